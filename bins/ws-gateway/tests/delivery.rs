//! The delivery state machine over a real Redis: the lag path, which sockets cannot trigger
//! reliably (the client's channel must overflow while its socket keeps up).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fleet::stream::entry::StreamId;
use ws_gateway::connection::{Delivery, Resume};
use ws_gateway::registry::{CHANNEL_CAPACITY, Live, Registry, Transport};

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
