//! Consumer-group housekeeping: creation, inspection (lag, pending, consumers), trimming below
//! what every group acknowledged, and removal of stale consumers.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::streams::XCap;
use serde::Serialize;

use super::entry::{StreamId, parse_id};

/// One consumer group of a stream, as `XINFO GROUPS` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    /// Delivered but not yet acknowledged.
    pub pending: u64,
    /// Not yet delivered to any consumer (`None` when Redis cannot tell, after deletions).
    pub lag: Option<u64>,
    #[serde(serialize_with = "display")]
    pub last_delivered: StreamId,
}

/// A stream, as `XINFO STREAM` reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamInfo {
    /// Entries it holds now.
    pub length: u64,
    /// Entries ever added (`None` before Redis 7.0): above `length` once any was trimmed or
    /// deleted.
    pub entries_added: Option<u64>,
    /// Its oldest entry's id, when it holds one.
    pub first_entry: Option<StreamId>,
}

/// `XINFO STREAM` of `stream`; `None` when it does not exist.
pub async fn stream_info(client: &Client, stream: &str) -> Result<Option<StreamInfo>, Error> {
    let reply: Value = match client.xinfo_stream(stream, false, None).await {
        Ok(v) => v,
        Err(e) if e.details().contains("no such key") => return Ok(None),
        Err(e) => return Err(e),
    };
    let rec = record(reply);
    Ok(Some(StreamInfo {
        length: num(&rec, "length").unwrap_or(0),
        entries_added: num(&rec, "entries-added"),
        first_entry: rec
            .get("first-entry")
            .cloned()
            .and_then(|e| e.into_array().into_iter().next())
            .and_then(|id| parse_id(id).ok()),
    }))
}

/// One consumer of a group, as `XINFO CONSUMERS` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

fn display<S: serde::Serializer>(id: &StreamId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Turns a flat `[k1, v1, k2, v2, ...]` (RESP2) or a map (RESP3) into a map by name.
fn record(v: Value) -> HashMap<String, Value> {
    match v {
        Value::Map(m) => m
            .inner()
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k.into_bytes()).into_owned(), v))
            .collect(),
        Value::Array(flat) => {
            let mut out = HashMap::new();
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = k.as_string() {
                    out.insert(k, v);
                }
            }
            out
        }
        _ => HashMap::new(),
    }
}

fn num(rec: &HashMap<String, Value>, name: &str) -> Option<u64> {
    rec.get(name).and_then(|v| v.as_u64())
}

