//! ws-gateway: delivers each chat session's events to its browsers over WebSocket and SSE, and
//! takes chat messages sent over the WebSocket.
//!
//! | module | what it holds |
//! |---|---|
//! | [`routes`] | the router (`/ws/chat/{id}`, `/sse/chat/{id}`) and the state its handlers share |
//! | [`ws`] | the WebSocket: admission, client frames, close codes |
//! | [`sse`] | the Server-Sent Events stream |
//! | [`access`] | token and resume-point checks, refusals as close codes and HTTP errors |
//! | [`connection`] | the per-client delivery state machine: replay, live events, gap fills |
//! | [`registry`] | the live clients of this gateway by session, fed without ever blocking |
//! | [`fanout`] | one reader per `<prefix>:fanout:<shard>` stream, feeding the registry |
//! | [`presence`] | this gateway's count of each session's WebSockets, `ws:<gateway>` on its hash |
//!
//! Invariants: the session log is the truth and the fan-out only the fast path, so a client
//! never misses an event the log holds; a gateway keeps no state another gateway would need (a
//! client may reconnect anywhere with its `last_event_id`); a slow client never slows a reader or
//! another client.
//!
//! [`App::build`] checks the config, connects Redis and binds both listeners; [`App::run`] starts
//! the fan-out readers, serves until its token is cancelled, then closes every socket with 1001,
//! ends every SSE stream and waits for them (at most the shutdown grace).

pub mod access;
pub mod connection;
pub mod fanout;
pub mod presence;
pub mod registry;
pub mod routes;
pub mod sse;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet::agent::AgentStore;
use fleet::session::{Backpressure, Chat, ChatLimits, TokenSigner};
use fleet::session_log::SessionLog;
use fleet::task::TaskStore;
use fred::prelude::Client;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::registry::Registry;
use crate::routes::{Gateway, WsLimits};

pub use fleet::session::{DEV_SECRET, MIN_SECRET_BYTES};

/// ws-gateway's flags; each mirrors an environment variable (flags win).
#[derive(clap::Parser, Clone)]
#[command(
    name = "ws-gateway",
    version,
    about = "Fleet's WebSocket and SSE gateway: delivers chat session events to browsers.",
    long_about = "Fleet's WebSocket and SSE gateway.\n\n\
        Serves GET /ws/chat/{session_id} (WebSocket) and GET /sse/chat/{session_id} \
        (Server-Sent Events), authorized by the session token edge-api handed out \
        (?token= or Authorization: Bearer). A client receives every event of its session after \
        its last_event_id, in order and once each: the session log is replayed, then live events \
        arrive from the <prefix>:fanout:<shard> streams, and any gap is read from the log. \
        Chat messages sent over the WebSocket become tasks as REST submits do: each is sent \
        straight to its agent's pool (<prefix>:exec:<pool>), or through <prefix>:tasks and the \
        dispatchers with --direct-dispatch false or when the agent is unknown.\n\n\
        Health and metrics are served on the admin address. Refuses to start without \
        FLEET_SECRET unless --dev is given."
)]
pub struct Config {
    #[command(flatten)]
    pub common: fleet::config::CommonArgs,

    /// Address the WebSocket and SSE endpoints listen on; port 0 picks a free port.
    #[arg(long, env = "FLEET_HTTP_ADDR", default_value = "0.0.0.0:8002")]
    pub http_addr: SocketAddr,

    /// Address /health, /health/ready, /health/detailed and /metrics listen on; port 0 picks a
    /// free port, logged in the `listening` line.
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9104")]
    pub admin_addr: SocketAddr,

    /// Secret that checks session tokens (at least 16 bytes). Must be the same for every
    /// edge-api and ws-gateway of a fleet.
    #[arg(long, env = "FLEET_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Development mode: without FLEET_SECRET, check tokens with a fixed, publicly known secret
    /// (the one edge-api --dev signs with).
    #[arg(long, env = "FLEET_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,

    /// Refuse chat messages (an `overloaded` error) while the backlog (entries not yet taken by
    /// the dispatchers, or by the executors of a pool this process sends to) is above this many
    /// entries; 0 never refuses.
    #[arg(long, env = "FLEET_MAX_BACKLOG", default_value_t = 100_000)]
    pub max_backlog: u64,

