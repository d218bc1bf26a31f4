//! edge-api: the REST and gRPC front door of Fleet: chat sessions, tasks, agent configs,
//! health (REST), and `orchestrator.v1.OrchestratorService` with deliberations, orchestrations,
//! planning events, councils, chat, status and metrics (gRPC, [`grpc`]).
//!
//! | module | what it holds |
//! |---|---|
//! | [`grpc`] | the gRPC server: orchestrator service, health, reflection |
//! | [`routes`] | the router, its shared state and the 404 / 405 fallbacks |
//! | [`routes::chat`] | `/api/v1/chat/...`: sessions and their tasks (session-token auth) |
//! | [`routes::agents`] | `/api/v1/agents/...`: agent configs (API-key auth) |
//! | [`auth`] | session-token and API-key checks, as extractors |
//! | [`error`] | [`error::ApiError`], the one error every route answers with |
//! | [`extract`] | JSON and path extractors that answer with [`error::ApiError`] |
//! | [`http_metrics`] | per-route request counters and latency histograms |
//! | [`public_url`] | the WebSocket / SSE URLs handed to clients |
//! | [`unread_body`] | `Connection: close` on an answer given before the body was read |
//!
//! [`App::build`] validates the config, connects Redis, seeds agents from a file and binds the
//! listeners; [`App::run`] serves REST and gRPC until its token is cancelled, then drains both.
//! Health and metrics (`/health/...`, `/metrics`) are served on the REST port too.

pub mod auth;
pub mod error;
pub mod extract;
pub mod grpc;
pub mod http_metrics;
pub mod public_url;
pub mod routes;
pub mod unread_body;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet::agent::AgentStore;
use fleet::council::Councils;
use fleet::deliberation::{DeliberationStore, Engine, EngineConfig};
use fleet::planning::PlanningRules;
use fleet::session::{Backpressure, Chat, ChatLimits, TokenSigner};
use fleet::session_log::SessionLog;
use fleet::task::TaskStore;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::auth::ApiKeys;
use crate::public_url::PublicUrls;
use crate::routes::AppState;

pub use fleet::session::{DEV_SECRET, MIN_SECRET_BYTES};

/// The gRPC port the Gateway calls (`orchestrator:50055`).
pub const DEFAULT_GRPC_PORT: u16 = 50055;

/// edge-api's flags; each mirrors an environment variable (flags win).
#[derive(clap::Parser, Clone)]
#[command(
    name = "edge-api",
    version,
    about = "Fleet's REST and gRPC front door: chat sessions, tasks, agent configs, \
        deliberations, planning events, councils and health.",
    long_about = "Fleet's REST and gRPC front door.\n\n\
        Opens chat sessions (POST /api/v1/chat/init) with a signed session token, accepts \
        messages as tasks (POST /api/v1/chat/{session_id}/task) and sends each to its agent's \
        pool (`<prefix>:exec:<pool>`; through the `<prefix>:tasks` stream and the dispatchers \
        with --direct-dispatch false), answers task and session status, cancels tasks and \
        closes sessions. Manages agent configs (/api/v1/agents, guarded by API keys) and serves \
        /health, /health/ready, /health/detailed and /metrics on the same port.\n\n\
        Serves gRPC on --grpc-addr (default 0.0.0.0:50055): orchestrator.v1.OrchestratorService \
        (deliberations, orchestrations, planning events, councils, chat, status and metrics), \
        grpc.health.v1 and server reflection.\n\n\
        Refuses to start without FLEET_SECRET unless --dev is given."
)]
pub struct Config {
    #[command(flatten)]
    pub common: fleet::config::CommonArgs,

    /// Address the REST API (and health and metrics) listens on; port 0 picks a free port.
    #[arg(long, env = "FLEET_HTTP_ADDR", default_value = "0.0.0.0:8001")]
    pub http_addr: SocketAddr,

    /// Address the gRPC server (orchestrator.v1.OrchestratorService, grpc.health.v1, reflection)
    /// listens on; port 0 picks a free port. Unset: 0.0.0.0:50055, or an ephemeral port on the
    /// REST address's IP when the REST port is 0 (as tests run it).
    #[arg(long, env = "FLEET_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,

