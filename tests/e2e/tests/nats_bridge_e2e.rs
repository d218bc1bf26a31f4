//! The planning flow across NATS (seed 004): a TRANSITION published on `agile.events` reaches
//! the dispatcher through nats-bridge, its derived subtasks come out on NATS `agent.requests`
//! (each once), and the answers NATS-side runners publish on `agent.responses` complete those
//! tasks, as edge-api shows.
//!
//! Runs a dispatcher, a callback-worker, edge-api and nats-bridge in this process (no
//! exec-worker: here the agents are the NATS-side runners) against real `redis-server` and
//! `nats-server -js`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::HeaderMap;
use clap::Parser;
use fleet::envelope::PlanningEvent;
use fleet::planning::PlanningRules;
use fleet::session::TokenSigner;
use fleet_test_support::{NatsServer, eventually};
use futures::StreamExt;
use serde_json::{Value as Json, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-secret-0123456789abcdef-0123456789";
const WITHIN: Duration = Duration::from_secs(30);

fn parse<C: Parser>(name: &str, args: &[String]) -> C {
    C::try_parse_from(std::iter::once(name.to_owned()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{name} config: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_yields_subtasks_on_nats_and_nats_answers_complete_them() {
    let nats = NatsServer::start();
    let redis_url = fleet_test_support::redis();
    let prefix = fleet_test_support::prefix();
    let shutdown = CancellationToken::new();
    let mut running: Vec<(&str, JoinHandle<anyhow::Result<()>>)> = Vec::new();
    let base: Vec<String> = [
        "--redis-url",
        &redis_url,
        "--prefix",
        &prefix,
        "--shutdown-grace-secs",
        "10",
    ]
    .map(str::to_owned)
    .into();
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v = base.clone();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let admin = ["--admin-addr", "127.0.0.1:0"];

    let app = dispatcher::App::build(parse("dispatcher", &with(&admin)))
        .await
        .expect("dispatcher");
    running.push(("dispatcher", tokio::spawn(app.run(shutdown.clone()))));
    let app = callback_worker::App::build(parse("callback-worker", &with(&admin)))
        .await
        .expect("callback-worker");
    running.push(("callback-worker", tokio::spawn(app.run(shutdown.clone()))));
    let app = edge_api::App::build(parse(
        "edge-api",
        &with(&["--secret", SECRET, "--http-addr", "127.0.0.1:0"]),
    ))
    .await
    .expect("edge-api");
    let edge = app.http_addr();
    running.push(("edge-api", tokio::spawn(app.run(shutdown.clone()))));
    let nats_url = nats.url();
    let app = nats_bridge::App::build(parse(
        "nats-bridge",
        &with(&[
            "--admin-addr",
            "127.0.0.1:0",
            "--nats-url",
            &nats_url,
            "--nats-ack-wait-secs",
            "5",
        ]),
    ))
    .await
    .expect("nats-bridge");
    running.push(("nats-bridge", tokio::spawn(app.run(shutdown.clone()))));

    // The NATS side: a planning service and a workspace runner.
    let nc = async_nats::connect(nats.url()).await.expect("nats client");
    let js = async_nats::jetstream::new(nc.clone());
    let mut requests = nc.subscribe("agent.requests").await.unwrap();
    for subject in ["agile.events", "agent.responses", "agent.requests"] {
        eventually(WITHIN, &format!("a stream for {subject}"), || async {
            js.stream_by_subject(subject.to_owned()).await.ok()
        })
        .await;
    }

    let event = json!({"event_type": "TRANSITION", "case_id": "US-123", "plan_id": "P-1",
                       "from": "DESIGN", "to": "BUILD"});
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", "planning-US-123-BUILD");
    js.publish_with_headers("agile.events", h, event.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();

    // What derivation is expected to ask for.
    let expected = PlanningRules::builtin().derive(
        &PlanningEvent {
            event_id: "planning-US-123-BUILD".into(),
            event_type: "TRANSITION".into(),
            case_id: "US-123".into(),
            plan_id: "P-1".into(),
            from_state: "DESIGN".into(),
            to_state: "BUILD".into(),
            timestamp: String::new(),
            metadata: Json::Null,
        },
        &[],
        &[],
    );
    assert!(!expected.is_empty(), "BUILD derives subtasks");
    let expected_ids: BTreeSet<String> = expected.iter().map(|s| s.task_id.clone()).collect();

    // Each subtask arrives on agent.requests, once.
    let mut got: BTreeMap<String, Json> = BTreeMap::new();
    let mut msg_ids = BTreeSet::new();
    while got.len() < expected.len() {
        let msg = tokio::time::timeout(WITHIN, requests.next())
            .await
            .expect("an agent request")
            .unwrap();
        let body: Json = serde_json::from_slice(&msg.payload).expect("JSON request");
        let tid = body["task_id"].as_str().expect("task_id").to_owned();
        assert!(
            got.insert(tid.clone(), body).is_none(),
            "subtask {tid} requested twice"
        );
        let h = msg.headers.expect("headers");
        msg_ids.insert(
            h.get("Nats-Msg-Id")
                .expect("Nats-Msg-Id")
                .as_str()
                .to_owned(),
        );
    }
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        expected_ids,
        "the derived subtasks"
    );
    assert_eq!(msg_ids.len(), expected.len(), "one message id per subtask");
    let name = js.stream_by_subject("agent.requests").await.unwrap();
    let mut stream = js.get_stream(name).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        expected.len() as u64,
        "JetStream stored each request once"
    );

    // The runners answer; the tasks complete.
    for (tid, req) in &got {
        let sid = req["session_id"].as_str().expect("session_id");
        let answer = json!({"task_id": tid, "session_id": sid, "attempt": req["attempt"],
                            "status": "completed", "output": format!("done: {}", req["role"])});
        js.publish("agent.responses", answer.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let http = reqwest::Client::new();
    let signer = TokenSigner::new(SECRET.as_bytes());
    for (tid, req) in &got {
        let sid = req["session_id"].as_str().unwrap().to_owned();
        let token = signer.sign(&sid, fleet::time::now_ms() + 600_000);
        let url = format!("http://{edge}/api/v1/chat/{sid}/tasks/{tid}");
        let view: Json = eventually(WITHIN, &format!("task {tid} completed"), || async {
            let r = http.get(&url).bearer_auth(&token).send().await.ok()?;
            let v: Json = r.json().await.ok()?;
            (v["state"] == "completed").then_some(v)
        })
        .await;
        assert_eq!(
            view["result"],
            json!(format!("done: {}", req["role"])),
            "{view}"
        );
    }

    shutdown.cancel();
    for (name, handle) in running {
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .unwrap_or_else(|_| panic!("{name} stops"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}
