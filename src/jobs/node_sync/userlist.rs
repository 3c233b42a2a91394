//! The panel's allowed-user list: the body shapes it may answer with, validated into a
//! sorted, de-duplicated list.
//!
//! What is an answer and what is a broken one (fail static: a broken answer is an
//! error, never "no users"):
//! - a body of the wrong shape is broken;
//! - a list with items of which none is a valid user is broken (`[1,2,3]`, `[null]`,
//!   `["nope"]`): a panel that means "nobody" says `[]`;
//! - a list where more than half of the items are invalid is broken too: a panel
//!   emitting mostly garbage is failing, and what little parses is not its list;
//! - otherwise it is an answer: invalid items (at most half) are skipped and reported;
//! - an explicitly empty list (`[]`, `{"uuids": []}`) is a valid answer: nobody is
//!   allowed. `sync.max_removal_ratio` is the guard against a panel that says so wrongly.

use std::fmt;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::users::Keyed;
pub use super::users::{Merged, UserRef, Users, merge};

/// One allowed user. Stored with bincode (node sync state), so no field may be skipped
/// when serialising: bincode is not self-describing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Canonical form: lowercase, hyphenated.
    pub uuid: Uuid,
    pub email: Option<String>,
    pub flow: Option<String>,
    pub level: Option<u32>,
}

/// An item that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Position in the answer's list.
    pub index: usize,
    pub reason: InvalidItem,
}

/// Why one item of the answer's list is not a user. The texts are what the log says
/// (`describe` of a JSON value, a UUID shown at most 40 characters, escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidItem {
    #[error("\"{shown}\" is not a UUID")]
    NotAUuid { shown: String },
    #[error("object has no `uuid`")]
    NoUuid,
    #[error("`{field}` is {found}")]
    Field { field: &'static str, found: String },
    #[error("`level` {0} is not a small whole number")]
    Level(String),
    #[error("{0}, not a UUID string or an object with `uuid`")]
    NotAUser(String),
}

/// A validated list: users sorted by UUID, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserList {
    /// How many items the answer's list had, valid or not.
    pub items: usize,
    pub users: Users,
    pub skipped: Vec<Skipped>,
    /// How many items repeated a UUID already in the list.
    pub duplicates: usize,
}

/// How many offending items an error or a log line names.
pub const EXAMPLES: usize = 3;

/// Why a body is not a user list (a broken answer: the last good list stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("the body is empty")]
    Empty,
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error(
        "the body is JSON but not a user list (expected an array, or an object with `uuids`, optionally under `data`; got {0})"
    )]
    WrongShape(String),
    #[error("the list has {items} items and none is a valid user ({})", examples(.first))]
    NoValidUser {
        items: usize,
        /// The first few offending items.
        first: Vec<Skipped>,
    },
    #[error(
        "{invalid} of the list's {items} items are not valid users, more than half ({})",
        examples(.first)
    )]
    MostlyInvalid {
        items: usize,
        invalid: usize,
        /// The first few offending items.
        first: Vec<Skipped>,
    },
}

/// `item 0: …; item 3: …` for the first [`EXAMPLES`] of `skipped`.
pub fn examples(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .take(EXAMPLES)
        .map(|s| format!("item {}: {}", s.index, s.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the log names a JSON value of the wrong kind: its type, and for an object its
/// first five keys (in sorted order, as a JSON object's keys are kept).
fn describe_keys(mut keys: Vec<String>) -> String {
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(5);
    format!("an object with keys [{}]", keys.join(", "))
}

/// Parses and validates a panel answer in one pass over the body, without building a
/// JSON tree: a 100,000-user answer is read as it is parsed (issue 15), with the same
/// answers and errors as reading it into a `serde_json::Value` first (a test compares
/// the two on hostile bodies).
pub fn parse(body: &[u8]) -> Result<UserList, ShapeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ShapeError::Empty);
    }
    // JSON gives no length for a list: the body's size bounds it (an item is a quoted
    // 36-character UUID and a comma, 39 bytes at least), so the users' vector is sized
    // once instead of doubling its way up.
    CAPACITY.set(body.len() / 39);
    let top: Top = serde_json::from_slice(body).map_err(|e| ShapeError::NotJson(e.to_string()))?;
    let items = match top {
        Top::List(items) => items,
        Top::Object { uuids, data, keys } => match (uuids, data) {
            (Some(List::Items(items)), _) => items,
            (Some(List::Other(what)), _) => {
                return Err(ShapeError::WrongShape(format!("`uuids` is {what}")));
            }
            (
                None,
                Some(Data::Object {
                    uuids: Some(List::Items(items)),
                    ..
                }),
            ) => items,
            (
                None,
                Some(Data::Object {
                    uuids: Some(List::Other(what)),
                    ..
                }),
            ) => {
                return Err(ShapeError::WrongShape(format!("`uuids` is {what}")));
            }
            (None, Some(Data::Object { uuids: None, keys })) => {
                return Err(ShapeError::WrongShape(format!(
                    "`data` is {}",
                    describe_keys(keys)
                )));
            }
            (None, Some(Data::Other) | None) => {
                return Err(ShapeError::WrongShape(describe_keys(keys)));
            }
        },
        Top::Other(what) => return Err(ShapeError::WrongShape(what.into())),
    };
    judge(validate(items))
}

