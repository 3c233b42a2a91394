//! A kind of job, as the queue knows it: a one-byte code and a name, given by the
//! product. The code is part of the on-disk key layout (see `queue-schema/`), so the
//! product never reuses or renumbers one; the name is what config, logs and `queuectl`
//! show. The queue holds no list of kinds of its own: it is given one in
//! [`Settings`](crate::Settings), and a record whose code is not in it is unreadable
//! ([`RecordError::UnknownKind`](crate::RecordError::UnknownKind)).

use std::fmt;

use serde::{Serialize, Serializer};

/// Ordered by code (then name, which is unique per code in any one list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKind {
    code: u8,
    name: &'static str,
}

impl JobKind {
    pub const fn new(code: u8, name: &'static str) -> JobKind {
        JobKind { code, name }
    }

    /// The on-disk code. Stable forever.
    pub const fn code(self) -> u8 {
        self.code
    }

    /// The name used in config (`[queue.kinds.NAME]`), logs and `queuectl`.
    pub const fn as_str(self) -> &'static str {
        self.name
    }
}

/// The kind with this code among `kinds`.
pub(crate) fn by_code(kinds: &[JobKind], code: u8) -> Option<JobKind> {
    kinds.iter().copied().find(|k| k.code == code)
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// As its name, which is what JSON views and `queuectl --json` show. Reading a name back
/// needs the list of kinds, so there is no `Deserialize`: see
/// [`Settings::named`](crate::Settings::named).
impl Serialize for JobKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}
