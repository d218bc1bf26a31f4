//! What an idle WebSocket costs the gateway: the binary runs as a process of its own, many
//! clients connect and idle, and its resident memory is compared before and after.
//!
//! Ignored by default (it needs `cargo build -p ws-gateway` and a few thousand descriptors):
//! `cargo build -p ws-gateway && cargo nextest run -p ws-gateway --run-ignored only idle`.

mod common;

use common::*;

/// Idle WebSockets opened after the warm-up.
const CLIENTS: usize = 2000;
/// The budget per idle connection.
const BUDGET_BYTES: u64 = 16 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test]
#[ignore = "measurement: needs the built binary and many descriptors"]
async fn idle_websockets_stay_under_16_kib_each() {
    let fleet = Fleet::new().await;
    let (mut gw, http) = fleet.gateway_process().await;
    let pid = gw.pid().expect("running");
    let base = format!("ws://{http}/ws/chat");
    let mut sessions = Vec::new();
    for _ in 0..50 {
        sessions.push(fleet.session().await);
    }
    let url = |i: usize| {
        let s = &sessions[i % sessions.len()];
        format!("{base}/{}?token={}", s.sid, s.token)
    };

    // Warm-up: allocator arenas, runtime, Redis connections.
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut ws = ws_connect(&url(i)).await;
        ping_pong(&mut ws).await;
        clients.push(ws);
    }
    let before = rss_bytes(pid);
    for i in 0..CLIENTS {
        let mut ws = ws_connect(&url(i)).await;
        ping_pong(&mut ws).await;
        clients.push(ws);
    }
    let after = rss_bytes(pid);
    let per = after.saturating_sub(before) / CLIENTS as u64;
    println!(
        "gateway RSS {} KiB -> {} KiB for {CLIENTS} more idle WebSockets: {per} bytes each",
        before / 1024,
        after / 1024
    );
    assert!(gw.running(), "the gateway survived");
    assert!(per < BUDGET_BYTES, "{per} bytes per idle WebSocket");
    drop(clients);
    gw.terminate(WAIT).await;
}
