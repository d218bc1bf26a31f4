//! The bridge survives NATS and Redis outages on its own, and several bridges share the work.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Env, headers, health, transition};
use fleet_test_support::{RedisServer, eventually};
use futures::StreamExt;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(60);

/// Checks the tasks stream holds exactly the planning events `ids`, once each.
async fn assert_exactly_once(env: &Env, ids: &BTreeSet<String>) {
    let events = env.planning_events().await;
    let seen: BTreeSet<String> = events.iter().map(|(_, p)| p.event_id.clone()).collect();
    assert_eq!(&seen, ids, "every event arrived");
    assert_eq!(events.len(), ids.len(), "no event arrived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_traffic_is_survived_without_loss() {
    let mut env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    let env_ref = &env;
    const N: usize = 300;
    let ids: BTreeSet<String> = (0..N).map(|i| format!("ev-{i}")).collect();

    // A publisher that keeps going, retrying each event until JetStream acknowledges it.
    let publisher = {
        let js = env_ref.js.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let payload = transition(&format!("US-{i}"), "DRAFT", "BUILD");
                loop {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", format!("ev-{i}").as_str());
                    let sent = js
                        .publish_with_headers("agile.events", h, payload.clone().into())
                        .await;
                    if let Ok(ack) = sent
                        && ack.await.is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    env.wait_len(&env.keys.tasks(), 50, WITHIN).await;

    env.nats.stop(false);
    eventually(WITHIN, "health degraded while NATS is down", || async {
        let (code, body) = bridge.ready().await;
        (code == 503 && body["components"]["nats"]["up"] == json!(false)).then_some(())
    })
    .await;
    let during = env.len(&env.keys.tasks()).await;
    env.nats.start_again();

    publisher.await.unwrap();
    eventually(WITHIN, "every event written", || async {
        (env.len(&env.keys.tasks()).await >= N as u64).then_some(())
    })
    .await;
    eventually(WITHIN, "health ready again", || async {
        (bridge.ready().await.0 == 200).then_some(())
    })
    .await;
    eventually(WITHIN, "everything acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;
    assert!(during < N as u64, "the restart happened during traffic");
    assert_exactly_once(&env, &ids).await;
    bridge.stop().await;
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_held_while_redis_hangs_and_written_once_after() {
    let redis = RedisServer::start();
    let env = Env::with_redis(redis.url()).await;
    let bridge = env.bridge(&[]).await;
    env.publish("agile.events", headers(&[]), transition("US-0", "A", "B"))
        .await;
    env.wait_len(&env.keys.tasks(), 1, WITHIN).await;

    // Redis stops answering (but keeps its data), for longer than ack_wait (2s).
    signal(redis.pid(), "STOP");
    for i in 1..=20 {
        env.publish(
            "agile.events",
            headers(&[]),
            transition(&format!("US-{i}"), "A", "B"),
        )
        .await;
    }
    eventually(WITHIN, "health degraded while Redis hangs", || async {
        (bridge.ready().await.0 == 503).then_some(())
    })
    .await;
    // Held past ack_wait (2s) more than twice: no event announces that nothing happened, so
    // this one waits. The bridge keeps them in progress: none is redelivered meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = env
        .consumer_info("agile.events", "fleet-bridge-agile")
        .await;
    assert_eq!(c.num_redelivered, 0, "held messages are not redelivered");
    assert_eq!(c.num_ack_pending, 20, "the bridge holds them");
    signal(redis.pid(), "CONT");

    env.wait_len(&env.keys.tasks(), 21, WITHIN).await;
    eventually(WITHIN, "everything acked and health ready", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        let ready = bridge.ready().await;
        (c.num_ack_pending == 0
            && c.num_pending == 0
            && ready.0 == 200
            && ready.1["components"]["redis"]["up"] != json!(false))
        .then_some(())
    })
    .await;
    let events = env.planning_events().await;
    let cases: BTreeSet<String> = events.iter().map(|(_, p)| p.case_id.clone()).collect();
    assert_eq!(cases.len(), 21);
    assert_eq!(events.len(), 21, "nothing written twice");
    bridge.stop().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_are_recognised_and_not_written_twice() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    const N: u64 = 50;
    for i in 0..N {
        env.publish(
            "agile.events",
            headers(&[]),
            transition(&format!("US-{i}"), "A", "B"),
        )
        .await;
    }
    env.wait_len(&env.keys.tasks(), N, WITHIN).await;
    bridge.stop().await;

    // Every message delivered again, as if each ack had been lost after its write (a bridge
    // killed between the two): a new durable consumer created with `--nats-agile-deliver all`
    // starts from the stream's beginning.
    let stream = env.js.get_stream("AGILE").await.unwrap();
    stream.delete_consumer("fleet-bridge-agile").await.unwrap();
    let bridge = env.bridge(&["--nats-agile-deliver", "all"]).await;
    eventually(
        WITHIN,
        "every message delivered again and acked",
        || async {
            let c = env
                .try_consumer_info("agile.events", "fleet-bridge-agile")
                .await?;
            (c.num_ack_pending == 0 && c.num_pending == 0 && c.ack_floor.stream_sequence == N)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        bridge.stats.duplicates(),
        N,
        "each redelivery was recognised"
    );
    assert_eq!(bridge.stats.written(), 0);
    assert_eq!(env.len(&env.keys.tasks()).await, N, "nothing written twice");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_jetstream_gives_up_on_is_dead_lettered() {
    use async_nats::jetstream::{consumer, stream};
    let env = Env::start().await;
    // The stream and the bridges' durable as a bridge would create them, with max_deliver 2.
    let s = env
        .js
        .create_stream(stream::Config {
            name: "AGILE".into(),
            subjects: vec!["agile.events".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let durable: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("fleet-bridge-agile".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(3),
            max_deliver: 2,
            filter_subject: "agile.events".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.publish("agile.events", headers(&[]), transition("US-X", "A", "B"))
        .await;
    // Two bridges took it and died before acking (here: a consumer that never acks).
    for delivery in 1..=2 {
        let mut batch = durable
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.expect("a delivery").unwrap();
        assert_eq!(msg.info().unwrap().delivered, delivery);
    }
    // A live bridge hears JetStream give up on it (3s after the last delivery).
    let bridge = env
        .bridge(&["--nats-max-deliver", "2", "--nats-ack-wait-secs", "3"])
        .await;
    env.wait_len(&env.keys.dlq(), 1, WITHIN).await;
    let letter = env.entries(&env.keys.dlq()).await.remove(0);
    let reason = letter.get_str("reason").unwrap();
    assert!(reason.contains("max_deliver"), "{reason}");
    assert_eq!(letter.get_str("deliveries"), Some("2"));
    assert_eq!(letter.get_str("entry_id"), Some("AGILE:1"));
    assert!(
        letter
            .get_str("orig.data")
            .is_some_and(|d| d.contains("US-X"))
    );
    assert_eq!(env.len(&env.keys.tasks()).await, 0);
    assert_eq!(bridge.stats.dead_lettered(), 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_the_work_and_each_message_is_handled_once() {
    let env = Arc::new(Env::start().await);
    let small = ["--nats-batch", "4", "--batch", "4", "--max-in-flight", "4"];
    let a = env.bridge(&small).await;
    let b = env.bridge(&small).await;
    const N: usize = 400;
    const M: usize = 200;

    let inbound = {
        let env = env.clone();
        tokio::spawn(async move {
            for i in 0..N {
                env.publish(
                    "agile.events",
                    headers(&[]),
                    transition(&format!("US-{i}"), "A", "B"),
                )
                .await;
            }
        })
    };
    for i in 0..M {
        env.outbound(
            "agent.requests",
            &json!({"task_id": format!("t{i}"), "session_id": "s"}).to_string(),
        )
        .await;
    }
    inbound.await.unwrap();

    env.wait_len(&env.keys.tasks(), N as u64, WITHIN).await;
    env.wait_outbound_drained().await;
    eventually(WITHIN, "every request stored", || async {
        (env.stored("agent.requests").await == M as u64).then_some(())
    })
    .await;
    eventually(WITHIN, "everything acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;

    let events = env.planning_events().await;
    let distinct: BTreeSet<String> = events.iter().map(|(_, p)| p.event_id.clone()).collect();
    assert_eq!(distinct.len(), N);
    assert_eq!(events.len(), N, "no event written twice");
    let (wa, wb) = (a.stats.written(), b.stats.written());
    assert!(wa > 0 && wb > 0, "both bridges pulled: {wa} + {wb}");
    assert_eq!(wa + wb, N as u64);
    let (pa, pb) = (a.stats.published(), b.stats.published());
    assert!(pa > 0 && pb > 0, "both bridges published: {pa} + {pb}");
    assert_eq!(pa + pb, M as u64);
    for bridge in [&a, &b] {
        let (code, body) = health(bridge.admin, "/health/detailed").await;
        assert_eq!(code, 200, "{body}");
    }
    a.stop().await;
    b.stop().await;
}
