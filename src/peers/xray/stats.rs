//! `QueryStats` read without a `String` per counter, and without copying the answer.
//!
//! A 100,000-user core answers with 200,000 counters. Decoded the usual way that is
//! 200,000 `Stat` messages, each with its own `String` name: most of a collection's time
//! and memory went there. [`RawStats`] keeps the answer as the bytes it came in — the
//! very buffer tonic read the message into (`Buf::copy_to_bytes` on tonic's buffer is a
//! reference count, not a copy) — checks its framing once, and [`RawStats::counters`]
//! walks it again, reading each name as a `&str` borrowed from it. Malformed bytes are
//! an error naming what is wrong, as a decode error of the generated message would be.
//!
//! The message (`{pkg}.app.stats.command.QueryStatsResponse`): `repeated Stat stat = 1`,
//! `Stat { string name = 1; int64 value = 2; }`.

use prost::bytes::{Buf, BufMut, Bytes};

use prost::encoding::{self, DecodeContext, WireType};

use super::{XrayClient, XrayError, wire};

/// A `QueryStatsResponse` as its bytes: each `Stat` read on demand.
#[derive(Debug, Clone, Default)]
pub struct RawStats {
    /// The answer's bytes, framing checked (`frames` never fails on them).
    buf: Bytes,
    /// How many `Stat` fields they hold.
    count: usize,
}

/// A counter that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("counter {index} of the answer: {reason}")]
pub struct BadCounter {
    pub index: usize,
    #[source]
    pub reason: BadStat,
}

/// What is wrong with one `Stat`'s bytes.
#[derive(Debug, thiserror::Error)]
pub enum BadStat {
    #[error("bad field key: {0}")]
    Key(#[source] prost::DecodeError),
    #[error("bad name length: {0}")]
    NameLength(#[source] prost::DecodeError),
    #[error("the name runs past the counter's end")]
    NamePastEnd,
    #[error("the name is not UTF-8")]
    NameNotUtf8,
    #[error("bad value: {0}")]
    Value(#[source] prost::DecodeError),
    #[error("bad field {tag}: {source}")]
    Field {
        tag: u32,
        #[source]
        source: prost::DecodeError,
    },
}

impl RawStats {
    /// How many counters the answer has.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each counter's name and value, in the core's order.
    pub fn counters(&self) -> impl Iterator<Item = Result<(&str, i64), BadCounter>> + '_ {
        frames(&self.buf)
            .map_while(Result::ok)
            .enumerate()
            .map(|(index, bytes)| stat(bytes).map_err(|reason| BadCounter { index, reason }))
    }
}

/// The `Stat` messages (field 1) of a `QueryStatsResponse`'s bytes; other fields
/// skipped. Yields an error, once, where the framing is broken.
fn frames(mut bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], prost::DecodeError>> {
    std::iter::from_fn(move || {
        loop {
            if bytes.is_empty() {
                return None;
            }
            let step = (|| {
                let (tag, wire_type) = encoding::decode_key(&mut bytes)?;
                let mut body = bytes;
                // prost's own skip checks the length against what is left.
                encoding::skip_field(wire_type, tag, &mut bytes, DecodeContext::default())?;
                if tag == 1 && wire_type == WireType::LengthDelimited {
                    let len = encoding::decode_varint(&mut body)?;
                    return Ok(body.get(..usize::try_from(len).unwrap_or(usize::MAX)));
                }
                Ok(None)
            })();
            match step {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(e) => {
                    bytes = &[];
                    return Some(Err(e));
                }
            }
        }
    })
}

/// One `Stat`: its name (UTF-8, as protobuf strings must be) and value.
fn stat(mut bytes: &[u8]) -> Result<(&str, i64), BadStat> {
    let whole = bytes;
    let (mut name, mut value) = ("", 0i64);
    while !bytes.is_empty() {
        let (tag, wire_type) = encoding::decode_key(&mut bytes).map_err(BadStat::Key)?;
        match (tag, wire_type) {
            (1, WireType::LengthDelimited) => {
                let len = encoding::decode_varint(&mut bytes).map_err(BadStat::NameLength)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= bytes.len())
                    .ok_or(BadStat::NamePastEnd)?;
                // Borrow from `whole` (same bytes) so the name outlives this cursor.
                let at = whole.len() - bytes.len();
                name =
                    std::str::from_utf8(&whole[at..at + len]).map_err(|_| BadStat::NameNotUtf8)?;
                bytes = &bytes[len..];
            }
            (2, WireType::Varint) => {
                // int64: two's complement in a varint.
                value = encoding::decode_varint(&mut bytes).map_err(BadStat::Value)? as i64;
            }
            _ => encoding::skip_field(wire_type, tag, &mut bytes, DecodeContext::default())
                .map_err(|source| BadStat::Field { tag, source })?,
        }
    }
    Ok((name, value))
}

impl prost::Message for RawStats {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for bytes in frames(&self.buf).map_while(Result::ok) {
            encoding::encode_key(1, WireType::LengthDelimited, buf);
            encoding::encode_varint(bytes.len() as u64, buf);
            buf.put_slice(bytes);
        }
    }