    /// Deadline of a deliberation whose request sets no timeout, in seconds.
    #[arg(long, env = "FLEET_DELIBERATION_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub deliberation_timeout_secs: u64,

    /// gRPC calls that may wait at once (sync Deliberate / Orchestrate and streams each hold a
    /// Redis connection); more answer RESOURCE_EXHAUSTED. At least 1: there is no unlimited.
    #[arg(long, env = "FLEET_GRPC_MAX_WAITERS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_waiters: u32,

    /// TOML or YAML file of the subtask rules for planning events (the same file the
    /// dispatchers read; format: docs/grpc.md, "Planning events"). Unset: the built-in rules.
    #[arg(long, env = "FLEET_PLANNING_RULES")]
    pub planning_rules: Option<PathBuf>,

    /// Secret that signs session tokens (at least 16 bytes). Must be the same for every
    /// edge-api and ws-gateway of a fleet.
    #[arg(long, env = "FLEET_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Development mode: without FLEET_SECRET, sign tokens with a fixed, publicly known secret.
    /// FLEET_DEV takes true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "FLEET_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,

    /// Comma-separated API keys that guard /api/v1/agents (sent as `X-API-Key: <key>` or
    /// `Authorization: Bearer <key>`). Empty leaves those routes open.
    #[arg(
        long,
        env = "FLEET_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Public base URL of the WebSocket gateway handed to clients, e.g. `wss://chat.example.com`.
    /// Unset: derived from each request (its Host without the port, ws or wss after
    /// `X-Forwarded-Proto`, port 8002).
    #[arg(long, env = "FLEET_PUBLIC_WS_URL")]
    pub public_ws_url: Option<String>,

    /// TOML or YAML file of agent configs upserted at start (`[[agents]] id = ... name = ...`).
    #[arg(long, env = "FLEET_AGENTS_FILE")]
    pub agents_file: Option<PathBuf>,

    /// Refuse new tasks (429) while the backlog (entries not yet taken by the dispatchers, or by
    /// the executors of a pool this process sends to) is above this many entries; 0 never
    /// refuses.
    #[arg(long, env = "FLEET_MAX_BACKLOG", default_value_t = 100_000)]
    pub max_backlog: u64,

    /// Largest request body accepted, in bytes (413 above it).
    #[arg(long, env = "FLEET_MAX_BODY_BYTES", default_value_t = 262_144)]
    pub max_body_bytes: usize,

    /// Largest user message accepted, in bytes (400 above it).
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
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("common", &self.common)
            .field("http_addr", &self.http_addr)
            .field("grpc_addr", &self.grpc_addr())
            .field("deliberation_timeout_secs", &self.deliberation_timeout_secs)
            .field("grpc_max_waiters", &self.grpc_max_waiters)
            .field("planning_rules", &self.planning_rules)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("dev", &self.dev)
            .field("api_keys", &format_args!("{} key(s)", self.api_keys.len()))
            .field("public_ws_url", &self.public_ws_url)
            .field("agents_file", &self.agents_file)
            .field("max_backlog", &self.max_backlog)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("task_timeout_secs", &self.task_timeout_secs)
            .field("direct_dispatch", &self.direct_dispatch)
            .finish()
    }
}

impl Config {
    /// The secret that signs session tokens, or why there is none to use.
    pub fn signing_secret(&self) -> anyhow::Result<String> {
        Ok(fleet::session::signing_secret(
            self.secret.as_deref(),
            self.dev,
        )?)
    }

    /// Where gRPC listens (see `--grpc-addr`).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr.unwrap_or_else(|| {
            if self.http_addr.port() == 0 {
                SocketAddr::new(self.http_addr.ip(), 0)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_GRPC_PORT)
            }
        })
    }

    /// The limits of the gRPC service.
    pub fn grpc_limits(&self) -> grpc::GrpcLimits {
        grpc::GrpcLimits {
            default_deliberation_timeout: Duration::from_secs(self.deliberation_timeout_secs),
            max_waiters: self.grpc_max_waiters as usize,
        }
    }

    /// The limits of the chat API.
    pub fn chat_limits(&self) -> ChatLimits {
        ChatLimits {
            max_message_bytes: self.max_message_bytes,
            default_task_timeout: Duration::from_secs(self.task_timeout_secs),
            direct_dispatch: self.direct_dispatch,
            // A token lasts as long as an idle session does; an active session outlives it and
            // gets a fresh one from `POST /api/v1/chat/session/{id}/token`.
            token_ttl: Duration::from_secs(self.common.session_ttl_secs),
        }
    }
}

