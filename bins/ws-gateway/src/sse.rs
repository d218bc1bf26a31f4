//! `GET /sse/chat/{session_id}`: the session's events as Server-Sent Events.
//!
//! The resume point is the `Last-Event-ID` header (what `EventSource` sends when it reconnects)
//! or `?last_event_id=`. A refusal is an HTTP error with the JSON error shape: 401 (token), 404
//! (session), 400 (malformed id), 503 (storage). Each event is one frame,
//! `id: <event_id>\ndata: <json>\n\n`, without an `event:` name so that `onmessage` fires;
//! replies outside the log (`events_lost`) carry no `id`. A comment goes out every
//! [`KEEP_ALIVE`] so that proxies keep the stream open. The stream ends on shutdown (the client's
//! `EventSource` reconnects with `Last-Event-ID`) or when the log cannot be read.
//!
//! The stream is polled by the HTTP connection's own task: no task per client.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::access::{self, AccessQuery, Refusal};
use crate::connection::{Delivery, Outgoing};
use crate::registry::Transport;
use crate::routes::Gateway;

/// A keep-alive comment goes out this often while no event does.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
#[tracing::instrument(skip_all, fields(session_id = %sid))]
pub async fn stream(
    State(gw): State<Arc<Gateway>>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Ok(Query(query)) = Query::<AccessQuery>::try_from_uri(&uri) else {
        return Refusal::BadLastEventId("<malformed query string>".into()).into_response();
    };
    let token = access::token(&headers, &query);
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id);
    let Some(_turn) = gw.admissions.turn().await else {
        return Refusal::Unavailable.into_response();
    };
    let resume =
        match access::admit(&gw.chat, &sid, token.as_deref(), last_event_id.as_deref()).await {
            Ok(r) => r,
            Err(refusal) => return refusal.into_response(),
        };
    let delivery =
        match Delivery::start(gw.log.clone(), &gw.registry, &sid, Transport::Sse, resume).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "session log unavailable");
                return Refusal::Unavailable.into_response();
            }
        };
    let events = futures::stream::unfold(
        (delivery, StreamGuard::new()),
        |(mut delivery, guard)| async move {
            match delivery.next().await {
                Ok(out) => {
                    metrics::counter!("fleet_sse_messages_sent_total").increment(1);
                    Some((Ok::<_, Infallible>(event(out)), (delivery, guard)))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "session log unavailable; ending the stream");
                    None
                }
            }
        },
    )
    .take_until(gw.closing.clone().cancelled_owned());
    let mut res = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Ask buffering proxies (nginx) to pass events through at once.
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

fn event(out: Outgoing) -> Event {
    let ev = Event::default().data(out.json);
    match out.event_id {
        Some(id) => ev.id(id.to_string()),
        None => ev,
    }
}
