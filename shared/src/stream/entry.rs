//! Raw stream entries and stream ids, parsed from Redis replies.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, Error, ErrorKind, StreamsInterface, Value};
use fred::types::{CustomCommand, Resp3Frame};

use crate::text::{DigitBuf, decimal};

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
        // One write of text made without the formatting machinery: ids are written for every
        // event a client gets and every stream read.
        let (mut ms, mut seq) = (DigitBuf::default(), DigitBuf::default());
        let (ms, seq) = (decimal(self.ms, &mut ms), decimal(self.seq, &mut seq));
        let mut text = [0u8; 41];
        text[..ms.len()].copy_from_slice(ms.as_bytes());
        text[ms.len()] = b'-';
        let len = ms.len() + 1 + seq.len();
        text[ms.len() + 1..len].copy_from_slice(seq.as_bytes());
        f.write_str(std::str::from_utf8(&text[..len]).expect("ASCII id"))
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

/// What the stream parsers need to know of one reply element, whichever form it came in: a
/// [`Value`] (fred's typed commands) or a raw [`Resp3Frame`] ([`xread`], [`xreadgroup`], which
/// skip fred's conversion of every element into a `Value`).
pub trait Reply: Sized {
    fn into_shape(self) -> Shape<Self>;
}

/// One reply element, by shape.
pub enum Shape<R> {
    Null,
    Bytes(Bytes),
    Array(Vec<R>),
    /// A RESP3 map, as key/value pairs.
    Pairs(Vec<(R, R)>),
    Other(&'static str),
}

impl Reply for Value {
    fn into_shape(self) -> Shape<Self> {
        match self {
            Value::Null => Shape::Null,
            Value::Bytes(b) => Shape::Bytes(b),
            Value::String(s) => Shape::Bytes(s.into_inner()),
            Value::Integer(i) => Shape::Bytes(Bytes::from(i.to_string())),
            Value::Double(d) => Shape::Bytes(Bytes::from(d.to_string())),
            Value::Array(a) => Shape::Array(a),
            Value::Map(map) => Shape::Pairs(
                map.inner()
                    .into_iter()
                    .map(|(k, v)| (Value::Bytes(k.into_bytes()), v))
                    .collect(),
            ),
            Value::Boolean(_) => Shape::Other("boolean"),
            Value::Queued => Shape::Other("queued"),
        }
    }
}

impl Reply for Resp3Frame {
    fn into_shape(self) -> Shape<Self> {
        match self {
            Resp3Frame::Null => Shape::Null,
            Resp3Frame::BlobString { data, .. }
            | Resp3Frame::SimpleString { data, .. }
            | Resp3Frame::VerbatimString { data, .. }
            | Resp3Frame::BigNumber { data, .. } => Shape::Bytes(data),
            Resp3Frame::Number { data, .. } => Shape::Bytes(Bytes::from(data.to_string())),
            Resp3Frame::Double { data, .. } => Shape::Bytes(Bytes::from(data.to_string())),
            Resp3Frame::Array { data, .. } | Resp3Frame::Push { data, .. } => Shape::Array(data),
            Resp3Frame::Map { data, .. } => Shape::Pairs(data.into_iter().collect()),
            Resp3Frame::Set { .. } => Shape::Other("set"),
            Resp3Frame::Boolean { .. } => Shape::Other("boolean"),
            _ => Shape::Other("error"),
        }
    }
}

fn reply_bytes<R: Reply>(v: R) -> Option<Bytes> {
    match v.into_shape() {
        Shape::Bytes(b) => Some(b),
        _ => None,
    }
}

/// Parses a stream id from a reply value.
pub fn parse_id<R: Reply>(v: R) -> Result<StreamId, ReplyShape> {
    let b = reply_bytes(v).ok_or_else(|| ReplyShape("id is not a string".into()))?;
    std::str::from_utf8(&b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ReplyShape(format!("bad id {b:?}")))
}

/// Parses one `[id, [field, value, ...]]` entry. A deleted entry (`[id, nil]`) yields `None`.
fn parse_entry<R: Reply>(v: R) -> Result<Option<StreamEntry>, ReplyShape> {
    let Shape::Array(mut parts) = v.into_shape() else {
        return Ok(None); // nil in place of an entry: deleted meanwhile
    };
    if parts.len() != 2 {
        return Err(ReplyShape(format!("entry with {} parts", parts.len())));
    }
    let raw_fields = parts.pop().map(R::into_shape).unwrap_or(Shape::Null);
    let id = parse_id(parts.pop().ok_or_else(|| ReplyShape("entry id".into()))?)?;
    let flat = match raw_fields {
        Shape::Array(flat) => flat,
        Shape::Pairs(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        Shape::Null => return Ok(None),
        Shape::Bytes(_) => return Err(ReplyShape("fields are a string".into())),
        Shape::Other(kind) => return Err(ReplyShape(format!("fields are {kind}"))),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = reply_bytes(k).ok_or_else(|| ReplyShape("field name".into()))?;
        let v = reply_bytes(v).unwrap_or_default();
        fields.push((k, v));
    }
    Ok(Some(StreamEntry { id, fields }))
}

/// Parses a list of entries (XRANGE, XCLAIM, one stream of XREAD).
pub fn parse_entries<R: Reply>(v: R) -> Result<Vec<StreamEntry>, ReplyShape> {
    match v.into_shape() {
        Shape::Null => Ok(Vec::new()),
        Shape::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(e) = parse_entry(item)? {
                    out.push(e);
                }
            }
            Ok(out)
        }
        Shape::Bytes(_) => Err(ReplyShape("entries are a string".into())),
        Shape::Pairs(_) => Err(ReplyShape("entries are a map".into())),
        Shape::Other(kind) => Err(ReplyShape(format!("entries are {kind}"))),
    }
}

