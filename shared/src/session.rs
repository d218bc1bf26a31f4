//! Chat sessions: creation, signed tokens, status, and the one submit path that REST, WebSocket
//! and gRPC all use ([`Chat::submit`]).
//!
//! A session is the hash `fleet:{s:<sid>}` (fields `session_id`, `type`, `agent_id`,
//! `agent_name`, `tenant_id`, `user_id`, `metadata`, `state` open|closed, `created_ms`,
//! `last_activity_ms`, `expires_ms`, `tasks_total`, `tasks_<final state>`, `active_task`,
//! `last_eid`, `ws:<gateway>` per ws-gateway that held a WebSocket of it, `open:<tid>` per open
//! task, `ttl_refreshed_ms`).
//! It expires after the retention TTL without activity, together with its tasks and its event
//! log (the scripts renew the TTLs once a hundredth of it has passed: `lua/prelude.lua`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fred::prelude::*;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value as Json;
use sha2::Sha256;
use uuid::Uuid;

use crate::agent::{AgentConfig, AgentError, AgentStore};
use crate::envelope::{
    Envelope, ExecMessage, ExecRequest, SessionClose, TaskCancel, TaskCommand, TaskSubmit,
};
use crate::keys::Keys;
use crate::stream::producer;
use crate::task::{Created, NewTask, TaskError, TaskStore, TaskView};
use crate::time::now_ms;

/// The secret `--dev` uses when `FLEET_SECRET` is unset. Never for production: anyone who
/// knows it can forge session tokens.
pub const DEV_SECRET: &str = "fleet-dev-secret-do-not-use-in-production";

/// Shortest accepted `FLEET_SECRET`, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// Why no signing secret can be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("FLEET_SECRET is required; pass --dev for a development default")]
    Missing,
    #[error("FLEET_SECRET must be at least {MIN_SECRET_BYTES} bytes (it is {0})")]
    TooShort(usize),
}

/// The secret that signs session tokens: `secret` when given, [`DEV_SECRET`] with `dev`
/// (logged as a warning), otherwise an error. Every edge-api and ws-gateway of a fleet must end
/// up with the same one.
pub fn signing_secret(secret: Option<&str>, dev: bool) -> Result<String, SecretError> {
    let secret = match (secret, dev) {
        (Some(s), _) if !s.is_empty() => s.to_owned(),
        (_, true) => {
            tracing::warn!(
                "no FLEET_SECRET: --dev signs session tokens with a publicly known secret; never run this in production"
            );
            DEV_SECRET.to_owned()
        }
        _ => return Err(SecretError::Missing),
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Err(SecretError::TooShort(secret.len()));
    }
    Ok(secret)
}

/// Signs and checks session tokens: `v1.<session_id>.<expires_ms>.<HMAC-SHA256, base64url>`.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Arc<[u8]>,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed session token")]
    Malformed,
    #[error("session token signature does not match")]
    BadSignature,
    #[error("session token is for another session")]
    WrongSession,
    #[error("session token expired")]
    Expired,
}

impl TokenSigner {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: Arc::from(secret),
        }
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(payload.as_bytes());
        mac
    }

    pub fn sign(&self, session_id: &str, expires_ms: i64) -> String {
        let payload = format!("v1.{session_id}.{expires_ms}");
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// Checks `token` for `session_id` at time `now_ms`, in constant time for the signature;
    /// answers when it expires (ms since the Unix epoch).
    pub fn verify(&self, token: &str, session_id: &str, now_ms: i64) -> Result<i64, TokenError> {
        // Read from the right: a session id may hold dots (a planning session of case `US.12`
        // is `plan-US.12`), the expiry and the signature never do.
        let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (sid, exp) = payload
            .strip_prefix("v1.")
            .and_then(|rest| rest.rsplit_once('.'))
            .ok_or(TokenError::Malformed)?;
        let exp: i64 = exp.parse().map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(payload)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if sid != session_id {
            return Err(TokenError::WrongSession);
        }
        if exp <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(exp)
    }
}

/// Errors a chat call answers with. Each maps to one HTTP status / WS error / gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("session `{0}` is closed")]
    SessionClosed(String),
    #[error("the fleet is overloaded ({backlog} tasks waiting); retry later")]
    Overloaded { backlog: u64 },
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl From<Error> for ChatError {
    fn from(e: Error) -> Self {
        ChatError::Unavailable(e.to_string())
    }
}

