//! The per-client delivery state machine, shared by WebSocket and SSE clients.
//!
//! Guarantee: a client receives every event of its session after its `last_event_id`, in log
//! order, each once, across reconnects, gateway restarts and lost fan-out entries.
//!
//! How ([`Delivery`]):
//!
//! 1. Subscribe to live entries **first** (they queue in the subscription), **then** replay the
//!    session log after `last_event_id`, page by page. An event logged after the replay read
//!    has its fan-out entry written after that, so the subscription sees it.
//! 2. Track `last`, the id of the newest event handed out. For each live entry:
//!    * `event_id <= last`: a duplicate (already replayed or delivered): skip;
//!    * it has a payload and `prev == last` (`prev` empty: the session's first event, which
//!      follows only "nothing delivered"): hand it out as is;
//!    * otherwise (a gap: a fan-out entry was lost; or a nudge without payload): read the log
//!      after `last` up to `event_id` inclusive and hand those out. This is a *gap fill*.
//! 3. A client whose subscription overflowed is told the newest dropped id and gap-fills up to it.
//! 4. A client whose fan-out shard was trimmed past its reader's position (the reader lost
//!    entries of unknown sessions, [`crate::fanout`]) is told to *resync*: it reads the log after
//!    `last` to its end, as the replay on connect does.
//! 5. The catch-ups of 3 and 4 take turns with admissions ([`Admissions`]) for each read of the
//!    log: a resync tells every client of a shard at once, and a stall of the gateway leaves many
//!    clients lagging at once. Unbounded, their reads would queue on the shared Redis connection
//!    until its command timeout failed them (each socket closed with 1011, then a reconnect
//!    storm); in turns they wait instead.
//!
//! Every read of the log (the replay, a gap fill, a resync) goes through one page reader, which
//! checks each entry's `p` (the session's event before it): an entry whose `p` is after `last`
//! means the log itself no longer holds the events between them. When `last_event_id` is older
//! than the oldest event still in the log, or any later read finds such a hole, what is left is
//! delivered after an `error` message with `error_type` `events_lost`; so is a gap fill that finds
//! the event it was sent for gone from the log.

use std::collections::VecDeque;
use std::sync::Arc;

use fleet::Keys;
use fleet::events::{ServerMessage, with_event_id};
use fleet::session_log::SessionLog;
use fleet::stream::entry::StreamId;

use crate::registry::{Live, Registry, Signal, Subscription, Transport};
use crate::routes::Admissions;

/// Events read from the log per XRANGE.
pub const PAGE: u64 = 256;

/// `error_type` of the message telling a client that events it asked for are gone.
pub const EVENTS_LOST: &str = "events_lost";

/// One message for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Set for events of the session log; `None` for replies that are not part of it.
    pub event_id: Option<StreamId>,
    /// The JSON text to send (with `event_id` spliced in for log events).
    pub json: String,
}

impl Outgoing {
    fn event(event_id: StreamId, json: &str) -> Self {
        Outgoing {
            event_id: Some(event_id),
            json: with_event_id(json, &event_id.to_string()),
        }
    }

    /// A reply that is not part of the session's history.
    pub fn reply(msg: &ServerMessage) -> Self {
        Outgoing {
            event_id: None,
            json: msg.to_json(),
        }
    }
}

/// How far to read the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// To its end (the replay on connect).
    End,
    /// Up to this event id, inclusive (a gap fill).
    Upto(StreamId),
}

/// Where a client starts.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// The last event the client has (`None`: send everything the log holds).
    pub after: Option<StreamId>,
    /// The session's newest event id, as its hash records it.
    pub session_last: Option<StreamId>,
}

/// Delivers a session's events to one client. See the module docs.
pub struct Delivery {
    log: SessionLog,
    live: Subscription,
    /// The newest event handed out (or queued in `pending`).
    last: Option<StreamId>,
    pending: VecDeque<Outgoing>,
    catch_up: Option<Target>,
    /// Turns for the reads of catch-ups many clients may start at once (see the module docs).
    admissions: Arc<Admissions>,
    /// Whether the catch-up under way waits for a turn before each read: one a lag mark or a
    /// resync started.
    in_turns: bool,
}

