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

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

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

/// The order in which one process's writers of a session's events hand their fan-out entries to
/// Redis: the order in which they sent their `apply` calls. On one connection Redis runs
/// commands in the order they were sent, so that is the order of the session's events, and each
/// fan-out entry's `prev` is the last event of the entry before it.
///
/// Without it, two batches of one session handled at once fan out in either order (of two tasks
/// woken one after the other, the scheduler often runs the later first), and a gateway that sees
/// an entry whose `prev` it has not delivered yet reads the log to fill the gap: correct, but a
/// read and a delay per reordering. A writer waits only for the earlier writers of its session
/// to *send* their entries, not for Redis to answer them, so a session's calls stay pipelined.
/// Writers in different processes can still interleave; gateways fill those gaps as before.
/// Sessions whose ids hash to the same stripe share a line.
///
/// ```text
/// let (turn, applied) = order.send(sid, pin!(tasks.apply(sid, &ops))).await;
/// let applied = applied?;
/// order.publish(turn, pin!(log.publish_applied(sid, &applied, false))).await?;
/// ```
#[derive(Clone)]
pub struct PublishOrder {
    stripes: Arc<[Stripe]>,
}

#[derive(Default)]
struct Stripe {
    /// The next ticket, and the tickets taken and not yet released, oldest first.
    line: std::sync::Mutex<(u64, std::collections::VecDeque<u64>)>,
    released: tokio::sync::Notify,
}

/// A writer's place in its session's line, from sending its `apply` until sending its fan-out
/// entry ([`PublishOrder::publish`]); dropping it (an error, a cancellation) gives the place up.
#[must_use = "a turn orders the fan-out entry that follows its apply"]
pub struct Turn<'a> {
    stripe: &'a Stripe,
    ticket: u64,
}

impl PublishOrder {
    /// Stripes: far more than the sessions a process has in hand at once.
    pub const STRIPES: u32 = 1024;

    pub fn new() -> Self {
        Self {
            stripes: (0..Self::STRIPES).map(|_| Stripe::default()).collect(),
        }
    }

    /// Takes a place in session `sid`'s line and, in the same step, sends `apply` (a Redis call
    /// is written to its connection when its future is first polled); then awaits its reply.
    /// The futures are pinned by the caller: the task futures are large, and moving them into
    /// this one would copy them.
    pub async fn send<F: Future>(
        &self,
        sid: &str,
        mut apply: Pin<&mut F>,
    ) -> (Turn<'_>, F::Output) {
        let stripe = &self.stripes[Keys::fanout_shard(sid, Self::STRIPES) as usize];
        let (turn, first) = std::future::poll_fn(|cx| {
            let mut line = stripe.line.lock().unwrap_or_else(|e| e.into_inner());
            let ticket = line.0;
            line.0 += 1;
            line.1.push_back(ticket);
            // Polled with the line held, so places and sends are in the same order.
            let first = apply.as_mut().poll(cx);
            Poll::Ready((Turn { stripe, ticket }, first))
        })
        .await;
        let out = match first {
            Poll::Ready(out) => out,
            Poll::Pending => apply.await,
        };
        (turn, out)
    }

    /// Waits until every earlier writer in `turn`'s line has sent its fan-out entry, sends
    /// `publish`, lets the next writer go, then awaits the reply.
    pub async fn publish<F: Future>(&self, turn: Turn<'_>, mut publish: Pin<&mut F>) -> F::Output {
        turn.wait().await;
        let first = std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await;
        drop(turn);
        match first {
            Poll::Ready(out) => out,
            Poll::Pending => publish.await,
        }
    }
}

impl Default for PublishOrder {
    fn default() -> Self {
        Self::new()
    }
}

impl Turn<'_> {
    async fn wait(&self) {
        loop {
            let notified = self.stripe.released.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let first = {
                let line = self.stripe.line.lock().unwrap_or_else(|e| e.into_inner());
                line.1.front() == Some(&self.ticket)
            };
            if first {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut line = self.stripe.line.lock().unwrap_or_else(|e| e.into_inner());
        let first = line.1.front() == Some(&self.ticket);
        line.1.retain(|&t| t != self.ticket);
        drop(line);
        if first {
            self.stripe.released.notify_waiters();
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
    use std::pin::pin;

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

    /// A future that is ready at once and records that it was polled.
    async fn sent(log: &std::sync::Mutex<Vec<&'static str>>, what: &'static str) {
        log.lock().unwrap().push(what);
    }

    #[tokio::test]
    async fn a_writer_sends_its_fan_out_after_the_earlier_writers_of_its_session() {
        let order = PublishOrder::new();
        let log = std::sync::Mutex::new(Vec::new());
        let (first, ()) = order.send("s1", pin!(sent(&log, "apply 1"))).await;
        let (second, ()) = order.send("s1", pin!(sent(&log, "apply 2"))).await;
        let apply_other = pin!(sent(&log, "apply of another session"));
        let (other, ()) = order.send("s2-elsewhere", apply_other).await;
        assert_ne!(
            Keys::fanout_shard("s1", PublishOrder::STRIPES),
            Keys::fanout_shard("s2-elsewhere", PublishOrder::STRIPES)
        );

        // The second apply's fan-out waits for the first's; another session's does not.
        let publish_second = pin!(sent(&log, "publish 2"));
        let mut second_publish = pin!(order.publish(second, publish_second));
        assert!(futures::poll!(second_publish.as_mut()).is_pending());
        let publish_other = pin!(sent(&log, "publish of another session"));
        order.publish(other, publish_other).await;
        assert!(futures::poll!(second_publish.as_mut()).is_pending());
        order.publish(first, pin!(sent(&log, "publish 1"))).await;
        second_publish.await;
        assert_eq!(
            *log.lock().unwrap(),
            [
                "apply 1",
                "apply 2",
                "apply of another session",
                "publish of another session",
                "publish 1",
                "publish 2"
            ]
        );
    }

    #[tokio::test]
    async fn a_writer_that_gives_up_its_turn_lets_the_next_one_go() {
        let order = PublishOrder::new();
        let (failed, ()) = order.send("s", pin!(async {})).await;
        let (next, ()) = order.send("s", pin!(async {})).await;
        let published = pin!(async { "published" });
        let mut publish = pin!(order.publish(next, published));
        assert!(futures::poll!(publish.as_mut()).is_pending());
        drop(failed); // its apply failed: it publishes nothing
        assert_eq!(publish.await, "published");
        // The line is empty again: a new writer goes at once.
        let (turn, ()) = order.send("s", pin!(async {})).await;
        assert_eq!(order.publish(turn, pin!(async { 7 })).await, 7);
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