impl From<TaskError> for ChatError {
    fn from(e: TaskError) -> Self {
        ChatError::Unavailable(e.to_string())
    }
}

impl From<AgentError> for ChatError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Invalid(m) => ChatError::Invalid(m),
            other => ChatError::Unavailable(other.to_string()),
        }
    }
}

impl From<producer::ProduceError> for ChatError {
    fn from(e: producer::ProduceError) -> Self {
        ChatError::Unavailable(e.to_string())
    }
}

/// Limits and defaults of the chat API.
#[derive(Clone, Debug)]
pub struct ChatLimits {
    /// Largest user message, in bytes.
    pub max_message_bytes: usize,
    /// Deadline of a task whose agent sets none.
    pub default_task_timeout: Duration,
    /// Session tokens are valid this long (edge-api: the session TTL).
    pub token_ttl: Duration,
    /// Whether a submit sends the executor's request itself (the task is created `dispatched`
    /// to its agent's pool) instead of a `task.submit` for the dispatchers: one hop fewer per
    /// task (docs/ARCHITECTURE.md). A task whose agent is unknown always goes to the
    /// dispatchers, which fail it with the reason.
    pub direct_dispatch: bool,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            default_task_timeout: Duration::from_secs(300),
            token_ttl: Duration::from_secs(24 * 3600),
            direct_dispatch: true,
        }
    }
}

/// A new session.
#[derive(Clone, Debug, Serialize)]
pub struct NewSession {
    pub session_id: String,
    pub session_token: String,
    /// A task id reserved for the session's first message.
    pub task_id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub expires_ms: i64,
}

/// `POST /api/v1/chat/init` input.
#[derive(Clone, Debug, Default)]
pub struct InitSession {
    pub agent_id: String,
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub metadata: Json,
}

/// A message to submit.
#[derive(Clone, Debug, Default)]
pub struct SubmitMessage {
    pub message: String,
    pub metadata: Json,
    /// A reserved task id to use.
    pub task_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// `rest`, `ws` or `grpc`.
    pub source: &'static str,
}

/// What a submit answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub task_id: String,
    pub status: String,
    /// The same request was submitted before; this is its task.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// `GET /api/v1/chat/session/{id}/status`.
#[derive(Clone, Debug, Serialize)]
pub struct SessionStatus {
    pub session_id: String,
    #[serde(rename = "type")]
    pub session_type: String,
    pub state: String,
    pub agent_id: String,
    pub agent_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub totals: SessionTotals,
    pub active_task: Option<String>,
    pub created_ms: i64,
    pub last_activity_ms: i64,
    pub websocket_connected: bool,
    pub websocket_connections: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<String>,
    #[serde(skip_serializing_if = "Json::is_null")]
    pub metadata: Json,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionTotals {
    pub tasks: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub timed_out: i64,
}

/// Writes one gateway's report of its WebSockets on a session hash that still exists, unless
/// the field holds a newer report of that gateway (a retried call may arrive after a later one).
/// KEYS: session; ARGV: field (`ws:<gateway>`), connections, version, now_ms.
/// The field's value: `<connections> <now_ms> <version>`.
static PRESENCE: std::sync::LazyLock<fred::types::scripts::Script> =
    std::sync::LazyLock::new(|| {
        fred::types::scripts::Script::from_lua(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
             local cur = redis.call('HGET', KEYS[1], ARGV[1]) \
             if cur then \
               local v = tonumber(string.match(cur, ' (%d+)$')) \
               if v and v > tonumber(ARGV[3]) then return 0 end \
             end \
             redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[4] .. ' ' .. ARGV[3]) \
             return 1",
        )
    });

/// A gateway's report counts while it is this recent: a gateway refreshes its reports every 15
/// s, so the WebSockets of one that died stop counting this long after its last refresh.
pub const WS_PRESENCE_WINDOW_MS: i64 = 45_000;

/// The session hash field of one gateway's WebSocket report.
pub fn ws_presence_field(gateway: &str) -> String {
    format!("ws:{gateway}")
}

/// One gateway's WebSockets of one session, as its registry of connections saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsPresence {
    pub session_id: String,
    /// The connections the gateway holds for the session (0 when it holds none any more).
    pub connections: u64,
    /// Orders the gateway's reports of the session: a report older than the stored one is
    /// ignored.
    pub version: u64,
}