/// Parses an XREAD / XREADGROUP reply into `(stream, entries)` pairs. A timeout (nil) is empty.
pub fn parse_read<R: Reply>(v: R) -> Result<Vec<(String, Vec<StreamEntry>)>, ReplyShape> {
    let pairs: Vec<(R, R)> = match v.into_shape() {
        Shape::Null => return Ok(Vec::new()),
        Shape::Array(streams) => {
            let mut pairs = Vec::with_capacity(streams.len());
            for s in streams {
                let Shape::Array(mut kv) = s.into_shape() else {
                    return Err(ReplyShape("stream is not [name, entries]".into()));
                };
                if kv.len() != 2 {
                    return Err(ReplyShape("stream is not [name, entries]".into()));
                }
                let (Some(entries), Some(name)) = (kv.pop(), kv.pop()) else {
                    unreachable!("two elements");
                };
                pairs.push((name, entries));
            }
            pairs
        }
        Shape::Pairs(pairs) => pairs,
        Shape::Bytes(_) => return Err(ReplyShape("read reply is a string".into())),
        Shape::Other(kind) => return Err(ReplyShape(format!("read reply is {kind}"))),
    };
    pairs
        .into_iter()
        .map(|(name, entries)| {
            let name = reply_bytes(name)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| ReplyShape("stream name".into()))?;
            Ok((name, parse_entries(entries)?))
        })
        .collect()
}

/// The id of the newest entry of `stream` (`0-0` for an empty or missing one): where a reader
/// that wants what is written from now on starts. Read from there, not from `$`: `$` means "after
/// the newest entry at the time of this read", so whatever is written between two reads (a
/// blocking read that timed out, or failed, and the next) would be missed.
pub async fn newest_id(client: &Client, stream: &str) -> Result<StreamId, Error> {
    let reply: Value = client.xrevrange(stream, "+", "-", Some(1)).await?;
    Ok(parse_entries(reply)
        .ok()
        .and_then(|e| e.first().map(|e| e.id))
        .unwrap_or(StreamId::ZERO))
}

/// The streams and entries of one XREAD or XREADGROUP; `Err(shape)` inside when the reply
/// could not be read as one.
pub type ReadReply = Result<Vec<(String, Vec<StreamEntry>)>, ReplyShape>;

/// `XREAD [COUNT count] [BLOCK ms] STREAMS stream after`, its reply parsed straight from the
/// frame. For a connection of its own: a blocking read holds it.
pub async fn xread(
    client: &Client,
    count: Option<u64>,
    block_ms: Option<u64>,
    stream: &str,
    after: StreamId,
) -> Result<ReadReply, Error> {
    let mut args: Vec<Value> = Vec::with_capacity(7);
    read_options(&mut args, count, block_ms);
    args.push(Value::from_static_str("STREAMS"));
    args.push(stream.into());
    args.push(after.to_string().into());
    read("XREAD", client, stream, args, block_ms.is_some()).await
}