/// Creates `group` on `stream` at the stream's start, creating the stream if needed.
/// An existing group is left as it is.
pub async fn ensure_group(client: &Client, stream: &str, group: &str) -> Result<(), Error> {
    match client
        .xgroup_create::<Value, _, _, _>(stream, group, "0", true)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every group of `stream`. A stream that does not exist has none.
pub async fn groups(client: &Client, stream: &str) -> Result<Vec<GroupInfo>, Error> {
    let reply: Value = match client.xinfo_groups(stream).await {
        Ok(v) => v,
        Err(e) if e.details().contains("no such key") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(reply
        .into_array()
        .into_iter()
        .map(|g| {
            let rec = record(g);
            GroupInfo {
                name: rec
                    .get("name")
                    .and_then(|v| v.as_string())
                    .unwrap_or_default(),
                consumers: num(&rec, "consumers").unwrap_or(0),
                pending: num(&rec, "pending").unwrap_or(0),
                lag: num(&rec, "lag"),
                last_delivered: rec
                    .get("last-delivered-id")
                    .cloned()
                    .and_then(|v| parse_id(v).ok())
                    .unwrap_or_default(),
            }
        })
        .collect())
}

/// One group of `stream`, if it exists.
pub async fn group(client: &Client, stream: &str, group: &str) -> Result<Option<GroupInfo>, Error> {
    Ok(groups(client, stream)
        .await?
        .into_iter()
        .find(|g| g.name == group))
}

/// Every consumer of `group` on `stream`.
pub async fn consumers(
    client: &Client,
    stream: &str,
    group: &str,
) -> Result<Vec<ConsumerInfo>, Error> {
    let reply: Value = client.xinfo_consumers(stream, group).await?;
    Ok(reply
        .into_array()
        .into_iter()
        .map(|c| {
            let rec = record(c);
            ConsumerInfo {
                name: rec
                    .get("name")
                    .and_then(|v| v.as_string())
                    .unwrap_or_default(),
                pending: num(&rec, "pending").unwrap_or(0),
                idle_ms: num(&rec, "idle").unwrap_or(0),
            }
        })
        .collect())
}

/// The oldest pending id of `group`, if any entry is pending (`XPENDING` summary form).
async fn oldest_pending(
    client: &Client,
    stream: &str,
    group: &str,
) -> Result<Option<StreamId>, Error> {
    let reply: Value = client.xpending(stream, group, ()).await?;
    let mut parts = reply.into_array().into_iter();
    let count = parts.next().and_then(|v| v.as_u64()).unwrap_or(0);
    if count == 0 {
        return Ok(None);
    }
    Ok(parts.next().and_then(|v| parse_id(v).ok()))
}

/// Samples `group` on `stream` into the gauges `fleet_stream_lag` (entries not yet delivered),
/// `fleet_stream_pending` (delivered, not acknowledged) and
/// `fleet_stream_oldest_pending_age_seconds` (age of the oldest unacknowledged entry, from its
/// id's timestamp; 0 when none), labelled by stream and group.
pub async fn sample(client: &Client, stream: &str, group_name: &str) -> Result<(), Error> {
    let Some(g) = group(client, stream, group_name).await? else {
        return Ok(());
    };
    let oldest = if g.pending > 0 {
        oldest_pending(client, stream, group_name).await?
    } else {
        None
    };
    let age = oldest.map_or(0.0, |id| {
        (crate::time::now_ms() - id.ms as i64).max(0) as f64 / 1000.0
    });
    let labels = [
        ("stream", stream.to_owned()),
        ("group", group_name.to_owned()),
    ];
    metrics::gauge!("fleet_stream_lag", &labels).set(g.lag.unwrap_or(0) as f64);
    metrics::gauge!("fleet_stream_pending", &labels).set(g.pending as f64);
    metrics::gauge!("fleet_stream_oldest_pending_age_seconds", &labels).set(age);
    Ok(())
}

/// Trims `stream` below the oldest entry some group still needs (its oldest pending entry, or
/// the entry after its last delivered one). Streams without groups are left alone.
/// Returns the id trimmed below, if any.
pub async fn trim_acknowledged(client: &Client, stream: &str) -> Result<Option<StreamId>, Error> {
    let groups = groups(client, stream).await?;
    if groups.is_empty() {
        return Ok(None);
    }
    let mut floor: Option<StreamId> = None;
    for g in &groups {
        let needed = match oldest_pending(client, stream, &g.name).await? {
            Some(id) => id,
            None => g.last_delivered.next(),
        };
        floor = Some(floor.map_or(needed, |f| f.min(needed)));
    }
    let Some(floor) = floor else { return Ok(None) };
    if floor == StreamId::ZERO.next() || floor == StreamId::ZERO {
        return Ok(None);
    }
    let _: Value = client
        .xtrim(stream, XCap::try_from(("MINID", "~", floor.to_string()))?)
        .await?;
    Ok(Some(floor))
}

/// Removes consumers of `group` that own no pending entry and have been idle longer than
/// `older_than` (never `me`). A consumer with pending entries is kept so they can be reclaimed.
pub async fn forget_stale_consumers(
    client: &Client,
    stream: &str,
    group: &str,
    me: &str,
    older_than: Duration,
) {
    let Ok(list) = consumers(client, stream, group).await else {
        return;
    };
    for c in list {
        if c.name != me && c.pending == 0 && c.idle_ms > older_than.as_millis() as u64 {
            let _: Result<Value, _> = client
                .xgroup_delconsumer(stream, group, c.name.as_str())
                .await;
            tracing::info!(%stream, %group, consumer = %c.name, idle_ms = c.idle_ms, "removed stale consumer");
        }
    }
}

/// On a clean stop: removes `me` from the group if it owns no pending entry.
pub async fn forget_consumer_if_idle(client: &Client, stream: &str, group: &str, me: &str) {
    let Ok(list) = consumers(client, stream, group).await else {
        return;
    };
    if list.iter().any(|c| c.name == me && c.pending == 0) {
        let _: Result<Value, _> = client.xgroup_delconsumer(stream, group, me).await;
    }
}