/// The WebSockets of a session hash's fresh gateway reports (`ws:<gateway>` fields).
fn websocket_connections(h: &HashMap<String, String>, now: i64) -> i64 {
    h.iter()
        .filter(|(k, _)| k.starts_with("ws:"))
        .filter_map(|(_, v)| {
            let mut parts = v.split(' ');
            let connections = parts.next()?.parse::<i64>().ok()?;
            let seen = parts.next()?.parse::<i64>().ok()?;
            (now - seen < WS_PRESENCE_WINDOW_MS).then_some(connections.max(0))
        })
        .sum()
}

/// Whether new work should be refused, from the backlog of the dispatchers and of the pools
/// this process sends to (see [`crate::backlog`]).
#[derive(Clone, Default)]
pub struct Backpressure {
    backlog: Arc<AtomicU64>,
    pools: crate::backlog::Pools,
    limit: u64,
}

impl Backpressure {
    /// `limit` 0 never refuses.
    pub fn new(sampler: crate::backlog::Sampler, limit: u64) -> Self {
        Self {
            backlog: sampler.backlog,
            pools: sampler.pools,
            limit,
        }
    }

    /// Counts the backlog of `pool`'s executors from the next sample on.
    pub fn watch_pool(&self, pool: &str) {
        self.pools.watch(pool);
    }

    pub fn check(&self) -> Result<(), ChatError> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if self.limit > 0 && backlog > self.limit {
            metrics::counter!("fleet_submissions_refused_total", "reason" => "overloaded")
                .increment(1);
            return Err(ChatError::Overloaded { backlog });
        }
        Ok(())
    }
}

/// The chat API over Redis, shared by every front door.
#[derive(Clone)]
pub struct Chat {
    pub tasks: TaskStore,
    pub agents: AgentStore,
    pub tokens: TokenSigner,
    pub limits: ChatLimits,
    pub backpressure: Backpressure,
}

/// A new task id (a UUIDv7: ids made later sort later).
pub fn new_task_id() -> String {
    Uuid::now_v7().to_string()
}

/// A created task, as it is sent on to its executor or the dispatchers.
struct Outgoing<'a> {
    sid: &'a str,
    tid: &'a str,
    agent_id: String,
    message: String,
    metadata: Json,
    deadline_ms: i64,
    source: &'static str,
}

/// An id that is no id ([`crate::agent::valid_name`]) names nothing: not found, quoted short.
fn check_id(what: &'static str, id: &str) -> Result<(), ChatError> {
    if crate::agent::valid_name(id) {
        Ok(())
    } else {
        Err(ChatError::NotFound {
            what,
            id: crate::agent::excerpt(id),
        })
    }
}

/// A session's optional `tenant_id` / `user_id`: kept and shown as it came, so bounded as an
/// agent's are ([`crate::agent::check_label`]). Empty means none.
fn check_label(field: &str, value: Option<&str>) -> Result<(), ChatError> {
    match value {
        Some(v) => crate::agent::check_label(field, v, crate::agent::MAX_LABEL_CHARS)
            .map_err(ChatError::Invalid),
        None => Ok(()),
    }
}

impl Chat {
    fn client(&self) -> &Client {
        self.tasks.client()
    }

    fn keys(&self) -> &Keys {
        self.tasks.keys()
    }

