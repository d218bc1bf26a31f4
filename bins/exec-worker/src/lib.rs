//! exec-worker: the reference executor. Consumes `fleet:exec:<pool>` (group `executors`) and
//! answers on `fleet:callbacks` with `started`, `chunk`*, then `result` or `error`, numbering the
//! callbacks of each task attempt with `seq` from 1.
//!
//! Modes:
//! * `echo`: streams the message back word by word (`--echo-delay-ms` between words; 0 for
//!   benchmarks, which also sends all callbacks of a task in one round trip).
//! * `command`: runs `--command` (through `sh -c`) per task with the task as JSON on stdin; each
//!   stdout line becomes a chunk; exit status 0 is the result (all of stdout), anything else an
//!   error carrying the tail of stderr. The program runs in a process group of its own: the
//!   group is killed at the task's deadline or on cancel, and when the program exits (so what it
//!   left in the background neither holds the task open nor outlives it).
//!
//! Agent mode (`--agent-mode mock|command|openai`, see [`agent`]): instead of chat tasks, it
//! answers council requests (`agent.request`) on `fleet:agents:<role>` for each of `--roles`,
//! and with `--agent-id` on its own member stream too, registering and heartbeating in the
//! council of its (single) role.
//!
//! Cancellation: every executor of a pool reads the pool's control stream (`exec.cancel`) and
//! stops the task if it holds it; a cancel that arrives before the task is dropped too.
//! An entry is acked only after its last callback is written, so a crashed executor's tasks are
//! taken over by another one (and the duplicate callbacks are dropped by the callback-worker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use fleet::admin::{self, Health};
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::keys::GROUP_EXECUTORS;
use fleet::stream::entry::newest_id;
use fleet::stream::{ConsumerLoop, Producer, consumer::unique_consumer_name};
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod agent;
mod command;
mod control;
mod echo;
mod executor;

pub use agent::AgentMode;
pub use control::Cancellations;
pub use executor::Executor;

/// Heartbeat interval of a registered agent, ms.
pub const DEFAULT_HEARTBEAT_MS: u64 = 5_000;

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

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics); port 0
    /// picks a free port, logged in the `listening` line.
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

    /// Command mode (and `--agent-mode command`): the program to run per task or agent
    /// request, through `sh -c`, in a process group of its own that is killed on cancel, at the
    /// deadline, and when the program exits.
    #[arg(long, env = "FLEET_EXEC_COMMAND", required_if_eq_any([("mode", "command"), ("agent_mode", "command")]))]
    pub command: Option<String>,

    /// Answer council agent requests instead of chat tasks: mock (deterministic), command (a
    /// program per request) or openai (an OpenAI-compatible endpoint). off: chat tasks only.
    #[arg(long, env = "FLEET_AGENT_MODE", value_enum, default_value_t = AgentMode::Off)]
    pub agent_mode: AgentMode,

    /// Agent mode: the roles served (comma-separated; DEV, QA, ARCHITECT, DEVOPS, DATA).
    #[arg(long, env = "FLEET_ROLES", value_delimiter = ',', default_values_t = fleet::deliberation::ROLES.map(str::to_owned))]
    pub roles: Vec<String>,

    /// Agent mode: register in the council of the (single) role under this id, heartbeat, and
    /// also serve this member's own stream (fleet:agents:<role>:member:<id>).
    #[arg(long, env = "FLEET_AGENT_ID")]
    pub agent_id: Option<String>,

    /// Agent mode: capabilities to register with (comma-separated).
    #[arg(long, env = "FLEET_CAPABILITIES", value_delimiter = ',')]
    pub capabilities: Vec<String>,

    /// Agent mode: milliseconds between two heartbeats of a registered agent (it counts as
    /// offline after three missed ones).
    #[arg(long, env = "FLEET_HEARTBEAT_MS", default_value_t = DEFAULT_HEARTBEAT_MS)]
    pub heartbeat_ms: u64,

    /// Mock agents: milliseconds to think before each answer.
    #[arg(long, env = "FLEET_MOCK_DELAY_MS", default_value_t = 0)]
    pub mock_delay_ms: u64,

    /// OpenAI agents: base URL of the endpoint (e.g. http://127.0.0.1:11434 for Ollama, or
    /// http://vllm:8000/v1).
    #[arg(
        long,
        env = "FLEET_OPENAI_BASE_URL",
        required_if_eq("agent_mode", "openai")
    )]
    pub openai_base_url: Option<String>,

    /// OpenAI agents: the model to ask.
    #[arg(
        long,
        env = "FLEET_OPENAI_MODEL",
        required_if_eq("agent_mode", "openai")
    )]
    pub openai_model: Option<String>,

    /// OpenAI agents: API key, sent as a bearer token (optional for local servers).
    #[arg(long, env = "FLEET_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
}

