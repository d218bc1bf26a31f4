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

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use fleet::admin::{self, Health};
use fleet::agent::AgentStore;
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::keys::GROUP_DISPATCHERS;
use fleet::session_log::SessionLog;
use fleet::stream::{ConsumerLoop, consumer::unique_consumer_name};
use fleet::task::TaskStore;
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod handler;

pub use handler::Dispatcher;

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

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics).
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9101")]
    pub admin_addr: SocketAddr,

    /// TOML or YAML file of agent configs to load at start (upserted into Redis).
    #[arg(long, env = "FLEET_AGENTS_FILE")]
    pub agents_file: Option<PathBuf>,
}

/// A dispatcher process: built with [`App::build`], run until its shutdown token is cancelled.
pub struct App {
    cfg: Config,
    client: fred::prelude::Client,
    admin: TcpListener,
}

impl App {
    /// Connects to Redis, loads the agents file and binds the admin port.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        admin::prometheus();
        let client = fleet::redis::connect(&cfg.common.redis_url).await?;
        if let Some(path) = &cfg.agents_file {
            let n = AgentStore::new(client.clone(), cfg.common.keys())
                .load_file(path)
                .await?;
            tracing::info!(agents = n, file = %path.display(), "loaded agents");
        }
        let admin = TcpListener::bind(cfg.admin_addr).await?;
        Ok(App { cfg, client, admin })
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
        let admin_task = admin::spawn(self.admin, admin::router(health), admin_stop.clone());

        let handler = Dispatcher {
            tasks: TaskStore::new(
                self.client.clone(),
                keys.clone(),
                self.cfg.common.retention(),
            ),
            agents: AgentStore::new(self.client.clone(), keys.clone()),
            log: SessionLog::new(self.client.clone(), keys.clone(), self.cfg.common.fanout()),
            keys: keys.clone(),
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
