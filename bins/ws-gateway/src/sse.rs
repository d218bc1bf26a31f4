//! `GET /sse/chat/{session_id}`: the session's events as Server-Sent Events.
//!
//! The resume point is the `Last-Event-ID` header (what `EventSource` sends when it reconnects)
//! or `?last_event_id=`. A refusal is an HTTP error with the JSON error shape: 401 (token), 404
//! (session), 400 (a malformed event id, query string or session id). Each event is one frame,
//! `id: <event_id>\ndata: <json>\n\n`, without an `event:` name so that `onmessage` fires;
//! replies outside the log (`events_lost`) carry no `id`. A comment goes out every
//! [`KEEP_ALIVE`] so that proxies keep the stream open. The stream ends on shutdown (the client's
//! `EventSource` reconnects with `Last-Event-ID`).
//!
//! The token is checked once, at connect, and the stream ends when it expires, as a WebSocket is
//! closed with 4001 then (REST and a reconnect refuse the token from that instant on): the last
//! frame is an `error` message with `error_type` [`TOKEN_EXPIRED`], without an `id` (the client's
//! resume point stays its last event), naming the route that hands out a fresh token. The
//! client reconnects with that token and its last event id and misses nothing. One timer per
//! stream, armed at connect; delivering an event does no extra work.
//!
//! When session storage is unavailable (at admission, or when the log cannot be read later),
//! the answer is not a 503: an `EventSource` that gets any status but 200 fails for good (HTML,
//! "Server-sent events"), so a Redis failover of a few seconds would stop every browser that
//! reconnects meanwhile. It is a 200 stream holding a `retry:` field (see [`retry_delay`]) and a
//! comment saying why, which then ends: the `EventSource` reconnects after that delay.
//!
//! The stream is polled by the HTTP connection's own task: no task per client.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fleet::events::{ServerMessage, message_type};
use futures::StreamExt;
use serde_json::json;

use crate::access::{self, AccessQuery, Refusal};
use crate::connection::{Delivery, Outgoing};
use crate::registry::Transport;
use crate::routes::Gateway;

/// A keep-alive comment goes out this often while no event does.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The shortest reconnection delay asked of a client the gateway cannot serve for now.
pub const RETRY_MIN: Duration = Duration::from_millis(1000);
/// The longest reconnection delay asked of a client the gateway cannot serve for now.
pub const RETRY_MAX: Duration = Duration::from_millis(3000);

/// `error_type` of the last message of a stream whose session token expired.
pub const TOKEN_EXPIRED: &str = "token_expired";

/// Counts an open SSE stream while it lives.
struct StreamGuard;

impl StreamGuard {
    fn new() -> Self {
        metrics::gauge!("fleet_sse_streams").increment(1.0);
        metrics::counter!("fleet_sse_streams_total").increment(1);
        StreamGuard
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        metrics::gauge!("fleet_sse_streams").decrement(1.0);
    }
}