impl Config {
    /// The roles served, canonical, or why they are not acceptable.
    pub fn agent_roles(&self) -> anyhow::Result<Vec<&'static str>> {
        let mut roles = Vec::new();
        for r in &self.roles {
            let Some(role) = fleet::deliberation::parse_role(r) else {
                anyhow::bail!(
                    "role `{r}` is not one of {}",
                    fleet::deliberation::ROLES.join(", ")
                );
            };
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        if roles.is_empty() {
            anyhow::bail!("--roles names no role");
        }
        if self.agent_id.is_some() && roles.len() != 1 {
            anyhow::bail!(
                "--agent-id registers one council member: give exactly one role with --roles"
            );
        }
        if let Some(id) = &self.agent_id
            && !fleet::agent::valid_name(id)
        {
            anyhow::bail!(
                "agent id `{}` must be {}",
                fleet::agent::excerpt(id),
                fleet::agent::ID_RULE
            );
        }
        Ok(roles)
    }
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
                "pool `{}` must be {}",
                fleet::agent::excerpt(&cfg.pool),
                fleet::agent::ID_RULE
            );
        }
        if cfg.agent_mode != AgentMode::Off {
            cfg.agent_roles()?;
        }
        admin::prometheus();
        let client = cfg.common.connect().await?;
        let admin = fleet::net::bind(cfg.admin_addr, "FLEET_ADMIN_ADDR").await?;
        tracing::info!(admin = %admin.local_addr()?, "listening");
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
        if self.cfg.agent_mode != AgentMode::Off {
            return self.run_agent(shutdown).await;
        }
        let keys = self.cfg.common.keys();
        let stream = keys.exec(&self.cfg.pool);
        let health = Health::new(
            "exec-worker",
            self.client.clone(),
            vec![(stream.clone(), GROUP_EXECUTORS.to_owned())],
        );
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(
            self.admin,
            admin::router(health),
            self.cfg.common.http_read_timeout(),
            admin_stop.clone(),
        );

        let cancellations = Cancellations::default();
        let control_stream = keys.exec_control(&self.cfg.pool);
        let control = control::ControlReader {
            from: newest_id(&self.client, &control_stream).await?,
            client: self.client.clone(),
            stream: control_stream,
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

impl App {
    /// Agent mode: one consumer loop per served stream, a control reader per role, and the
    /// heartbeat of a registered agent.
    async fn run_agent(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let keys = cfg.common.keys();
        let roles = cfg.agent_roles()?;
        let name = cfg
            .agent_id
            .clone()
            .unwrap_or_else(|| unique_consumer_name("agent"));
        let mut streams: Vec<String> = roles.iter().map(|r| keys.agents(r)).collect();
        if let Some(id) = &cfg.agent_id {
            streams.push(keys.agent_member(roles[0], id));
        }
        let health = Health::new(
            "exec-worker",
            self.client.clone(),
            streams
                .iter()
                .map(|s| (s.clone(), GROUP_EXECUTORS.to_owned()))
                .collect(),
        );
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(
            self.admin,
            admin::router(health),
            cfg.common.http_read_timeout(),
            admin_stop.clone(),
        );

        let backend = match cfg.agent_mode {
            AgentMode::Mock | AgentMode::Off => agent::Backend::Mock {
                delay: Duration::from_millis(cfg.mock_delay_ms),
            },
            AgentMode::Command => agent::Backend::Command {
                program: cfg.command.clone().unwrap_or_default(),
            },
            AgentMode::Openai => agent::Backend::OpenAi(agent::openai::OpenAiClient::new(
                cfg.openai_base_url.as_deref().unwrap_or_default(),
                cfg.openai_model.as_deref().unwrap_or_default(),
                cfg.openai_api_key.clone(),
            )?),
        };
        let cancellations = Cancellations::default();
        let worker = agent::AgentWorker {
            callbacks: Producer::new(self.client.clone(), keys.callbacks(), None),
            cancellations: cancellations.clone(),
            backend: Arc::new(backend),
            mode: cfg.agent_mode,
            name: name.clone(),
            busy: Arc::default(),
            shutdown: shutdown.clone(),
        };

        // The control readers start where their streams end now, before any request is read:
        // a cancel of a request in hand always comes after it.
        let mut workers = JoinSet::new();
        for role in &roles {
            let stream = keys.agents_control(role);
            let reader = agent::control::AgentControlReader {
                from: newest_id(&self.client, &stream).await?,
                client: self.client.clone(),
                stream,
                cancellations: cancellations.clone(),
            };
            let stop = shutdown.clone();
            workers.spawn(async move { ("agent-control", reader.run(stop).await) });
            let stream = keys.exec_control(&fleet::planning::subtask_pool(role));
            let subtasks = control::ControlReader {
                from: newest_id(&self.client, &stream).await?,
                client: self.client.clone(),
                stream,
                cancellations: cancellations.clone(),
            };
            let stop = shutdown.clone();
            workers.spawn(async move { ("subtask-control", subtasks.run(stop).await) });
        }
        for stream in &streams {
            let consumer = cfg.consumer.consumer(
                &keys,
                stream.clone(),
                GROUP_EXECUTORS,
                unique_consumer_name("agent"),
            );
            let looped = ConsumerLoop::new(consumer, self.client.clone(), worker.clone());
            let stop = shutdown.clone();
            workers.spawn(async move { ("consumer", looped.run(stop).await.map_err(Into::into)) });
        }
        if let Some(id) = &cfg.agent_id {
            let registration = fleet::council::Registration {
                agent_id: id.clone(),
                role: roles[0].to_owned(),
                capabilities: cfg.capabilities.clone(),
                metadata: [("mode".to_owned(), cfg.agent_mode.as_str().to_owned())]
                    .into_iter()
                    .collect(),
                heartbeat_ms: cfg.heartbeat_ms as i64,
                status: "ready".into(),
            };
            let councils = fleet::council::Councils::new(self.client.clone(), keys.clone());
            let every = Duration::from_millis(cfg.heartbeat_ms.max(10));
            let busy = worker.busy.clone();
            let stop = shutdown.clone();
            workers.spawn(async move {
                (
                    "heartbeat",
                    agent::heartbeat(councils, registration, busy, every, stop).await,
                )
            });
        }
        tracing::info!(mode = cfg.agent_mode.as_str(), roles = ?roles, agent = %name, streams = streams.len(), "agent started");

        let result = fleet::shutdown::supervise(workers, shutdown, cfg.common.grace()).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = self.client.quit().await;
        tracing::info!("exec-worker (agent) stopped");
        result
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("exec-worker").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_is_well_formed_and_agent_flags_are_checked() {
        Config::command().debug_assert();
        let chat = parse(&[]).unwrap();
        assert_eq!(chat.agent_mode, AgentMode::Off);
        assert_eq!(chat.agent_roles().unwrap(), fleet::deliberation::ROLES);
        let one = parse(&["--agent-mode", "mock", "--roles", "dev", "--agent-id", "a1"]).unwrap();
        assert_eq!(one.agent_roles().unwrap(), ["DEV"]);
        // A registered member has one role.
        assert!(
            parse(&["--agent-mode", "mock", "--agent-id", "a1"])
                .unwrap()
                .agent_roles()
                .is_err()
        );
        assert!(
            parse(&["--agent-mode", "mock", "--roles", "CEO"])
                .unwrap()
                .agent_roles()
                .is_err()
        );
        // Command and OpenAI agents need their program / endpoint.
        assert!(parse(&["--agent-mode", "command"]).is_err());
        assert!(parse(&["--agent-mode", "openai", "--openai-model", "m"]).is_err());
        assert!(
            parse(&[
                "--agent-mode",
                "openai",
                "--openai-model",
                "m",
                "--openai-base-url",
                "http://h"
            ])
            .is_ok()
        );
    }
}