/// The share rule: a list with items and no valid user, or with more invalid items than
/// valid ones (more than half), is a broken answer.
fn judge(list: UserList) -> Result<UserList, ShapeError> {
    let (items, invalid) = (list.items, list.skipped.len());
    let first = || list.skipped.iter().take(EXAMPLES).cloned().collect();
    if items > 0 && invalid == items {
        return Err(ShapeError::NoValidUser {
            items,
            first: first(),
        });
    }
    if invalid * 2 > items {
        return Err(ShapeError::MostlyInvalid {
            items,
            invalid,
            first: first(),
        });
    }
    Ok(list)
}

fn validate(read: Read) -> UserList {
    // Sorted as 20-byte (UUID, position) keys, so the first occurrence of a repeated
    // UUID is the one kept, and the list is built straight into its compact form.
    let (users, duplicates) = read.users.finish();
    UserList {
        items: read.items,
        users,
        skipped: read.skipped,
        duplicates,
    }
}

/// Accepts only the 36-character hyphenated form (any case). Braced, URN and
/// unhyphenated forms are refused: a core may treat them differently than we do.
fn parse_uuid(s: &str) -> Result<Uuid, InvalidItem> {
    // The message is built only on failure: this runs for every user of every sync.
    // At most 40 characters of it, escaped: the log is one line per event.
    let refuse = || {
        let head: String = s.chars().take(40).collect();
        let more = if s.chars().nth(40).is_some() {
            "…"
        } else {
            ""
        };
        InvalidItem::NotAUuid {
            shown: format!("{}{more}", head.escape_debug()),
        }
    };
    if s.len() != 36 {
        return Err(refuse());
    }
    Uuid::try_parse(s).map_err(|_| refuse())
}

// ---- the body's shapes, read straight from the JSON ----
//
// Each visitor takes any JSON value (`deserialize_any`) and turns what is not the shape
// it wants into a description instead of an error, so a wrong shape is a `ShapeError`
// with our words, and only broken JSON is serde_json's error.

/// The whole body: a list, an object (with `uuids`, or `data.uuids`), or anything else.
enum Top {
    List(Read),
    Object {
        /// The last `uuids` (a JSON object keeps the last of repeated keys).
        uuids: Option<List>,
        data: Option<Data>,
        /// Every key, for saying what the object was when it has neither.
        keys: Vec<String>,
    },
    Other(&'static str),
}

/// The value of a `uuids` key.
enum List {
    Items(Read),
    Other(String),
}

/// The value of a `data` key.
enum Data {
    Object {
        uuids: Option<List>,
        keys: Vec<String>,
    },
    Other,
}

/// One value of a field of a user object, or what it was instead.
enum Scalar {
    Str(String),
    Null,
    Number(serde_json::Number),
    Other(String),
}

macro_rules! describe_scalars {
    ($out:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out("a boolean"))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($out("null"))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($out("null"))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
    };
    ($out:expr, strings) => {
        describe_scalars!($out);
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($out("a string"))
        }
    };
}

