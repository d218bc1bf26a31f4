//! exec-worker: the reference executor. Consumes `fleet:exec:<pool>` (group `executors`) and
//! answers on `fleet:callbacks` with `started`, `chunk`*, then `result` or `error`, numbering the
//! callbacks of each task attempt with `seq` from 1.
//!
//! Modes:
//! * `echo`: streams the message back word by word (`--echo-delay-ms` between words; 0 for
//!   benchmarks, which also sends all callbacks of a task in one round trip).
//! * `command`: runs `--command` (through `sh -c`) per task with the task as JSON on stdin; each
//!   stdout line becomes a chunk; exit status 0 is the result (all of stdout), anything else an
//!   error carrying the tail of stderr. The program is killed at the task's deadline or on cancel.
//!
//! Cancellation: every executor of a pool reads the pool's control stream (`exec.cancel`) and
//! stops the task if it holds it; a cancel that arrives before the task is dropped too.
//! An entry is acked only after its last callback is written, so a crashed executor's tasks are
//! taken over by another one (and the duplicate callbacks are dropped by the callback-worker).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use fleet::admin::{self, Health};
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::keys::GROUP_EXECUTORS;
use fleet::stream::{ConsumerLoop, Producer, consumer::unique_consumer_name};
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod command;
mod control;
mod echo;
mod executor;

pub use control::Cancellations;
pub use executor::Executor;

/// What the executor does with a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Stream the message back word by word.
    Echo,
    /// Run a program per task (see --command).
    Command,
}

#[derive(Parser, Clone, Debug)]
#[command(
    name = "exec-worker",
    version,
    about = "Fleet reference executor: runs tasks from fleet:exec:<pool> and streams results back.",
    long_about = "Fleet reference executor: consumes fleet:exec:<pool> (consumer group `executors`) \
and writes started, chunk and result/error callbacks to fleet:callbacks. In `echo` mode it streams \
the user's message back word by word; in `command` mode it runs a program per task (task JSON on \
stdin, one chunk per stdout line, exit status decides result or error). Honours cancel entries \
and task deadlines. Executors in any language can do the same: see docs/protocol.md."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub consumer: ConsumerArgs,

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics).
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9106")]
    pub admin_addr: SocketAddr,

    /// What to do with each task.
    #[arg(long, env = "FLEET_EXEC_MODE", value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,

    /// The pool whose tasks this executor runs (fleet:exec:<pool>).
    #[arg(long, env = "FLEET_POOL", default_value = fleet::agent::DEFAULT_POOL)]
    pub pool: String,

    /// Echo mode: milliseconds between two words (an agent's `params.delay_ms` overrides it).
    #[arg(long, env = "FLEET_ECHO_DELAY_MS", default_value_t = 20)]
    pub echo_delay_ms: u64,

    /// Command mode: the program to run per task, through `sh -c`.
    #[arg(long, env = "FLEET_EXEC_COMMAND", required_if_eq("mode", "command"))]
    pub command: Option<String>,
}

/// An exec-worker process.
pub struct App {
    cfg: Config,
    client: fred::prelude::Client,
    admin: TcpListener,
}

impl App {
    /// Connects to Redis and binds the admin port.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        if !fleet::agent::valid_name(&cfg.pool) {
            anyhow::bail!(
                "pool `{}` must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                cfg.pool
            );
        }
        admin::prometheus();
        let client = fleet::redis::connect(&cfg.common.redis_url).await?;
        let admin = TcpListener::bind(cfg.admin_addr).await?;
        Ok(App { cfg, client, admin })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Runs tasks until `shutdown`, then finishes those in hand (within the grace period; what
    /// is left stays pending and is taken over by another executor).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let keys = self.cfg.common.keys();
        let stream = keys.exec(&self.cfg.pool);
        let health = Health::new(
            "exec-worker",
            self.client.clone(),
            vec![(stream.clone(), GROUP_EXECUTORS.to_owned())],
        );
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(self.admin, admin::router(health), admin_stop.clone());

        let cancellations = Cancellations::default();
        let control = control::ControlReader {
            client: self.client.clone(),
            stream: keys.exec_control(&self.cfg.pool),
            cancellations: cancellations.clone(),
        };
        let executor = Executor {
            callbacks: Producer::new(self.client.clone(), keys.callbacks(), None),
            cancellations,
            mode: self.cfg.mode,
            echo_delay: Duration::from_millis(self.cfg.echo_delay_ms),
            command: self.cfg.command.clone(),
            name: unique_consumer_name("exec-worker"),
        };
        let consumer =
            self.cfg
                .consumer
                .consumer(&keys, stream, GROUP_EXECUTORS, executor.name.clone());
        let looped = ConsumerLoop::new(consumer, self.client.clone(), executor);

        let mut workers = JoinSet::new();
        let stop = shutdown.clone();
        workers.spawn(async move { ("consumer", looped.run(stop).await.map_err(Into::into)) });
        let stop = shutdown.clone();
        workers.spawn(async move { ("control", control.run(stop).await) });

        let result = fleet::shutdown::supervise(workers, shutdown, self.cfg.common.grace()).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = self.client.quit().await;
        tracing::info!("exec-worker stopped");
        result
    }
}
