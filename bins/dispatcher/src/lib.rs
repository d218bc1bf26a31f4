//! dispatcher: consumes `fleet:tasks` (group `dispatchers`) and turns commands into work.
//!
//! * `task.submit`: looks up the session's agent, moves the task `queued -> dispatched` by
//!   compare-and-set and XADDs an `exec.request` to `fleet:exec:<pool>` (the agent's pool).
//!   When a redelivered submit finds its task already `dispatched`, the earlier delivery may have
//!   died between the move and the XADD, so the request is sent again (executors' callbacks are
//!   idempotent, so a duplicate costs work, never correctness).
//! * `task.cancel`: ends the task `cancelled` (with its client event) and, when an executor may
//!   hold it, XADDs `exec.cancel` to the pool's control stream.
//! * `session.close`: closes the session (no new tasks), cancels its open tasks, logs
//!   `session_closed`.
//! * `task.deliberate`: picks the deliberation's council members (registered agents first, pool
//!   seats for the rest), moves it `pending -> generating` and sends one `agent.request` per
//!   member (see [`fleet::deliberation`]).
//! * `planning.event`: derives the transition's subtasks ([`fleet::planning`]), creates each as a
//!   task of the case's planning session (deterministic ids: a replay derives nothing twice) and
//!   sends it to `fleet:agents:<role>` and to NATS `agent.requests` (through `fleet:outbound`).
//!
//! With `FLEET_CONTEXT_ADDR`, agent requests carry the Context service's `GetContext` answer
//! ([`hydrate`]). With `FLEET_PLANNING_ADDR`, the subtasks of planning sessions its cancels and
//! closes end are reported to the Planning service ([`fleet::planning::notifier`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleet::admin::{self, Health};
use fleet::agent::AgentStore;
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::council::Councils;
use fleet::deliberation::{DeliberationStore, Engine, EngineConfig};
use fleet::keys::GROUP_DISPATCHERS;
use fleet::planning::PlanningRules;
use fleet::planning::notifier::{PlanningArgs, PlanningNotifier};
use fleet::session_log::SessionLog;
use fleet::stream::{ConsumerLoop, consumer::unique_consumer_name};
use fleet::task::TaskStore;
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod handler;
pub mod hydrate;

pub use handler::{DispatchError, Dispatcher};

#[derive(Parser, Clone, Debug)]
#[command(
    name = "dispatcher",
    version,
    about = "Fleet dispatcher: turns commands on fleet:tasks into work for executors.",
    long_about = "Fleet dispatcher: consumes the fleet:tasks stream (consumer group `dispatchers`), \
validates each task against its session and agent, moves it queued -> dispatched by compare-and-set \
and sends it to the agent's executor pool (fleet:exec:<pool>). Handles cancellations and session \
closes. Stateless: run as many as the backlog needs."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub consumer: ConsumerArgs,

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics); port 0
    /// picks a free port, logged in the `listening` line.
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9101")]
    pub admin_addr: SocketAddr,

    /// TOML or YAML file of agent configs to load at start (upserted into Redis).
    #[arg(long, env = "FLEET_AGENTS_FILE")]
    pub agents_file: Option<PathBuf>,

    /// TOML or YAML file of the rules that derive subtasks from planning events (format:
    /// docs/grpc.md, "Planning events"); checked at start. Unset: the built-in rules (DESIGN,
    /// BUILD, TEST, DEPLOY).
    #[arg(long, env = "FLEET_PLANNING_RULES")]
    pub planning_rules: Option<PathBuf>,

    /// Address of a Context service (`context.v1.ContextService`, e.g. `context:50054`) whose
    /// `GetContext` hydrates agent requests. Unset: no hydration.
    #[arg(long, env = "FLEET_CONTEXT_ADDR")]
    pub context_addr: Option<String>,

    /// Milliseconds to wait for the Context service before going on without context.
    #[arg(long, env = "FLEET_CONTEXT_TIMEOUT_MS", default_value_t = 2000)]
    pub context_timeout_ms: u64,

    /// Also publish deliberation requests to NATS `agent.requests` (through fleet:outbound),
    /// including those of planning subtasks run by a council (DESIGN's architecture); other
    /// planning subtasks always go there. Set it when the agents are NATS-side runners.
    /// FLEET_PUBLISH_AGENT_REQUESTS takes true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "FLEET_PUBLISH_AGENT_REQUESTS", value_parser = clap::builder::BoolishValueParser::new())]
    pub publish_agent_requests: bool,

    #[command(flatten)]
    pub planning_updates: PlanningArgs,
}

