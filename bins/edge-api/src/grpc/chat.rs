//! Chat over gRPC for backend callers: the same [`fleet::session::Chat`] calls REST makes
//! (`source: grpc`), with the session token in `session_token` or `authorization: Bearer`.
//! `StreamSessionEvents` replays the session log after `last_event_id`
//! ([`fleet::session_log::SessionLog::replay_after`]), then follows it live; it ends after
//! `session_closed`, or, for a session closed before the call, once its log is replayed.
//! `CancelTask` of a planning session also cancels a council subtask, whose id names a
//! deliberation, not a task ([`fleet::deliberation::Engine::request_council_cancel`]).

use std::collections::VecDeque;

use fleet::events::with_event_id;
use fleet::session::{ChatError, InitSession, SubmitMessage};
use fleet::stream::entry::{StreamId, parse_read};
use fleet_proto::orchestrator::v1 as pb;
use fred::prelude::*;
use serde_json::Value as Json;
use tonic::{Request, Status};
use tracing::Span;

use super::{BoxStream, Orchestrator, READ_BLOCK, convert, error};

/// Events read per replay page and per live read.
const PAGE: u64 = 500;

/// The bearer token of a call: the `session_token` field, else `authorization: Bearer <token>`
/// (the scheme read case-insensitively, as REST reads it).
fn token<T>(req: &Request<T>, field: &str) -> Result<String, Status> {
    if !field.is_empty() {
        return Ok(field.to_owned());
    }
    crate::auth::bearer(req.metadata().as_ref())
        .map(str::to_owned)
        .ok_or_else(|| {
            Status::unauthenticated(
                "a session token is required (session_token, or authorization: Bearer <token>)",
            )
        })
}

/// The session id of a call, which must be given: without it a valid token would be refused as
/// one "for another session".
fn session_id(sid: &str) -> Result<(), Status> {
    if sid.is_empty() {
        return Err(Status::invalid_argument("session_id is required"));
    }
    Ok(())
}

fn json_object(text: &str) -> Result<Json, Status> {
    if text.trim().is_empty() {
        return Ok(Json::Null);
    }
    match serde_json::from_str::<Json>(text) {
        Ok(v @ Json::Object(_)) => Ok(v),
        _ => Err(Status::invalid_argument(
            "metadata_json must be a JSON object",
        )),
    }
}

