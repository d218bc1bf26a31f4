//! Writing envelopes to streams.

use std::sync::LazyLock;

use bytes::Bytes;
use fred::clients::Pipeline;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::streams::XCap;

use super::entry::{StreamId, parse_id};
use crate::envelope::{Envelope, EnvelopeError, Message};

/// Why an entry was not written.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

fn cap(maxlen: Option<u64>) -> Result<XCap, Error> {
    match maxlen {
        Some(n) => XCap::try_from(("MAXLEN", "~", n as i64)),
        None => Ok(XCap::from(None::<()>)),
    }
}

/// XADDs `env` to `stream` (capped at about `maxlen` entries when given). Returns the entry id.
pub async fn send<M: Message>(
    client: &Client,
    stream: &str,
    maxlen: Option<u64>,
    env: &Envelope<M>,
) -> Result<StreamId, ProduceError> {
    Ok(xadd(client, stream, maxlen, env.to_fields()?).await?)
}

/// One XADD of `fields`; returns the entry id.
async fn xadd(
    client: &Client,
    stream: &str,
    maxlen: Option<u64>,
    fields: Vec<(&'static str, Bytes)>,
) -> Result<StreamId, Error> {
    let id: Value = client
        .xadd(stream, false, cap(maxlen)?, "*", fields)
        .await?;
    entry_id(id)
}

/// An XADD reply as an entry id.
fn entry_id(reply: Value) -> Result<StreamId, Error> {
    parse_id(reply).map_err(|e| Error::new(ErrorKind::Protocol, e.to_string()))
}

/// `stream/xadd_all.lua`: several XADDs to one stream as one command.
pub static XADD_ALL: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("xadd_all.lua")));

/// XADDs `entries` (each a list of field/value pairs) to `stream` in one command: a plain XADD
/// for one entry, [`XADD_ALL`] for more. Redis serves a reader blocked on a stream after each
/// command, so the entries of a pipeline reach it over two reads (the first alone, then the
/// rest) while those of one command arrive in one read: one batch, one handler call, one ack
/// downstream. (`MULTI`/`EXEC` would do the same, but a transaction holds the multiplexed
/// connection until it completes.) Returns the entry ids.
pub async fn xadd_all(
    client: &Client,
    stream: &str,
    maxlen: Option<u64>,
    mut entries: Vec<Vec<(&'static str, Bytes)>>,
) -> Result<Vec<StreamId>, Error> {
    if entries.len() <= 1 {
        let Some(fields) = entries.pop() else {
            return Ok(Vec::new());
        };
        return Ok(vec![xadd(client, stream, maxlen, fields).await?]);
    }
    let mut args: Vec<Value> =
        Vec::with_capacity(1 + entries.iter().map(|e| 1 + 2 * e.len()).sum::<usize>());
    args.push((maxlen.unwrap_or(0) as i64).into());
    for fields in entries {
        args.push((fields.len() as i64).into());
        for (name, value) in fields {
            args.push(name.into());
            args.push(Value::Bytes(value));
        }
    }
    let ids: Value = XADD_ALL
        .evalsha_with_reload(client, vec![stream.to_owned()], args)
        .await?;
    ids.into_array().into_iter().map(entry_id).collect()
}

/// Queues the XADD of `env` on `pipeline`.
pub async fn queue<M: Message>(
    pipeline: &Pipeline<Client>,
    stream: &str,
    maxlen: Option<u64>,
    env: &Envelope<M>,
) -> Result<(), ProduceError> {
    pipeline
        .xadd::<(), _, _, _, _>(stream, false, cap(maxlen)?, "*", env.to_fields()?)
        .await?;
    Ok(())
}

/// A writer bound to one stream, for workers that emit many entries to the same place.
#[derive(Clone)]
pub struct Producer {
    client: Client,
    stream: String,
    maxlen: Option<u64>,
}

impl Producer {
    pub fn new(client: Client, stream: String, maxlen: Option<u64>) -> Self {
        Self {
            client,
            stream,
            maxlen,
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn send<M: Message>(&self, env: &Envelope<M>) -> Result<StreamId, ProduceError> {
        send(&self.client, &self.stream, self.maxlen, env).await
    }
}