    /// Largest WebSocket frame (and message) a client may send, in bytes; a larger one closes
    /// the socket with 4008. Four times --max-message-bytes by default: a chat_message holds its
    /// message JSON-escaped, and a client that escapes all but ASCII (as Python's json.dumps
    /// does) sends `\uXXXX`, six bytes, for each character of two or three, so a message under
    /// its limit must not close the socket for its frame.
    #[arg(long, env = "FLEET_MAX_FRAME_BYTES", default_value_t = 262_144,
          value_parser = clap::value_parser!(u64).range(256..=16_777_216))]
    pub max_frame_bytes: u64,

    /// Largest user message accepted in a chat_message, in bytes (an `invalid_request` error
    /// above it).
    #[arg(long, env = "FLEET_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub max_message_bytes: usize,

    /// Deadline of a task whose agent config sets no `timeout_secs`, in seconds.
    #[arg(long, env = "FLEET_TASK_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub task_timeout_secs: u64,

    /// Send a chat task's request straight to its agent's pool (`fleet:exec:<pool>`), one hop
    /// fewer than through the dispatchers; `false` sends every task through `fleet:tasks` and
    /// the dispatchers (docs/ARCHITECTURE.md, "One task, end to end").
    #[arg(long, env = "FLEET_DIRECT_DISPATCH", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub direct_dispatch: bool,

    /// Connections that may wait on Redis at once for their admission (session status, replay
    /// start, presence), their goodbye (presence) or a read of their session log while they catch
    /// up after a lag or a fan-out resync; the others queue for a turn, counted in
    /// `fleet_ws_admissions_waiting`. Bounds the Redis requests of a reconnect or resync storm.
    #[arg(long, env = "FLEET_WS_ADMISSIONS_AT_ONCE",
          default_value_t = routes::Admissions::DEFAULT_AT_ONCE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub admissions_at_once: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("common", &self.common)
            .field("http_addr", &self.http_addr)
            .field("admin_addr", &self.admin_addr)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("dev", &self.dev)
            .field("max_backlog", &self.max_backlog)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("task_timeout_secs", &self.task_timeout_secs)
            .field("direct_dispatch", &self.direct_dispatch)
            .field("admissions_at_once", &self.admissions_at_once)
            .finish()
    }
}

impl Config {
    /// The secret that checks session tokens, or why there is none to use.
    pub fn signing_secret(&self) -> anyhow::Result<String> {
        Ok(fleet::session::signing_secret(
            self.secret.as_deref(),
            self.dev,
        )?)
    }

    /// The limits of the chat API.
    pub fn chat_limits(&self) -> ChatLimits {
        ChatLimits {
            max_message_bytes: self.max_message_bytes,
            default_task_timeout: Duration::from_secs(self.task_timeout_secs),
            direct_dispatch: self.direct_dispatch,
            ..ChatLimits::default()
        }
    }
}

/// ws-gateway, built and bound, ready to [`run`](App::run).
pub struct App {
    listener: TcpListener,
    http_addr: SocketAddr,
    admin_addr: SocketAddr,
    client: Client,
    gateway: Arc<Gateway>,
    grace: Duration,
    /// How long a client may take to send a request (`FLEET_HTTP_READ_TIMEOUT_SECS`).
    read_timeout: Duration,
    /// Stops the admin server and background work when the app ends (or is dropped unrun).
    background: CancellationToken,
    _background_guard: DropGuard,
}

impl App {
    /// Checks the config, connects Redis, binds the client-facing and admin listeners.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        let secret = cfg.signing_secret()?;
        match raise_open_files_limit() {
            Ok((before, after)) if before != after => {
                tracing::info!(before, after, "open-files limit raised to the hard limit");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
        let client = cfg.common.connect().await?;
        let keys = cfg.common.keys();

        // Install the Prometheus recorder before the first metric is recorded.
        fleet::admin::prometheus();
        let background = CancellationToken::new();
        let backpressure = if cfg.max_backlog > 0 {
            let sampler =
                fleet::backlog::spawn_sampler(client.clone(), keys.clone(), background.clone());
            Backpressure::new(sampler, cfg.max_backlog)
        } else {
            Backpressure::default()
        };
        let chat = Chat {
            tasks: TaskStore::new(client.clone(), keys.clone(), cfg.common.retention()),
            agents: AgentStore::new(client.clone(), keys.clone()),
            tokens: TokenSigner::new(secret.as_bytes()),
            limits: cfg.chat_limits(),
            backpressure,
        };
        let log = SessionLog::new(client.clone(), keys, cfg.common.fanout());
        let registry = Arc::new(Registry::default());
        let presence = Arc::new(presence::Presence::new(chat.clone(), registry.clone()));
        let gateway = Arc::new(Gateway {
            chat,
            log,
            registry,
            presence,
            limits: WsLimits {
                max_frame_bytes: cfg.max_frame_bytes as usize,
            },
            closing: CancellationToken::new(),
            connections: TaskTracker::new(),
            admissions: Arc::new(routes::Admissions::new(cfg.admissions_at_once)),
        });

        let listener = fleet::net::bind(cfg.http_addr, "FLEET_HTTP_ADDR").await?;
        let http_addr = listener.local_addr()?;
        let health = fleet::admin::Health::new("ws-gateway", client.clone(), vec![]);
        let admin = fleet::net::bind(cfg.admin_addr, "FLEET_ADMIN_ADDR").await?;
        let admin_addr = admin.local_addr()?;
        fleet::admin::spawn(
            admin,
            fleet::admin::router(health),
            cfg.common.http_read_timeout(),
            background.clone(),
        );
        tracing::info!(
            http = %http_addr,
            admin = %admin_addr,
            presence_field = %fleet::session::ws_presence_field(gateway.presence.gateway()),
            "listening"
        );
        Ok(App {
            listener,
            http_addr,
            admin_addr,
            client,
            gateway,
            grace: cfg.common.grace(),
            read_timeout: cfg.common.http_read_timeout(),
            _background_guard: background.clone().drop_guard(),
            background,
        })
    }

    /// The address of the WebSocket and SSE endpoints.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address of the health and metrics endpoints.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` is cancelled, then closes every socket with 1001 ("going away"),
    /// ends every SSE stream and waits for them, at most the shutdown grace.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            listener,
            client,
            gateway,
            grace,
            read_timeout,
            background,
            _background_guard,
            ..
        } = self;

