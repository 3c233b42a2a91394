//! Kept counts: how many jobs of each kind are in each state, kept on disk beside the
//! indexes and changed in the same sled batch as they are, so `stats` (what `/metrics`,
//! `/healthz` and `queuectl stats` read) costs the same at a million jobs as at ten.
//!
//! Every write goes through [`Batch`], which notes each `p`, `r`, `f` and `c` key it
//! writes or removes. When the batch is applied (under the write lock, `Queue::apply`)
//! the tree is asked what each of those keys held before, and the counts move by the
//! difference. So the counts follow the index entries themselves, whatever the call
//! meant to do: a key removed twice, or one that was never there, counts nothing; and
//! the invariant is simply "the kept counts equal a scan of the indexes", which `fsck`
//! checks (and `--repair` restores) with [`Queue::check_counts`].
//!
//! Ready and scheduled are one stored state (pending) told apart by the clock, so the
//! pending jobs are also counted by due time, in buckets at five widths (2³², 2²⁴,
//! 2¹⁶, 2⁸ and 1 ms). The pending jobs due by `now` are the sum of whole buckets before
//! `now` at each width, within the one bucket of the wider width that holds `now`: at
//! most 256 bucket keys read per width, whatever the number of jobs.
//!
//! Keys (all under `m`, the metadata prefix; `queue-schema/README.md`):
//!
//! | key | value | what |
//! |---|---|---|
//! | `m/k` code class | u64 BE | index entries of kind `code` in `class` (1 pending, 2 running, 3 done, 4 dead); code 0 class 5: quarantine entries |
//! | `m/d` code width due>>shift | u64 BE | pending entries of kind `code` whose due time, shifted right by `SHIFTS[width]`, is that |
//! | `m/counted` | u64 BE | `m/next_id` as of the last write of a build that keeps counts |
//!
//! A count that reaches zero is removed, so the bucket keys never outnumber the pending
//! jobs. A database without `m/counted`, or whose `m/next_id` moved on since (a build
//! that does not keep counts enqueued into it), has its counts computed once on open,
//! from a scan of the indexes, in one batch ([`recount`]).

use std::collections::{BTreeMap, HashMap};

use super::Storage as _;
use super::clock::Millis;
use super::keys;
use super::{JobKind, Result};

/// `m/k` code class → u64 BE.
pub(crate) const COUNT: &[u8] = b"m/k";
/// `m/d` code width bucket(8) → u64 BE.
pub(crate) const DUE: &[u8] = b"m/d";
/// `m/counted` → u64 BE: `m/next_id` when the counts were last kept.
pub(crate) const COUNTED: &[u8] = b"m/counted";

pub(crate) const PENDING: u8 = 1;
pub(crate) const RUNNING: u8 = 2;
pub(crate) const DONE: u8 = 3;
pub(crate) const DEAD: u8 = 4;
pub(crate) const QUARANTINED: u8 = 5;

/// Bucket widths of the due-time counts, widest first (a width's bucket holds 2^shift
/// ms). Consecutive widths differ by 8 bits: at most 256 buckets of one inside one of
/// the next wider.
pub(crate) const SHIFTS: [u32; 5] = [32, 24, 16, 8, 0];

pub(crate) fn count_key(code: u8, class: u8) -> [u8; 5] {
    [COUNT[0], COUNT[1], COUNT[2], code, class]
}

pub(crate) fn due_key(code: u8, width: u8, bucket: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..3].copy_from_slice(DUE);
    k[3] = code;
    k[4] = width;
    k[5..].copy_from_slice(&bucket.to_be_bytes());
    k
}

/// True for the keys this module writes.
pub(crate) fn is_count_key(key: &[u8]) -> bool {
    (key.len() == 5 && key.starts_with(COUNT))
        || (key.len() == 13 && key.starts_with(DUE))
        || key == COUNTED
}

/// The name of a class, for people.
pub(crate) fn class_name(class: u8) -> &'static str {
    match class {
        PENDING => "pending",
        RUNNING => "running",
        DONE => "done",
        DEAD => "dead",
        QUARANTINED => "quarantined",
        _ => "unknown",
    }
}

/// The counts an index (or quarantine) entry adds to, as `stats` always counted them: a
/// `p` key of the right length (kind from the key), an `r` key with a value (kind from
/// the value), an `f` key of the right length with a value (state 1 done, any other
/// dead), any `c` key. Calls `add` with each count key.
pub(crate) fn counted_by(key: &[u8], value: &[u8], mut add: impl FnMut(&[u8])) {
    match key.first() {
        Some(&keys::PENDING) => {
            if let Some((code, due, _)) = keys::parse_pending(key) {
                add(&count_key(code, PENDING));
                for (w, &shift) in SHIFTS.iter().enumerate() {
                    add(&due_key(code, w as u8, due >> shift));
                }
            }
        }
        Some(&keys::RUNNING) => {
            if let Some(&code) = value.first() {
                add(&count_key(code, RUNNING));
            }
        }
        Some(&keys::FINISHED) => {
            if let (Some((state, _, _)), Some(&code)) = (keys::parse_finished(key), value.first()) {
                let class = if state == keys::FINISHED_DONE {
                    DONE
                } else {
                    DEAD
                };
                add(&count_key(code, class));
            }
        }
        Some(&keys::QUARANTINE) => add(&count_key(0, QUARANTINED)),
        _ => {}
    }
}