    /// Opens a session with `agent_id` and reserves its first task id.
    pub async fn init_session(&self, req: InitSession) -> Result<NewSession, ChatError> {
        if req.agent_id.is_empty() {
            return Err(ChatError::Invalid("agent_id is required".into()));
        }
        check_id("agent", &req.agent_id)?;
        check_label("tenant_id", req.tenant_id.as_deref())?;
        check_label("user_id", req.user_id.as_deref())?;
        let agent: AgentConfig =
            self.agents
                .get(&req.agent_id)
                .await?
                .ok_or_else(|| ChatError::NotFound {
                    what: "agent",
                    id: req.agent_id.clone(),
                })?;
        if let (Some(want), Some(have)) = (&req.tenant_id, &agent.tenant_id)
            && want != have
        {
            return Err(ChatError::NotFound {
                what: "agent",
                id: req.agent_id,
            });
        }
        let sid = Uuid::now_v7().to_string();
        let now = now_ms();
        let expires_ms = now + self.limits.token_ttl.as_millis() as i64;
        let key = self.keys().session(&sid);
        let fields: Vec<(&str, String)> = vec![
            ("session_id", sid.clone()),
            ("type", "chat".into()),
            ("agent_id", agent.id.clone()),
            ("agent_name", agent.name.clone()),
            ("tenant_id", req.tenant_id.clone().unwrap_or_default()),
            ("user_id", req.user_id.clone().unwrap_or_default()),
            ("metadata", req.metadata.to_string()),
            ("state", "open".into()),
            ("created_ms", now.to_string()),
            ("last_activity_ms", now.to_string()),
            ("expires_ms", expires_ms.to_string()),
            ("tasks_total", "0".into()),
        ];
        let tx = self.client().multi();
        let _: () = tx.hset(&key, fields).await?;
        let _: () = tx
            .pexpire(&key, self.tasks.retention().session_ttl_ms, None)
            .await?;
        let _: Value = tx.exec(true).await?;
        let task_id = new_task_id();
        self.tasks.reserve(&sid, &task_id).await?;
        metrics::counter!("fleet_sessions_created_total").increment(1);
        Ok(NewSession {
            session_token: self.tokens.sign(&sid, expires_ms),
            session_id: sid,
            task_id,
            agent_id: agent.id,
            agent_name: agent.name,
            expires_ms,
        })
    }

    /// A fresh token for open session `sid`, valid `token_ttl` from now; the caller has
    /// checked its current one. A session outlives its first token while it is active (its TTL
    /// slides), and this is how its client keeps access. Returns the token and its expiry.
    pub async fn refresh_token(&self, sid: &str) -> Result<(String, i64), ChatError> {
        let status = self.status(sid).await?;
        if status.state != "open" {
            return Err(ChatError::SessionClosed(sid.to_owned()));
        }
        let expires_ms = now_ms() + self.limits.token_ttl.as_millis() as i64;
        Ok((self.tokens.sign(sid, expires_ms), expires_ms))
    }

    /// Checks a bearer token for `sid`.
    pub fn authorize(&self, sid: &str, token: &str) -> Result<i64, TokenError> {
        self.tokens.verify(token, sid, now_ms())
    }

    async fn session_hash(&self, sid: &str) -> Result<HashMap<String, String>, ChatError> {
        check_id("session", sid)?;
        let h: HashMap<String, String> = self.client().hgetall(self.keys().session(sid)).await?;
        if h.is_empty() {
            return Err(ChatError::NotFound {
                what: "session",
                id: sid.to_owned(),
            });
        }
        Ok(h)
    }

    /// The session's status.
    pub async fn status(&self, sid: &str) -> Result<SessionStatus, ChatError> {
        let h = self.session_hash(sid).await?;
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let opt = |k: &str| h.get(k).filter(|v| !v.is_empty()).cloned();
        let ws_connections = websocket_connections(&h, now_ms());
        Ok(SessionStatus {
            session_id: sid.to_owned(),
            session_type: opt("type").unwrap_or_else(|| "chat".into()),
            state: opt("state").unwrap_or_default(),
            agent_id: opt("agent_id").unwrap_or_default(),
            agent_name: opt("agent_name").unwrap_or_default(),
            tenant_id: opt("tenant_id"),
            user_id: opt("user_id"),
            totals: SessionTotals {
                tasks: int("tasks_total"),
                completed: int("tasks_completed"),
                failed: int("tasks_failed"),
                cancelled: int("tasks_cancelled"),
                timed_out: int("tasks_timed_out"),
            },
            active_task: opt("active_task"),
            created_ms: int("created_ms"),
            last_activity_ms: int("last_activity_ms"),
            websocket_connected: ws_connections > 0,
            websocket_connections: ws_connections,
            last_event_id: opt("last_eid"),
            metadata: h
                .get("metadata")
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or(Json::Null),
        })
    }

    /// Reserves a task id for a later submit.
    pub async fn reserve_task(&self, sid: &str) -> Result<String, ChatError> {
        check_id("session", sid)?;
        let tid = new_task_id();
        match self.tasks.reserve(sid, &tid).await? {
            Created::New { .. } => Ok(tid),
            Created::SessionClosed => Err(ChatError::SessionClosed(sid.to_owned())),
            _ => Err(ChatError::NotFound {
                what: "session",
                id: sid.to_owned(),
            }),
        }
    }

