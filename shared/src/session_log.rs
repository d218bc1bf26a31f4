//! The session event log and the live fan-out that carries it to gateways.
//!
//! * `fleet:{s:<sid>}:events` is the **truth**: every client-facing event of a session, appended
//!   by the task-state scripts in the same atomic step as the state change (capped, with a TTL).
//!   Its entry ids are the `event_id`s clients resume from.
//! * `fleet:fanout:<shard>` is the **fast path**: after a script appended events, the writer
//!   XADDs a copy of them, as one entry, to the session's shard, each with the id of the event
//!   before it (`prev`).
//!   Every ws-gateway XREADs every shard. The shards are capped: losing an entry there is fine,
//!   because a gateway that sees `prev` differ from what it last delivered (or receives a nudge
//!   without payload) reads the gap from the log before delivering more.
//!
//! Fan-out entry fields: `s` session id, then for each event `e` event id, `p` previous event id
//! (empty: none), `d` the event JSON (absent in a nudge), then `tp` when traced
//! ([`FanoutEntry::parse_all`]).

use bytes::Bytes;
use fred::prelude::*;

use crate::keys::Keys;
use crate::stream::entry::{StreamEntry, StreamId, parse_entries};
use crate::stream::producer::xadd;
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
    /// The events of a fan-out stream entry, in order; none when it is not one.
    ///
    /// An entry is `s` (the session), then `e`, `p`, `d` for each of its events in log order
    /// (`p` absent for a session's first event, `d` absent in a nudge), then `tp` when traced.
    /// An `e` that does not parse ends the list: what follows it cannot be placed (a reader
    /// catches up from the session log).
    pub fn parse_all(e: &StreamEntry) -> Vec<FanoutEntry> {
        let Some(sid) = e.get_str("s") else {
            return Vec::new();
        };
        let mut events: Vec<FanoutEntry> = Vec::new();
        for (name, value) in &e.fields {
            let value = std::str::from_utf8(value).ok();
            match name.as_ref() {
                b"e" => match value.and_then(|v| v.parse().ok()) {
                    Some(event_id) => events.push(FanoutEntry {
                        session_id: sid.to_owned(),
                        event_id,
                        prev: None,
                        json: None,
                    }),
                    None => break,
                },
                b"p" => {
                    if let Some(ev) = events.last_mut() {
                        ev.prev = value.and_then(|p| p.parse().ok());
                    }
                }
                b"d" => {
                    if let Some(ev) = events.last_mut() {
                        ev.json = value.map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
        events
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

    /// The fields of the one fan-out entry of `events` (see [`FanoutEntry::parse_all`]), with
    /// the trace context `tp` when traced.
    fn fanout_fields(
        sid: &str,
        events: &[LoggedEvent],
        tp: Option<&str>,
    ) -> Vec<(&'static str, Bytes)> {
        let mut fields: Vec<(&str, Bytes)> = Vec::with_capacity(2 + 3 * events.len());
        fields.push(("s", Bytes::from(sid.to_owned())));
        for ev in events {
            fields.push(("e", Bytes::from(ev.event_id.clone())));
            fields.push(("p", Bytes::from(ev.prev.clone())));
            fields.push(("d", Bytes::from(ev.json.clone())));
        }
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
    /// The events go to the shard as one entry (one XADD), which a gateway reads and hands on
    /// in one go. Commands sent together on one connection share its round trip, so the
    /// deadline removal runs beside the fan-out, not after it.
    pub async fn publish_applied(
        &self,
        sid: &str,
        applied: &Applied,
        nudge: bool,
    ) -> Result<(), Error> {
        let fan_out = async {
            let fields = if !applied.events.is_empty() {
                let tp = crate::telemetry::current_traceparent();
                Self::fanout_fields(sid, &applied.events, tp.as_deref())
            } else if nudge && !applied.last_event_id.is_empty() {
                Self::nudge_fields(sid, &applied.last_event_id)
            } else {
                return Ok(());
            };
            let key = self.fanout_key(sid);
            xadd(&self.client, &key, Some(self.fanout.maxlen), fields)
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
                .map(|t| crate::text::concat(&[sid, "/", &t.task_id]))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&'static str, &'static str)]) -> StreamEntry {
        StreamEntry {
            id: StreamId { ms: 9, seq: 0 },
            fields: fields
                .iter()
                .map(|&(k, v)| {
                    (
                        Bytes::from_static(k.as_bytes()),
                        Bytes::from_static(v.as_bytes()),
                    )
                })
                .collect(),
        }
    }

    fn ev(sid: &str, e: &str, p: Option<&str>, d: Option<&str>) -> FanoutEntry {
        FanoutEntry {
            session_id: sid.into(),
            event_id: e.parse().unwrap(),
            prev: p.map(|p| p.parse().unwrap()),
            json: d.map(Into::into),
        }
    }

    #[test]
    fn a_fanout_entry_holds_its_events_in_order() {
        let fields = [
            ("s", "s1"),
            ("e", "5-0"),
            ("p", ""),
            ("d", "{\"a\":1}"),
            ("e", "5-1"),
            ("p", "5-0"),
            ("d", "{\"b\":2}"),
            ("tp", "00-x"),
        ];
        assert_eq!(
            FanoutEntry::parse_all(&entry(&fields)),
            [
                ev("s1", "5-0", None, Some("{\"a\":1}")),
                ev("s1", "5-1", Some("5-0"), Some("{\"b\":2}")),
            ]
        );
        // A nudge: an event id and no payload.
        assert_eq!(
            FanoutEntry::parse_all(&entry(&[("s", "s1"), ("e", "7-0")])),
            [ev("s1", "7-0", None, None)]
        );
    }

    #[test]
    fn what_cannot_be_placed_is_left_to_the_log() {
        assert!(FanoutEntry::parse_all(&entry(&[("e", "5-0"), ("d", "{}")])).is_empty());
        let fields = [
            ("s", "s1"),
            ("e", "5-0"),
            ("d", "{}"),
            ("e", "not an id"),
            ("d", "{}"),
            ("e", "6-0"),
        ];
        assert_eq!(
            FanoutEntry::parse_all(&entry(&fields)),
            [ev("s1", "5-0", None, Some("{}"))]
        );
    }
}