/// A value read and thrown away. Not serde's `IgnoredAny`: serde_json skips that
/// without its nesting limit, and a body nested deeper than 128 must stay the error it
/// always was, not become an answer.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            describe_scalars!(|_: &str| Skip, strings);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
                drain_seq(seq).map(|()| Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
                drain_map(map).map(|_| Skip)
            }
        }
        d.deserialize_any(V)
    }
}

/// Drains a sequence (`an array`).
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Skip>()?.is_some() {}
    Ok(())
}

/// Drains a map, returning its keys.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Vec<String>, A::Error> {
    let mut keys = Vec::new();
    while let Some(k) = map.next_key::<String>()? {
        map.next_value::<Skip>()?;
        keys.push(k);
    }
    Ok(keys)
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other("a boolean".into()))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_i64<E>(self, n: i64) -> Result<Scalar, E> {
                Ok(Scalar::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Scalar, E> {
                // JSON has no NaN or infinity, so every f64 it gives is a Number.
                Ok(serde_json::Number::from_f64(n)
                    .map_or_else(|| Scalar::Other("a number".into()), Scalar::Number))
            }
            fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
                drain_seq(seq)?;
                Ok(Scalar::Other("an array".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
                Ok(Scalar::Other(describe_keys(drain_map(map)?)))
            }
        }
        d.deserialize_any(V)
    }
}

impl Scalar {
    fn describe(&self) -> String {
        match self {
            Scalar::Str(_) => "a string".into(),
            Scalar::Null => "null".into(),
            Scalar::Number(_) => "a number".into(),
            Scalar::Other(what) => what.clone(),
        }
    }
}

/// One item of the list: a user, or why it is not one.
struct Item(Result<User, InvalidItem>);

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list item")
            }
            describe_scalars!(|s: &str| Item(Err(InvalidItem::NotAUser(s.to_string()))));
            fn visit_str<E>(self, s: &str) -> Result<Item, E> {
                Ok(Item(user_of_uuid(s)))
            }
            fn visit_string<E>(self, s: String) -> Result<Item, E> {
                Ok(Item(user_of_uuid(&s)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item, A::Error> {
                drain_seq(seq)?;
                Ok(Item(Err(InvalidItem::NotAUser("an array".into()))))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                // The last of a repeated key counts, as in a JSON object.
                let (mut uuid, mut email, mut flow, mut level) = (None, None, None, None);
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match k.as_ref() {
                        "uuid" => uuid = Some(map.next_value::<Scalar>()?),
                        "email" => email = Some(map.next_value::<Scalar>()?),
                        "flow" => flow = Some(map.next_value::<Scalar>()?),
                        "level" => level = Some(map.next_value::<Scalar>()?),
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(Item(user_of_fields(uuid, email, flow, level)))
            }
        }
        d.deserialize_any(V)
    }
}

fn user_of_uuid(s: &str) -> Result<User, InvalidItem> {
    Ok(User {
        uuid: parse_uuid(s)?,
        email: None,
        flow: None,
        level: None,
    })
}

/// A user object's fields, checked in the order the log has always named them.
fn user_of_fields(
    uuid: Option<Scalar>,
    email: Option<Scalar>,
    flow: Option<Scalar>,
    level: Option<Scalar>,
) -> Result<User, InvalidItem> {
    let uuid = match uuid {
        Some(Scalar::Str(s)) => parse_uuid(&s)?,
        Some(other) => {
            return Err(InvalidItem::Field {
                field: "uuid",
                found: other.describe(),
            });
        }
        None => return Err(InvalidItem::NoUuid),
    };
    let text = |v: Option<Scalar>, field: &'static str| match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.is_empty() => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        Some(other) => Err(InvalidItem::Field {
            field,
            found: other.describe(),
        }),
    };
    let email = text(email, "email")?;
    let flow = text(flow, "flow")?;
    let level = match level {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Number(n)) => Some(
            n.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| InvalidItem::Level(n.to_string()))?,
        ),
        Some(other) => {
            return Err(InvalidItem::Field {
                field: "level",
                found: other.describe(),
            });
        }
    };
    Ok(User {
        uuid,
        email,
        flow,
        level,
    })
}

/// A list of items, or what the value was instead.
fn list_of<'de, D: Deserializer<'de>>(d: D) -> Result<List, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = List;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list")
        }
        describe_scalars!(|s: &str| List::Other(s.to_string()), strings);
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<List, A::Error> {
            Ok(List::Items(items(seq)?))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List, A::Error> {
            Ok(List::Other(describe_keys(drain_map(map)?)))
        }
    }
    d.deserialize_any(V)
}

