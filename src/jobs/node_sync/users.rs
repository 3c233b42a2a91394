//! A node's users as compact as they can be held: every UUID once, sorted, 16 bytes each,
//! and the rare user with more than a UUID (an email, a flow, a level) on the side.
//!
//! Issue 15: at 100,000 users a node's list is 1.6 MB this way, against 7.2 MB as a
//! `Vec<User>` (72 bytes a user, most of them three `None`s). Node sync, its state,
//! its removal guard and xray_apply's reconcile all hold this one form, and compare
//! lists by merging the sorted UUIDs ([`merge`]) rather than building sets.
//!
//! Serialised exactly as the `Vec<User>` it replaces (a sequence of user records, in
//! UUID order), so the state records written before it read unchanged and the records
//! it writes read in an older build.

use std::cmp::Ordering;
use std::fmt;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::userlist::User;

/// What a user has beyond its UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extra {
    email: Option<String>,
    flow: Option<String>,
    level: Option<u32>,
}

/// One user of a [`Users`], borrowed. Serialises like [`User`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserRef<'a> {
    pub uuid: Uuid,
    pub email: Option<&'a str>,
    pub flow: Option<&'a str>,
    pub level: Option<u32>,
}

impl UserRef<'_> {
    fn bare(uuid: Uuid) -> Self {
        UserRef {
            uuid,
            email: None,
            flow: None,
            level: None,
        }
    }

    pub fn to_user(self) -> User {
        User {
            uuid: self.uuid,
            email: self.email.map(str::to_string),
            flow: self.flow.map(str::to_string),
            level: self.level,
        }
    }
}

impl User {
    /// This user, borrowed as a [`Users`] hands them out.
    pub fn view(&self) -> UserRef<'_> {
        UserRef {
            uuid: self.uuid,
            email: self.email.as_deref(),
            flow: self.flow.as_deref(),
            level: self.level,
        }
    }

    /// The UUID, and the rest when there is any.
    fn split(self) -> (Uuid, Option<Extra>) {
        let extra = (self.email.is_some() || self.flow.is_some() || self.level.is_some())
            .then_some(Extra {
                email: self.email,
                flow: self.flow,
                level: self.level,
            });
        (self.uuid, extra)
    }
}

/// Users sorted by UUID, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users {
    /// Every user's UUID, sorted, each once.
    uuids: Vec<Uuid>,
    /// The users with more than a UUID, sorted by UUID (a subset of `uuids`).
    extras: Vec<(Uuid, Extra)>,
}

impl Users {
    pub fn len(&self) -> usize {
        self.uuids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uuids.is_empty()
    }

    /// Every UUID, sorted, each once.
    pub fn uuids(&self) -> &[Uuid] {
        &self.uuids
    }

    pub fn contains(&self, uuid: &Uuid) -> bool {
        self.uuids.binary_search(uuid).is_ok()
    }

    /// The user with `uuid`, if there is one.
    pub fn get(&self, uuid: &Uuid) -> Option<UserRef<'_>> {
        self.contains(uuid).then(|| self.user(*uuid))
    }

    fn user(&self, uuid: Uuid) -> UserRef<'_> {
        match self.extras.binary_search_by_key(&uuid, |(u, _)| *u) {
            Ok(i) => Self::with(uuid, &self.extras[i].1),
            Err(_) => UserRef::bare(uuid),
        }
    }

    fn with(uuid: Uuid, e: &Extra) -> UserRef<'_> {
        UserRef {
            uuid,
            email: e.email.as_deref(),
            flow: e.flow.as_deref(),
            level: e.level,
        }
    }

    /// The users in UUID order.
    pub fn iter(&self) -> impl Iterator<Item = UserRef<'_>> + '_ {
        let mut extras = self.extras.iter().peekable();
        self.uuids
            .iter()
            .map(move |&uuid| match extras.next_if(|(u, _)| *u == uuid) {
                Some((_, e)) => Self::with(uuid, e),
                None => UserRef::bare(uuid),
            })
    }

    /// The users, owned (for a caller that wants `User`s; the list itself never does).
    pub fn to_vec(&self) -> Vec<User> {
        self.iter().map(UserRef::to_user).collect()
    }

    /// Appends a user whose UUID sorts after every one so far.
    fn push_last(&mut self, uuid: Uuid, extra: Option<Extra>) {
        debug_assert!(self.uuids.last().is_none_or(|l| *l < uuid));
        self.uuids.push(uuid);
        if let Some(e) = extra {
            self.extras.push((uuid, e));
        }
    }

    /// Builds the list from keys `(uuid, position)` of users in any order, and the
    /// extras of some of them by position (sorted by position). Of a repeated UUID the
    /// first position is kept; returns the list and how many repeats were left out.
    fn from_keyed(mut keys: Vec<(Uuid, u32)>, mut extras: Vec<(u32, Extra)>) -> (Users, usize) {
        keys.sort_unstable();
        let mut out = Users {
            uuids: Vec::with_capacity(keys.len()),
            extras: Vec::new(),
        };
        let mut duplicates = 0;
        for (uuid, pos) in keys {
            if out.uuids.last() == Some(&uuid) {
                duplicates += 1;
                continue;
            }
            let extra = extras
                .binary_search_by_key(&pos, |(p, _)| *p)
                .ok()
                .map(|i| std::mem::replace(&mut extras[i].1, Extra::NONE));
            out.push_last(uuid, extra);
        }
        out.extras.shrink_to_fit();
        (out, duplicates)
    }
}