    /// The whole message at once (rather than field by field): its bytes are taken as
    /// they are and their framing checked, so a broken answer fails here, as it would
    /// for the generated message.
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), prost::DecodeError> {
        let more = buf.copy_to_bytes(buf.remaining());
        let mut count = 0;
        for frame in frames(&more) {
            frame?;
            count += 1;
        }
        if self.buf.is_empty() {
            self.buf = more;
        } else {
            // Merging into a non-empty message (prost's contract; tonic never does).
            let mut joined = Vec::with_capacity(self.buf.len() + more.len());
            joined.extend_from_slice(&self.buf);
            joined.extend_from_slice(&more);
            self.buf = joined.into();
        }
        self.count += count;
        Ok(())
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only reached through a caller that decodes field by field; `merge` above is
        // what tonic calls. Keep the field as its encoding.
        if tag != 1 {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut stat = Vec::new();
        encoding::bytes::merge(wire_type, &mut stat, buf, ctx)?;
        let mut joined = Vec::with_capacity(self.buf.len() + stat.len() + 10);
        joined.extend_from_slice(&self.buf);
        encoding::encode_key(1, WireType::LengthDelimited, &mut joined);
        encoding::encode_varint(stat.len() as u64, &mut joined);
        joined.extend_from_slice(&stat);
        self.buf = joined.into();
        self.count += 1;
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        frames(&self.buf)
            .map_while(Result::ok)
            .map(|bytes| {
                encoding::key_len(1)
                    + encoding::encoded_len_varint(bytes.len() as u64)
                    + bytes.len()
            })
            .sum()
    }

    fn clear(&mut self) {
        self.buf = Bytes::new();
        self.count = 0;
    }
}

impl XrayClient {
    /// `QueryStats` with `pattern`, never resetting, kept as bytes (module doc).
    pub async fn query_stats_raw(&self, pattern: &str) -> Result<RawStats, XrayError> {
        self.call(
            Self::STATS,
            "QueryStats",
            wire::QueryStatsRequest {
                pattern: pattern.to_string(),
                reset: false,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn reads_what_the_generated_message_writes() {
        let msg = wire::QueryStatsResponse {
            stat: vec![
                wire::Stat {
                    name: "user>>>a@x>>>traffic>>>uplink".into(),
                    value: 5,
                },
                wire::Stat {
                    name: String::new(),
                    value: -1,
                },
                wire::Stat {
                    name: "user>>>é>>>traffic>>>downlink".into(),
                    value: i64::MAX,
                },
            ],
        };
        let bytes = msg.encode_to_vec();
        let raw = RawStats::decode(bytes.as_slice()).unwrap();
        let got: Vec<(&str, i64)> = raw.counters().map(Result::unwrap).collect();
        assert_eq!(
            got,
            [
                ("user>>>a@x>>>traffic>>>uplink", 5),
                ("", -1),
                ("user>>>é>>>traffic>>>downlink", i64::MAX)
            ]
        );
        // And writes it back the same.
        assert_eq!(raw.encode_to_vec(), bytes);
        assert_eq!(raw.encoded_len(), bytes.len());
    }

    #[test]
    fn keeps_the_answer_without_copying_it_and_skips_other_fields() {
        let mut bytes = wire::QueryStatsResponse {
            stat: vec![wire::Stat {
                name: "user>>>a>>>traffic>>>uplink".into(),
                value: 7,
            }],
        }
        .encode_to_vec();
        // An unknown varint field 3 between two stats.
        bytes.extend_from_slice(&[0x18, 0x05]);
        bytes.extend_from_slice(
            &wire::QueryStatsResponse {
                stat: vec![wire::Stat {
                    name: "b".into(),
                    value: 1,
                }],
            }
            .encode_to_vec(),
        );
        let answer = Bytes::from(bytes);
        let raw = RawStats::decode(answer.clone()).unwrap();
        assert_eq!(raw.buf.as_ptr(), answer.as_ptr(), "the answer was copied");
        assert_eq!(raw.len(), 2);
        let got: Vec<(&str, i64)> = raw.counters().map(Result::unwrap).collect();
        assert_eq!(got, [("user>>>a>>>traffic>>>uplink", 7), ("b", 1)]);
    }

    #[test]
    fn malformed_counters_are_errors_not_panics() {
        // A Stat whose name is not UTF-8, one whose name runs past its end, and a
        // truncated answer.
        let mut bad = Vec::new();
        for stat in [vec![0x0a, 0x02, 0xff, 0xfe], vec![0x0a, 0x09, b'a']] {
            encoding::encode_key(1, WireType::LengthDelimited, &mut bad);
            encoding::encode_varint(stat.len() as u64, &mut bad);
            bad.extend_from_slice(&stat);
        }
        let raw = RawStats::decode(bad.as_slice()).unwrap();
        let errs: Vec<String> = raw.counters().map(|r| r.unwrap_err().to_string()).collect();
        assert_eq!(
            errs,
            [
                "counter 0 of the answer: the name is not UTF-8",
                "counter 1 of the answer: the name runs past the counter's end"
            ]
        );
        assert!(RawStats::decode(&[0x0a, 0x05, 1][..]).is_err());
        for cut in 0..bad.len() {
            let _ = RawStats::decode(&bad[..cut]).map(|r| r.counters().count());
        }
    }
}