/// A dispatcher process: built with [`App::build`], run until its shutdown token is cancelled.
pub struct App {
    cfg: Config,
    client: fred::prelude::Client,
    admin: TcpListener,
    planning: Arc<PlanningRules>,
    context: Option<hydrate::ContextHydrator>,
    notifier: Option<PlanningNotifier>,
}

impl App {
    /// Connects to Redis, loads the agents file and the planning rules, checks the Context and
    /// Planning services' addresses and binds the admin port.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        admin::prometheus();
        let planning = Arc::new(PlanningRules::from_file(cfg.planning_rules.as_deref())?);
        let notifier = cfg
            .planning_updates
            .notifier()
            .context("invalid FLEET_PLANNING_ADDR")?;
        let context = match &cfg.context_addr {
            Some(addr) => Some(hydrate::ContextHydrator::new(
                addr,
                Duration::from_millis(cfg.context_timeout_ms.max(1)),
            )?),
            None => None,
        };
        let client = cfg.common.connect().await?;
        if let Some(path) = &cfg.agents_file {
            let n = AgentStore::new(client.clone(), cfg.common.keys())
                .load_file(path)
                .await?;
            tracing::info!(agents = n, file = %path.display(), "loaded agents");
        }
        let admin = fleet::net::bind(cfg.admin_addr, "FLEET_ADMIN_ADDR").await?;
        tracing::info!(admin = %admin.local_addr()?, "listening");
        Ok(App {
            cfg,
            client,
            admin,
            planning,
            context,
            notifier,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Dispatches until `shutdown`, then finishes the batches in hand (within the grace period).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let keys = self.cfg.common.keys();
        let health = Health::new(
            "dispatcher",
            self.client.clone(),
            vec![(keys.tasks(), GROUP_DISPATCHERS.to_owned())],
        );
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(
            self.admin,
            admin::router(health),
            self.cfg.common.http_read_timeout(),
            admin_stop.clone(),
        );

        let handler = Dispatcher {
            tasks: TaskStore::new(
                self.client.clone(),
                keys.clone(),
                self.cfg.common.retention(),
            ),
            agents: AgentStore::new(self.client.clone(), keys.clone()),
            log: SessionLog::new(self.client.clone(), keys.clone(), self.cfg.common.fanout()),
            keys: keys.clone(),
            engine: Engine::new(
                DeliberationStore::new(
                    self.client.clone(),
                    keys.clone(),
                    self.cfg.common.retention().session_ttl_ms,
                ),
                Councils::new(self.client.clone(), keys.clone()),
                EngineConfig {
                    publish_agent_requests: self.cfg.publish_agent_requests,
                },
            )
            // Its steps end the council subtasks the dispatcher's cancels and closes cancel.
            .with_planning(self.notifier.clone()),
            planning: self.planning.clone(),
            context: self.context.clone(),
            notifier: self.notifier.clone(),
        };
        let consumer = self.cfg.consumer.consumer(
            &keys,
            keys.tasks(),
            GROUP_DISPATCHERS,
            unique_consumer_name("dispatcher"),
        );
        let mut workers = JoinSet::new();
        let looped = ConsumerLoop::new(consumer, self.client.clone(), handler);
        let stop = shutdown.clone();
        workers.spawn(async move { ("consumer", looped.run(stop).await.map_err(Into::into)) });

        let result = fleet::shutdown::supervise(workers, shutdown, self.cfg.common.grace()).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = self.client.quit().await;
        tracing::info!("dispatcher stopped");
        result
    }
}
