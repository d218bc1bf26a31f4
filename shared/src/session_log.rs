//! The session event log and the live fan-out that carries it to gateways.
//!
//! * `fleet:{s:<sid>}:events` is the **truth**: every client-facing event of a session, appended
//!   by the task-state scripts in the same atomic step as the state change (capped, with a TTL).
//!   Its entry ids are the `event_id`s clients resume from.
//! * `fleet:fanout:<shard>` is the **fast path**: after a script appended events, the writer
//!   XADDs a copy of each to the session's shard, with the id of the event before it (`prev`).
//!   Every ws-gateway XREADs every shard. The shards are capped: losing an entry there is fine,
//!   because a gateway that sees `prev` differ from what it last delivered (or receives a nudge
//!   without payload) reads the gap from the log before delivering more.
//!
//! Fan-out entry fields: `s` session id, `e` event id, `p` previous event id (empty: none),
//! `d` the event JSON (absent in a nudge).

use bytes::Bytes;
use fred::prelude::*;

use crate::keys::Keys;
use crate::stream::entry::{StreamEntry, StreamId, parse_entries};
use crate::stream::producer::xadd_all;
use crate::task::Applied;

/// An event a script appended to a session log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    /// The session's previous event id ("" when this is its first event).
    pub prev: String,
    pub event_id: String,
    /// The rendered message, without `event_id`.
    pub json: String,
}

/// One event read back from a session log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub event_id: StreamId,
    /// The session's event before this one (`None` for its first event).
    pub prev: Option<StreamId>,
    pub task_id: String,
    pub json: String,
}

impl LogEntry {
    fn from_entry(e: &StreamEntry) -> LogEntry {
        LogEntry {
            event_id: e.id,
            prev: e.get_str("p").and_then(|p| p.parse().ok()),
            task_id: e.get_str("t").unwrap_or_default().to_owned(),
            json: e.get_str("d").unwrap_or_default().to_owned(),
        }
    }

    /// Whether events of the session between `after` and this entry were trimmed from the log.
    pub fn lost_since(&self, after: StreamId) -> bool {
        self.event_id > after && self.prev.is_some_and(|p| p > after)
    }
}

/// One fan-out entry as a gateway reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanoutEntry {
    pub session_id: String,
    pub event_id: StreamId,
    pub prev: Option<StreamId>,
    /// `None` for a nudge: "the log has events up to `event_id`; read what you miss".
    pub json: Option<String>,
}

impl FanoutEntry {
    /// Parses a fan-out stream entry; `None` when it is not one.
    pub fn parse(e: &StreamEntry) -> Option<FanoutEntry> {
        Some(FanoutEntry {
            session_id: e.get_str("s")?.to_owned(),
            event_id: e.get_str("e")?.parse().ok()?,
            prev: e.get_str("p").and_then(|p| p.parse().ok()),
            json: e.get_str("d").map(str::to_owned),
        })
    }
}

/// Fan-out layout every writer and reader must agree on.
#[derive(Clone, Debug)]
pub struct FanoutConfig {
    /// Number of `fleet:fanout:<shard>` streams (`FLEET_FANOUT_SHARDS`).
    pub shards: u32,
    /// Each shard keeps about this many entries.
    pub maxlen: u64,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            shards: 4,
            maxlen: 100_000,
        }
    }
}

/// Reads session logs and writes the fan-out.
#[derive(Clone)]
pub struct SessionLog {
    client: Client,
    keys: Keys,
    fanout: FanoutConfig,
}

impl SessionLog {
    pub fn new(client: Client, keys: Keys, fanout: FanoutConfig) -> Self {
        Self {
            client,
            keys,
            fanout,
        }
    }

    pub fn fanout_config(&self) -> &FanoutConfig {
        &self.fanout
    }

    /// The fan-out stream of session `sid`.
    pub fn fanout_key(&self, sid: &str) -> String {
        self.keys
            .fanout(Keys::fanout_shard(sid, self.fanout.shards))
    }

