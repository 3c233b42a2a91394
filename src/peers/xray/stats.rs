//! `QueryStats` read without a `String` per counter.
//!
//! A 100,000-user core answers with 200,000 counters. Decoded the usual way that is
//! 200,000 `Stat` messages, each with its own `String` name: most of a collection's time
//! and memory went there. [`RawStats`] keeps the answer as the bytes it came in (one
//! buffer, one span per counter) and [`RawStats::counters`] reads each name as a `&str`
//! borrowed from it. Malformed bytes are an error naming what is wrong, as a decode
//! error of the generated message would be.
//!
//! The message (`{pkg}.app.stats.command.QueryStatsResponse`): `repeated Stat stat = 1`,
//! `Stat { string name = 1; int64 value = 2; }`.

use prost::bytes::{Buf, BufMut};

use prost::encoding::{self, DecodeContext, WireType};

use super::{XrayClient, XrayError, wire};

/// A `QueryStatsResponse` as its bytes: each `Stat` kept whole, read on demand.
#[derive(Debug, Clone, Default)]
pub struct RawStats {
    buf: Vec<u8>,
    /// Where each `Stat` message is in `buf`.
    spans: Vec<(usize, usize)>,
    /// One `Stat` as it is decoded (reused).
    scratch: Vec<u8>,
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
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Each counter's name and value, in the core's order.
    pub fn counters(&self) -> impl Iterator<Item = Result<(&str, i64), BadCounter>> + '_ {
        self.spans.iter().enumerate().map(|(index, &(start, end))| {
            let bytes = &self.buf[start..end];
            stat(bytes).map_err(|reason| BadCounter { index, reason })
        })
    }
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
        for &(start, end) in &self.spans {
            let bytes = &self.buf[start..end];
            encoding::encode_key(1, WireType::LengthDelimited, buf);
            encoding::encode_varint(bytes.len() as u64, buf);
            buf.put_slice(bytes);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != 1 {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut stat = std::mem::take(&mut self.scratch);
        encoding::bytes::merge(wire_type, &mut stat, buf, ctx)?;
        let start = self.buf.len();
        self.buf.extend_from_slice(&stat);
        self.spans.push((start, self.buf.len()));
        self.scratch = stat;
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.spans
            .iter()
            .map(|&(s, e)| {
                let len = e - s;
                encoding::key_len(1) + encoding::encoded_len_varint(len as u64) + len
            })
            .sum()
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
        self.scratch.clear();
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