/// `XREADGROUP GROUP group consumer [COUNT count] [BLOCK ms] STREAMS stream >`, its reply
/// parsed straight from the frame. For a connection of its own: a blocking read holds it.
pub async fn xreadgroup(
    client: &Client,
    group: &str,
    consumer: &str,
    count: Option<u64>,
    block_ms: Option<u64>,
    stream: &str,
) -> Result<ReadReply, Error> {
    let mut args: Vec<Value> = Vec::with_capacity(10);
    args.push(Value::from_static_str("GROUP"));
    args.push(group.into());
    args.push(consumer.into());
    read_options(&mut args, count, block_ms);
    args.push(Value::from_static_str("STREAMS"));
    args.push(stream.into());
    args.push(Value::from_static_str(">"));
    read("XREADGROUP", client, stream, args, block_ms.is_some()).await
}

fn read_options(args: &mut Vec<Value>, count: Option<u64>, block_ms: Option<u64>) {
    if let Some(count) = count {
        args.push(Value::from_static_str("COUNT"));
        args.push((count as i64).into());
    }
    if let Some(ms) = block_ms {
        args.push(Value::from_static_str("BLOCK"));
        args.push((ms as i64).into());
    }
}

async fn read(
    cmd: &'static str,
    client: &Client,
    stream: &str,
    args: Vec<Value>,
    blocking: bool,
) -> Result<ReadReply, Error> {
    // Sent to the node of the stream's slot in cluster mode.
    let cmd = CustomCommand::new_static(cmd, stream, blocking);
    let frame = client.custom_raw(cmd, args).await?;
    // The raw frame carries an error reply as a frame.
    match frame {
        Resp3Frame::SimpleError { data, .. } => {
            Err(Error::new(ErrorKind::Unknown, data.to_string()))
        }
        Resp3Frame::BlobError { data, .. } => Err(Error::new(
            ErrorKind::Unknown,
            String::from_utf8_lossy(&data).into_owned(),
        )),
        frame => Ok(parse_read(frame)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    proptest::proptest! {
        #[test]
        fn ids_are_written_as_redis_writes_them_and_read_back(ms: u64, seq: u64) {
            let id = StreamId { ms, seq };
            let text = id.to_string();
            proptest::prop_assert_eq!(&text, &format!("{ms}-{seq}"));
            proptest::prop_assert_eq!(text.parse::<StreamId>().ok(), Some(id));
        }
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

    fn blob(x: &str) -> Resp3Frame {
        Resp3Frame::BlobString {
            data: Bytes::copy_from_slice(x.as_bytes()),
            attributes: None,
        }
    }

    fn array(data: Vec<Resp3Frame>) -> Resp3Frame {
        Resp3Frame::Array {
            data,
            attributes: None,
        }
    }

    #[test]
    fn raw_frames_parse_as_values_do() {
        let reply = array(vec![array(vec![
            blob("fleet:tasks"),
            array(vec![
                array(vec![blob("1-1"), array(vec![blob("kind"), blob("x")])]),
                array(vec![blob("1-2"), Resp3Frame::Null]),
                array(vec![
                    blob("1-3"),
                    array(vec![
                        blob("n"),
                        Resp3Frame::Number {
                            data: 7,
                            attributes: None,
                        },
                    ]),
                ]),
            ]),
        ])]);
        let streams = parse_read(reply).unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].0, "fleet:tasks");
        let ids: Vec<String> = streams[0].1.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["1-1", "1-3"]);
        assert_eq!(streams[0].1[0].get_str("kind"), Some("x"));
        assert_eq!(streams[0].1[1].get_str("n"), Some("7"));
        assert!(parse_read(Resp3Frame::Null).unwrap().is_empty());
        // Not a read reply: a shape error, not a panic.
        assert!(parse_read(blob("OK")).is_err());
        assert!(parse_read(array(vec![array(vec![blob("s")])])).is_err());
        assert!(
            parse_read(array(vec![array(vec![
                blob("s"),
                array(vec![array(vec![blob("nope"), array(vec![])])])
            ])]))
            .is_err()
        );
    }
}
