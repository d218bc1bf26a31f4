//! The live connections of this gateway, by session: where the fan-out readers hand events.
//!
//! Every WebSocket or SSE client holds a [`Subscription`]: a bounded channel whose sender sits in
//! the registry under the client's session id. The registry is split into [`SHARDS`] maps, each
//! behind its own short-held mutex, so readers of different fan-out shards and connecting clients
//! rarely meet on one lock.
//!
//! A reader never waits for a client. When a client's channel is full, the reader drops the entry
//! and marks the client *lagging* up to that event id ([`Slot::mark_lagged`]); the client then
//! reads what it missed from the session log (see [`crate::connection`]). The per-client cost is
//! one slot (a channel of [`CHANNEL_CAPACITY`] pointers, a lag mark and a wake-up) and a map entry.
//!
//! A reader that finds its fan-out shard trimmed past the last entry it read has lost entries of
//! unknown sessions: it marks every client of that shard *resyncing* ([`Registry::resync`]), and
//! each reads its session log to the end (the same marks and wake-up as a lag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleet::Keys;
use fleet::session::WsPresence;
use fleet::session_log::FanoutEntry;
use fleet::stream::entry::StreamId;
use tokio::sync::{Notify, mpsc};

/// Number of independently locked maps.
pub const SHARDS: u32 = 64;

/// Live events a client may have queued before it is marked lagging.
///
/// A lagging client catches up from the session log, which costs Redis an XRANGE per page: on a
/// loaded machine, a bound of 128 events made clients that fell a second behind at once turn a
/// short stall into a backlog that kept growing (docs/performance.md). 1,024 is about five
/// seconds of a session's events at 100 tasks a second. Idle clients do not pay for it: the
/// channel allocates its slots 32 at a time as events queue. A client that stops reading holds
/// at most this many events, each shared with the session's other clients.
pub const CHANNEL_CAPACITY: usize = 1024;

/// One fan-out entry of a session this gateway serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Live {
    pub event_id: StreamId,
    /// The session's event before this one; `None` when this is its first.
    pub prev: Option<StreamId>,
    /// The event JSON without `event_id`; `None` for a nudge ("read the log up to `event_id`").
    pub json: Option<Box<str>>,
}

impl From<FanoutEntry> for Live {
    fn from(e: FanoutEntry) -> Self {
        Live {
            event_id: e.event_id,
            prev: e.prev,
            json: e.json.map(String::into_boxed_str),
        }
    }
}

/// What kind of client a subscription serves (only WebSockets count for presence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

/// The registry's side of one client.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    transport: Transport,
    /// The fan-out shard its session's entries come through; `None`: not known, any.
    fanout_shard: Option<u32>,
    tx: mpsc::Sender<Arc<Live>>,
    /// What the client missed outside its channel.
    behind: Mutex<Behind>,
    wake: Notify,
}

/// What a client missed outside its channel, told on its next receive.
#[derive(Debug, Default)]
struct Behind {
    /// The newest event dropped because the channel was full.
    lagged_until: Option<StreamId>,
    /// The fan-out lost entries that may be the session's.
    resync: bool,
}

impl Slot {
    /// Records that `event_id` could not be queued and wakes the client.
    pub fn mark_lagged(&self, event_id: StreamId) {
        {
            let mut behind = self.behind.lock().expect("lag lock");
            behind.lagged_until = Some(behind.lagged_until.map_or(event_id, |l| l.max(event_id)));
        }
        // A permit is stored when the client is not waiting: the mark is never missed.
        self.wake.notify_one();
    }

    /// Records that fan-out entries of unknown sessions were lost and wakes the client.
    fn mark_resync(&self) {
        self.behind.lock().expect("lag lock").resync = true;
        self.wake.notify_one();
    }

    fn take_behind(&self) -> Option<Signal> {
        let mut behind = self.behind.lock().expect("lag lock");
        if std::mem::take(&mut behind.resync) {
            // Reading the log to its end covers the lag too: a dropped event was logged before
            // its fan-out entry was read, so before the mark is taken.
            behind.lagged_until = None;
            return Some(Signal::Resync);
        }
        behind.lagged_until.take().map(Signal::Lagged)
    }
}

type Shard = Mutex<HashMap<Arc<str>, Vec<Arc<Slot>>>>;

/// The live connections of this gateway, by session id.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    /// Numbers the presence snapshots ([`Registry::websocket_presence`]).
    snapshots: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            snapshots: AtomicU64::new(1),
        }
    }
}

/// What a client learns from its subscription.
#[derive(Debug)]
pub enum Signal {
    Live(Arc<Live>),
    /// Entries up to this id were dropped while the channel was full.
    Lagged(StreamId),
    /// The fan-out lost entries that may be the session's: read the session log to its end.
    Resync,
}