fn session_event(sid: &str, event_id: StreamId, task_id: &str, json: &str) -> pb::SessionEvent {
    let message_type = serde_json::from_str::<Json>(json)
        .ok()
        .and_then(|v| v["message_type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    pb::SessionEvent {
        event_id: event_id.to_string(),
        session_id: sid.to_owned(),
        task_id: task_id.to_owned(),
        message_type,
        json: with_event_id(json, &event_id.to_string()),
    }
}

impl Orchestrator {
    fn authorize(&self, sid: &str, token: &str) -> Result<(), Status> {
        self.chat
            .authorize(sid, token)
            .map(drop)
            .map_err(error::token)
    }

    #[tracing::instrument(skip_all, fields(session_id, task_id))]
    pub async fn create_session_rpc(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<pb::CreateSessionResponse, Status> {
        let req = req.into_inner();
        let metadata = json_object(&req.metadata_json)?;
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let s = self
            .chat
            .init_session(InitSession {
                agent_id: req.agent_id,
                tenant_id: opt(req.tenant_id),
                user_id: opt(req.user_id),
                metadata,
            })
            .await
            .map_err(error::chat)?;
        Span::current().record("session_id", s.session_id.as_str());
        Span::current().record("task_id", s.task_id.as_str());
        Ok(pb::CreateSessionResponse {
            session_id: s.session_id,
            session_token: s.session_token,
            task_id: s.task_id,
            agent_id: s.agent_id,
            agent_name: s.agent_name,
            expires_ms: s.expires_ms,
        })
    }

    #[tracing::instrument(skip_all, fields(session_id, task_id))]
    pub async fn submit_task_rpc(
        &self,
        req: Request<pb::SubmitTaskRequest>,
    ) -> Result<pb::SubmitTaskResponse, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        Span::current().record("session_id", req.session_id.as_str());
        self.authorize(&req.session_id, &token)?;
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let submitted = self
            .chat
            .submit(
                &req.session_id,
                SubmitMessage {
                    message: req.message,
                    metadata: json_object(&req.metadata_json)?,
                    task_id: opt(req.task_id),
                    idempotency_key: opt(req.idempotency_key),
                    source: "grpc",
                },
            )
            .await
            .map_err(error::chat)?;
        Span::current().record("task_id", submitted.task_id.as_str());
        Ok(pb::SubmitTaskResponse {
            task_id: submitted.task_id,
            status: submitted.status,
            duplicate: submitted.duplicate,
        })
    }

    #[tracing::instrument(skip_all, fields(session_id, task_id))]
    pub async fn get_task_rpc(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<pb::ChatTask, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        Span::current().record("session_id", req.session_id.as_str());
        Span::current().record("task_id", req.task_id.as_str());
        self.authorize(&req.session_id, &token)?;
        let t = self
            .chat
            .task(&req.session_id, &req.task_id)
            .await
            .map_err(error::chat)?;
        Ok(convert::task(&t))
    }

    #[tracing::instrument(skip_all, fields(session_id, task_id))]
    pub async fn cancel_task_rpc(
        &self,
        req: Request<pb::CancelTaskRequest>,
    ) -> Result<pb::CancelTaskResponse, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        Span::current().record("session_id", req.session_id.as_str());
        Span::current().record("task_id", req.task_id.as_str());
        self.authorize(&req.session_id, &token)?;
        let reason = if req.reason.is_empty() {
            "cancelled by the client".to_owned()
        } else {
            req.reason.chars().take(256).collect()
        };
        let t = match self
            .chat
            .cancel(&req.session_id, &req.task_id, &reason)
            .await
        {
            Ok(t) => t,
            // Not a task: a council subtask of a planning session is a deliberation, cancelled
            // through the dispatchers with the same command.
            Err(e @ ChatError::NotFound { what: "task", .. }) => {
                let Some(status) = self
                    .engine
                    .request_council_cancel(&req.session_id, &req.task_id, &reason)
                    .await
                    .map_err(error::engine)?
                else {
                    return Err(error::chat(e));
                };
                return Ok(pb::CancelTaskResponse {
                    status: status.cancel_answer().into(),
                    task_id: req.task_id,
                });
            }
            Err(e) => return Err(error::chat(e)),
        };
        Ok(pb::CancelTaskResponse {
            status: if t.cancellable() {
                "cancelling".into()
            } else {
                t.state
            },
            task_id: t.task_id,
        })
    }

    #[tracing::instrument(skip_all, fields(session_id))]
    pub async fn close_session_rpc(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<pb::CloseSessionResponse, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        Span::current().record("session_id", req.session_id.as_str());
        self.authorize(&req.session_id, &token)?;
        let reason = if req.reason.is_empty() {
            "closed by the client".to_owned()
        } else {
            req.reason.chars().take(256).collect()
        };
        let s = self
            .chat
            .close(&req.session_id, &reason)
            .await
            .map_err(error::chat)?;
        Ok(pb::CloseSessionResponse {
            session_id: s.session_id,
            status: if s.state == "open" {
                "closing".into()
            } else {
                s.state
            },
        })
    }

    #[tracing::instrument(skip_all, fields(session_id))]
    pub async fn refresh_session_token_rpc(
        &self,
        req: Request<pb::RefreshSessionTokenRequest>,
    ) -> Result<pb::RefreshSessionTokenResponse, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        Span::current().record("session_id", req.session_id.as_str());
        self.authorize(&req.session_id, &token)?;
        let (session_token, expires_ms) = self
            .chat
            .refresh_token(&req.session_id)
            .await
            .map_err(error::chat)?;
        Ok(pb::RefreshSessionTokenResponse {
            session_token,
            expires_ms,
        })
    }

    #[tracing::instrument(skip_all, fields(session_id))]
    pub async fn stream_session_events_rpc(
        &self,
        req: Request<pb::StreamSessionEventsRequest>,
    ) -> Result<BoxStream<pb::SessionEvent>, Status> {
        session_id(&req.get_ref().session_id)?;
        let token = token(&req, &req.get_ref().session_token)?;
        let req = req.into_inner();
        let sid = req.session_id;
        Span::current().record("session_id", sid.as_str());
        let expires_ms = self.chat.authorize(&sid, &token).map_err(error::token)?;
        let after: Option<StreamId> = if req.last_event_id.is_empty() {
            None
        } else {
            Some(req.last_event_id.parse().map_err(|_| {
                Status::invalid_argument("last_event_id is not an event id (<ms>-<seq>)")
            })?)
        };
        let closed = self.chat.status(&sid).await.map_err(error::chat)?.state == "closed";
        let reader = self.blocking_reader().await?;
        struct State {
            me: Orchestrator,
            reader: super::BlockingReader,
            sid: String,
            after: Option<StreamId>,
            replaying: bool,
            /// The session was closed before the call: nothing comes after its log.
            closed: bool,
            pending: VecDeque<pb::SessionEvent>,
            done: bool,
            /// When the token expires (ms since the epoch), and a timer for it.
            expires_ms: i64,
            expired: std::pin::Pin<Box<tokio::time::Sleep>>,
        }
        let state = State {
            me: self.clone(),
            reader,
            sid,
            after,
            replaying: true,
            closed,
            pending: VecDeque::new(),
            done: false,
            expires_ms,
            expired: fleet::time::timer_until(expires_ms),
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                // The token was checked once, at the call; from its expiry on, nothing more
                // goes out on it (as a WebSocket closes with 4001 and an SSE stream ends).
                if fleet::time::now_ms() >= st.expires_ms {
                    st.done = true;
                    return Some((Err(token_expired()), st));
                }
                if let Some(ev) = st.pending.pop_front() {
                    st.done = ev.message_type == fleet::events::message_type::SESSION_CLOSED;
                    return Some((Ok(ev), st));
                }
                if st.me.shutdown.is_cancelled() {
                    st.done = true;
                    return Some((
                        Err(Status::unavailable(
                            "this server is shutting down; resume from your last event_id",
                        )),
                        st,
                    ));
                }
                if st.replaying {
                    match st.me.log.replay_after(&st.sid, st.after, None, PAGE).await {
                        Ok(page) => {
                            st.replaying = page.len() as u64 == PAGE;
                            for e in page {
                                st.after = Some(e.event_id);
                                st.pending.push_back(session_event(
                                    &st.sid, e.event_id, &e.task_id, &e.json,
                                ));
                            }
                        }
                        Err(e) => {
                            st.done = true;
                            return Some((Err(error::unavailable(e)), st));
                        }
                    }
                    continue;
                }
                if st.closed {
                    // Replayed to its end without `session_closed` (the client resumed after
                    // it, or it was trimmed): waiting on would hold this call until its token
                    // expires, for events that never come.
                    return None;
                }
                let from = st.after.unwrap_or(StreamId::ZERO).to_string();
                let key = st.me.keys().session_events(&st.sid);
                let read = tokio::select! {
                    r = st.reader.client.xread::<Value, _, _>(Some(PAGE), Some(READ_BLOCK.as_millis() as u64), key, from) => r,
                    _ = st.me.shutdown.cancelled() => continue,
                    () = st.expired.as_mut() => continue,
                };
                match read.map(parse_read) {
                    Ok(Ok(streams)) => {
                        for e in streams.into_iter().flat_map(|(_, e)| e) {
                            st.after = Some(e.id);
                            st.pending.push_back(session_event(
                                &st.sid,
                                e.id,
                                e.get_str("t").unwrap_or_default(),
                                e.get_str("d").unwrap_or_default(),
                            ));
                        }
                    }
                    Ok(Err(e)) => {
                        st.done = true;
                        return Some((Err(error::unavailable(e)), st));
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(error::unavailable(e)), st));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// How a session-events stream ends when its token expires.
fn token_expired() -> Status {
    Status::unauthenticated(
        "session token expired; get a fresh one with RefreshSessionToken and call again with \
         your last event_id",
    )
}
