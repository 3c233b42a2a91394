//! What the demo prints, and how it waits: a condition polled until a deadline, with a
//! progress line meanwhile (a `\r` spinner with the seconds elapsed on a terminal; a
//! plain line every few seconds otherwise, so a CI log shows it is alive).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How long one step may take before the demo gives up on it.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a condition is checked.
const POLL: Duration = Duration::from_millis(100);
/// Without a terminal: a "still waiting" line this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// One poll of a condition.
pub(crate) enum Check<T> {
    /// It happened; here is what was seen.
    Done(T),
    /// Not yet; what was seen instead (named in the error on timeout).
    NotYet(String),
}

/// A step that did not reach its outcome: which, what was awaited, what was seen.
#[derive(Debug)]
pub(crate) struct StepFailed(pub String);

impl std::fmt::Display for StepFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StepFailed {}

pub(crate) fn tty() -> bool {
    std::io::stdout().is_terminal()
}

/// A numbered step's heading.
pub(crate) fn step(n: usize, title: &str) {
    println!("\n{n}. {title}");
}

/// One line of what happened, indented under its step.
pub(crate) fn said(text: impl AsRef<str>) {
    println!("   {}", text.as_ref());
}

/// An outcome reached.
pub(crate) fn ok(text: impl AsRef<str>) {
    println!("   ✓ {}", text.as_ref());
}

/// Polls `check` until it is done or `timeout` passes, showing `what` as the progress
/// line. On timeout: `StepFailed` naming `what`, the time, and the last thing seen.
pub(crate) async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check<T>>,
{
    let started = Instant::now();
    let tty = tty();
    let mut next_plain = started + PLAIN_EVERY;
    let mut frame = 0usize;
    loop {
        let seen = match check().await {
            Check::Done(v) => {
                if tty {
                    // Erase the progress line.
                    print!("\r\x1b[2K");
                    let _ = std::io::stdout().flush();
                }
                return Ok(v);
            }
            Check::NotYet(seen) => seen,
        };
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            if tty {
                println!();
            }
            return Err(StepFailed(format!(
                "gave up after {}s waiting for: {what}; last seen: {seen}",
                elapsed.as_secs()
            ))
            .into());
        }
        if tty {
            print!(
                "\r\x1b[2K   {} {what} … {:.1}s",
                SPINNER[frame % SPINNER.len()],
                elapsed.as_secs_f64()
            );
            let _ = std::io::stdout().flush();
            frame += 1;
        } else if Instant::now() >= next_plain {
            println!("   … still waiting ({}s): {what}", elapsed.as_secs());
            next_plain += PLAIN_EVERY;
        }
        // Polling an outside observation (the core, the panel, the relay): they say
        // nothing when they change.
        tokio::time::sleep(POLL).await;
    }
}

/// `1234567` → `1,234,567`.
pub(crate) fn bytes(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_are_grouped() {
        assert_eq!(super::bytes(0), "0");
        assert_eq!(super::bytes(999), "999");
        assert_eq!(super::bytes(1000), "1,000");
        assert_eq!(super::bytes(1048576), "1,048,576");
    }
}