impl Registry {
    fn shard(&self, sid: &str) -> &Shard {
        &self.shards[Keys::fanout_shard(sid, SHARDS) as usize]
    }

    /// Registers a client of session `sid`; it is removed when the subscription is dropped.
    /// Its fan-out shard is not known: a loss on any shard resyncs it
    /// ([`Registry::subscribe_on_shard`] tells it).
    pub fn subscribe(self: &Arc<Self>, sid: &str, transport: Transport) -> Subscription {
        self.subscribe_to(sid, transport, None)
    }

    /// Registers a client of session `sid`, whose entries come through fan-out shard
    /// `fanout_shard` ([`fleet::Keys::fanout_shard`]); it is removed when the subscription is
    /// dropped.
    pub fn subscribe_on_shard(
        self: &Arc<Self>,
        sid: &str,
        transport: Transport,
        fanout_shard: u32,
    ) -> Subscription {
        self.subscribe_to(sid, transport, Some(fanout_shard))
    }

    fn subscribe_to(
        self: &Arc<Self>,
        sid: &str,
        transport: Transport,
        fanout_shard: Option<u32>,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            transport,
            fanout_shard,
            tx,
            behind: Mutex::default(),
            wake: Notify::new(),
        });
        let sid: Arc<str> = Arc::from(sid);
        self.shard(&sid)
            .lock()
            .expect("registry lock")
            .entry(sid.clone())
            .or_default()
            .push(slot.clone());
        Subscription {
            registry: self.clone(),
            sid,
            slot,
            rx,
        }
    }

    fn unsubscribe(&self, sid: &str, id: u64) {
        let mut shard = self.shard(sid).lock().expect("registry lock");
        if let Some(slots) = shard.get_mut(sid) {
            slots.retain(|s| s.id != id);
            if slots.is_empty() {
                shard.remove(sid);
            }
        }
    }

    /// Hands the events of one fan-out entry of session `sid`, in order, to each of its
    /// clients, without ever waiting: a client whose channel is full is marked lagging instead.
    /// `events` is only called when the session has clients here. Returns the number of
    /// clients the last event was queued for.
    pub fn dispatch(&self, sid: &str, events: impl FnOnce() -> Vec<Live>) -> usize {
        let shard = self.shard(sid).lock().expect("registry lock");
        let Some(slots) = shard.get(sid) else {
            return 0;
        };
        let mut queued = 0;
        for live in events().into_iter().map(Arc::new) {
            queued = 0;
            for slot in slots {
                match slot.tx.try_send(live.clone()) {
                    Ok(()) => queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("fleet_ws_lagged_total").increment(1);
                        slot.mark_lagged(live.event_id);
                    }
                    // The client is going away; its subscription removes the slot.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        queued
    }

    /// Tells every client whose session's entries come through fan-out shard `fanout_shard`
    /// (every client, when `None`) to read its session log to the end: the shard's reader lost
    /// entries it cannot name. Returns the number of clients told. Rare (a reader that fell a
    /// whole shard behind); it walks every client.
    pub fn resync(&self, fanout_shard: Option<u32>) -> usize {
        let mut told = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock().expect("registry lock");
            for slot in shard.values().flatten() {
                let on_it = match (fanout_shard, slot.fanout_shard) {
                    (Some(lost), Some(own)) => lost == own,
                    _ => true,
                };
                if on_it {
                    slot.mark_resync();
                    told += 1;
                }
            }
        }
        told
    }

    /// How many WebSockets of session `sid` are registered here now, numbered so that of two
    /// snapshots of one session the later has the larger version (it is taken under the lock
    /// that registering and unregistering take).
    pub fn websocket_presence(&self, sid: &str) -> WsPresence {
        let shard = self.shard(sid).lock().expect("registry lock");
        let connections = shard.get(sid).map_or(0, |slots| {
            slots
                .iter()
                .filter(|s| s.transport == Transport::WebSocket)
                .count()
        });
        WsPresence {
            session_id: sid.to_owned(),
            connections: connections as u64,
            version: self.snapshots.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Sessions with at least one WebSocket on this gateway.
    pub fn websocket_sessions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().expect("registry lock");
            out.extend(
                shard
                    .iter()
                    .filter(|(_, slots)| slots.iter().any(|s| s.transport == Transport::WebSocket))
                    .map(|(sid, _)| sid.to_string()),
            );
        }
        out
    }

    /// Number of clients registered.
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .expect("registry lock")
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
            })
            .sum()
    }
}

