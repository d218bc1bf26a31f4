//! Writing envelopes to streams.

use bytes::Bytes;
use fred::clients::Pipeline;
use fred::prelude::*;
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

/// One XADD of `fields` (field/value pairs); returns the entry id.
pub async fn xadd(
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
