//! Raw stream entries and stream ids, parsed from Redis replies.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use fred::prelude::Value;

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// The smallest id strictly greater than this one.
    pub fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A string that is not a stream id.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a stream id (expected <ms>-<seq>)")]
pub struct BadStreamId(pub String);

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadStreamId(s.to_owned());
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        Ok(StreamId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One entry as read from a stream: its id and its field/value pairs, bytes untouched.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamEntry {
    pub id: StreamId,
    pub fields: Vec<(Bytes, Bytes)>,
}

impl StreamEntry {
    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The value of `name` as UTF-8 text, if present and valid.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// A reply that does not have the shape of a stream reply.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply shape: {0}")]
pub struct ReplyShape(pub String);

fn value_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        Value::Integer(i) => Some(Bytes::from(i.to_string())),
        Value::Double(d) => Some(Bytes::from(d.to_string())),
        _ => None,
    }
}

/// Parses a stream id from a reply value.
pub fn parse_id(v: Value) -> Result<StreamId, ReplyShape> {
    let b = value_bytes(v).ok_or_else(|| ReplyShape("id is not a string".into()))?;
    std::str::from_utf8(&b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ReplyShape(format!("bad id {b:?}")))
}

/// Parses one `[id, [field, value, ...]]` entry. A deleted entry (`[id, nil]`) yields `None`.
fn parse_entry(v: Value) -> Result<Option<StreamEntry>, ReplyShape> {
    let Value::Array(mut parts) = v else {
        return Ok(None); // nil in place of an entry: deleted meanwhile
    };
    if parts.len() != 2 {
        return Err(ReplyShape(format!("entry with {} parts", parts.len())));
    }
    let raw_fields = parts.pop().unwrap_or(Value::Null);
    let id = parse_id(parts.pop().unwrap_or(Value::Null))?;
    let flat = match raw_fields {
        Value::Array(flat) => flat,
        Value::Map(map) => {
            let mut flat = Vec::new();
            for (k, v) in map.inner() {
                flat.push(Value::Bytes(k.into_bytes()));
                flat.push(v);
            }
            flat
        }
        Value::Null => return Ok(None),
        other => return Err(ReplyShape(format!("fields are {:?}", other.kind()))),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = value_bytes(k).ok_or_else(|| ReplyShape("field name".into()))?;
        let v = value_bytes(v).unwrap_or_default();
        fields.push((k, v));
    }
    Ok(Some(StreamEntry { id, fields }))
}

/// Parses a list of entries (XRANGE, XCLAIM, one stream of XREAD).
pub fn parse_entries(v: Value) -> Result<Vec<StreamEntry>, ReplyShape> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(e) = parse_entry(item)? {
                    out.push(e);
                }
            }
            Ok(out)
        }
        other => Err(ReplyShape(format!("entries are {:?}", other.kind()))),
    }
}

/// Parses an XREAD / XREADGROUP reply into `(stream, entries)` pairs. A timeout (nil) is empty.
pub fn parse_read(v: Value) -> Result<Vec<(String, Vec<StreamEntry>)>, ReplyShape> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(streams) => {
            let mut pairs = Vec::with_capacity(streams.len());
            for s in streams {
                let Value::Array(mut kv) = s else {
                    return Err(ReplyShape("stream is not [name, entries]".into()));
                };
                if kv.len() != 2 {
                    return Err(ReplyShape("stream is not [name, entries]".into()));
                }
                let entries = kv.pop().unwrap_or(Value::Null);
                let name = kv.pop().unwrap_or(Value::Null);
                pairs.push((name, entries));
            }
            pairs
        }
        Value::Map(map) => map
            .inner()
            .into_iter()
            .map(|(k, v)| (Value::Bytes(k.into_bytes()), v))
            .collect(),
        other => return Err(ReplyShape(format!("read reply is {:?}", other.kind()))),
    };
    pairs
        .into_iter()
        .map(|(name, entries)| {
            let name = value_bytes(name)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| ReplyShape("stream name".into()))?;
            Ok((name, parse_entries(entries)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    #[test]
    fn stream_ids_parse_order_and_step() {
        let a: StreamId = "1700-3".parse().unwrap();
        let b: StreamId = "1700-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.next().to_string(), "1700-4");
        assert_eq!("5".parse::<StreamId>().unwrap(), StreamId { ms: 5, seq: 0 });
        assert!("x-1".parse::<StreamId>().is_err());
    }

    #[test]
    fn parses_xreadgroup_replies_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            s("fleet:tasks"),
            Value::Array(vec![
                Value::Array(vec![s("1-1"), Value::Array(vec![s("kind"), s("x")])]),
                Value::Array(vec![s("1-2"), Value::Null]),
            ]),
        ])]);
        let streams = parse_read(reply).unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].0, "fleet:tasks");
        assert_eq!(streams[0].1.len(), 1);
        assert_eq!(streams[0].1[0].get_str("kind"), Some("x"));
        assert!(parse_read(Value::Null).unwrap().is_empty());
    }
}