thread_local! {
    /// How many users the body being parsed can hold at most ([`parse`]); taken by the
    /// first list read.
    static CAPACITY: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The list's items as read: users keyed by position in the answer's order, and the
/// invalid ones by position (not yet sorted nor de-duplicated: [`validate`]).
#[derive(Default)]
struct Read {
    items: usize,
    users: Keyed,
    skipped: Vec<Skipped>,
}

fn items<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Read, A::Error> {
    let hint = seq.size_hint().unwrap_or_else(|| CAPACITY.take());
    let mut out = Read {
        users: Keyed::with_capacity(hint.min(1 << 20)),
        ..Read::default()
    };
    while let Some(Item(item)) = seq.next_element::<Item>()? {
        match item {
            // Positions past u32 would need a list of 4 billion items in one body.
            Ok(u) => out.users.push(out.items as u32, u),
            Err(reason) => out.skipped.push(Skipped {
                index: out.items,
                reason,
            }),
        }
        out.items += 1;
    }
    Ok(out)
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        list_of(d)
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Data;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            describe_scalars!(|_: &str| Data::Other, strings);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Data, A::Error> {
                drain_seq(seq)?;
                Ok(Data::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Data, A::Error> {
                let (mut uuids, mut keys) = (None, Vec::new());
                while let Some(k) = map.next_key::<String>()? {
                    if k == "uuids" {
                        uuids = Some(map.next_value::<List>()?);
                    } else {
                        map.next_value::<Skip>()?;
                    }
                    keys.push(k);
                }
                Ok(Data::Object { uuids, keys })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a user list")
            }
            describe_scalars!(|s: &'static str| Top::Other(s), strings);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top, A::Error> {
                Ok(Top::List(items(seq)?))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let (mut uuids, mut data, mut keys) = (None, None, Vec::new());
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "uuids" => uuids = Some(map.next_value::<List>()?),
                        "data" => data = Some(map.next_value::<Data>()?),
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                    keys.push(k);
                }
                Ok(Top::Object { uuids, data, keys })
            }
        }
        d.deserialize_any(V)
    }
}

