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

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

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
    pub users: Vec<User>,
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
pub fn parse(body: &[u8]) -> Result<UserList, ShapeError> {
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

fn validate(items: Vec<Value>) -> UserList {
    let mut list = UserList {
        items: items.len(),
        ..UserList::default()
    };
    list.users.reserve(items.len());
    for (index, item) in items.into_iter().enumerate() {
        match user_of(item) {
            Ok(u) => list.users.push(u),
            Err(reason) => list.skipped.push(Skipped { index, reason }),
        }
    }
    // Stable sort keeps the first occurrence of a repeated UUID.
    list.users.sort_by_key(|u| u.uuid);
    let before = list.users.len();
    list.users.dedup_by_key(|u| u.uuid);
    list.duplicates = before - list.users.len();
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

/// How many of `old` are not in `new`; both sorted by UUID (as every [`UserList`] is).
pub fn removed_count(old: &[User], new: &[User]) -> usize {
    let (mut i, mut j, mut removed) = (0, 0, 0);
    while i < old.len() {
        match new.get(j).map(|n| n.uuid.cmp(&old[i].uuid)) {
            Some(std::cmp::Ordering::Less) => j += 1,
            Some(std::cmp::Ordering::Equal) => {
                i += 1;
                j += 1;
            }
            Some(std::cmp::Ordering::Greater) | None => {
                removed += 1;
                i += 1;
            }
        }
    }
    removed
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
        let (back, _): (Vec<User>, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, users);
    }

    #[test]
    fn removed_count_merges_sorted_lists() {
        let list = |ids: &[u128]| -> Vec<User> {
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
}