    /// Submits a user message as a task and answers at once with its id. The task is created
    /// `dispatched` to its agent's pool with its deadline registered and the executor's request
    /// sent, in one round trip after the `create` script; without
    /// [`direct_dispatch`](ChatLimits::direct_dispatch), or when the agent is unknown, it is
    /// created `queued` and `task.submit` goes to the dispatchers instead.
    pub async fn submit(&self, sid: &str, msg: SubmitMessage) -> Result<Submitted, ChatError> {
        check_id("session", sid)?;
        if msg.message.trim().is_empty() {
            return Err(ChatError::Invalid("message must not be empty".into()));
        }
        if msg.message.len() > self.limits.max_message_bytes {
            return Err(ChatError::Invalid(format!(
                "message is {} bytes; the limit is {}",
                msg.message.len(),
                self.limits.max_message_bytes
            )));
        }
        if let Some(k) = &msg.idempotency_key
            && (k.is_empty() || k.len() > 128 || k.contains(char::is_control))
        {
            return Err(ChatError::Invalid(
                "idempotency key must be 1-128 printable characters".into(),
            ));
        }
        if let Some(t) = &msg.task_id
            && !crate::agent::valid_name(t)
        {
            return Err(ChatError::Invalid(format!(
                "task_id must be {}",
                crate::agent::ID_RULE
            )));
        }
        self.backpressure.check()?;

        let tid = msg.task_id.clone().unwrap_or_else(new_task_id);
        // The deadline follows the agent's timeout; the agent is read through the cache.
        let agent_id = self.agents.of_session(sid).await?;
        let agent = match &agent_id {
            Some(a) => self.agents.get_cached(a).await?,
            None => None,
        };
        let timeout = agent
            .as_ref()
            .and_then(|a| a.timeout_secs)
            .map(Duration::from_secs)
            .unwrap_or(self.limits.default_task_timeout);
        let deadline_ms = now_ms() + timeout.as_millis() as i64;
        // Sent straight to the agent's pool, or through the dispatchers.
        let direct = agent.filter(|_| self.limits.direct_dispatch);

        // The task and its deadline in one round trip; then the task is sent on. The Redis calls'
        // futures are boxed: unboxed, this future was 11.7 KB (the rare duplicate's read alone
        // 4.5 KB), and the WebSocket gateway copies it whole into each submit's box
        // (docs/performance.md).
        let created = Box::pin(self.tasks.create(NewTask {
            session_id: sid,
            task_id: &tid,
            message: &msg.message,
            metadata: &msg.metadata,
            deadline_ms,
            source: msg.source,
            idempotency_key: msg.idempotency_key.as_deref(),
            pool: direct.as_ref().map(|a| a.pool.as_str()),
        }))
        .await?;
        match created {
            Created::New { agent_id } => {
                let task = Outgoing {
                    sid,
                    tid: &tid,
                    agent_id,
                    message: msg.message,
                    metadata: msg.metadata,
                    deadline_ms,
                    source: msg.source,
                };
                if let Err(e) = Box::pin(self.send_on(task, direct.as_ref())).await {
                    // The task is stored but nobody will run it: mark it, so that the client's
                    // retry of this submit (same key or task id) sends it instead of answering
                    // "duplicate". If even the mark fails, the deadline sweeper ends it.
                    if let Err(mark) = self.tasks.mark_unsent(sid, &tid).await {
                        tracing::warn!(task_id = %tid, error = %mark, "could not mark an unsent task");
                    }
                    return Err(e);
                }
                Ok(Submitted {
                    task_id: tid,
                    status: "queued".into(),
                    duplicate: false,
                })
            }
            Created::Duplicate { task_id } => {
                Box::pin(self.duplicate(sid, task_id, msg.source, None)).await
            }
            Created::Exists { state } => {
                Box::pin(self.duplicate(sid, tid, msg.source, Some(state))).await
            }
            Created::NoSession => Err(ChatError::NotFound {
                what: "session",
                id: sid.to_owned(),
            }),
            Created::SessionClosed => Err(ChatError::SessionClosed(sid.to_owned())),
        }
    }

