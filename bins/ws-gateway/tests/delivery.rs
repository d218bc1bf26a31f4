//! The delivery state machine over a real Redis: the lag path, which sockets cannot trigger
//! reliably (the client's channel must overflow while its socket keeps up), and the turns its
//! catch-ups take with admissions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fleet::stream::entry::StreamId;
use ws_gateway::connection::{Delivery, Resume};
use ws_gateway::registry::{CHANNEL_CAPACITY, Live, Registry, Transport};
use ws_gateway::routes::Admissions;

#[tokio::test]
async fn a_client_whose_channel_overflowed_catches_up_from_the_log() {
    let fleet = Fleet::new().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let registry = Arc::new(Registry::default());
    let mut d = Delivery::start(
        fleet.log.clone(),
        &registry,
        &s.sid,
        Transport::WebSocket,
        Resume::default(),
        Arc::new(Admissions::new(1)),
    )
    .await
    .expect("start");
    // The replay of the empty log ends; then the delivery waits for live entries.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), d.next())
            .await
            .is_err()
    );

    // More events than the channel holds, all fanned out at once while the client is busy.
    let n = CHANNEL_CAPACITY as u32 + 20;
    let ops: Vec<_> = (1..=n).map(|seq| chunk(&s.sid, &tid, seq, "x")).collect();
    let logged = fleet.emit(&s.sid, &ops, false).await;
    let mut queued = 0;
    for ev in &logged {
        queued += registry.dispatch(&s.sid, || {
            vec![Live {
                event_id: ev.event_id.parse().unwrap(),
                prev: ev.prev.parse::<StreamId>().ok(),
                json: Some(ev.json.clone().into_boxed_str()),
            }]
        });
    }
    assert_eq!(queued, CHANNEL_CAPACITY, "the rest were dropped");

    let mut got = Vec::new();
    for _ in 0..n {
        let out = tokio::time::timeout(WAIT, d.next())
            .await
            .expect("in time")
            .expect("log readable");
        got.push(out.event_id.expect("a log event").to_string());
    }
    let want: Vec<String> = logged.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(got, want, "every event once, in order");
    // The queued entries are all duplicates now.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), d.next())
            .await
            .is_err()
    );
}

/// The value of gauge `name` in this process's Prometheus text (0 when absent).
fn gauge(name: &str) -> f64 {
    fleet::admin::prometheus()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A live entry of `event_id` (its payload does not matter: a duplicate is skipped).
fn dup(event_id: &str) -> Vec<Live> {
    vec![Live {
        event_id: event_id.parse().unwrap(),
        prev: None,
        json: Some("{}".into()),
    }]
}

#[tokio::test]
async fn catch_ups_after_a_resync_or_a_lag_read_the_log_in_admission_turns() {
    // The recorder, before the first metric.
    fleet::admin::prometheus();
    let fleet = Fleet::new().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let first = fleet
        .emit(&s.sid, &[chunk(&s.sid, &tid, 1, "a")], false)
        .await;
    let registry = Arc::new(Registry::default());
    let admissions = Arc::new(Admissions::new(1));
    let mut d = Delivery::start(
        fleet.log.clone(),
        &registry,
        &s.sid,
        Transport::WebSocket,
        Resume::default(),
        admissions.clone(),
    )
    .await
    .expect("start");

    // The only turn is taken (say, by an admission waiting on Redis); the replay on connect
    // does not wait for it.
    let turn = admissions.turn().await.expect("a turn");
    let out = tokio::time::timeout(WAIT, d.next())
        .await
        .expect("the replay in time")
        .expect("log readable");
    assert_eq!(out.event_id, first[0].event_id.parse().ok());

    // The shard was trimmed past the reader: every client of it reads its log, in turns.
    let missed = fleet
        .emit(&s.sid, &[chunk(&s.sid, &tid, 2, "b")], false)
        .await;
    assert_eq!(registry.resync(None), 1);
    let reading = tokio::spawn(async move {
        let out = d.next().await;
        (d, out)
    });
    fleet_test_support::eventually(WAIT, "the resync waiting for a turn", || async {
        (gauge("fleet_ws_admissions_waiting") == 1.0).then_some(())
    })
    .await;
    assert!(!reading.is_finished(), "no log read without a turn");
    drop(turn);
    let (mut d, out) = tokio::time::timeout(WAIT, reading)
        .await
        .expect("the resync in time")
        .expect("no panic");
    assert_eq!(
        out.expect("log readable").event_id,
        missed[0].event_id.parse().ok()
    );
    assert_eq!(gauge("fleet_ws_admissions_waiting"), 0.0);

    // A lag mark: the channel overflowed (with duplicates), the newest entry dropped.
    let turn = admissions.turn().await.expect("a turn");
    let dropped = fleet
        .emit(&s.sid, &[chunk(&s.sid, &tid, 3, "c")], false)
        .await;
    for _ in 0..CHANNEL_CAPACITY {
        assert_eq!(registry.dispatch(&s.sid, || dup(&missed[0].event_id)), 1);
    }
    assert_eq!(registry.dispatch(&s.sid, || dup(&dropped[0].event_id)), 0);
    let reading = tokio::spawn(async move { d.next().await });
    fleet_test_support::eventually(WAIT, "the lag catch-up waiting for a turn", || async {
        (gauge("fleet_ws_admissions_waiting") == 1.0).then_some(())
    })
    .await;
    assert!(!reading.is_finished(), "no log read without a turn");
    drop(turn);
    let out = tokio::time::timeout(WAIT, reading)
        .await
        .expect("the catch-up in time")
        .expect("no panic")
        .expect("log readable");
    assert_eq!(out.event_id, dropped[0].event_id.parse().ok());
}