impl Delivery {
    /// Subscribes to the session's live events, then prepares the replay after `resume.after`.
    /// Reads the log once, to tell whether events the client asks for were trimmed. Its
    /// catch-ups after a lag or a resync read the log in turns taken from `admissions`.
    pub async fn start(
        log: SessionLog,
        registry: &Arc<Registry>,
        sid: &str,
        transport: Transport,
        resume: Resume,
        admissions: Arc<Admissions>,
    ) -> Result<Delivery, fred::error::Error> {
        // A resume point after the session's newest event is none of its events (made up, or
        // kept from before a failover that lost the newest ones): every event the session logs
        // from now on comes after its newest, so resume there. Kept as it is, every event up to
        // it would be taken for one delivered, and skipped without a word.
        let after = match resume.after {
            Some(after) if resume.session_last.is_none_or(|l| after > l) => resume.session_last,
            after => after,
        };
        // Live events first, so that nothing logged after the replay's read can slip by.
        let shard = Keys::fanout_shard(sid, log.fanout_config().shards);
        let live = registry.subscribe_on_shard(sid, transport, shard);
        let mut d = Delivery {
            log,
            live,
            last: after,
            pending: VecDeque::new(),
            catch_up: Some(Target::End),
            admissions,
            in_turns: false,
        };
        if let Some(after) = after {
            // Told here, before anything is sent; `last` then moves past what is gone so that
            // the replay's reads do not tell it again.
            match d.log.oldest(sid).await? {
                Some(oldest) if oldest.lost_since(after) => {
                    d.lost(&format!(
                        "events before {} are no longer in the session log; events between \
                         {after} and {} are lost",
                        oldest.event_id, oldest.event_id
                    ));
                    d.last = oldest.prev;
                }
                None if resume.session_last.is_some_and(|l| l > after) => {
                    d.lost(&format!(
                        "the session log no longer holds the events after {after}; they are lost"
                    ));
                    d.last = resume.session_last;
                }
                _ => {}
            }
        }
        Ok(d)
    }

    /// Queues the `events_lost` error: events after `last` that the log no longer holds.
    fn lost(&mut self, message: &str) {
        metrics::counter!("fleet_ws_events_lost_total").increment(1);
        self.pending
            .push_back(Outgoing::reply(&ServerMessage::error(
                self.live.session_id(),
                EVENTS_LOST,
                message,
            )));
    }

    pub fn session_id(&self) -> &str {
        self.live.session_id()
    }

    /// The newest event id handed out so far.
    pub fn last_event_id(&self) -> Option<StreamId> {
        self.last
    }

    /// The next message for the client: waits for live events when there is nothing to send.
    /// Cancel-safe: state changes only after each read completed.
    pub async fn next(&mut self) -> Result<Outgoing, fred::error::Error> {
        loop {
            if let Some(out) = self.pop_pending() {
                return Ok(out);
            }
            if let Some(target) = self.catch_up {
                // Boxed: an idle connection should not carry the read's state.
                Box::pin(self.catch_up_page(target)).await?;
                continue;
            }
            let signal = self.live.recv().await;
            self.on_signal(signal);
        }
    }

    /// The next message if one can be handed out without waiting or reading the log: what
    /// [`Delivery::next`] would return at once, or `None`. A sender drains these after each
    /// `next` to write everything ready in one go.
    pub fn ready(&mut self) -> Option<Outgoing> {
        loop {
            if let Some(out) = self.pop_pending() {
                return Some(out);
            }
            if self.catch_up.is_some() {
                return None;
            }
            let signal = self.live.try_recv()?;
            self.on_signal(signal);
        }
    }

