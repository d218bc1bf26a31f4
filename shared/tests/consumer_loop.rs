//! The consumer loop against a real redis-server: acks, dead letters (and dead letters Redis
//! refuses), reclaim, max deliveries, claim renewal while every handler slot is taken and while
//! stopping, graceful stop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet::Keys;
use fleet::envelope::{Envelope, TaskCancel, TaskCommand};
use fleet::stream::{ConsumerConfig, ConsumerLoop, Delivery, Handler, Outcome, groups, producer};
use fleet_test_support::eventually;
use fred::prelude::*;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

const GROUP: &str = "workers";

async fn setup() -> (Client, Keys) {
    let client = fleet::redis::connect(&fleet_test_support::redis())
        .await
        .unwrap();
    (client, Keys::new(&fleet_test_support::prefix()))
}

fn cancel(task: &str) -> Envelope<TaskCommand> {
    Envelope::new(TaskCommand::Cancel(TaskCancel {
        session_id: "s".into(),
        task_id: task.into(),
        reason: String::new(),
    }))
}

fn config(keys: &Keys, consumer: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(keys.tasks(), GROUP, consumer.into(), keys.dlq());
    c.block = Duration::from_millis(100);
    c.claim_idle = Duration::from_millis(300);
    c
}

/// Reports each delivery and answers a fixed outcome.
struct Recorder {
    seen: mpsc::UnboundedSender<(String, u32)>,
    outcome: Outcome,
    /// When set, the handler waits for it before answering.
    gate: Option<Arc<Mutex<()>>>,
}

impl Handler for Recorder {
    type Msg = TaskCommand;

    async fn handle(&self, batch: Vec<Delivery<TaskCommand>>) -> Vec<Outcome> {
        for d in &batch {
            let TaskCommand::Cancel(c) = &d.envelope.msg else {
                panic!("unexpected kind")
            };
            self.seen.send((c.task_id.clone(), d.deliveries)).unwrap();
        }
        if let Some(gate) = &self.gate {
            let _held = gate.lock().await;
        }
        vec![self.outcome.clone(); batch.len()]
    }
}

async fn dlq_entries(client: &Client, keys: &Keys) -> Vec<fleet::stream::StreamEntry> {
    let v: Value = client.xrange(keys.dlq(), "-", "+", None).await.unwrap();
    fleet::stream::entry::parse_entries(v).unwrap()
}

/// The dead-letter stream's entries once it has one (`what` names the wait).
async fn dead_letters(client: &Client, keys: &Keys, what: &str) -> Vec<fleet::stream::StreamEntry> {
    eventually(Duration::from_secs(10), what, || async {
        let l = dlq_entries(client, keys).await;
        (!l.is_empty()).then_some(l)
    })
    .await
}

/// The dead-letter stream's entries, or `None` while the key holds something else.
async fn dlq_entries_or_none(
    client: &Client,
    keys: &Keys,
) -> Option<Vec<fleet::stream::StreamEntry>> {
    let v: Value = client.xrange(keys.dlq(), "-", "+", None).await.ok()?;
    Some(fleet::stream::entry::parse_entries(v).unwrap())
}

/// One pending entry of the group, as XPENDING reports it.
#[derive(Debug)]
struct Pending {
    id: String,
    consumer: String,
    idle: Duration,
    deliveries: u64,
}

async fn pending(client: &Client, keys: &Keys) -> Vec<Pending> {
    let v: Value = client
        .xpending(keys.tasks(), GROUP, ("-", "+", 100))
        .await
        .unwrap();
    v.into_array()
        .into_iter()
        .map(|row| {
            let mut cols = row.into_array().into_iter();
            let mut next = || cols.next().expect("four columns");
            Pending {
                id: next().as_string().unwrap(),
                consumer: next().as_string().unwrap(),
                idle: Duration::from_millis(next().as_u64().unwrap()),
                deliveries: next().as_u64().unwrap(),
            }
        })
        .collect()
}

async fn pending_entry(client: &Client, keys: &Keys, id: &str) -> Option<Pending> {
    pending(client, keys).await.into_iter().find(|p| p.id == id)
}

/// Sends the text of every WARN and ERROR event (message and fields) to a channel: what the
/// loop logs is how a test learns that it gave up on something.
struct Warnings(mpsc::UnboundedSender<String>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={value:?}", field.name()));
            }
        }
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut text = Text(event.metadata().level().to_string());
            event.record(&mut text);
            let _ = self.0.send(text.0);
        }
    }
}