        // Where each reader starts is fixed before any client can register (see `fanout`).
        let shards = gateway.log.fanout_keys();
        let starts = fanout::start_ids(&client, &shards)
            .await
            .context("cannot read the fan-out streams")?;
        let workers = TaskTracker::new();
        for (key, start) in shards.into_iter().zip(starts) {
            workers.spawn(fanout::read_shard(
                client.clone(),
                key,
                start,
                gateway.registry.clone(),
                background.clone(),
            ));
        }
        workers.spawn(gateway.presence.clone().heartbeat(background.clone()));
        workers.close();

        let closing = gateway.closing.clone();
        let mut server = tokio::spawn(fleet::net::serve(
            listener,
            routes::router(gateway.clone()),
            read_timeout,
            closing.clone(),
        ));
        tracing::info!("ws-gateway serving");

        let failed = tokio::select! {
            () = shutdown.cancelled() => None,
            r = &mut server => Some(r),
        };
        tracing::info!(
            clients = gateway.registry.clients(),
            "shutting down: closing sockets"
        );
        closing.cancel();
        gateway.connections.close();
        let drained = fleet::shutdown::drain(
            async {
                if failed.is_none() {
                    let _ = (&mut server).await;
                }
                gateway.connections.wait().await;
            },
            grace,
        )
        .await;
        background.cancel();
        // Readers notice within one blocking read.
        let _ = tokio::time::timeout(Duration::from_secs(3), workers.wait()).await;
        tracing::info!(drained, "ws-gateway stopped");
        match failed {
            Some(Ok(())) if !shutdown.is_cancelled() => {
                anyhow::bail!("the HTTP server stopped unexpectedly")
            }
            Some(Err(e)) => Err(e).context("the HTTP server panicked"),
            _ => Ok(()),
        }
    }
}

/// Raises this process's open-files soft limit to its hard limit, and returns both soft limits
/// (before, after; `u64::MAX` for unlimited). Each connection is an open file, and the soft limit
/// a shell, systemd or a container runtime hands a process is often 1024; the hard limit is the
/// operator's real bound (`ulimit -Hn`, compose `ulimits`, the runtime's `LimitNOFILE`).
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let before = now.current.unwrap_or(u64::MAX);
    if now.current == now.maximum {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        },
    )?;
    Ok((before, now.maximum.unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from([&["ws-gateway"], args].concat()).expect("valid flags")
    }

    #[test]
    fn a_secret_is_required_unless_dev() {
        let err = config(&[]).signing_secret().unwrap_err().to_string();
        assert!(err.contains("FLEET_SECRET is required"), "{err}");
        assert_eq!(config(&["--dev"]).signing_secret().unwrap(), DEV_SECRET);
        let err = config(&["--secret", "short"])
            .signing_secret()
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16 bytes"), "{err}");
        let long = "0123456789abcdef";
        assert_eq!(
            config(&["--secret", long, "--dev"])
                .signing_secret()
                .unwrap(),
            long
        );
    }

    #[test]
    fn the_help_says_where_chat_messages_go() {
        let help = <Config as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(help.contains("<prefix>:exec:<pool>"), "{help}");
        assert!(help.contains("--direct-dispatch false"), "{help}");
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = config(&["--dev"]);
        assert_eq!(c.http_addr.port(), 8002);
        assert_eq!(c.admin_addr.port(), 9104);
        assert_eq!(c.max_backlog, 100_000);
        assert_eq!(c.max_frame_bytes, 262_144);
        assert_eq!(c.chat_limits().max_message_bytes, 65_536);
        assert_eq!(
            c.chat_limits().default_task_timeout,
            Duration::from_secs(300)
        );
        assert!(c.chat_limits().direct_dispatch);
        let off = config(&["--dev", "--direct-dispatch", "false"]).chat_limits();
        assert!(!off.direct_dispatch);
        assert!(!format!("{:?}", config(&["--secret", "sekrit-sekrit-sekrit"])).contains("sekrit"));
    }
}