/// edge-api, built and bound, ready to [`run`](App::run).
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    /// The gRPC service, less its shutdown token (set in [`App::run`]).
    orchestrator: grpc::Orchestrator,
    state: AppState,
    grace: Duration,
    /// How long a client may take to send a request (`FLEET_HTTP_READ_TIMEOUT_SECS`).
    read_timeout: Duration,
    /// Stops the back-pressure sampler when the app ends (or is dropped unrun).
    _background: DropGuard,
}

impl App {
    /// Checks the config, connects Redis, upserts the agents file and binds the listener.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        let secret = cfg.signing_secret()?;
        let urls = PublicUrls::new(cfg.public_ws_url.as_deref())?;
        let api_keys = ApiKeys::new(&cfg.api_keys);
        if api_keys.is_empty() {
            tracing::warn!("FLEET_API_KEYS is empty: /api/v1/agents is open to anyone");
        }

        let client = cfg.common.connect().await?;
        let keys = cfg.common.keys();
        let agents = AgentStore::new(client.clone(), keys.clone());
        if let Some(path) = &cfg.agents_file {
            let n = agents
                .load_file(path)
                .await
                .with_context(|| format!("cannot load FLEET_AGENTS_FILE `{}`", path.display()))?;
            tracing::info!(agents = n, file = %path.display(), "agents loaded");
        }

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
            agents,
            tokens: TokenSigner::new(secret.as_bytes()),
            limits: cfg.chat_limits(),
            backpressure,
        };
        let rules = PlanningRules::from_file(cfg.planning_rules.as_deref())
            .context("cannot load FLEET_PLANNING_RULES")?;
        let limits = cfg.grpc_limits();
        let engine = Engine::new(
            DeliberationStore::new(
                client.clone(),
                keys.clone(),
                cfg.common.retention().session_ttl_ms,
            ),
            Councils::new(client.clone(), keys.clone()),
            EngineConfig::default(),
        );
        let orchestrator = grpc::Orchestrator {
            chat: chat.clone(),
            engine: engine.clone(),
            log: SessionLog::new(client.clone(), keys.clone(), cfg.common.fanout()),
            rules: Arc::new(rules),
            waiters: Arc::new(tokio::sync::Semaphore::new(limits.max_waiters)),
            limits,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
        };
        let health = fleet::admin::Health::new(
            "edge-api",
            client,
            vec![(keys.tasks(), fleet::keys::GROUP_DISPATCHERS.into())],
        );
        let state = AppState::new(
            chat,
            engine,
            api_keys,
            urls,
            health,
            cfg.max_body_bytes,
            cfg.common.http_read_timeout(),
        );

        let listener = fleet::net::bind(cfg.http_addr, "FLEET_HTTP_ADDR").await?;
        let addr = listener.local_addr()?;
        let grpc_listener = fleet::net::bind(cfg.grpc_addr(), "FLEET_GRPC_ADDR").await?;
        let grpc_addr = grpc_listener.local_addr()?;
        Ok(App {
            listener,
            addr,
            grpc_listener,
            grpc_addr,
            orchestrator,
            state,
            grace: cfg.common.grace(),
            read_timeout: cfg.common.http_read_timeout(),
            _background: background.drop_guard(),
        })
    }

    /// The address the REST API listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Serves REST and gRPC until `shutdown` is cancelled, then lets requests in flight finish,
    /// at most the shutdown grace period (waiting gRPC calls and streams end at once with
    /// UNAVAILABLE; their work goes on and any replica answers for it).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut orchestrator = self.orchestrator;
        orchestrator.shutdown = shutdown.child_token();
        let mut grpc_server = tokio::spawn(grpc::serve(
            self.grpc_listener,
            orchestrator,
            self.read_timeout,
            shutdown.clone(),
        ));
        let router = routes::router(self.state.clone());
        tracing::info!(http = %self.addr, grpc = %self.grpc_addr, "listening");
        let mut server = tokio::spawn(fleet::net::serve(
            self.listener,
            router,
            self.read_timeout,
            shutdown.clone(),
        ));
        tokio::select! {
            served = &mut server => {
                // The server only ends by itself on shutdown, or when it panicked.
                shutdown.cancel();
                grpc_server.abort();
                served.context("http server task")?;
                return Ok(());
            }
            served = &mut grpc_server => {
                shutdown.cancel();
                server.abort();
                served.context("grpc server task")?.context("grpc server")?;
                return Ok(());
            }
            _ = shutdown.cancelled() => {}
        }
        tracing::info!("draining requests in flight");
        let drained = fleet::shutdown::drain(
            async {
                if let Err(e) = (&mut server).await {
                    tracing::error!(error = %e, "http server task failed");
                }
                match (&mut grpc_server).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "grpc server failed while draining"),
                    Err(e) => tracing::error!(error = %e, "grpc server task failed"),
                }
            },
            self.grace,
        )
        .await;
        if !drained {
            server.abort();
            grpc_server.abort();
        }
        tracing::info!("edge-api stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn secrets_are_required_long_enough_or_dev() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("edge-api").chain(args.iter().copied())).unwrap()
        };
        let ok = parse(&["--secret", "0123456789abcdef"]);
        assert_eq!(ok.signing_secret().unwrap(), "0123456789abcdef");
        assert!(
            parse(&["--secret", "0123456789abcde"])
                .signing_secret()
                .is_err()
        );
        assert_eq!(parse(&["--dev"]).signing_secret().unwrap(), DEV_SECRET);
        let keys = ApiKeys::new(&parse(&["--api-keys", "a, b,,c"]).api_keys);
        assert!(keys.accepts("b") && keys.accepts("c") && !keys.accepts(""));
        let limits =
            parse(&["--max-message-bytes", "10", "--task-timeout-secs", "7"]).chat_limits();
        assert_eq!(limits.max_message_bytes, 10);
        assert_eq!(limits.default_task_timeout, Duration::from_secs(7));
        assert!(limits.direct_dispatch);
        assert!(
            !parse(&["--direct-dispatch", "false"])
                .chat_limits()
                .direct_dispatch
        );
    }

    #[test]
    fn zero_grpc_waiters_is_refused_not_taken_for_one() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("edge-api").chain(args.iter().copied()))
        };
        // FLEET_MAX_BACKLOG=0 means no limit; FLEET_GRPC_MAX_WAITERS=0 must not quietly mean 1.
        let err = parse(&["--dev", "--grpc-max-waiters", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("--grpc-max-waiters"), "{err}");
        let limits = parse(&["--dev", "--grpc-max-waiters", "3"])
            .unwrap()
            .grpc_limits();
        assert_eq!(limits.max_waiters, 3);
        assert_eq!(parse(&["--dev"]).unwrap().grpc_limits().max_waiters, 1024);
    }

    #[test]
    fn help_describes_the_grpc_server_and_where_tasks_go() {
        let help = Config::command().render_long_help().to_string();
        for said in [
            "gRPC",
            "orchestrator.v1.OrchestratorService",
            "0.0.0.0:50055",
            "`<prefix>:exec:<pool>`",
            "--direct-dispatch false",
        ] {
            assert!(help.contains(said), "--help should say `{said}`:\n{help}");
        }
        let about = Config::command().get_about().unwrap().to_string();
        assert!(about.contains("gRPC"), "{about}");
    }

    #[test]
    fn grpc_listens_on_50055_unless_told_or_rest_is_ephemeral() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("edge-api").chain(args.iter().copied())).unwrap()
        };
        assert_eq!(parse(&["--dev"]).grpc_addr().to_string(), "0.0.0.0:50055");
        assert_eq!(
            parse(&["--dev", "--http-addr", "127.0.0.1:0"])
                .grpc_addr()
                .to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(
            parse(&[
                "--dev",
                "--grpc-addr",
                "127.0.0.1:7000",
                "--http-addr",
                "127.0.0.1:0"
            ])
            .grpc_addr()
            .to_string(),
            "127.0.0.1:7000"
        );
    }
}
