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
    tx: mpsc::Sender<Arc<Live>>,
    /// The newest event dropped because the channel was full.
    lagged_until: Mutex<Option<StreamId>>,
    wake: Notify,
}

impl Slot {
    /// Records that `event_id` could not be queued and wakes the client.
    pub fn mark_lagged(&self, event_id: StreamId) {
        {
            let mut lag = self.lagged_until.lock().expect("lag lock");
            *lag = Some(lag.map_or(event_id, |l| l.max(event_id)));
        }
        // A permit is stored when the client is not waiting: the mark is never missed.
        self.wake.notify_one();
    }

    fn take_lag(&self) -> Option<StreamId> {
        self.lagged_until.lock().expect("lag lock").take()
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
}

impl Registry {
    fn shard(&self, sid: &str) -> &Shard {
        &self.shards[Keys::fanout_shard(sid, SHARDS) as usize]
    }

    /// Registers a client of session `sid`; it is removed when the subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, sid: &str, transport: Transport) -> Subscription {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            transport,
            tx,
            lagged_until: Mutex::new(None),
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

    /// The next live entry, or the news that some were dropped. Cancel-safe.
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
        if let Some(until) = self.slot.take_lag() {
            return Some(Signal::Lagged(until));
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
}