    /// Sends a created task on: its execution request straight to its agent's pool (`direct`),
    /// or `task.submit` to the dispatchers.
    async fn send_on(
        &self,
        t: Outgoing<'_>,
        direct: Option<&AgentConfig>,
    ) -> Result<(), ChatError> {
        match direct {
            Some(agent) => {
                let env = Envelope::new(ExecMessage::Request(ExecRequest {
                    session_id: t.sid.to_owned(),
                    task_id: t.tid.to_owned(),
                    attempt: 1,
                    agent_id: t.agent_id,
                    message: t.message,
                    metadata: t.metadata,
                    params: agent.params.clone(),
                    deadline_ms: t.deadline_ms,
                }));
                let stream = self.keys().exec(&agent.pool);
                producer::send(self.client(), &stream, None, &env).await?;
                self.backpressure.watch_pool(&agent.pool);
                metrics::counter!("fleet_tasks_dispatched_total", "pool" => agent.pool.clone())
                    .increment(1);
            }
            None => {
                let env = Envelope::new(TaskCommand::Submit(TaskSubmit {
                    session_id: t.sid.to_owned(),
                    task_id: t.tid.to_owned(),
                    agent_id: t.agent_id,
                    attempt: 1,
                    message: t.message,
                    metadata: t.metadata,
                    deadline_ms: t.deadline_ms,
                    source: t.source.to_owned(),
                }));
                producer::send(self.client(), &self.keys().tasks(), None, &env).await?;
            }
        }
        metrics::counter!("fleet_tasks_submitted_total", "source" => t.source).increment(1);
        Ok(())
    }

    /// The answer to a submit of a task that exists (its `Idempotency-Key` or task id was used
    /// before): the task as it is. A task its front door could not send on
    /// ([`TaskStore::mark_unsent`]) and that has not started is sent now, as the first submit
    /// would have sent it: this is the retry its `503` asked for.
    async fn duplicate(
        &self,
        sid: &str,
        tid: String,
        source: &'static str,
        state: Option<String>,
    ) -> Result<Submitted, ChatError> {
        let unsent_state = |s: &str| s == "queued" || s == "dispatched";
        if state.as_deref().is_some_and(|s| !unsent_state(s)) {
            return Ok(Submitted {
                task_id: tid,
                status: state.unwrap_or_default(),
                duplicate: true,
            });
        }
        let Some(task) = self.tasks.get(sid, &tid).await? else {
            return Ok(Submitted {
                task_id: tid,
                status: state.unwrap_or_else(|| "queued".into()),
                duplicate: true,
            });
        };
        if task.unsent && task.started_ms.is_none() && unsent_state(&task.state) {
            // Queued: for the dispatchers. Dispatched: to the pool `create` named, with the
            // agent's parameters as they are now.
            let direct = match (&task.pool, task.state.as_str()) {
                (Some(pool), "dispatched") => match self.agents.get_cached(&task.agent_id).await? {
                    Some(agent) => Some(AgentConfig {
                        pool: pool.clone(),
                        ..agent
                    }),
                    None => {
                        tracing::warn!(task_id = %tid, agent_id = %task.agent_id,
                            "an unsent task's agent is gone; its deadline ends it");
                        return Ok(Submitted {
                            task_id: tid,
                            status: task.state,
                            duplicate: true,
                        });
                    }
                },
                _ => None,
            };
            let again = Outgoing {
                sid,
                tid: &tid,
                agent_id: task.agent_id.clone(),
                message: task.message.clone(),
                metadata: task.metadata.clone(),
                deadline_ms: task.deadline_ms,
                source,
            };
            self.send_on(again, direct.as_ref()).await?;
            self.tasks.clear_unsent(sid, &tid).await?;
            tracing::info!(task_id = %tid, "sent a task whose first submit could not send it");
        }
        Ok(Submitted {
            task_id: tid,
            status: task.state,
            duplicate: true,
        })
    }

    /// A task of the session.
    pub async fn task(&self, sid: &str, tid: &str) -> Result<TaskView, ChatError> {
        check_id("session", sid)?;
        check_id("task", tid)?;
        self.tasks
            .get(sid, tid)
            .await?
            .ok_or_else(|| ChatError::NotFound {
                what: "task",
                id: tid.to_owned(),
            })
    }

    /// Asks the dispatchers to cancel a task. Answers with the task as it is now; the task ends
    /// `cancelled` shortly after unless it finished first.
    pub async fn cancel(&self, sid: &str, tid: &str, reason: &str) -> Result<TaskView, ChatError> {
        let task = self.task(sid, tid).await?;
        // A reserved id has no task yet: counting it as a cancelled task (with a client event
        // for a message never sent) would be wrong.
        if task.cancellable() {
            let env = Envelope::new(TaskCommand::Cancel(TaskCancel {
                session_id: sid.to_owned(),
                task_id: tid.to_owned(),
                reason: reason.to_owned(),
            }));
            producer::send(self.client(), &self.keys().tasks(), None, &env).await?;
        }
        Ok(task)
    }

