//! `GET /ws/chat/{session_id}`: the WebSocket of a chat session.
//!
//! A WebSocket handshake always succeeds (a request that is not one gets a JSON 400); a refused
//! client is told why with a close code: 4001 (token missing, invalid, expired or of another
//! session), 4004 (no such session), 4000 (malformed `last_event_id`, query string or session
//! id), 1011 (session storage unavailable). An admitted client gets the session's events
//! ([`crate::connection`]) until its token expires (4001 then: REST refuses the token from that
//! time on), and may send, as JSON text frames:
//!
//! * `{"message_type":"chat_message","data":{"message":"...","metadata":{},"task_id"?,"idempotency_key"?}}`:
//!   submitted like `POST /api/v1/chat/{id}/task`; answered with `task_queued` (or an `error`
//!   message) on this connection only;
//! * `{"message_type":"ping"}`: answered with `pong` at once.
//!
//! Chat messages are submitted concurrently, up to [`MAX_PENDING_REPLIES`] per socket: while one
//! waits on Redis the socket goes on reading frames, sending events and answering pings. Their
//! replies (and the `error` replies to malformed frames) go out in the order of the frames, so a
//! client may match them by order; a client with that many replies outstanding is read again
//! once the oldest is sent.
//!
//! Anything else gets an `error` message; the [`MAX_MALFORMED`]th bad frame closes the socket with
//! 4008, and so does a frame (text or binary) over `--max-frame-bytes`. A frame that breaks the
//! WebSocket protocol closes it with 1007 (text that is not UTF-8) or 1002 (anything else, such
//! as reserved bits set). On shutdown every socket closes with 1001. A client's close is answered
//! once the chat messages it sent before it have been submitted (their replies are not sent: no
//! message may follow a close frame), so nothing it sent is dropped.
//!
//! One task per socket (the one axum spawns for the upgrade) does everything: it reads frames,
//! drives the socket's submits, sends events and pings. Rarely taken, large futures (replay
//! pages, submits) are boxed so that an idle connection stays small.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use fleet::events::{ChatMessageData, ClientMessage, ServerMessage, message_type};
use fleet::session::{ChatError, SubmitMessage, TokenError, new_task_id};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tracing::Instrument;

use crate::access::{self, AccessQuery, Refusal, close};
use crate::connection::{Delivery, Outgoing};
use crate::registry::Transport;
use crate::routes::Gateway;

/// Malformed frames tolerated on one connection; this many closes it with 4008.
pub const MAX_MALFORMED: u32 = 5;
/// Replies one socket may owe at once (chat messages being submitted, and replies queued behind
/// them); past this the socket is not read until the oldest is sent.
pub const MAX_PENDING_REPLIES: usize = 32;
/// A server ping goes out this often; a client that sent nothing (not even the pong) between two
/// pings is dropped.
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// A send that takes longer drops the connection (the client reconnects and resumes).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close handshake may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer of each socket, allocated when the socket opens and held while it is idle; it
/// grows only while a larger frame is read. Client frames are small (a chat message, a ping),
/// so 1 KiB reads them in one call and keeps an idle connection's memory low (see
/// docs/performance.md, idle WebSockets).
pub const READ_BUFFER_BYTES: usize = 1024;
/// Frames are written to the socket when the write buffer holds more than this, or on flush:
/// [`send_batch`] queues everything ready (a task's chunk and result come together) and flushes
/// once, so they leave in one system call and one TCP segment. The buffer keeps its capacity
/// (at most this plus one frame), so it stays small.
pub const WRITE_BUFFER_BYTES: usize = 4 * 1024;