fn tracked(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(&(keys::PENDING | keys::RUNNING | keys::FINISHED | keys::QUARANTINE))
    )
}

/// A sled batch that keeps the counts: every write of the queue goes through one.
/// It keeps its writes in order until it is applied, so one batch can be appended to
/// another (the write combiner builds each operation's writes apart, and adds them to
/// the group's only if the operation succeeds).
#[derive(Default)]
pub(crate) struct Batch {
    /// Writes (`Some`) and removals (`None`), in order; the last one of a key wins.
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Set on the counts directly (fsck's corrections), on top of what `ops` do.
    adjust: BTreeMap<Vec<u8>, i64>,
}

impl Batch {
    pub(crate) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    /// [`Batch::insert`] of a record built for this write: moved in, not copied (a job's
    /// record can be megabytes).
    pub(crate) fn put(&mut self, key: impl AsRef<[u8]>, record: Vec<u8>) {
        self.ops.push((key.as_ref().to_vec(), Some(record)));
    }

    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    /// Moves the count under `key` by `delta` (fsck's corrections).
    pub(crate) fn adjust(&mut self, key: &[u8], delta: i64) {
        *self.adjust.entry(key.to_vec()).or_default() += delta;
    }

    /// Adds `other`'s writes after this one's.
    pub(crate) fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
        for (k, d) in other.adjust {
            *self.adjust.entry(k).or_default() += d;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.adjust.is_empty()
    }