    fn pop_pending(&mut self) -> Option<Outgoing> {
        let out = self.pending.pop_front()?;
        if self.pending.is_empty() && self.pending.capacity() > 16 {
            // A replay page was delivered: give its buffer back.
            self.pending = VecDeque::new();
        }
        Some(out)
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Live(live) => self.on_live(&live),
            Signal::Lagged(until) => {
                self.gap_fill(until);
                self.in_turns = self.catch_up.is_some();
            }
            Signal::Resync => {
                metrics::counter!("fleet_ws_resyncs_total").increment(1);
                // To the end: which entries were lost is not known, but their events were
                // logged before the reader noticed, so before this read of the log.
                self.catch_up = Some(Target::End);
                self.in_turns = true;
            }
        }
    }

    /// Applies the delivery rule to one live entry.
    fn on_live(&mut self, live: &Live) {
        if self.last.is_some_and(|l| live.event_id <= l) {
            return; // already delivered
        }
        match &live.json {
            Some(json) if live.prev == self.last => {
                self.pending.push_back(Outgoing::event(live.event_id, json));
                self.last = Some(live.event_id);
            }
            _ => self.gap_fill(live.event_id),
        }
    }

    fn gap_fill(&mut self, until: StreamId) {
        if self.last.is_some_and(|l| until <= l) {
            return;
        }
        metrics::counter!("fleet_ws_gap_fills_total").increment(1);
        self.catch_up = Some(match self.catch_up {
            // A replay to the end covers any gap.
            Some(Target::End) => Target::End,
            Some(Target::Upto(u)) => Target::Upto(u.max(until)),
            None => Target::Upto(until),
        });
    }

    /// Reads one page of the catch-up under way, in its turn when it takes turns.
    async fn catch_up_page(&mut self, target: Target) -> Result<(), fred::error::Error> {
        let admissions = self.in_turns.then(|| self.admissions.clone());
        let _turn = match &admissions {
            Some(admissions) => admissions.turn().await,
            None => None,
        };
        self.read_page(target).await
    }

    /// Reads one page of the log after `last`, up to `target`.
    async fn read_page(&mut self, target: Target) -> Result<(), fred::error::Error> {
        let until = match target {
            Target::End => None,
            Target::Upto(u) => Some(u),
        };
        if let (Some(u), Some(l)) = (until, self.last)
            && u <= l
        {
            self.catch_up = None;
            self.in_turns = false;
            return Ok(());
        }
        let page = self
            .log
            .replay_after(self.live.session_id(), self.last, until, PAGE)
            .await?;
        let more = page.len() as u64 >= PAGE;
        for entry in page {
            if let Some(l) = self.last {
                if entry.event_id <= l {
                    continue;
                }
                if entry.lost_since(l) {
                    // The log was trimmed past `last`: the events between are gone.
                    self.lost(&format!(
                        "events between {l} and {} are no longer in the session log; they are \
                         lost",
                        entry.event_id
                    ));
                }
            }
            self.pending
                .push_back(Outgoing::event(entry.event_id, &entry.json));
            self.last = Some(entry.event_id);
        }
        if !more {
            self.catch_up = None;
            self.in_turns = false;
            if let Some(u) = until
                && self.last.is_none_or(|l| l < u)
            {
                // `u` names an event the log held (a live entry, a nudge, a dropped entry); the
                // log no longer holds it, nor what came before it. Gone: do not ask again.
                self.lost(&format!(
                    "the session log no longer holds the events up to {u}; they are lost"
                ));
                self.last = Some(u);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fleet::Keys;
    use fleet::session_log::FanoutConfig;

    use super::*;

    fn id(ms: u64) -> StreamId {
        StreamId { ms, seq: 0 }
    }

    fn live(ms: u64, prev: Option<u64>, payload: bool) -> Live {
        Live {
            event_id: id(ms),
            prev: prev.map(id),
            json: payload.then(|| format!("{{\"n\":{ms}}}").into_boxed_str()),
        }
    }

    /// A delivery whose replay is over, resuming after `last`; never touches Redis.
    async fn delivery(last: Option<u64>) -> (Delivery, Arc<Registry>) {
        let registry = Arc::new(Registry::default());
        let log = SessionLog::new(
            fred::prelude::Client::default(),
            Keys::new("t"),
            FanoutConfig::default(),
        );
        let admissions = Arc::new(Admissions::new(1));
        let mut d = Delivery::start(
            log,
            &registry,
            "s",
            Transport::Sse,
            Resume::default(),
            admissions,
        )
        .await
        .expect("no I/O without a resume point");
        d.catch_up = None;
        d.last = last.map(id);
        (d, registry)
    }

    #[tokio::test]
    async fn in_order_entries_are_delivered_and_duplicates_skipped() {
        let (mut d, _r) = delivery(None).await;
        d.on_live(&live(5, None, true)); // the session's first event
        d.on_live(&live(6, Some(5), true));
        d.on_live(&live(6, Some(5), true)); // duplicate
        d.on_live(&live(4, None, true)); // older than delivered
        let sent: Vec<_> = d.pending.iter().map(|o| o.event_id).collect();
        assert_eq!(sent, vec![Some(id(5)), Some(id(6))]);
        assert_eq!(d.pending[1].json, "{\"event_id\":\"6-0\",\"n\":6}");
        assert_eq!(d.catch_up, None);
        assert_eq!(d.last_event_id(), Some(id(6)));
    }

    #[tokio::test]
    async fn a_gap_or_a_nudge_reads_the_log_up_to_the_entry() {
        let (mut d, _r) = delivery(Some(5)).await;
        d.on_live(&live(8, Some(7), true)); // 6..7 missing
        assert!(d.pending.is_empty());
        assert_eq!(d.catch_up, Some(Target::Upto(id(8))));

        let (mut d, _r) = delivery(Some(5)).await;
        d.on_live(&live(9, None, false)); // a nudge
        assert_eq!(d.catch_up, Some(Target::Upto(id(9))));

        // Nothing delivered yet, but the entry has a predecessor: read the log from its start.
        let (mut d, _r) = delivery(None).await;
        d.on_live(&live(3, Some(2), true));
        assert_eq!(d.catch_up, Some(Target::Upto(id(3))));

        // A nudge for what was delivered changes nothing.
        let (mut d, _r) = delivery(Some(9)).await;
        d.on_live(&live(9, None, false));
        assert_eq!(d.catch_up, None);
    }

    #[tokio::test]
    async fn what_is_ready_is_handed_out_without_waiting_and_a_gap_stops_it() {
        let (mut d, registry) = delivery(Some(5)).await;
        assert_eq!(d.ready(), None);
        // One fan-out entry with two events (a chunk and the result), then one after a gap.
        registry.dispatch("s", || vec![live(6, Some(5), true), live(7, Some(6), true)]);
        registry.dispatch("s", || vec![live(9, Some(8), true)]);
        let first = d.next().await.expect("queued");
        assert_eq!(first.event_id, Some(id(6)));
        assert_eq!(d.ready().map(|o| o.event_id), Some(Some(id(7))));
        // Event 8 must come from the log: not ready.
        assert_eq!(d.ready(), None);
        assert_eq!(d.catch_up, Some(Target::Upto(id(9))));
        assert_eq!(d.last_event_id(), Some(id(7)));
    }

    #[tokio::test]
    async fn a_resync_reads_the_log_to_its_end() {
        let (mut d, registry) = delivery(Some(5)).await;
        assert_eq!(registry.resync(None), 1);
        assert_eq!(d.ready(), None);
        assert_eq!(d.catch_up, Some(Target::End));

        // It covers a gap fill under way.
        let (mut d, _r) = delivery(Some(5)).await;
        d.gap_fill(id(7));
        d.on_signal(Signal::Resync);
        assert_eq!(d.catch_up, Some(Target::End));
    }

    #[tokio::test]
    async fn a_lag_mark_becomes_a_gap_fill() {
        let (mut d, _r) = delivery(Some(5)).await;
        d.gap_fill(id(7));
        d.gap_fill(id(12));
        assert_eq!(d.catch_up, Some(Target::Upto(id(12))));
    }
}