/// The upgrade handler. A request that is not a WebSocket handshake is answered with the JSON
/// error shape (400, or 405 for `HEAD`); a handshake is always accepted, and a refused client
/// (a session id that does not decode included) is told why with a close code.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return not_a_handshake(&rejection),
    };
    let (sid, mut refused) = match path {
        Ok(Path(sid)) => (sid, None),
        Err(e) => (String::new(), Some(Refusal::BadSessionId(e.body_text()))),
    };
    let (token, last_event_id) = match Query::<AccessQuery>::try_from_uri(&uri) {
        Ok(Query(q)) => (access::token(&headers, &q), q.last_event_id),
        Err(e) => {
            refused.get_or_insert(Refusal::BadQuery(e.body_text()));
            (None, None)
        }
    };
    // Taken before the upgrade, so that shutdown waits for this connection's close.
    let tracked = gw.connections.token();
    let hard_cap = gw.limits.hard_cap();
    let span = tracing::info_span!("ws", session_id = %sid);
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_frame_size(hard_cap)
        .max_message_size(hard_cap)
        .on_upgrade(move |socket| {
            async move {
                let _tracked = tracked;
                let request = Request {
                    sid,
                    token,
                    last_event_id,
                    refused,
                };
                serve(gw, socket, request).await;
            }
            .instrument(span)
        })
}

/// The answer to a request of `/ws/chat/{id}` that is not a WebSocket handshake (no `Upgrade:
/// websocket`, a missing key, another version): the JSON error shape, saying what is missing.
fn not_a_handshake(rejection: &WebSocketUpgradeRejection) -> Response {
    let status = rejection.status();
    let code = if status == StatusCode::METHOD_NOT_ALLOWED {
        "method_not_allowed"
    } else {
        "invalid_request"
    };
    let message = format!(
        "this route takes a WebSocket handshake (RFC 6455): {}",
        rejection.body_text()
    );
    crate::routes::json_error(status, code, &message)
}

struct Request {
    sid: String,
    token: Option<String>,
    last_event_id: Option<String>,
    /// Refused before admission: a session id or query string that does not parse.
    refused: Option<Refusal>,
}

/// How a connection ends.
enum End {
    /// Send a close frame and wait for the client's.
    Close(u16, &'static str),
    /// The client's stream broke on a frame it cannot be read past (oversized, or breaking the
    /// protocol): send a close frame, linger briefly.
    CloseBroken(u16, &'static str),
    /// The client sent a close frame: flush the automatic reply.
    ClientClosed,
    /// The client is gone: nothing more to say.
    Gone,
}

/// What to do about one client frame.
enum Action {
    Nothing,
    /// Send this at once (a pong).
    Answer(ServerMessage),
    /// Send this in frame order, after the replies owed before it.
    Reply(ServerMessage),
    Submit(ChatMessageData),
    End(End),
}

/// A reply the socket owes, in frame order.
type PendingReply = BoxFuture<'static, ServerMessage>;

async fn serve(gw: Arc<Gateway>, mut socket: WebSocket, req: Request) {
    if let Some(refusal) = &req.refused {
        tracing::debug!(reason = %refusal, "websocket refused");
        let (code, reason) = refusal.close_frame();
        return finish(socket, End::Close(code, reason)).await;
    }
    // Held until the connection is admitted: status, replay start and presence.
    let admission = tokio::select! {
        turn = gw.admissions.turn() => turn,
        () = gw.closing.cancelled() => {
            return finish(socket, End::Close(close::GOING_AWAY, "going away")).await;
        }
    };
    let admitted = Box::pin(access::admit(
        &gw.chat,
        &req.sid,
        req.token.as_deref(),
        req.last_event_id.as_deref(),
    ))
    .await;
    let admitted = match admitted {
        Ok(a) => a,
        Err(refusal) => {
            tracing::debug!(reason = %refusal, "websocket refused");
            let (code, reason) = refusal.close_frame();
            return finish(socket, End::Close(code, reason)).await;
        }
    };
    if gw.closing.is_cancelled() {
        return finish(socket, End::Close(close::GOING_AWAY, "going away")).await;
    }
    let started = Box::pin(Delivery::start(
        gw.log.clone(),
        &gw.registry,
        &req.sid,
        Transport::WebSocket,
        admitted.resume,
        gw.admissions.clone(),
    ))
    .await;
    let mut delivery = match started {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "session log unavailable");
            return finish(
                socket,
                End::Close(close::INTERNAL, "session log unavailable"),
            )
            .await;
        }
    };
    drop(req);
    Box::pin(gw.presence.report(delivery.session_id())).await;
    drop(admission);
    metrics::gauge!("fleet_ws_connections").increment(1.0);
    tracing::debug!("websocket admitted");