/// One client's live feed; unregisters itself when dropped.
#[derive(Debug)]
pub struct Subscription {
    registry: Arc<Registry>,
    sid: Arc<str>,
    slot: Arc<Slot>,
    rx: mpsc::Receiver<Arc<Live>>,
}

impl Subscription {
    pub fn session_id(&self) -> &str {
        &self.sid
    }

    /// The next live entry, or the news that some were dropped or lost. Cancel-safe.
    pub async fn recv(&mut self) -> Signal {
        loop {
            if let Some(signal) = self.try_recv() {
                return signal;
            }
            tokio::select! {
                biased;
                live = self.rx.recv() => match live {
                    Some(live) => return Signal::Live(live),
                    // The slot holds the sender while the subscription lives: unreachable, but
                    // waiting for a wake-up is the right answer should it ever happen.
                    None => self.slot.wake.notified().await,
                },
                () = self.slot.wake.notified() => {}
            }
        }
    }

    /// What [`Subscription::recv`] would return now, without waiting: `None` when nothing is
    /// queued.
    pub fn try_recv(&mut self) -> Option<Signal> {
        if let Some(signal) = self.slot.take_behind() {
            return Some(signal);
        }
        self.rx.try_recv().ok().map(Signal::Live)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.unsubscribe(&self.sid, self.slot.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ms: u64, prev: Option<u64>) -> Vec<Live> {
        vec![Live {
            event_id: StreamId { ms, seq: 0 },
            prev: prev.map(|p| StreamId { ms: p, seq: 0 }),
            json: Some("{}".into()),
        }]
    }

    #[tokio::test]
    async fn entries_reach_only_their_session_and_subscriptions_unregister() {
        let reg = Arc::new(Registry::default());
        let mut a = reg.subscribe("a", Transport::WebSocket);
        let b = reg.subscribe("b", Transport::Sse);
        assert_eq!(reg.clients(), 2);
        assert_eq!(reg.dispatch("a", || live(1, None)), 1);
        assert_eq!(reg.dispatch("zzz", || panic!("no client: not built")), 0);
        match a.recv().await {
            Signal::Live(l) => assert_eq!(l.event_id.ms, 1),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(reg.websocket_sessions(), vec!["a".to_owned()]);
        drop(b);
        drop(a);
        assert_eq!(reg.clients(), 0);
        assert!(reg.websocket_sessions().is_empty());
    }

    #[tokio::test]
    async fn a_full_channel_marks_the_client_lagging_instead_of_blocking() {
        let reg = Arc::new(Registry::default());
        let mut a = reg.subscribe("a", Transport::WebSocket);
        for ms in 1..=CHANNEL_CAPACITY as u64 {
            assert_eq!(reg.dispatch("a", || live(ms, Some(ms - 1))), 1);
        }
        let over = CHANNEL_CAPACITY as u64 + 5;
        assert_eq!(reg.dispatch("a", || live(over - 1, None)), 0);
        assert_eq!(reg.dispatch("a", || live(over, None)), 0);
        // The lag is reported first, with the newest id dropped.
        match a.recv().await {
            Signal::Lagged(id) => assert_eq!(id.ms, over),
            other => panic!("unexpected {other:?}"),
        }
        match a.recv().await {
            Signal::Live(l) => assert_eq!(l.event_id.ms, 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_resync_reaches_the_clients_of_its_fan_out_shard_and_covers_a_lag() {
        let reg = Arc::new(Registry::default());
        let mut on_2 = reg.subscribe_on_shard("a", Transport::WebSocket, 2);
        let mut also_on_2 = reg.subscribe_on_shard("b", Transport::Sse, 2);
        let mut on_3 = reg.subscribe_on_shard("c", Transport::WebSocket, 3);
        let mut unknown = reg.subscribe("d", Transport::WebSocket);
        on_2.slot.mark_lagged(StreamId { ms: 7, seq: 0 });
        assert_eq!(reg.dispatch("b", || live(1, None)), 1);

        assert_eq!(
            reg.resync(Some(2)),
            3,
            "shard 2's clients and the one of no known shard"
        );
        // Reading the log to its end covers the lag: one signal.
        assert!(matches!(on_2.recv().await, Signal::Resync));
        assert!(on_2.try_recv().is_none());
        // Told before what is queued, like a lag.
        assert!(matches!(also_on_2.recv().await, Signal::Resync));
        assert!(matches!(also_on_2.recv().await, Signal::Live(_)));
        assert!(matches!(unknown.recv().await, Signal::Resync));
        assert!(on_3.try_recv().is_none());

        assert_eq!(reg.resync(None), 4);
        assert!(matches!(on_3.recv().await, Signal::Resync));
    }
}