impl Extra {
    const NONE: Extra = Extra {
        email: None,
        flow: None,
        level: None,
    };
}

/// What [`Users::from_keyed`] takes: users as read, in the answer's order.
#[derive(Debug, Default)]
pub(crate) struct Keyed {
    keys: Vec<(Uuid, u32)>,
    extras: Vec<(u32, Extra)>,
}

impl Keyed {
    pub fn with_capacity(n: usize) -> Self {
        Keyed {
            keys: Vec::with_capacity(n),
            extras: Vec::new(),
        }
    }

    /// Adds the user at `pos` (positions increase with each call).
    pub fn push(&mut self, pos: u32, user: User) {
        let (uuid, extra) = user.split();
        self.keys.push((uuid, pos));
        if let Some(e) = extra {
            self.extras.push((pos, e));
        }
    }

    /// The list, and how many repeated UUIDs were left out.
    pub fn finish(self) -> (Users, usize) {
        Users::from_keyed(self.keys, self.extras)
    }
}

impl FromIterator<User> for Users {
    /// Users in any order; of a repeated UUID the first is kept.
    fn from_iter<I: IntoIterator<Item = User>>(iter: I) -> Self {
        let mut k = Keyed::default();
        for (pos, u) in iter.into_iter().enumerate() {
            k.push(pos as u32, u);
        }
        k.finish().0
    }
}

impl From<Vec<User>> for Users {
    fn from(users: Vec<User>) -> Self {
        users.into_iter().collect()
    }
}

impl Serialize for Users {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Users {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Users;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of users")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Users, A::Error> {
                // Written sorted and de-duplicated; a record that is not (none this
                // program wrote) is sorted here rather than trusted.
                let mut out = Users {
                    uuids: Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20)),
                    extras: Vec::new(),
                };
                let mut rest = Keyed::default();
                while let Some(u) = seq.next_element::<User>()? {
                    if rest.keys.is_empty() && out.uuids.last().is_none_or(|l| *l < u.uuid) {
                        let (uuid, extra) = u.split();
                        out.push_last(uuid, extra);
                    } else {
                        if rest.keys.is_empty() {
                            for (pos, u) in
                                std::mem::take(&mut out).to_vec().into_iter().enumerate()
                            {
                                rest.push(pos as u32, u);
                            }
                        }
                        let pos = rest.keys.len() as u32;
                        rest.push(pos, u);
                    }
                }
                if rest.keys.is_empty() {
                    Ok(out)
                } else {
                    Ok(rest.finish().0)
                }
            }
        }
        d.deserialize_seq(V)
    }
}

/// One UUID of a merge of two sorted, de-duplicated lists: in the left one only, in
/// both, or in the right one only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged<T> {
    Left(T),
    Both(T),
    Right(T),
}