    /// Asks the dispatchers to close a session and cancel its open tasks.
    pub async fn close(&self, sid: &str, reason: &str) -> Result<SessionStatus, ChatError> {
        let status = self.status(sid).await?;
        if status.state == "open" {
            let env = Envelope::new(TaskCommand::SessionClose(SessionClose {
                session_id: sid.to_owned(),
                reason: reason.to_owned(),
            }));
            producer::send(self.client(), &self.keys().tasks(), None, &env).await?;
        }
        Ok(status)
    }

    /// Writes gateway `gateway`'s reports of its WebSockets, each on its session's hash. A
    /// session that expired meanwhile is left alone (not recreated without its TTL).
    pub async fn websocket_presence(
        &self,
        gateway: &str,
        reports: &[WsPresence],
    ) -> Result<(), ChatError> {
        let field = ws_presence_field(gateway);
        let now = now_ms();
        for chunk in reports.chunks(256) {
            let writes = chunk.iter().map(|r| {
                PRESENCE.evalsha_with_reload::<Value, _, _>(
                    self.client(),
                    vec![self.keys().session(&r.session_id)],
                    vec![
                        field.clone(),
                        r.connections.to_string(),
                        r.version.to_string(),
                        now.to_string(),
                    ],
                )
            });
            for write in futures::future::join_all(writes).await {
                write?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_session_and_time() {
        let signer = TokenSigner::new(b"secret");
        let token = signer.sign("s1", 2_000);
        assert_eq!(signer.verify(&token, "s1", 1_000), Ok(2_000));
        assert_eq!(
            signer.verify(&token, "s2", 1_000),
            Err(TokenError::WrongSession)
        );
        assert_eq!(signer.verify(&token, "s1", 2_000), Err(TokenError::Expired));
        assert_eq!(
            TokenSigner::new(b"other").verify(&token, "s1", 1_000),
            Err(TokenError::BadSignature)
        );
        let forged = token.replace("v1.s1.2000", "v1.s1.9999");
        assert_eq!(
            signer.verify(&forged, "s1", 1_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify("garbage", "s1", 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            signer.verify("v1.s1.sig", "s1", 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn ids_that_are_no_ids_are_not_found_and_quoted_short() {
        for id in [".", "..", "", "a b"] {
            assert!(
                matches!(
                    check_id("task", id),
                    Err(ChatError::NotFound { what: "task", .. })
                ),
                "{id:?}"
            );
        }
        assert!(check_id("task", "...").is_ok());
        let long = "s".repeat(10_000);
        let err = check_id("session", &long).unwrap_err().to_string();
        assert_eq!(err, format!("session `{}…` not found", "s".repeat(64)));
    }

    #[test]
    fn session_tenant_and_user_ids_are_bounded_labels() {
        assert!(check_label("user_id", None).is_ok());
        assert!(check_label("user_id", Some("")).is_ok());
        assert!(check_label("user_id", Some("usuário-7 用户")).is_ok());
        let long = "u".repeat(crate::agent::MAX_LABEL_CHARS + 1);
        let Err(ChatError::Invalid(m)) = check_label("user_id", Some(&long)) else {
            panic!("a user id over the limit is refused as invalid");
        };
        assert_eq!(m, "user_id is 129 characters; the limit is 128");
        let Err(ChatError::Invalid(m)) = check_label("tenant_id", Some("t\0")) else {
            panic!("a tenant id with NUL is refused as invalid");
        };
        assert!(
            m.starts_with("tenant_id must not hold control characters"),
            "{m}"
        );
    }

    #[test]
    fn a_session_id_with_dots_has_a_token_that_verifies() {
        let signer = TokenSigner::new(b"secret");
        let token = signer.sign("plan-US.12.3", 2_000);
        assert_eq!(signer.verify(&token, "plan-US.12.3", 1_000), Ok(2_000));
        assert_eq!(
            signer.verify(&token, "plan-US.12", 1_000),
            Err(TokenError::WrongSession)
        );
        assert_eq!(
            signer.verify(&token, "plan-US.12.3", 2_000),
            Err(TokenError::Expired)
        );
    }
}
