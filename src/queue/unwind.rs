//! Keeping sled's panics inside the queue.
//!
//! sled 0.34.7 panics instead of returning an error on some damage to its own files: a
//! log segment whose header was overwritten leaves a hole in its page table, and the
//! snapshot it writes while opening then stops at `serialization.rs` ("tried to
//! serialize Uninitialized"). A panic is never how the queue reports a damaged file:
//! [`guarded`] runs a piece of sled work under `catch_unwind` and turns a panic into
//! the message it carried, for a typed error that names the database and what to do.
//!
//! The default panic hook would still print the panic and a backtrace hint on stderr
//! before the unwind reaches us. So the first guarded call installs a hook of our own
//! in front of the one that was there: a panic on a thread that is inside [`guarded`]
//! is only recorded (it becomes the error); a panic raised in sled's own code on another
//! thread (sled's thread pool catches those itself) becomes one `error` log line; every
//! other panic goes to the previous hook, as before.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::sync::Once;

thread_local! {
    /// Depth of [`guarded`] calls on this thread.
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// Where the last panic on this thread came from, recorded by the hook.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// A panic caught by [`guarded`]: its message and where sled raised it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Panicked(String);

/// Runs `f`; a panic inside it comes back as `Err` with its message and where sled
/// raised it (`sled-0.34.7/src/serialization.rs:662: tried to serialize Uninitialized`).
///
/// What `f` touched may be left half-done: callers only use this around work whose
/// results they throw away on error (opening a database, reading it for a salvage).
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    install_hook();
    GUARDED.with(|g| g.set(g.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    result.map_err(|payload| {
        let message = message(payload.as_ref());
        Panicked(match LOCATION.with(|l| l.borrow_mut().take()) {
            Some(at) => format!("{at}: {message}"),
            None => message,
        })
    })
}

fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// `sled-0.34.7/src/x.rs:12` from a full registry path; other paths as they are.
fn short_location(info: &PanicHookInfo<'_>) -> Option<String> {
    info.location().map(|l| {
        let file = l.file();
        let file = file
            .find("sled-")
            .map_or(file, |at| &file[at..])
            .to_string();
        format!("{file}:{}", l.line())
    })
}

fn in_sled(info: &PanicHookInfo<'_>) -> bool {
    info.location()
        .is_some_and(|l| l.file().contains("/sled-") || l.file().starts_with("sled-"))
}

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) > 0 {
                LOCATION.with(|l| *l.borrow_mut() = short_location(info));
            } else if in_sled(info) {
                let payload = info.payload();
                tracing::error!(
                    at = short_location(info).unwrap_or_default(),
                    error = message(payload),
                    "the storage engine (sled) failed in one of its threads; if the queue misbehaves, stop connector and run `queuectl salvage --to DIR`"
                );
            } else {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        let r: Result<(), Panicked> = guarded(|| panic!("tried to serialize {}", "Uninitialized"));
        let e = r.unwrap_err().to_string();
        assert!(e.ends_with("tried to serialize Uninitialized"), "{e}");
        assert!(e.contains("unwind.rs:"), "{e}");
        assert_eq!(guarded(|| 7), Ok(7));
    }
}