/// How many of `old` are not in `new`.
pub fn removed_count(old: &Users, new: &Users) -> usize {
    merge(old.uuids(), new.uuids())
        .filter(|m| matches!(m, Merged::Left(_)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10";
    const B: &str = "0a6f2b4e-1111-4c6e-9d1a-0b4f7a3c2d10";

    fn uuids(l: &UserList) -> Vec<String> {
        l.users.iter().map(|u| u.uuid.to_string()).collect()
    }

    #[test]
    fn users_survive_the_state_encoding() {
        let body = format!(r#"[{{"uuid": "{A}", "flow": "xtls-rprx-vision"}}, "{B}"]"#);
        let users = parse(body.as_bytes()).unwrap().users;
        let bytes = bincode::serde::encode_to_vec(&users, bincode::config::standard()).unwrap();
        let (back, _): (Users, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, users);
        // The compact list is written as the `Vec<User>` it replaced, both ways.
        let (old, _): (Vec<User>, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(old, users.to_vec());
        assert_eq!(old[1].flow.as_deref(), Some("xtls-rprx-vision"));
        assert_eq!(
            bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap(),
            bytes
        );
    }

    #[test]
    fn removed_count_merges_sorted_lists() {
        let list = |ids: &[u128]| -> Users {
            ids.iter()
                .map(|&n| User {
                    uuid: Uuid::from_u128(n),
                    email: None,
                    flow: None,
                    level: None,
                })
                .collect()
        };
        assert_eq!(removed_count(&list(&[1, 2, 3, 5]), &list(&[2, 4, 5, 6])), 2);
        assert_eq!(removed_count(&list(&[1, 2]), &list(&[])), 2);
        assert_eq!(removed_count(&list(&[]), &list(&[1])), 0);
        assert_eq!(removed_count(&list(&[7]), &list(&[1, 7, 9])), 0);
    }

    #[test]
    fn every_accepted_shape() {
        let bodies = [
            format!(r#"["{A}", "{B}"]"#),
            format!(r#"{{"uuids": ["{A}", "{B}"]}}"#),
            format!(r#"{{"data": {{"uuids": ["{A}", {{"uuid": "{B}"}}]}}}}"#),
            format!(
                r#"[{{"uuid": "{A}", "email": "a@x", "flow": "xtls-rprx-vision", "level": 0}}, "{B}"]"#
            ),
        ];
        for body in bodies {
            let l = parse(body.as_bytes()).unwrap();
            assert_eq!(uuids(&l), [B, A], "{body}");
            assert!(l.skipped.is_empty());
        }
    }

    #[test]
    fn bad_items_are_skipped_duplicates_folded_case_normalised() {
        // Five invalid items of ten: exactly half, still an answer.
        let body = format!(
            r#"["{A}", "not-a-uuid", 7, {{"email": "x"}}, "{}", "{{{A}}}", "{}", "{B}", "{C}", "{D}"]"#,
            A.to_uppercase(),
            A.replace('-', "")
        );
        let l = parse(body.as_bytes()).unwrap();
        assert_eq!(uuids(&l), [B, C, D, A]);
        assert_eq!((l.items, l.duplicates), (10, 1));
        assert_eq!(
            l.skipped.iter().map(|s| s.index).collect::<Vec<_>>(),
            [1, 2, 3, 5, 6]
        );
    }

    const C: &str = "3b0e9a4c-2222-4c6e-9d1a-0b4f7a3c2d10";
    const D: &str = "5d7c1e2a-3333-4c6e-9d1a-0b4f7a3c2d10";

    /// The share rule: no valid user among some items, or more than half invalid, is a
    /// broken answer; up to half invalid is an answer; an empty list is "nobody".
    #[test]
    fn a_list_of_mostly_invalid_items_is_broken_not_empty() {
        for body in [
            "[1,2,3]".to_string(),
            "[null]".into(),
            r#"[{"id":1}]"#.into(),
            r#"["nope"]"#.into(),
            r#"{"data":{"uuids":[{"uuid":"not-a-uuid"}]}}"#.into(),
            format!(r#"["{A}","{B}","x","y","z"]"#),
        ] {
            let e = parse(body.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    e,
                    ShapeError::NoValidUser { .. } | ShapeError::MostlyInvalid { .. }
                ),
                "{body}: {e}"
            );
        }
        let e = parse(br#"[1, "nope", {"id": 1}, null]"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the list has 4 items and none is a valid user (item 0: a number, not a UUID string or an object with `uuid`; item 1: \"nope\" is not a UUID; item 2: object has no `uuid`)"
        );
        let e = parse(format!(r#"["{A}", 1, 2]"#).as_bytes()).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "2 of the list's 3 items are not valid users, more than half (item 1: "
            ),
            "{e}"
        );
        // Half invalid: an answer, with the bad one skipped.
        let l = parse(format!(r#"["{A}", 1]"#).as_bytes()).unwrap();
        assert_eq!((uuids(&l), l.skipped.len()), (vec![A.to_string()], 1));
        // Empty lists are answers: nobody is allowed.
        for body in ["[]", r#"{"uuids": []}"#, r#"{"data": {"uuids": []}}"#] {
            assert!(parse(body.as_bytes()).unwrap().users.is_empty(), "{body}");
        }
        // A huge invalid item is named by position, and only its start is shown.
        let huge = format!(r#"["{}"]"#, "x".repeat(100_000));
        let e = parse(huge.as_bytes()).unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains("item 0:"), "{e}");
    }

    #[test]
    fn wrong_shapes_are_errors_not_empty_lists() {
        for body in [
            "",
            "  ",
            "null",
            "{}",
            r#"{"data": []}"#,
            r#"{"uuids": "x"}"#,
            "<html>",
            "42",
        ] {
            assert!(parse(body.as_bytes()).is_err(), "{body:?}");
        }
        // An explicit empty list is an answer: the panel says nobody is allowed.
        assert!(parse(b"[]").unwrap().users.is_empty());
    }

    /// The parser as it was, reading the body into a `serde_json::Value` first: the
    /// one-pass parser must give the same answer and the same error for every body.
    mod reference {
        use super::super::{EXAMPLES, InvalidItem, ShapeError, Skipped, User, UserList, Users};
        use serde_json::Value;
        use uuid::Uuid;

        fn describe(v: &Value) -> String {
            match v {
                Value::Null => "null".into(),
                Value::Bool(_) => "a boolean".into(),
                Value::Number(_) => "a number".into(),
                Value::String(_) => "a string".into(),
                Value::Array(_) => "an array".into(),
                Value::Object(m) => {
                    let keys: Vec<&str> = m.keys().take(5).map(String::as_str).collect();
                    format!("an object with keys [{}]", keys.join(", "))
                }
            }
        }

        /// Parses and validates a panel answer.
        fn reference_parse(body: &[u8]) -> Result<UserList, ShapeError> {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(ShapeError::Empty);
            }
            let value: Value =
                serde_json::from_slice(body).map_err(|e| ShapeError::NotJson(e.to_string()))?;
            let items = match value {
                Value::Array(items) => items,
                Value::Object(mut top) => {
                    let list = match top.remove("uuids") {
                        Some(l) => l,
                        None => match top.get_mut("data") {
                            Some(Value::Object(data)) => data.remove("uuids").ok_or_else(|| {
                                ShapeError::WrongShape(format!(
                                    "`data` is {}",
                                    describe(&Value::Object(data.clone()))
                                ))
                            })?,
                            _ => return Err(ShapeError::WrongShape(describe(&Value::Object(top)))),
                        },
                    };
                    match list {
                        Value::Array(items) => items,
                        other => {
                            return Err(ShapeError::WrongShape(format!(
                                "`uuids` is {}",
                                describe(&other)
                            )));
                        }
                    }
                }
                other => return Err(ShapeError::WrongShape(describe(&other))),
            };
            super::judge(validate(items))
        }

        /// The share rule: a list with items and no valid user, or with more invalid items than
        /// valid ones (more than half), is a broken answer.
        #[allow(dead_code)]
        fn _unused_judge(list: UserList) -> Result<UserList, ShapeError> {
            let (items, invalid) = (list.items, list.skipped.len());
            let first = || list.skipped.iter().take(EXAMPLES).cloned().collect();
            if items > 0 && invalid == items {
                return Err(ShapeError::NoValidUser {
                    items,
                    first: first(),
                });
            }
            if invalid * 2 > items {
                return Err(ShapeError::MostlyInvalid {
                    items,
                    invalid,
                    first: first(),
                });
            }
            Ok(list)
        }

        fn validate(items: Vec<Value>) -> UserList {
            let mut list = UserList {
                items: items.len(),
                ..UserList::default()
            };
            let mut users = Vec::with_capacity(items.len());
            for (index, item) in items.into_iter().enumerate() {
                match user_of(item) {
                    Ok(u) => users.push(u),
                    Err(reason) => list.skipped.push(Skipped { index, reason }),
                }
            }
            // Stable sort keeps the first occurrence of a repeated UUID.
            users.sort_by_key(|u| u.uuid);
            let before = users.len();
            users.dedup_by_key(|u| u.uuid);
            list.duplicates = before - users.len();
            list.users = Users::from(users);
            list
        }

        fn user_of(item: Value) -> Result<User, InvalidItem> {
            match item {
                Value::String(s) => Ok(User {
                    uuid: parse_uuid(&s)?,
                    email: None,
                    flow: None,
                    level: None,
                }),
                Value::Object(mut m) => {
                    let uuid = match m.remove("uuid") {
                        Some(Value::String(s)) => parse_uuid(&s)?,
                        Some(other) => {
                            return Err(InvalidItem::Field {
                                field: "uuid",
                                found: describe(&other),
                            });
                        }
                        None => return Err(InvalidItem::NoUuid),
                    };
                    let text = |v: Option<Value>, field: &'static str| match v {
                        None | Some(Value::Null) => Ok(None),
                        Some(Value::String(s)) if s.is_empty() => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s)),
                        Some(other) => Err(InvalidItem::Field {
                            field,
                            found: describe(&other),
                        }),
                    };
                    let email = text(m.remove("email"), "email")?;
                    let flow = text(m.remove("flow"), "flow")?;
                    let level = match m.remove("level") {
                        None | Some(Value::Null) => None,
                        Some(Value::Number(n)) => Some(
                            n.as_u64()
                                .and_then(|n| u32::try_from(n).ok())
                                .ok_or_else(|| InvalidItem::Level(n.to_string()))?,
                        ),
                        Some(other) => {
                            return Err(InvalidItem::Field {
                                field: "level",
                                found: describe(&other),
                            });
                        }
                    };
                    Ok(User {
                        uuid,
                        email,
                        flow,
                        level,
                    })
                }
                other => Err(InvalidItem::NotAUser(describe(&other))),
            }
        }

        /// Accepts only the 36-character hyphenated form (any case). Braced, URN and
        /// unhyphenated forms are refused: a core may treat them differently than we do.
        fn parse_uuid(s: &str) -> Result<Uuid, InvalidItem> {
            // The message is built only on failure: this runs for every user of every sync.
            // At most 40 characters of it, escaped: the log is one line per event.
            let refuse = || {
                let head: String = s.chars().take(40).collect();
                let more = if s.chars().nth(40).is_some() {
                    "…"
                } else {
                    ""
                };
                InvalidItem::NotAUuid {
                    shown: format!("{}{more}", head.escape_debug()),
                }
            };
            if s.len() != 36 {
                return Err(refuse());
            }
            Uuid::try_parse(s).map_err(|_| refuse())
        }

        pub(super) fn parse(body: &[u8]) -> Result<UserList, ShapeError> {
            reference_parse(body)
        }
    }

    fn same_as_reference(body: &str) {
        assert_eq!(
            parse(body.as_bytes()),
            reference::parse(body.as_bytes()),
            "{body}"
        );
    }

    #[test]
    fn one_pass_parser_answers_like_the_value_tree() {
        for body in [
            "",
            " ",
            "null",
            "true",
            "42",
            "-1.5",
            r#""x""#,
            "{}",
            "[]",
            "[",
            "{",
            "<html>",
            r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}"#,
            r#"{"f":1,"e":2,"a":3}"#,
            r#"{"data": []}"#,
            r#"{"data": 1}"#,
            r#"{"data": {"x": 1, "y": [1]}}"#,
            r#"{"data": {"uuids": "x"}}"#,
            r#"{"data": {"uuids": {"a": 1}}}"#,
            r#"{"uuids": "x"}"#,
            r#"{"uuids": null}"#,
            r#"{"uuids": {"z": 1, "a": 2}}"#,
            r#"{"uuids": 1, "uuids": []}"#,
            r#"{"uuids": [], "uuids": 1}"#,
            r#"{"data": {"uuids": []}, "uuids": 3}"#,
            r#"{"data": 5, "x": 1, "x": 2}"#,
            r#"[1, 1.5, -1, true, null, [], {}, "nope", {"id": 1}]"#,
            r#"[{"uuid": 1}, {"uuid": null}, {"uuid": []}, {"uuid": {"b": 1, "a": 2}}]"#,
            r#"["6F1C1F8E-59F6-4C6E-9D1A-0B4F7A3C2D10", "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10"]"#,
            r#"["6f1c1f8e\u002d59f6-4c6e-9d1a-0b4f7a3c2d10", "\u0041"]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "email": 1}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "flow": [], "level": "x"}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "level": -1}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "level": 1e3}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "level": 5000000000}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "level": 2.5}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "email": "", "flow": null, "level": 3}]"#,
            r#"[{"uuid": "x", "uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10"}]"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "uuid": "x"}]"#,
            r#"["6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10"] x"#,
            r#"[{"uuid": "6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10", "extra": {"deep": [[[1]]]}}]"#,
        ] {
            same_as_reference(body);
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        same_as_reference(&deep);
    }

    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let uuid = "[0-9a-fA-F]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u32>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            uuid.prop_map(serde_json::Value::from),
            "[a-z\\-{}\"]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                Just("uuid".to_string()),
                Just("uuids".to_string()),
                Just("data".to_string()),
                Just("email".to_string()),
                Just("flow".to_string()),
                Just("level".to_string()),
                "[a-z]{1,3}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(key, inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_json_answers_like_the_value_tree(v in json()) {
            let body = v.to_string();
            proptest::prop_assert_eq!(
                parse(body.as_bytes()),
                reference::parse(body.as_bytes()),
                "{}", body
            );
        }
    }
}
