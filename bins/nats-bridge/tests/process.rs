//! The built `nats-bridge` binary (run `cargo build --workspace --bins` first): kill -9 in the
//! middle of 1,000 events loses and repeats nothing; SIGTERM under load exits 0.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Env, headers, transition};
use fleet_test_support::eventually;
use serde_json::json;
use tokio::task::JoinHandle;

const WITHIN: Duration = Duration::from_secs(90);

/// Publishes `n` agile events, `US-0` .. `US-<n-1>`, as fast as JetStream acks them.
fn publish_events(env: &Arc<Env>, n: usize) -> JoinHandle<()> {
    let env = env.clone();
    tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..n {
            let ack = env
                .js
                .publish_with_headers(
                    "agile.events",
                    headers(&[]),
                    transition(&format!("US-{i}"), "DRAFT", "BUILD").into(),
                )
                .await
                .expect("publish");
            acks.push(ack);
            if acks.len() == 50 {
                for a in acks.drain(..) {
                    a.await.expect("ack");
                }
            }
        }
        for a in acks {
            a.await.expect("ack");
        }
    })
}

/// The value of metric `name` with label `outcome="<outcome>"` on an admin server (0 if absent).
async fn metric(admin: SocketAddr, name: &str, outcome: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        .abs()
}

/// Waits until `fleet:tasks` holds `n` entries; fails at once if the publisher task failed
/// (its panic would otherwise surface only after the wait timed out, as a 90 s "hang").
async fn wait_tasks(env: &Env, n: u64, publisher: &mut Option<JoinHandle<()>>) {
    let tasks = env.keys.tasks();
    if let Some(p) = publisher.as_mut() {
        let finished = tokio::select! {
            () = env.wait_len(&tasks, n, WITHIN) => None,
            r = p => Some(r),
        };
        let Some(r) = finished else { return };
        *publisher = None;
        r.expect("the publisher failed");
    }
    env.wait_len(&tasks, n, WITHIN).await;
}

/// Waits for the publisher to finish, if [`wait_tasks`] has not seen it finish already.
async fn join(publisher: Option<JoinHandle<()>>) {
    if let Some(p) = publisher {
        p.await.expect("the publisher failed");
    }
}

async fn check_exactly_once(env: &Env, n: usize) {
    let events = env.planning_events().await;
    let cases: BTreeSet<String> = events.iter().map(|(_, p)| p.case_id.clone()).collect();
    let ids: BTreeSet<String> = events.iter().map(|(_, p)| p.event_id.clone()).collect();
    assert_eq!(cases.len(), n, "every event handled");
    assert_eq!(ids.len(), n, "one distinct event_id per event");
    assert_eq!(events.len(), n, "no entry written twice");
    assert_eq!(env.len(&env.keys.dlq()).await, 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_of_1000_events_loses_and_repeats_nothing() {
    const N: usize = 1000;
    let env = Arc::new(Env::start().await);
    let (mut bridge, _) = env.bridge_process(&["--nats-batch", "32"]).await;
    env.wait_streams().await;
    let mut publisher = Some(publish_events(&env, N));

    wait_tasks(&env, 250, &mut publisher).await;
    bridge.kill();
    let at_kill = env.len(&env.keys.tasks()).await;
    let (mut bridge, admin) = env.bridge_process(&["--nats-batch", "32"]).await;

    join(publisher).await;
    env.wait_len(&env.keys.tasks(), N as u64, WITHIN).await;
    eventually(WITHIN, "every message acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;
    check_exactly_once(&env, N).await;
    assert!(at_kill < N as u64, "killed mid-stream ({at_kill} written)");
    let redelivered = metric(admin, "fleet_nats_messages_in_total", "duplicate").await;
    eprintln!(
        "killed after {at_kill} entries; the restarted bridge recognised {redelivered} redelivered messages as written"
    );
    assert!(bridge.running(), "bridge died:\n{}", bridge.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_a_successor_finishes() {
    const N: usize = 600;
    const M: usize = 200;
    let env = Arc::new(Env::start().await);
    let (mut bridge, _) = env
        .bridge_process(&["--nats-batch", "16", "--batch", "16"])
        .await;
    env.wait_streams().await;
    let mut publisher = Some(publish_events(&env, N));
    for i in 0..M {
        env.outbound(
            "agent.requests",
            &json!({"task_id": format!("t{i}"), "session_id": "s"}).to_string(),
        )
        .await;
    }
    wait_tasks(&env, 100, &mut publisher).await;

    let status = bridge
        .terminate(Duration::from_secs(30))
        .await
        .expect("the bridge exits within 30s of SIGTERM");
    assert!(status.success(), "exit status {status}:\n{}", bridge.log());
    let log = bridge.log();
    assert!(log.contains("nats-bridge stopped"), "{log}");

    let (mut successor, _) = env.bridge_process(&[]).await;
    join(publisher).await;
    env.wait_len(&env.keys.tasks(), N as u64, WITHIN).await;
    env.wait_outbound_drained().await;
    eventually(WITHIN, "every request stored", || async {
        (env.stored("agent.requests").await == M as u64).then_some(())
    })
    .await;
    eventually(WITHIN, "every message acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;
    check_exactly_once(&env, N).await;
    assert!(successor.running(), "{}", successor.log());
    let status = successor.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success());
}
