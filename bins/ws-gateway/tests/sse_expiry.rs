//! An SSE stream ends when its session token expires, saying why, and the client resumes with a
//! fresh token without losing an event: a real Redis, the gateway in-process, a client over a
//! real socket.

mod common;

use common::*;
use serde_json::Value as Json;

/// How long the short-lived token of the test holds: enough to connect and get two events.
const TOKEN_MS: i64 = 3000;

fn assert_chunk(ev: &SseEvent, id: &str, content: &str) {
    assert_eq!(ev.id.as_deref(), Some(id), "{:?}", ev.data);
    assert_eq!(ev.data["message_type"], "chat_streaming", "{:?}", ev.data);
    assert_eq!(ev.data["event_id"], id, "{:?}", ev.data);
    assert_eq!(ev.data["data"]["content"], content, "{:?}", ev.data);
}

#[tokio::test]
async fn an_sse_stream_ends_when_its_token_expires_and_resumes_with_a_fresh_one() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let a = fleet.chunk(&s.sid, &tid, 1, "a").await;

    // A token that expires in a moment, as EventSource uses it (`?token=`).
    let expires_ms = fleet::time::now_ms() + TOKEN_MS;
    let short = fleet.chat.tokens.sign(&s.sid, expires_ms);
    let url = format!("{}?token={short}", gw.sse_url(&s.sid));
    let mut sse = SseStream::new(SseStream::open(&url, &[]).await);
    assert_chunk(
        &sse.next().await.expect("the replayed event"),
        &a.event_id,
        "a",
    );
    let b = fleet.chunk(&s.sid, &tid, 2, "b").await;
    assert_chunk(&sse.next().await.expect("the live event"), &b.event_id, "b");

    // At the expiry the server says why, in a frame like the other replies (`error`, no `id`, no
    // `event:` name: `onmessage` sees it and the resume point stays `b`), then ends the body.
    let last = sse
        .next()
        .await
        .expect("a last event when the token expires");
    assert!(
        fleet::time::now_ms() >= expires_ms,
        "not before the token expired: {:?}",
        last.data
    );
    assert_eq!(
        last.id, None,
        "not part of the session log: {:?}",
        last.data
    );
    let msg = &last.data;
    assert_eq!(msg["message_type"], "error", "{msg}");
    assert_eq!(msg["session_id"], s.sid.as_str(), "{msg}");
    assert!(msg.get("event_id").is_none(), "{msg}");
    let error = &msg["data"]["error"];
    assert_eq!(error["error_type"], ws_gateway::sse::TOKEN_EXPIRED, "{msg}");
    let refresh = format!("POST /api/v1/chat/session/{}/token", s.sid);
    assert_eq!(error["details"]["refresh"], refresh.as_str(), "{msg}");
    assert_eq!(
        error["details"]["expired_at"],
        fleet::time::rfc3339_ms(expires_ms),
        "{msg}"
    );
    let text = error["message"].as_str().expect("a message");
    assert!(
        text.starts_with("session token expired") && text.contains(&refresh),
        "{text}"
    );
    assert!(sse.next().await.is_none(), "the stream ends after it");

    // Missed while away.
    let c = fleet.chunk(&s.sid, &tid, 3, "c").await;

    // EventSource reconnects on its own, with the same URL and its Last-Event-ID: refused.
    let res = SseStream::open(&url, &[("last-event-id", b.event_id.as_str())]).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let body: Json = res.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    assert_eq!(body["error"]["message"], "session token expired", "{body}");

    // With a fresh token (what the refresh route hands out) and the last event id it got: the
    // missed event, then live ones, each once.
    let (fresh, _) = fleet.chat.refresh_token(&s.sid).await.expect("fresh token");
    let auth = format!("Bearer {fresh}");
    let res = SseStream::open(
        &gw.sse_url(&s.sid),
        &[
            ("authorization", auth.as_str()),
            ("last-event-id", b.event_id.as_str()),
        ],
    )
    .await;
    let mut sse = SseStream::new(res);
    assert_chunk(
        &sse.next().await.expect("the missed event"),
        &c.event_id,
        "c",
    );
    let d = fleet.chunk(&s.sid, &tid, 4, "d").await;
    assert_chunk(&sse.next().await.expect("the live event"), &d.event_id, "d");

    gw.stop().await.expect("clean stop");
}