    let mut conn = Connection {
        gw: &gw,
        malformed: 0,
    };
    let sid: Arc<str> = Arc::from(delivery.session_id());
    // Replies owed, oldest first: submits run here concurrently with everything else.
    let mut replies: FuturesOrdered<PendingReply> = FuturesOrdered::new();
    // Beside each reply owed, the id of the task it answers (`None`: not a submit's). A task
    // can have events before its `task_queued` is sent (its submit returned, but a reply owed
    // before it has not), so an event of a task in here waits in `held`, with every event after
    // it, until the task's reply has gone out: a client sees `task_queued` first.
    let mut owed: VecDeque<Option<Arc<str>>> = VecDeque::new();
    let mut held: Option<String> = None;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut heard, mut pinged) = (false, false);
    // The token was checked once, at admission; REST refuses it once it expires, so must this.
    let mut expired = fleet::time::timer_until(admitted.token_expires_ms);
    let end = loop {
        // Not `biased`: with the socket polled first, a client that sends without pause (one
        // submitting faster than the fleet answers) kept it ready and got none of its events
        // until it stopped. In random order each ready branch gets its turn.
        tokio::select! {
            () = gw.closing.cancelled() => break End::Close(close::GOING_AWAY, "going away"),
            () = expired.as_mut() => {
                tracing::debug!("session token expired; closing");
                let (code, reason) = Refusal::Token(TokenError::Expired).close_frame();
                break End::Close(code, reason);
            }
            frame = socket.recv(), if replies.len() < MAX_PENDING_REPLIES => {
                heard = true;
                let action = match frame {
                    Some(Ok(msg)) => conn.on_frame(&sid, msg),
                    Some(Err(e)) => break read_failed(&e),
                    None => break End::Gone,
                };
                match action {
                    Action::Nothing => {}
                    Action::End(end) => break end,
                    Action::Reply(msg) if replies.is_empty() => {
                        if send(&mut socket, Outgoing::reply(&msg).json).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Action::Reply(msg) => {
                        owed.push_back(None);
                        replies.push_back(Box::pin(std::future::ready(msg)));
                    }
                    Action::Answer(msg) => {
                        if send(&mut socket, Outgoing::reply(&msg).json).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Action::Submit(mut data) => {
                        let tid = data.task_id.get_or_insert_with(new_task_id);
                        owed.push_back(Some(Arc::from(tid.as_str())));
                        replies.push_back(Box::pin(submit(gw.clone(), sid.clone(), data)));
                    }
                }
            }
            Some(reply) = replies.next(), if !replies.is_empty() => {
                owed.pop_front();
                // Replies that are ready behind it go out with it, in one flush.
                let more = || {
                    let msg = replies.next().now_or_never().flatten()?;
                    owed.pop_front();
                    Some(Outgoing::reply(&msg).json)
                };
                if send_batch(&mut socket, Outgoing::reply(&reply).json, more).await.is_err() {
                    break End::Gone;
                }
                if let Some(first) = held.take_if(|json| !awaits_reply(&owed, json)) {
                    let more = || next_event(&mut delivery, &owed, &mut held);
                    if send_batch(&mut socket, first, more).await.is_err() {
                        break End::Gone;
                    }
                }
            }
            out = delivery.next(), if held.is_none() => match out {
                Ok(out) if awaits_reply(&owed, &out.json) => held = Some(out.json),
                Ok(out) => {
                    let more = || next_event(&mut delivery, &owed, &mut held);
                    if send_batch(&mut socket, out.json, more).await.is_err() {
                        break End::Gone;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "session log unavailable");
                    break End::Close(close::INTERNAL, "session log unavailable");
                }
            },
            _ = ping.tick() => {
                // Anything heard since the last ping (its pong at least) proves the peer alive.
                if pinged && !heard {
                    tracing::debug!("no answer to the last ping; dropping the client");
                    break End::Gone;
                }
                heard = false;
                pinged = true;
                if tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Ping(Default::default())))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    break End::Gone;
                }
            }
        }
    };
    // Unregister before the close handshake: nothing more will be sent.
    drop(delivery);
    // A submit that started runs to its end (its task is created and queued, or not at all);
    // its reply still goes out if the client is there to read it. Not after the client's close
    // frame: no data frame may follow it (RFC 6455, 5.5.1), and a send would fail and drop the
    // connection without the close reply. That reply goes out once the submits have ended, so
    // a client whose close was answered knows the messages it sent before were taken.
    let mut end = end;
    while let Some(reply) = replies.next().await {
        if !matches!(end, End::Gone | End::ClientClosed)
            && send(&mut socket, Outgoing::reply(&reply).json)
                .await
                .is_err()
        {
            end = End::Gone;
        }
    }
    finish(socket, end).await;
    metrics::gauge!("fleet_ws_connections").decrement(1.0);
    let turn = gw.admissions.turn().await;
    Box::pin(gw.presence.report(&sid)).await;
    drop(turn);
    tracing::debug!("websocket ended");
}

