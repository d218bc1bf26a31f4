//! The dead-letter stream `fleet:dlq`.
//!
//! A dead letter keeps everything needed to understand and replay the entry:
//!
//! | field | holds |
//! |---|---|
//! | `stream`, `group` | where the entry was consumed |
//! | `entry_id` | its id in that stream |
//! | `reason` | why it was dead-lettered, in words |
//! | `deliveries` | how many times it had been delivered |
//! | `consumer` | the consumer that gave up on it |
//! | `ts` | when, ms since the epoch |
//! | `orig.<field>` | each field of the original entry, bytes untouched |

use bytes::Bytes;
use fred::clients::Pipeline;
use fred::prelude::*;
use fred::types::streams::XCap;

use super::entry::StreamEntry;
use crate::time::now_ms;

/// The dead-letter stream keeps about this many entries.
pub const DLQ_MAXLEN: u64 = 100_000;

/// Prefix of the original entry's fields in a dead letter.
pub const ORIGINAL_FIELD_PREFIX: &str = "orig.";

/// An entry on its way to the dead-letter stream.
pub struct DeadLetter<'a> {
    pub entry: &'a StreamEntry,
    pub reason: String,
    pub deliveries: u32,
}

/// The fields of a dead letter (see the module docs).
pub fn dead_letter_fields(
    stream: &str,
    group: &str,
    consumer: &str,
    letter: &DeadLetter<'_>,
) -> Vec<(Bytes, Bytes)> {
    let mut fields = vec![
        (
            Bytes::from_static(b"stream"),
            Bytes::from(stream.to_owned()),
        ),
        (Bytes::from_static(b"group"), Bytes::from(group.to_owned())),
        (
            Bytes::from_static(b"entry_id"),
            Bytes::from(letter.entry.id.to_string()),
        ),
        (
            Bytes::from_static(b"reason"),
            Bytes::from(letter.reason.clone()),
        ),
        (
            Bytes::from_static(b"deliveries"),
            Bytes::from(letter.deliveries.to_string()),
        ),
        (
            Bytes::from_static(b"consumer"),
            Bytes::from(consumer.to_owned()),
        ),
        (Bytes::from_static(b"ts"), Bytes::from(now_ms().to_string())),
    ];
    for (k, v) in &letter.entry.fields {
        let mut name = Vec::with_capacity(ORIGINAL_FIELD_PREFIX.len() + k.len());
        name.extend_from_slice(ORIGINAL_FIELD_PREFIX.as_bytes());
        name.extend_from_slice(k);
        fields.push((Bytes::from(name), v.clone()));
    }
    fields
}

/// Queues the XADD of a dead letter on `pipeline`.
pub async fn dead_letter(
    pipeline: &Pipeline<Client>,
    dlq: &str,
    stream: &str,
    group: &str,
    consumer: &str,
    letter: &DeadLetter<'_>,
) -> Result<(), fred::error::Error> {
    let fields = dead_letter_fields(stream, group, consumer, letter);
    pipeline
        .xadd::<(), _, _, _, _>(
            dlq,
            false,
            XCap::try_from(("MAXLEN", "~", DLQ_MAXLEN as i64))?,
            "*",
            fields,
        )
        .await
}

/// XADDs one dead letter now (for consumers that do not run the consumer loop, e.g. a bridge
/// rejecting a message that never was a stream entry).
pub async fn dead_letter_now(
    client: &Client,
    dlq: &str,
    fields: Vec<(Bytes, Bytes)>,
) -> Result<(), fred::error::Error> {
    client
        .xadd::<(), _, _, _, _>(
            dlq,
            false,
            XCap::try_from(("MAXLEN", "~", DLQ_MAXLEN as i64))?,
            "*",
            fields,
        )
        .await
}
