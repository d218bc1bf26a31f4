//! SIGTERM to edge-api and ws-gateway processes under load: each exits 0 within its grace
//! period, and every task it accepted still completes.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_e2e::{AGENT, Fleet, Options, RestSession, SECRET, is_final_of};
use fleet_test_support::{FleetProcess, eventually};
use serde_json::Value as Json;

/// Starts front door `name` on ports the system chooses; returns it and its HTTP address.
async fn front_door(name: &str, fleet: &Fleet) -> (FleetProcess, SocketAddr) {
    let mut args = fleet_e2e::process_args(name, &fleet.redis_url, &fleet.prefix);
    if name == "edge-api" {
        // Any free port for gRPC, so this test never competes for the default 50055.
        args.extend(["--grpc-addr".into(), "127.0.0.1:0".into()]);
    }
    args.extend([
        "--secret".into(),
        SECRET.into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = FleetProcess::spawn(name, &args, &[]);
    let http = process.listening("http", Duration::from_secs(20)).await;
    (process, http)
}

async fn healthy(url: &str) {
    eventually(Duration::from_secs(20), url, || async {
        reqwest::get(url)
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_doors_exit_zero_on_sigterm_and_what_they_accepted_completes() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        echo_delay_ms: 2,
        ..Default::default()
    })
    .await;
    let (mut api, api_addr) = front_door("edge-api", &fleet).await;
    let (mut gateway, ws_addr) = front_door("ws-gateway", &fleet).await;
    let api_url = format!("http://{api_addr}");
    healthy(&format!("{api_url}/health/ready")).await;

    let session = RestSession::open(&api_url, AGENT).await;
    let mut ws = session.connect(&format!("ws://{ws_addr}")).await;
    let sid = session.id.clone();

    // Load over REST until edge-api goes away; SIGTERM it once 50 tasks are accepted.
    let submitter = {
        let (http, api_url) = (reqwest::Client::new(), api_url.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0.. {
                let res = session
                    .task_request(&http, &api_url, &format!("load {i} a b c"))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 202 => {
                        let body: Json = r.json().await.unwrap();
                        accepted.push(body["task_id"].as_str().unwrap().to_owned());
                    }
                    _ => break,
                }
            }
            accepted
        })
    };
    eventually(Duration::from_secs(30), "50 accepted tasks", || async {
        let s = fleet.chat.status(&sid).await.ok()?;
        (s.totals.tasks >= 50).then_some(())
    })
    .await;
    let status = api
        .terminate(Duration::from_secs(15))
        .await
        .expect("edge-api exits within its grace period");
    assert!(
        status.success(),
        "edge-api exited with {status}:\n{}",
        api.log()
    );
    let accepted = submitter.await.unwrap();
    assert!(accepted.len() >= 50);

    // Everything edge-api accepted completes; the gateway streams it.
    for tid in &accepted {
        fleet.task_events(&sid, tid, Duration::from_secs(30)).await;
        assert_eq!(fleet.chat.task(&sid, tid).await.unwrap().state, "completed");
    }
    let last = accepted.last().unwrap().clone();
    ws.until(Duration::from_secs(30), |m| is_final_of(m, &last))
        .await;

    // SIGTERM the gateway while a client is connected: the client is told it is going away.
    let status = gateway
        .terminate(Duration::from_secs(15))
        .await
        .expect("ws-gateway exits within its grace period");
    assert!(
        status.success(),
        "ws-gateway exited with {status}:\n{}",
        gateway.log()
    );
    assert_eq!(ws.close_code(Duration::from_secs(5)).await, Some(1001));
    fleet.stop().await;
}