/// Whether event `json` is of a task whose `task_queued` is still owed. Events carry their
/// task's id as `"task_id":"<id>"`; an id seen elsewhere in the text only holds the event until
/// that reply has gone out.
fn awaits_reply(owed: &VecDeque<Option<Arc<str>>>, json: &str) -> bool {
    owed.iter().flatten().any(|tid| json.contains(&**tid))
}

/// The next event ready to send in the same flush; one that awaits a reply goes to `held`
/// instead, and ends the flush.
fn next_event(
    delivery: &mut Delivery,
    owed: &VecDeque<Option<Arc<str>>>,
    held: &mut Option<String>,
) -> Option<String> {
    let out = delivery.ready()?;
    if awaits_reply(owed, &out.json) {
        *held = Some(out.json);
        return None;
    }
    Some(out.json)
}

/// Per-connection state that only frames from the client change.
struct Connection<'a> {
    gw: &'a Gateway,
    malformed: u32,
}

impl Connection<'_> {
    fn on_frame(&mut self, sid: &str, msg: Message) -> Action {
        let len = match &msg {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            Message::Ping(_) | Message::Pong(_) => return Action::Nothing,
            Message::Close(_) => return Action::End(End::ClientClosed),
        };
        metrics::counter!("fleet_ws_messages_received_total").increment(1);
        // Frames up to the hard cap are read whole (see `WsLimits::hard_cap`); the limit holds
        // for every kind of frame.
        if len > self.gw.limits.max_frame_bytes {
            return Action::End(End::Close(close::POLICY, "message too large"));
        }
        let Message::Text(text) = msg else {
            return self.malformed(
                sid,
                "unsupported_frame",
                "binary frames are not supported; send JSON text".into(),
            );
        };
        let msg: ClientMessage = match serde_json::from_str(text.as_str()) {
            Ok(m) => m,
            Err(e) => {
                return self.malformed(
                    sid,
                    "invalid_message",
                    format!("frame is not a JSON client message: {e}"),
                );
            }
        };
        match msg.message_type.as_str() {
            message_type::PING => {
                Action::Answer(ServerMessage::new(message_type::PONG, sid, None, json!({})))
            }
            message_type::CHAT_MESSAGE => match serde_json::from_value::<ChatMessageData>(msg.data)
            {
                Ok(data) => Action::Submit(data),
                Err(e) => self.malformed(
                    sid,
                    "invalid_request",
                    format!("chat_message data is not valid: {e}"),
                ),
            },
            other => {
                let shown: String = other.chars().take(64).collect();
                self.malformed(
                    sid,
                    "unknown_message_type",
                    format!("unknown message_type `{shown}`; expected chat_message or ping"),
                )
            }
        }
    }

    fn malformed(&mut self, sid: &str, code: &str, message: String) -> Action {
        self.malformed += 1;
        metrics::counter!("fleet_ws_malformed_frames_total").increment(1);
        if self.malformed >= MAX_MALFORMED {
            return Action::End(End::Close(close::POLICY, "too many malformed messages"));
        }
        Action::Reply(ServerMessage::error(sid, code, &message))
    }
}

