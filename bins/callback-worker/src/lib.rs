//! callback-worker: consumes `fleet:callbacks` (group `callback-workers`) and runs the deadline
//! sweeper.
//!
//! For each batch it groups the callbacks by session and applies each session's callbacks in
//! one atomic script call (`fleet::task`): state moves by compare-and-set on `(task_id, attempt)`
//! in `seq` order, duplicates and stale callbacks are dropped, and each step's client event is
//! appended to the session log. It then fans the new events out to the gateways and drops ended
//! tasks from the deadline set. The sweeper ends overdue tasks `timed_out` and tells their
//! executors to stop.
//!
//! Deliberation callbacks (`proposal`, `selection`) go to the deliberation store instead
//! ([`fleet::deliberation::Engine`]): a complete round moves on to the next review round or to
//! scoring, ranking, the architect step and the decision; the sweeper applies the quorum rule
//! at each deliberation's deadline.
//!
//! With `FLEET_PLANNING_ADDR`, the ends it makes of subtasks of planning sessions (a runner's
//! answer or error, a deadline, a council subtask's decision) are reported to the Planning
//! service ([`fleet::planning::notifier`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleet::admin::{self, Health};
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::council::Councils;
use fleet::deliberation::{DeliberationStore, Engine, EngineConfig};
use fleet::keys::GROUP_CALLBACK_WORKERS;
use fleet::planning::notifier::{PlanningArgs, PlanningNotifier};
use fleet::session_log::{PublishOrder, SessionLog};
use fleet::stream::{ConsumerLoop, consumer::unique_consumer_name};
use fleet::task::TaskStore;
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod handler;
mod sweeper;

pub use handler::CallbackHandler;
pub use sweeper::Sweeper;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "callback-worker",
    version,
    about = "Fleet callback-worker: applies executor callbacks to task state and streams them to clients.",
    long_about = "Fleet callback-worker: consumes fleet:callbacks (consumer group `callback-workers`). \
Moves each task's state by compare-and-set in callback order, drops duplicate and stale callbacks, \
appends client events to the session's log and fans them out to the ws-gateways. Also ends tasks \
past their deadline as timed_out. Stateless: run as many as the backlog needs."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub consumer: ConsumerArgs,

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics); port 0
    /// picks a free port, logged in the `listening` line.
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9102")]
    pub admin_addr: SocketAddr,

    /// Milliseconds between two scans for tasks past their deadline.
    #[arg(long, env = "FLEET_SWEEP_INTERVAL_MS", default_value_t = 500)]
    pub sweep_interval_ms: u64,

    #[command(flatten)]
    pub planning: PlanningArgs,
}

/// A callback-worker process.
pub struct App {
    cfg: Config,
    client: fred::prelude::Client,
    admin: TcpListener,
    planning: Option<PlanningNotifier>,
}

impl App {
    /// Checks the Planning service's address, connects to Redis and binds the admin port.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        admin::prometheus();
        let planning = cfg
            .planning
            .notifier()
            .context("invalid FLEET_PLANNING_ADDR")?;
        let client = cfg.common.connect().await?;
        let admin = fleet::net::bind(cfg.admin_addr, "FLEET_ADMIN_ADDR").await?;
        tracing::info!(admin = %admin.local_addr()?, "listening");
        Ok(App {
            cfg,
            client,
            admin,
            planning,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Works until `shutdown`, then finishes the batches in hand (within the grace period).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let keys = self.cfg.common.keys();
        let health = Health::new(
            "callback-worker",
            self.client.clone(),
            vec![(keys.callbacks(), GROUP_CALLBACK_WORKERS.to_owned())],
        );
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(
            self.admin,
            admin::router(health),
            self.cfg.common.http_read_timeout(),
            admin_stop.clone(),
        );

        let tasks = TaskStore::new(
            self.client.clone(),
            keys.clone(),
            self.cfg.common.retention(),
        );
        let log = SessionLog::new(self.client.clone(), keys.clone(), self.cfg.common.fanout());
        let planning = self.planning;
        // Its steps end council subtasks' deliberations, which Planning is told of.
        let engine = Engine::new(
            DeliberationStore::new(
                self.client.clone(),
                keys.clone(),
                self.cfg.common.retention().session_ttl_ms,
            ),
            Councils::new(self.client.clone(), keys.clone()),
            EngineConfig::default(),
        )
        .with_planning(planning.clone());
        let order = PublishOrder::new();
        let consumer = self.cfg.consumer.consumer(
            &keys,
            keys.callbacks(),
            GROUP_CALLBACK_WORKERS,
            unique_consumer_name("callback-worker"),
        );
        let looped = ConsumerLoop::new(
            consumer,
            self.client.clone(),
            CallbackHandler {
                tasks: tasks.clone(),
                log: log.clone(),
                order: order.clone(),
                engine: engine.clone(),
                planning: planning.clone(),
            },
        );
        let sweeper = Sweeper {
            tasks,
            log,
            order,
            engine,
            planning,
            every: Duration::from_millis(self.cfg.sweep_interval_ms.max(10)),
        };

        let mut workers = JoinSet::new();
        let stop = shutdown.clone();
        workers.spawn(async move { ("consumer", looped.run(stop).await.map_err(Into::into)) });
        let stop = shutdown.clone();
        workers.spawn(async move { ("sweeper", sweeper.run(stop).await) });

        let result = fleet::shutdown::supervise(workers, shutdown, self.cfg.common.grace()).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = self.client.quit().await;
        tracing::info!("callback-worker stopped");
        result
    }
}
