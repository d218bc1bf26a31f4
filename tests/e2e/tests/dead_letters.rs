//! An entry no worker can decode, on each worker's stream, lands in the dead-letter stream with
//! its reason, and every worker keeps serving.

use std::time::Duration;

use fleet::stream::entry::{StreamEntry, parse_entries};
use fleet_e2e::{AGENT, Fleet, Options};
use fred::prelude::*;

/// The dead-letter stream once it holds `n` entries (no more: asserted).
async fn dead_letters(fleet: &Fleet, n: usize) -> Vec<StreamEntry> {
    let what = format!("{n} dead letters");
    let letters = fleet_test_support::eventually(Duration::from_secs(10), &what, || async {
        let v: Value = fleet
            .client
            .xrange(fleet.keys.dlq(), "-", "+", None)
            .await
            .unwrap();
        let l = parse_entries(v).unwrap();
        (l.len() >= n).then_some(l)
    })
    .await;
    assert_eq!(letters.len(), n);
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_stream_is_dead_lettered_and_work_goes_on() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let streams = [
        fleet.keys.tasks(),
        fleet.keys.callbacks(),
        fleet.keys.exec(fleet::agent::DEFAULT_POOL),
    ];
    for stream in &streams {
        let _: String = fleet
            .client
            .xadd(
                stream,
                false,
                None,
                "*",
                vec![
                    ("v", "1"),
                    ("kind", "no.such.kind"),
                    ("id", "x"),
                    ("ts", "1"),
                    ("body", "x"),
                ],
            )
            .await
            .unwrap();
        let _: String = fleet
            .client
            .xadd(stream, false, None, "*", vec![("hello", "world")])
            .await
            .unwrap();
    }

    let letters = dead_letters(&fleet, 6).await;
    for stream in &streams {
        let mine: Vec<_> = letters
            .iter()
            .filter(|l| l.get_str("stream") == Some(stream.as_str()))
            .collect();
        assert_eq!(mine.len(), 2, "two dead letters from {stream}");
        assert!(mine.iter().all(|l| {
            l.get_str("reason")
                .unwrap()
                .starts_with("undecodable entry")
        }));
        assert!(
            mine.iter()
                .any(|l| l.get_str("orig.hello") == Some("world"))
        );
    }

    // Every worker is still there: a task goes all the way through.
    let sid = fleet.open_session(AGENT).await.session_id;
    let tid = fleet.submit(&sid, "still here").await;
    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().message_type, "chat_response");
    fleet.stop().await;
}

/// A `batch` body as an executor in any language writes it (docs/protocol.md).
#[derive(serde::Serialize)]
struct Batch {
    callbacks: Vec<BatchItem>,
}

#[derive(serde::Serialize)]
struct BatchItem {
    kind: &'static str,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_two_tasks_is_dead_lettered_with_its_reason() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let started = |tid: &str| BatchItem {
        kind: "started",
        body: rmp_serde::to_vec_named(&fleet::envelope::Started {
            session_id: "s".into(),
            task_id: tid.into(),
            attempt: 1,
            seq: 1,
            executor: String::new(),
        })
        .unwrap(),
    };
    let body = rmp_serde::to_vec_named(&Batch {
        callbacks: vec![started("t1"), started("t2")],
    })
    .unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let _: String = fleet
        .client
        .xadd(
            fleet.keys.callbacks(),
            false,
            None,
            "*",
            vec![
                ("v", bytes::Bytes::from_static(b"1")),
                ("kind", bytes::Bytes::from_static(b"batch")),
                ("id", bytes::Bytes::from(id)),
                ("tp", bytes::Bytes::new()),
                ("ts", bytes::Bytes::from_static(b"1")),
                ("body", bytes::Bytes::from(body)),
            ],
        )
        .await
        .unwrap();

    let letters = dead_letters(&fleet, 1).await;
    assert_eq!(
        letters[0].get_str("stream"),
        Some(fleet.keys.callbacks().as_str())
    );
    let reason = letters[0].get_str("reason").unwrap();
    assert!(
        reason.contains("the callbacks of a batch are of one task attempt"),
        "{reason}"
    );
    fleet.stop().await;
}