/// The SSE handler.
#[tracing::instrument(skip_all, fields(session_id))]
pub async fn stream(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let sid = match path {
        Ok(Path(sid)) => sid,
        Err(e) => return Refusal::BadSessionId(e.body_text()).into_response(),
    };
    tracing::Span::current().record("session_id", sid.as_str());
    let query = match Query::<AccessQuery>::try_from_uri(&uri) {
        Ok(Query(query)) => query,
        Err(e) => return Refusal::BadQuery(query_error(&e)).into_response(),
    };
    let token = access::token(&headers, &query);
    // A header that is not text is refused, not ignored: ignored, the whole log would be sent
    // again to a client that has some of it.
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => match v.to_str() {
            Ok(id) => Some(id.to_owned()),
            Err(_) => {
                let shown = String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(64)
                    .collect();
                return Refusal::BadLastEventId(shown).into_response();
            }
        },
        None => query.last_event_id,
    };
    let Some(_turn) = gw.admissions.turn().await else {
        return retry_later(&Refusal::Unavailable.to_string());
    };
    let admitted =
        match access::admit(&gw.chat, &sid, token.as_deref(), last_event_id.as_deref()).await {
            Ok(a) => a,
            Err(refusal @ Refusal::Unavailable) => return retry_later(&refusal.to_string()),
            Err(refusal) => return refusal.into_response(),
        };
    let delivery = match Delivery::start(
        gw.log.clone(),
        &gw.registry,
        &sid,
        Transport::Sse,
        admitted.resume,
        gw.admissions.clone(),
    )
    .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "session log unavailable");
            return retry_later(LOG_UNAVAILABLE);
        }
    };
    // The token was checked once, at admission; REST refuses it once it expires, so must this.
    // One timer for the stream's life.
    let expires_ms = admitted.token_expires_ms;
    let expired = fleet::time::timer_until(expires_ms);
    // `None` once the stream has said its last word.
    let events = futures::stream::unfold(
        Some((delivery, expired, StreamGuard::new())),
        move |state| async move {
            let (mut delivery, mut expired, guard) = state?;
            tokio::select! {
                // First: from the expiry on, nothing more goes out on this token.
                biased;
                () = expired.as_mut() => {
                    tracing::debug!("session token expired; ending the stream");
                    Some((Ok(token_expired(delivery.session_id(), expires_ms)), None))
                }
                out = delivery.next() => match out {
                    Ok(out) => {
                        metrics::counter!("fleet_sse_messages_sent_total").increment(1);
                        Some((Ok::<_, Infallible>(event(out)), Some((delivery, expired, guard))))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "session log unavailable; ending the stream");
                        Some((Ok(retry_event(LOG_UNAVAILABLE)), None))
                    }
                },
            }
        },
    )
    .take_until(gw.closing.clone().cancelled_owned());
    respond(events)
}

/// What is wrong with a query string that does not parse (a repeated `token`, say).
fn query_error(e: &axum::extract::rejection::QueryRejection) -> String {
    use std::error::Error as _;
    e.source()
        .map_or_else(|| e.body_text(), |source| source.to_string())
}

/// The last frame of a stream whose token expired at `expires_ms`: an `error` message like
/// `events_lost`, without an `id` so that the client's resume point stays its last event, and
/// without an `event:` name so that `onmessage` sees it.
fn token_expired(sid: &str, expires_ms: i64) -> Event {
    let refresh = format!("POST /api/v1/chat/session/{sid}/token");
    let msg = ServerMessage::new(
        message_type::ERROR,
        sid,
        None,
        json!({"error": {
            "error_type": TOKEN_EXPIRED,
            "message": format!(
                "session token expired; get a fresh one with {refresh} and reconnect with it \
                 and the last event id"
            ),
            "details": {
                "expired_at": fleet::time::rfc3339_ms(expires_ms),
                "refresh": refresh,
            },
        }}),
    );
    event(Outgoing::reply(&msg))
}

/// Why a stream ends when the session log cannot be read.
const LOG_UNAVAILABLE: &str = "session log unavailable; retry later";

/// The SSE response of `events`.
fn respond<S>(events: S) -> Response
where
    S: futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut res = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Ask buffering proxies (nginx) to pass events through at once.
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// A stream that only asks the client to reconnect later, saying why (see the module docs).
fn retry_later(why: &str) -> Response {
    respond(futures::stream::iter([Ok(retry_event(why))]))
}

/// `: <why>` and `retry: <ms>`. A comment rather than `data`: no event is dispatched, so the
/// `EventSource`'s last event id, which it resumes from, stays as it is.
fn retry_event(why: &str) -> Event {
    Event::default().comment(why).retry(retry_delay())
}

/// A delay between [`RETRY_MIN`] and [`RETRY_MAX`], drawn for each client: the clients of a
/// failover reconnect spread over that span instead of all at once.
pub fn retry_delay() -> Duration {
    let spread = (RETRY_MAX - RETRY_MIN).as_millis() as u64;
    let draw = uuid::Uuid::new_v4().as_u64_pair().0 % (spread + 1);
    RETRY_MIN + Duration::from_millis(draw)
}

fn event(out: Outgoing) -> Event {
    let ev = Event::default().data(out.json);
    match out.event_id {
        Some(id) => ev.id(id.to_string()),
        None => ev,
    }
}