    /// Every fan-out stream.
    pub fn fanout_keys(&self) -> Vec<String> {
        (0..self.fanout.shards.max(1))
            .map(|s| self.keys.fanout(s))
            .collect()
    }

    /// The fields of the fan-out entry of `ev`, with the trace context `tp` when traced.
    fn fanout_fields(sid: &str, ev: &LoggedEvent, tp: Option<&str>) -> Vec<(&'static str, Bytes)> {
        let mut fields: Vec<(&str, Bytes)> = vec![
            ("s", Bytes::from(sid.to_owned())),
            ("e", Bytes::from(ev.event_id.clone())),
            ("p", Bytes::from(ev.prev.clone())),
            ("d", Bytes::from(ev.json.clone())),
        ];
        if let Some(tp) = tp {
            fields.push(("tp", Bytes::from(tp.to_owned())));
        }
        fields
    }

    /// The fields of a nudge: a fan-out entry without payload.
    fn nudge_fields(sid: &str, last_event_id: &str) -> Vec<(&'static str, Bytes)> {
        vec![
            ("s", Bytes::from(sid.to_owned())),
            ("e", Bytes::from(last_event_id.to_owned())),
        ]
    }

    /// Writes what must follow an `apply` of session `sid`, in one round trip: the fan-out of
    /// its events, and the removal of the tasks it ended from the deadline set. With `nudge`,
    /// also a nudge when the call appended nothing (a redelivered entry whose events were
    /// logged by an earlier delivery whose fan-out may be missing).
    ///
    /// Two or more events go to the shard in one command ([`xadd_all`]), so that a gateway reads
    /// them in one XREAD. Commands sent together on one connection share its round trip, so the
    /// deadline removal runs beside the fan-out, not after it.
    pub async fn publish_applied(
        &self,
        sid: &str,
        applied: &Applied,
        nudge: bool,
    ) -> Result<(), Error> {
        let fan_out = async {
            let tp = crate::telemetry::current_traceparent();
            let mut entries: Vec<_> = applied
                .events
                .iter()
                .map(|ev| Self::fanout_fields(sid, ev, tp.as_deref()))
                .collect();
            if entries.is_empty() && nudge && !applied.last_event_id.is_empty() {
                entries.push(Self::nudge_fields(sid, &applied.last_event_id));
            }
            let key = self.fanout_key(sid);
            xadd_all(&self.client, &key, Some(self.fanout.maxlen), entries)
                .await
                .map(drop)
        };
        let drop_deadlines = async {
            if applied.ended.is_empty() {
                return Ok(());
            }
            let members: Vec<String> = applied
                .ended
                .iter()
                .map(|t| format!("{sid}/{}", t.task_id))
                .collect();
            self.client
                .zrem::<(), _, _>(self.keys.deadlines(), members)
                .await
        };
        futures::future::try_join(fan_out, drop_deadlines).await?;
        Ok(())
    }

    /// Events of `sid` after `after` (all when `None`), up to `until` inclusive when given,
    /// at most `count`.
    pub async fn replay_after(
        &self,
        sid: &str,
        after: Option<StreamId>,
        until: Option<StreamId>,
        count: u64,
    ) -> Result<Vec<LogEntry>, Error> {
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let end = until.map_or_else(|| "+".to_owned(), |id| id.to_string());
        let reply: Value = self
            .client
            .xrange(self.keys.session_events(sid), start, end, Some(count))
            .await?;
        Ok(parse_entries(reply)
            .unwrap_or_default()
            .iter()
            .map(LogEntry::from_entry)
            .collect())
    }

    /// The oldest event still in the log of `sid`, if any.
    pub async fn oldest(&self, sid: &str) -> Result<Option<LogEntry>, Error> {
        let reply: Value = self
            .client
            .xrange(self.keys.session_events(sid), "-", "+", Some(1))
            .await?;
        Ok(parse_entries(reply)
            .unwrap_or_default()
            .first()
            .map(LogEntry::from_entry))
    }
}