/// Routes this thread's events (a `#[tokio::test]` runs its tasks on it) to [`Warnings`].
fn capture_warnings() -> (
    tracing::subscriber::DefaultGuard,
    mpsc::UnboundedReceiver<String>,
) {
    use tracing_subscriber::layer::SubscriberExt;
    let (tx, rx) = mpsc::unbounded_channel();
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(Warnings(tx)));
    (guard, rx)
}

/// The next warning that contains `text` (a bounded wait, so a missing one fails the test).
async fn warning_with(warnings: &mut mpsc::UnboundedReceiver<String>, text: &str) -> String {
    let wait = async {
        loop {
            let w = warnings.recv().await.expect("the subscriber lives");
            if w.contains(text) {
                return w;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no warning containing `{text}`"))
}

#[tokio::test]
async fn acks_good_entries_and_dead_letters_undecodable_ones() {
    let (client, keys) = setup().await;
    producer::send(&client, &keys.tasks(), None, &cancel("t1"))
        .await
        .unwrap();
    let _: Value = client
        .xadd(
            keys.tasks(),
            false,
            None,
            "*",
            vec![
                ("v", "1"),
                ("kind", "task.cancel"),
                ("id", "not-a-uuid"),
                ("ts", "1"),
                ("body", "x"),
            ],
        )
        .await
        .unwrap();
    let _: Value = client
        .xadd(
            keys.tasks(),
            false,
            None,
            "*",
            vec![("hello", Bytes::from_static(b"\xff\x00"))],
        )
        .await
        .unwrap();
    producer::send(&client, &keys.tasks(), None, &cancel("t2"))
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: None,
    };
    let run = tokio::spawn(
        ConsumerLoop::new(config(&keys, "c1"), client.clone(), handler).run(stop.clone()),
    );

    assert_eq!(rx.recv().await.unwrap(), ("t1".into(), 1));
    assert_eq!(rx.recv().await.unwrap(), ("t2".into(), 1));
    let letters = eventually(Duration::from_secs(5), "two dead letters", || async {
        let l = dlq_entries(&client, &keys).await;
        (l.len() == 2).then_some(l)
    })
    .await;
    assert!(
        letters[0]
            .get_str("reason")
            .unwrap()
            .contains("`id` is not valid"),
        "{letters:?}"
    );
    assert!(
        letters[1]
            .get_str("reason")
            .unwrap()
            .contains("missing field `v`")
    );
    assert_eq!(letters[1].get("orig.hello").unwrap().as_ref(), b"\xff\x00");
    assert_eq!(letters[0].get_str("stream").unwrap(), keys.tasks());
    assert_eq!(letters[0].get_str("group").unwrap(), GROUP);
    assert_eq!(letters[0].get_str("deliveries").unwrap(), "1");

    let g = eventually(Duration::from_secs(5), "nothing pending", || async {
        let g = groups::group(&client, &keys.tasks(), GROUP)
            .await
            .unwrap()
            .unwrap();
        (g.pending == 0).then_some(g)
    })
    .await;
    assert_eq!(g.lag, Some(0));
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_entry_whose_dead_letter_is_refused_stays_pending_until_it_is_written() {
    let (client, keys) = setup().await;
    let (_capture, mut warnings) = capture_warnings();
    // Something else holds the dead-letter key: every XADD to it fails with WRONGTYPE.
    let _: () = client
        .set(keys.dlq(), "x", None, None, false)
        .await
        .unwrap();
    let id: String = client
        .xadd(
            keys.tasks(),
            false,
            None,
            "*",
            vec![("hello", Bytes::from_static(b"\xff\x00"))],
        )
        .await
        .unwrap();

    let (tx, _rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let mut cfg = config(&keys, "c1");
    cfg.max_deliveries = 1000;
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: None,
    };
    let run = tokio::spawn(ConsumerLoop::new(cfg, client.clone(), handler).run(stop.clone()));

    let refused = warning_with(&mut warnings, "WRONGTYPE").await;
    let p = pending_entry(&client, &keys, &id).await;
    assert!(
        p.as_ref().is_some_and(|p| p.consumer == "c1"),
        "the entry whose dead letter was refused is still pending: {p:?}"
    );
    assert!(
        refused.contains(&id) && refused.contains("stays pending"),
        "the refusal names the entry: {refused}"
    );
    assert!(dlq_entries_or_none(&client, &keys).await.is_none());

    // Once the dead-letter stream can be written again, reclaim brings the entry back and it
    // is dead-lettered then.
    let _: i64 = client.del(keys.dlq()).await.unwrap();
    let letters = eventually(
        Duration::from_secs(10),
        "the dead letter written",
        || async {
            let l = dlq_entries(&client, &keys).await;
            (!l.is_empty()).then_some(l)
        },
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].get_str("entry_id").unwrap(), id);
    assert!(
        letters[0]
            .get_str("reason")
            .unwrap()
            .contains("undecodable entry")
    );
    let deliveries: u32 = letters[0].get_str("deliveries").unwrap().parse().unwrap();
    assert!(deliveries >= 2, "dead-lettered on a later delivery");
    eventually(Duration::from_secs(5), "the entry acked", || async {
        pending(&client, &keys).await.is_empty().then_some(())
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn takes_over_entries_of_a_dead_consumer() {
    let (client, keys) = setup().await;
    groups::ensure_group(&client, &keys.tasks(), GROUP)
        .await
        .unwrap();
    producer::send(&client, &keys.tasks(), None, &cancel("orphan"))
        .await
        .unwrap();
    // A consumer reads it and dies without acking.
    let _: Value = client
        .xreadgroup(GROUP, "dead", Some(10), None, false, keys.tasks(), ">")
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: None,
    };
    let run = tokio::spawn(
        ConsumerLoop::new(config(&keys, "alive"), client.clone(), handler).run(stop.clone()),
    );

    assert_eq!(rx.recv().await.unwrap(), ("orphan".into(), 2));
    eventually(Duration::from_secs(5), "the orphan acked", || async {
        let g = groups::group(&client, &keys.tasks(), GROUP)
            .await
            .unwrap()
            .unwrap();
        (g.pending == 0).then_some(())
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn dead_letters_an_entry_after_max_deliveries() {
    let (client, keys) = setup().await;
    producer::send(&client, &keys.tasks(), None, &cancel("poison"))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let mut cfg = config(&keys, "c1");
    cfg.max_deliveries = 3;
    cfg.claim_idle = Duration::from_millis(100);
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Retry,
        gate: None,
    };
    let run = tokio::spawn(ConsumerLoop::new(cfg, client.clone(), handler).run(stop.clone()));

    for n in 1..=3 {
        assert_eq!(rx.recv().await.unwrap(), ("poison".into(), n));
    }
    let letters = dead_letters(&client, &keys, "the poison entry dead-lettered").await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]
            .get_str("reason")
            .unwrap()
            .contains("delivered 3 times")
    );
    assert_eq!(letters[0].get_str("orig.kind").unwrap(), "task.cancel");
    let g = groups::group(&client, &keys.tasks(), GROUP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.pending, 0);
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(rx.try_recv().is_err(), "a dead letter is not handled again");
}

/// Acks every entry but `poison`, on which it panics.
struct PanicsOnPoison;

impl Handler for PanicsOnPoison {
    type Msg = TaskCommand;

    async fn handle(&self, batch: Vec<Delivery<TaskCommand>>) -> Vec<Outcome> {
        for d in &batch {
            if let TaskCommand::Cancel(c) = &d.envelope.msg
                && c.task_id == "poison"
            {
                panic!("the handler cannot take `poison`");
            }
        }
        vec![Outcome::Ack; batch.len()]
    }
}

#[tokio::test]
async fn an_entry_whose_handler_panics_is_delivered_again_then_dead_lettered() {
    let (client, keys) = setup().await;
    let mut cfg = config(&keys, "c1");
    cfg.max_deliveries = 2;
    cfg.claim_idle = Duration::from_millis(100);
    // One entry per batch, so the good one is not in the panicked batch.
    cfg.batch = 1;
    let stop = CancellationToken::new();
    let run =
        tokio::spawn(ConsumerLoop::new(cfg, client.clone(), PanicsOnPoison).run(stop.clone()));
    producer::send(&client, &keys.tasks(), None, &cancel("poison"))
        .await
        .unwrap();
    producer::send(&client, &keys.tasks(), None, &cancel("good"))
        .await
        .unwrap();
    // Not left pending for good (its claim renewed by a loop that thinks it is in hand): the
    // loop delivers it again, as a dead consumer's, and dead-letters it past max_deliveries.
    let letters = dead_letters(
        &client,
        &keys,
        "the entry whose handler panicked dead-lettered",
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]
            .get_str("reason")
            .unwrap()
            .contains("delivered 2 times"),
        "{:?}",
        letters[0].get_str("reason")
    );
    let g = groups::group(&client, &keys.tasks(), GROUP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        g.pending, 0,
        "the good entry acked, the poison dead-lettered"
    );
    assert!(!run.is_finished(), "the loop keeps serving");
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stop_finishes_the_batch_in_hand_before_returning() {
    let (client, keys) = setup().await;
    let gate = Arc::new(Mutex::new(()));
    let held = gate.clone().lock_owned().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: Some(gate),
    };
    let run = tokio::spawn(
        ConsumerLoop::new(config(&keys, "c1"), client.clone(), handler).run(stop.clone()),
    );
    producer::send(&client, &keys.tasks(), None, &cancel("in-hand"))
        .await
        .unwrap();
    assert_eq!(rx.recv().await.unwrap().0, "in-hand");

    stop.cancel();
    assert!(!run.is_finished());
    drop(held);
    run.await.unwrap().unwrap();
    let g = groups::group(&client, &keys.tasks(), GROUP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        g.pending, 0,
        "the batch in hand was acked before the loop returned"
    );
    assert_eq!(g.consumers, 0, "a clean stop leaves no consumer behind");
}

#[tokio::test]
async fn trims_only_what_every_group_acknowledged() {
    let (client, keys) = setup().await;
    let stream = keys.tasks();
    groups::ensure_group(&client, &stream, "fast")
        .await
        .unwrap();
    groups::ensure_group(&client, &stream, "slow")
        .await
        .unwrap();
    for i in 0..300 {
        producer::send(&client, &stream, None, &cancel(&format!("t{i}")))
            .await
            .unwrap();
    }
    // "fast" read and acked everything; "slow" read 100 and acked none.
    let all: Value = client
        .xreadgroup("fast", "f", Some(1000), None, true, &stream, ">")
        .await
        .unwrap();
    drop(all);
    let some: Value = client
        .xreadgroup("slow", "s", Some(100), None, false, &stream, ">")
        .await
        .unwrap();
    let oldest_pending = fleet::stream::entry::parse_read(some).unwrap()[0].1[0].id;
    let floor = groups::trim_acknowledged(&client, &stream)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(floor, oldest_pending);
    let first: Value = client.xrange(&stream, "-", "+", Some(1)).await.unwrap();
    let first = fleet::stream::entry::parse_entries(first).unwrap()[0].id;
    assert!(
        first <= oldest_pending,
        "nothing the slow group still needs was trimmed"
    );
}

#[tokio::test]
async fn group_gauges_report_lag_pending_and_the_oldest_pending_age() {
    fleet::admin::prometheus(); // as every binary does at build time
    let (client, keys) = setup().await;
    let stream = keys.tasks();
    groups::ensure_group(&client, &stream, GROUP).await.unwrap();
    for i in 0..3 {
        producer::send(&client, &stream, None, &cancel(&format!("t{i}")))
            .await
            .unwrap();
    }
    // One delivered and left pending, two never delivered.
    let _: Value = client
        .xreadgroup(GROUP, "c", Some(1), None, false, &stream, ">")
        .await
        .unwrap();
    groups::sample(&client, &stream, GROUP).await.unwrap();
    let text = fleet::admin::prometheus().render();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&stream))
            .unwrap_or_else(|| panic!("{name} for {stream} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(line("fleet_stream_lag{"), 2.0);
    assert_eq!(line("fleet_stream_pending{"), 1.0);
    assert!(line("fleet_stream_oldest_pending_age_seconds{") >= 0.0);
}

#[tokio::test]
async fn a_group_removed_under_a_running_loop_is_created_again() {
    let (client, keys) = setup().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: None,
    };
    let run = tokio::spawn(
        ConsumerLoop::new(config(&keys, "c1"), client.clone(), handler).run(stop.clone()),
    );
    producer::send(&client, &keys.tasks(), None, &cancel("before"))
        .await
        .unwrap();
    assert_eq!(rx.recv().await.unwrap(), ("before".into(), 1));

    // Someone removes the group: the loop's next read answers NOGROUP.
    let removed: i64 = client.xgroup_destroy(keys.tasks(), GROUP).await.unwrap();
    assert_eq!(removed, 1);
    eventually(
        Duration::from_secs(5),
        "the group created again",
        || async {
            groups::group(&client, &keys.tasks(), GROUP)
                .await
                .unwrap()
                .map(drop)
        },
    )
    .await;
    producer::send(&client, &keys.tasks(), None, &cancel("after"))
        .await
        .unwrap();
    // The new group starts from the stream's first entry: `before` again, then `after`.
    assert_eq!(rx.recv().await.unwrap(), ("before".into(), 1));
    assert_eq!(rx.recv().await.unwrap(), ("after".into(), 1));
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// With every handler slot taken by a long task: the loop takes over no idle entry (it has no
/// slot to handle it in) and keeps renewing its claim on the task, so a peer never steals it,
/// neither while the loop runs nor while it stops and waits for the task to finish.
#[tokio::test]
async fn a_long_task_keeps_its_claim_while_every_slot_is_taken_and_while_stopping() {
    let (client, keys) = setup().await;
    let claim_idle = Duration::from_millis(600);
    let config = |consumer: &str| {
        let mut c = config(&keys, consumer);
        c.claim_idle = claim_idle;
        c.max_deliveries = 1000;
        c
    };
    let gate = Arc::new(Mutex::new(()));
    let held = gate.clone().lock_owned().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let mut cfg = config("alive");
    cfg.batch = 1;
    cfg.max_in_flight = 1;
    let handler = Recorder {
        seen: tx,
        outcome: Outcome::Ack,
        gate: Some(gate),
    };
    let run = tokio::spawn(ConsumerLoop::new(cfg, client.clone(), handler).run(stop.clone()));
    let live = producer::send(&client, &keys.tasks(), None, &cancel("live"))
        .await
        .unwrap()
        .to_string();
    assert_eq!(rx.recv().await.unwrap(), ("live".into(), 1));

    // A consumer reads another entry and dies without acking. "alive" has no free slot, so it
    // reads nothing more.
    let orphan = producer::send(&client, &keys.tasks(), None, &cancel("orphan"))
        .await
        .unwrap()
        .to_string();
    let _: Value = client
        .xreadgroup(GROUP, "dead", Some(10), None, false, keys.tasks(), ">")
        .await
        .unwrap();
    // Let "alive"'s housekeeping see the orphan idle past claim_idle (it runs every
    // claim_idle / 2): it must leave it, having no slot for it.
    let seen = eventually(
        Duration::from_secs(10),
        "the orphan idle for two claim_idle periods, or taken",
        || async {
            let p = pending_entry(&client, &keys, &orphan).await.unwrap();
            (p.consumer != "dead" || p.idle >= claim_idle * 2).then_some(p)
        },
    )
    .await;
    assert_eq!(
        (seen.consumer.as_str(), seen.deliveries),
        ("dead", 1),
        "an entry is taken over only into a free slot"
    );

    // A peer with free slots takes the orphan over, and retries it: each redelivery to the peer
    // comes after another claim_idle, while "live" must stay with "alive".
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let peer_stop = CancellationToken::new();
    let peer = Recorder {
        seen: peer_tx,
        outcome: Outcome::Retry,
        gate: None,
    };
    let peer_run = tokio::spawn(
        ConsumerLoop::new(config("peer"), client.clone(), peer).run(peer_stop.clone()),
    );
    peer_redelivers(&mut peer_rx, 2..=4).await;
    assert_held_by_alive(&client, &keys, &live, "while it runs").await;

    // Stopping: "alive" waits for its task, and keeps it meanwhile.
    stop.cancel();
    peer_redelivers(&mut peer_rx, 5..=7).await;
    assert!(!run.is_finished());
    assert_held_by_alive(&client, &keys, &live, "while it stops").await;

    drop(held);
    run.await.unwrap().unwrap();
    assert!(pending_entry(&client, &keys, &live).await.is_none());
    peer_stop.cancel();
    peer_run.await.unwrap().unwrap();
}

/// Waits for the peer to handle the orphan with each of `deliveries`, and nothing else (a
/// bounded wait, so a peer that never gets it fails the test).
async fn peer_redelivers(
    peer_rx: &mut mpsc::UnboundedReceiver<(String, u32)>,
    deliveries: std::ops::RangeInclusive<u32>,
) {
    for n in deliveries {
        let got = tokio::time::timeout(Duration::from_secs(10), peer_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the peer never got delivery {n} of the orphan"));
        assert_eq!(
            got.unwrap(),
            ("orphan".into(), n),
            "the peer handles the orphan, and only it"
        );
    }
}

async fn assert_held_by_alive(client: &Client, keys: &Keys, id: &str, when: &str) {
    let p = pending_entry(client, keys, id).await.unwrap();
    assert_eq!(
        (p.consumer.as_str(), p.deliveries),
        ("alive", 1),
        "the long task stays with its consumer {when}"
    );
}