/// Walks two sorted, de-duplicated slices together, in order: a diff in one pass, with
/// no set built.
pub fn merge<'a, T: Ord + Copy>(
    left: &'a [T],
    right: &'a [T],
) -> impl Iterator<Item = Merged<T>> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || match (left.get(i), right.get(j)) {
        (Some(&l), Some(&r)) => Some(match l.cmp(&r) {
            Ordering::Less => {
                i += 1;
                Merged::Left(l)
            }
            Ordering::Equal => {
                i += 1;
                j += 1;
                Merged::Both(l)
            }
            Ordering::Greater => {
                j += 1;
                Merged::Right(r)
            }
        }),
        (Some(&l), None) => {
            i += 1;
            Some(Merged::Left(l))
        }
        (None, Some(&r)) => {
            j += 1;
            Some(Merged::Right(r))
        }
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn user(n: u128, flow: Option<&str>) -> User {
        User {
            uuid: Uuid::from_u128(n),
            email: None,
            flow: flow.map(str::to_string),
            level: None,
        }
    }

    #[test]
    fn first_of_a_repeated_uuid_is_kept_and_extras_follow_their_user() {
        let users: Users = vec![
            user(3, None),
            user(1, Some("a")),
            user(3, Some("late")),
            user(2, None),
            user(1, Some("b")),
        ]
        .into();
        assert_eq!(
            users.to_vec(),
            [user(1, Some("a")), user(2, None), user(3, None)]
        );
        assert_eq!(
            users.get(&Uuid::from_u128(1)).and_then(|u| u.flow),
            Some("a")
        );
        assert!(users.get(&Uuid::from_u128(4)).is_none());
        // A user whose extras are all empty is a bare UUID, so equal lists are equal.
        let bare: Users = vec![user(1, None)].into();
        assert_eq!(bare, Users::from(vec![user(1, None)]));
        assert!(bare.extras.is_empty());
    }

    #[test]
    fn an_unsorted_record_reads_sorted() {
        let old = vec![user(5, Some("x")), user(2, None), user(5, None)];
        let json = serde_json::to_vec(&old).unwrap();
        let back: Users = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.to_vec(), [user(2, None), user(5, Some("x"))]);
    }

    fn uuids() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..40, 0..60)
    }

    fn sorted(v: &[u8]) -> Vec<Uuid> {
        v.iter()
            .map(|&n| Uuid::from_u128(u128::from(n)))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    proptest! {
        /// The merge says what the set operations say.
        #[test]
        fn merge_is_the_set_difference_and_intersection(a in uuids(), b in uuids()) {
            let (l, r) = (sorted(&a), sorted(&b));
            let (ls, rs): (BTreeSet<Uuid>, BTreeSet<Uuid>) =
                (l.iter().copied().collect(), r.iter().copied().collect());
            let (mut left, mut both, mut right) = (Vec::new(), Vec::new(), Vec::new());
            let mut all = Vec::new();
            for m in merge(&l, &r) {
                match m {
                    Merged::Left(u) => left.push(u),
                    Merged::Both(u) => both.push(u),
                    Merged::Right(u) => right.push(u),
                }
                all.push(match m { Merged::Left(u) | Merged::Both(u) | Merged::Right(u) => u });
            }
            prop_assert_eq!(left, ls.difference(&rs).copied().collect::<Vec<_>>());
            prop_assert_eq!(both, ls.intersection(&rs).copied().collect::<Vec<_>>());
            prop_assert_eq!(right, rs.difference(&ls).copied().collect::<Vec<_>>());
            prop_assert_eq!(all, ls.union(&rs).copied().collect::<Vec<_>>());
        }

        /// The compact list holds what a sorted, de-duplicated `Vec<User>` (first kept)
        /// holds, and is written with the same bytes.
        #[test]
        fn compact_list_is_the_vec_it_replaced(
            items in proptest::collection::vec((0u8..30, proptest::option::of(0u32..3)), 0..50)
        ) {
            let input: Vec<User> = items
                .iter()
                .map(|&(n, level)| User { level, ..user(u128::from(n), None) })
                .collect();
            let mut want = input.clone();
            want.sort_by_key(|u| u.uuid);
            want.dedup_by_key(|u| u.uuid);
            let users = Users::from(input);
            prop_assert_eq!(users.to_vec(), want.clone());
            prop_assert_eq!(users.len(), want.len());
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&users, cfg).unwrap();
            prop_assert_eq!(&bytes, &bincode::serde::encode_to_vec(&want, cfg).unwrap());
            let (back, _): (Users, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(back, users);
        }
    }
}
