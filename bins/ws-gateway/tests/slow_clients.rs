//! Clients that stall, against the gateway's WebSocket / SSE port and its admin port, with the
//! read timeout (`--http-read-timeout-secs`) set low: a connection that sends nothing, or half
//! its request's headers, is closed by the server while other clients are served; a WebSocket
//! or an SSE stream that stays quiet far longer than the timeout is not cut.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fleet_test_support::stalled_client as stalled;
use serde_json::Value as Json;
use tokio::net::TcpStream;

/// The read timeout of these tests' gateways.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a test waits for the server to close a stalled client: well above [`READ_TIMEOUT`].
const CLOSE_BOUND: Duration = Duration::from_secs(15);

async fn gateway_reading_within_1s(fleet: &Fleet) -> Gateway {
    fleet.gateway_with(&["--http-read-timeout-secs", "1"]).await
}

/// What the server sent on `tcp` before closing it, and when, counted from `since`.
async fn until_closed(tcp: &mut TcpStream, since: Instant) -> (String, Duration) {
    fleet_test_support::until_closed(tcp, since, CLOSE_BOUND).await
}

#[tokio::test]
async fn stalled_clients_are_closed_on_both_ports_while_others_are_served() {
    let fleet = Fleet::new().await;
    let gw = gateway_reading_within_1s(&fleet).await;
    let s = fleet.session().await;
    let half_handshake = format!(
        "GET /ws/chat/{}?token={} HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\nconnection: Up",
        s.sid, s.token
    );
    let mut clients = vec![
        (
            "sent nothing to the WebSocket port",
            stalled(gw.http, b"").await,
        ),
        (
            "sent half a WebSocket handshake",
            stalled(gw.http, half_handshake.as_bytes()).await,
        ),
        (
            "sent nothing to the admin port",
            stalled(gw.admin, b"").await,
        ),
        (
            "sent half its headers to the admin port",
            stalled(gw.admin, b"GET /metrics HTTP/1.1\r\nhost: gw\r\nacc").await,
        ),
    ];

    // Meanwhile, well-behaved clients are served on connections of their own.
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;
    let health: Json = reqwest::get(format!("http://{}/health", gw.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let served = Instant::now();

    for (what, (tcp, since)) in &mut clients {
        let (answer, after) = until_closed(tcp, *since).await;
        assert_eq!(
            answer, "",
            "a client that {what} is closed without an answer"
        );
        assert!(
            after >= READ_TIMEOUT,
            "a client that {what} is closed after the read timeout, not {after:?}"
        );
        assert!(
            served < *since + after,
            "the other clients were served while a client that {what} held its connection"
        );
    }
    // The WebSocket opened meanwhile is still served.
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_websocket_and_an_sse_stream_that_stay_quiet_are_not_cut() {
    let fleet = Fleet::new().await;
    let gw = gateway_reading_within_1s(&fleet).await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;
    let mut sse = SseStream::new(
        SseStream::open(&format!("{}?token={}", gw.sse_url(&s.sid), s.token), &[]).await,
    );
    let quiet_since = Instant::now();

    // Both stay quiet while two stalled clients, one after the other, are closed on the same
    // port: more than twice the read timeout, counted by the server's own closes.
    for _ in 0..2 {
        let (mut tcp, since) = stalled(gw.http, b"GET /sse/chat/").await;
        let (_, after) = until_closed(&mut tcp, since).await;
        assert!(after >= READ_TIMEOUT, "{after:?}");
    }
    assert!(quiet_since.elapsed() >= 2 * READ_TIMEOUT);

    // Both are still open and deliver what comes next.
    ping_pong(&mut ws).await;
    let chunk = fleet.chunk(&s.sid, &tid, 1, "still here").await;
    let got = recv_json(&mut ws).await;
    assert_eq!(got["event_id"], chunk.event_id.as_str(), "{got}");
    assert_eq!(got["data"]["content"], "still here", "{got}");
    let event = sse.next().await.expect("the SSE stream is still open");
    assert_eq!(event.id.as_deref(), Some(chunk.event_id.as_str()));
    gw.stop().await.expect("clean stop");
}