/// Submits a chat message the way `POST /api/v1/chat/{id}/task` does. Owns what it uses, so that
/// a socket can run several at once beside its other work.
async fn submit(gw: Arc<Gateway>, sid: Arc<str>, data: ChatMessageData) -> ServerMessage {
    let sid = &*sid;
    // Each message is its own trace (the connection lives far longer than one task).
    let span = tracing::info_span!(
        parent: None,
        "ws_message",
        otel.name = "ws chat_message",
        otel.kind = "server",
        fleet.session_id = %sid,
    );
    let submitted = gw
        .chat
        .submit(
            sid,
            SubmitMessage {
                message: data.message,
                metadata: data.metadata,
                task_id: data.task_id,
                idempotency_key: data.idempotency_key,
                source: "ws",
            },
        )
        .instrument(span)
        .await;
    match submitted {
        Ok(s) => {
            let mut body = json!({"task_id": s.task_id, "status": s.status});
            if s.duplicate {
                body["duplicate"] = true.into();
            }
            ServerMessage::new(message_type::TASK_QUEUED, sid, Some(&s.task_id), body)
        }
        Err(e) => {
            let (code, message) = submit_error(&e);
            ServerMessage::error(sid, code, &message)
        }
    }
}

/// The `error_type` and message of a refused submit; never leaks storage details.
pub fn submit_error(e: &ChatError) -> (&'static str, String) {
    match e {
        ChatError::Invalid(m) => ("invalid_request", m.clone()),
        ChatError::NotFound { .. } => ("not_found", e.to_string()),
        ChatError::SessionClosed(_) => ("session_closed", e.to_string()),
        ChatError::Overloaded { .. } => ("overloaded", e.to_string()),
        ChatError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "submit failed");
            ("unavailable", "storage unavailable; retry later".to_owned())
        }
    }
}

/// How a connection whose read failed ends. A frame the client should not have sent is answered
/// with a close code saying what was wrong with it (the client would otherwise see only 1006, the
/// TCP connection dropped); a failed or reset connection has nobody left to tell.
fn read_failed(e: &axum::Error) -> End {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    let end = match e.source().and_then(|s| s.downcast_ref::<WsError>()) {
        Some(WsError::Capacity(_)) => End::CloseBroken(close::POLICY, "message too large"),
        Some(WsError::Utf8(_)) => End::CloseBroken(close::INVALID_DATA, "text is not valid UTF-8"),
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => End::Gone,
        Some(WsError::Protocol(_)) => End::CloseBroken(close::PROTOCOL_ERROR, "protocol error"),
        _ => End::Gone,
    };
    tracing::debug!(error = %e, "websocket read failed");
    end
}

/// Sends one message.
async fn send(socket: &mut WebSocket, json: String) -> Result<(), ()> {
    send_batch(socket, json, || None).await
}

/// Most messages [`send_batch`] writes before one flush.
const MAX_WRITE_BATCH: u64 = 64;

/// Sends `first` and then whatever `more` has ready without waiting (for a delivery, the events
/// of one fan-out entry, such as a task's last chunk and its result, arrive together), flushed
/// once: one system call and one TCP segment instead of one per message.
async fn send_batch(
    socket: &mut WebSocket,
    first: String,
    mut more: impl FnMut() -> Option<String>,
) -> Result<(), ()> {
    let write = async {
        socket.feed(Message::Text(first.into())).await?;
        let mut sent = 1;
        while sent < MAX_WRITE_BATCH
            && let Some(json) = more()
        {
            socket.feed(Message::Text(json.into())).await?;
            sent += 1;
        }
        socket.flush().await?;
        Ok::<_, axum::Error>(sent)
    };
    match tokio::time::timeout(SEND_TIMEOUT, write).await {
        Ok(Ok(sent)) => {
            metrics::counter!("fleet_ws_messages_sent_total").increment(sent);
            Ok(())
        }
        _ => Err(()),
    }
}

/// Ends the connection as `end` says, bounded by [`CLOSE_TIMEOUT`]. Boxed: it is reached from
/// several places of [`serve`] and would otherwise weigh on every idle connection.
fn finish(mut socket: WebSocket, end: End) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (code, reason, broken) = match end {
            End::Gone => return,
            End::ClientClosed => {
                // Reading on flushes the close reply tungstenite queued, then ends the stream.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    while let Some(Ok(_)) = socket.recv().await {}
                })
                .await;
                return;
            }
            End::Close(code, reason) => (code, reason, false),
            End::CloseBroken(code, reason) => (code, reason, true),
        };
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if socket.send(frame).await.is_err() {
                return;
            }
            if broken {
                // The stream cannot be read past the oversized frame; give the client time to
                // read the close frame before the socket (with unread bytes) is reset.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
            while let Some(Ok(msg)) = socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    })
}