    /// The sled batch to apply: this one's writes and the counts they move, read from
    /// `db` as it is before the batch (the caller holds the write lock).
    pub(crate) fn resolve(self, db: &sled::Db) -> sled::Result<sled::Batch> {
        let mut sled = sled::Batch::default();
        // Counted keys as the batch leaves them, and `m/next_id` if it is written.
        let mut last: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
        let mut next_id = None;
        for (k, v) in &self.ops {
            if tracked(k) {
                last.insert(k, v.as_deref());
            } else if k.as_slice() == keys::META_NEXT_ID {
                next_id = v.as_deref();
            }
            match v {
                Some(v) => sled.insert(k.as_slice(), v.as_slice()),
                None => sled.remove(k.as_slice()),
            }
        }
        let mut deltas = self.adjust.clone();
        for (key, after) in last {
            if let Some(before) = db.get(key)? {
                counted_by(key, &before, |k| {
                    *deltas.entry(k.to_vec()).or_default() -= 1;
                });
            }
            if let Some(after) = after {
                counted_by(key, after, |k| {
                    *deltas.entry(k.to_vec()).or_default() += 1;
                });
            }
        }
        for (key, delta) in deltas {
            if delta == 0 {
                continue;
            }
            let now = db.get(&key)?.and_then(|v| value(&v)).unwrap_or(0);
            // Below zero only if the counts were wrong already (a tampered database):
            // `fsck` says so and `--repair` sets them right.
            let new = (i128::from(now) + i128::from(delta)).clamp(0, i128::from(u64::MAX)) as u64;
            if new == 0 {
                sled.remove(key);
            } else {
                sled.insert(key, &new.to_be_bytes());
            }
        }
        if let Some(n) = next_id {
            sled.insert(COUNTED, n);
        }
        Ok(sled)
    }
}

/// Count key → count.
pub(crate) type Counts = BTreeMap<Vec<u8>, u64>;

/// What a scan of the indexes and the quarantine counts: count key → count.
pub(crate) fn scan(db: &sled::Db) -> Result<BTreeMap<Vec<u8>, u64>> {
    let mut out: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for prefix in [
        keys::PENDING,
        keys::RUNNING,
        keys::FINISHED,
        keys::QUARANTINE,
    ] {
        for entry in db.scan_prefix([prefix]) {
            let (k, v) = entry.storage()?;
            counted_by(&k, &v, |ck| *out.entry(ck.to_vec()).or_default() += 1);
        }
    }
    Ok(out)
}

/// A count's value: 8 bytes, big-endian; anything else is not a count (`None`).
pub(crate) fn value(v: &[u8]) -> Option<u64> {
    if v.len() == 8 { keys::be_u64(v) } else { None }
}

/// The counts as kept: count key → count. A value that is not a count reads as 0 (as
/// a batch reads it before changing it) and its key is in the second list.
pub(crate) fn kept(db: &sled::Db) -> Result<(Counts, Vec<Vec<u8>>)> {
    let mut out = BTreeMap::new();
    let mut malformed = Vec::new();
    for prefix in [COUNT, DUE] {
        for entry in db.scan_prefix(prefix) {
            let (k, v) = entry.storage()?;
            let n = value(&v).unwrap_or_else(|| {
                malformed.push(k.to_vec());
                0
            });
            out.insert(k.to_vec(), n);
        }
    }
    Ok((out, malformed))
}

/// True when the counts are the ones this build keeps: `m/counted` equals `m/next_id`.
pub(crate) fn current(db: &sled::Db) -> Result<bool> {
    let counted = db.get(COUNTED).storage()?;
    let next = db.get(keys::META_NEXT_ID).storage()?;
    Ok(match (counted, next) {
        (Some(c), Some(n)) => c == n,
        // No job was ever enqueued: counted once is enough.
        (Some(_), None) => true,
        (None, _) => false,
    })
}

/// Counts the indexes and writes the counts (replacing any there were) in one batch.
/// Returns how many entries were counted.
pub(crate) fn recount(db: &sled::Db) -> Result<u64> {
    let scanned = scan(db)?;
    let mut b = sled::Batch::default();
    for prefix in [COUNT, DUE] {
        for k in db.scan_prefix(prefix).keys() {
            b.remove(k.storage()?);
        }
    }
    let mut entries = 0;
    for (k, n) in &scanned {
        if k.starts_with(COUNT) {
            entries += n;
        }
        b.insert(k.as_slice(), &n.to_be_bytes());
    }
    let next = db
        .get(keys::META_NEXT_ID)
        .storage()?
        .map_or_else(|| 0u64.to_be_bytes().to_vec(), |v| v.to_vec());
    b.insert(COUNTED, next);
    db.apply_batch(b).storage()?;
    Ok(entries)
}

/// One kind's count in `class`.
pub(crate) fn count(db: &sled::Db, code: u8, class: u8) -> Result<u64> {
    Ok(db
        .get(count_key(code, class))
        .storage()?
        .and_then(|v| value(&v))
        .unwrap_or(0))
}

/// Pending jobs of `code` due at or before `now`, from the due-time buckets.
pub(crate) fn due_by(db: &sled::Db, code: u8, now: Millis) -> Result<u64> {
    let mut n = 0u64;
    for (w, &shift) in SHIFTS.iter().enumerate() {
        // Buckets of this width inside the wider bucket that holds `now`, before the
        // one that holds `now`; the narrowest width takes `now`'s own bucket too.
        let lo = match w {
            0 => 0,
            _ => (now >> SHIFTS[w - 1]) << (SHIFTS[w - 1] - shift),
        };
        let hi = now >> shift;
        let start = due_key(code, w as u8, lo);
        let end = due_key(code, w as u8, hi);
        let range = if shift == 0 {
            db.range(start..=end)
        } else {
            db.range(start..end)
        };
        for v in range.values() {
            n = n.saturating_add(value(&v.storage()?).unwrap_or(0));
        }
    }
    Ok(n)
}

/// Renders a count key for people: `m/k/webhook/pending`, `m/d/webhook/3/123`.
pub(crate) fn display(key: &[u8], kinds: &[JobKind]) -> String {
    let kind = |code: u8| match (code, super::kind::by_code(kinds, code)) {
        (_, Some(k)) => k.to_string(),
        (0, None) => "-".to_string(),
        (c, None) => format!("kind{c}"),
    };
    if key.len() == 5 && key.starts_with(COUNT) {
        format!("m/k/{}/{}", kind(key[3]), class_name(key[4]))
    } else if key.len() == 13 && key.starts_with(DUE) {
        format!(
            "m/d/{}/{}/{}",
            kind(key[3]),
            key[4],
            keys::be_u64(&key[5..]).unwrap_or_default()
        )
    } else {
        String::from_utf8_lossy(key).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket arithmetic against a plain count, for due times around `now` at every
    /// width.
    #[test]
    fn due_buckets_count_exactly_what_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let now: Millis = 1_767_225_600_123;
        let mut dues = Vec::new();
        for d in [
            0u64,
            1,
            255,
            256,
            257,
            65_535,
            65_536,
            (1 << 24) + 5,
            (1 << 32) + 7,
            1 << 40,
        ] {
            dues.push(now.saturating_sub(d));
            dues.push(now.saturating_add(d));
        }
        dues.push(0);
        dues.push(u64::MAX);
        let mut b = Batch::default();
        for (id, &due) in dues.iter().enumerate() {
            b.insert(
                keys::pending(JobKind::new(4, "webhook"), due, id as u64),
                b"",
            );
        }
        db.apply_batch(b.resolve(&db).unwrap()).unwrap();
        for probe in [now - 300, now - 1, now, now + 1, now + 70_000, 0, u64::MAX] {
            let want = dues.iter().filter(|&&d| d <= probe).count() as u64;
            assert_eq!(due_by(&db, 4, probe).unwrap(), want, "due by {probe}");
        }
        assert_eq!(count(&db, 4, PENDING).unwrap(), dues.len() as u64);
        assert_eq!(kept(&db).unwrap(), (scan(&db).unwrap(), Vec::new()));
    }
}
