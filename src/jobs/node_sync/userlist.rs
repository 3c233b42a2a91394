//! The panel's allowed-user list: the body shapes it may answer with, validated into a
//! sorted, de-duplicated list. A body of the wrong shape is an error (fail static); a
//! single bad item is skipped and reported.

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
    pub reason: String,
}

/// A validated list: users sorted by UUID, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserList {
    pub users: Vec<User>,
    pub skipped: Vec<Skipped>,
    /// How many items repeated a UUID already in the list.
    pub duplicates: usize,
}

/// Why a body is not a user list.
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
    Ok(validate(items))
}

fn validate(items: Vec<Value>) -> UserList {
    let mut list = UserList::default();
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

fn user_of(item: Value) -> Result<User, String> {
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
                Some(other) => return Err(format!("`uuid` is {}", describe(&other))),
                None => return Err("object has no `uuid`".into()),
            };
            let text = |v: Option<Value>, field: &str| match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(format!("`{field}` is {}", describe(&other))),
            };
            let email = text(m.remove("email"), "email")?;
            let flow = text(m.remove("flow"), "flow")?;
            let level = match m.remove("level") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| format!("`level` {n} is not a small whole number"))?,
                ),
                Some(other) => return Err(format!("`level` is {}", describe(&other))),
            };
            Ok(User {
                uuid,
                email,
                flow,
                level,
            })
        }
        other => Err(format!(
            "item is {}, not a UUID string or object",
            describe(&other)
        )),
    }
}

/// Accepts only the 36-character hyphenated form (any case). Braced, URN and
/// unhyphenated forms are refused: a core may treat them differently than we do.
fn parse_uuid(s: &str) -> Result<Uuid, String> {
    // The message is built only on failure: this runs for every user of every sync.
    let refuse = || format!("`{}` is not a UUID", s.chars().take(40).collect::<String>());
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
        let body = format!(
            r#"["{A}", "not-a-uuid", 7, {{"email": "x"}}, "{}", "{{{A}}}", "{}"]"#,
            A.to_uppercase(),
            A.replace('-', "")
        );
        let l = parse(body.as_bytes()).unwrap();
        assert_eq!(uuids(&l), [A]);
        assert_eq!(l.duplicates, 1);
        assert_eq!(
            l.skipped.iter().map(|s| s.index).collect::<Vec<_>>(),
            [1, 2, 3, 5, 6]
        );
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
