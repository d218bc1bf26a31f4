//! Harness for deliberation and gRPC tests: a dispatcher, a callback-worker (with a quick
//! sweeper), N edge-api replicas serving gRPC on free ports, and council agents (exec-workers in
//! agent mode, in-process or as processes), on a fresh prefix of the test's redis-server.

use std::net::SocketAddr;
use std::time::Duration;

use fleet::Keys;
use fleet::envelope::Message;
use fleet::stream::entry::parse_entries;
use fleet_proto::orchestrator::v1 as pb;
use fleet_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use fred::prelude::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{AGENT, Fleet, SECRET, common_args, redis_args};

/// Milliseconds between two deadline sweeps in test fleets (deadlines are noticed quickly).
pub const SWEEP_MS: u64 = 50;

/// Council agents run in-process: one exec-worker in agent mode.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// `mock`, `command` or `openai`.
    pub mode: &'static str,
    pub roles: Vec<&'static str>,
    /// Registers under this id (needs exactly one role).
    pub agent_id: Option<String>,
    pub mock_delay_ms: u64,
    /// Any further flags.
    pub extra: Vec<String>,
}

impl AgentSpec {
    /// Mock agents serving the pools of `roles`.
    pub fn mock(roles: &[&'static str]) -> Self {
        Self {
            mode: "mock",
            roles: roles.to_vec(),
            agent_id: None,
            mock_delay_ms: 0,
            extra: Vec::new(),
        }
    }

    pub fn delay(mut self, ms: u64) -> Self {
        self.mock_delay_ms = ms;
        self
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct DelibOptions {
    /// edge-api replicas.
    pub edges: usize,
    pub agents: Vec<AgentSpec>,
    /// Also an echo exec-worker for chat tasks.
    pub chat_executor: bool,
    /// Extra flags for the dispatcher, the callback-worker and every edge-api.
    pub dispatcher_args: Vec<String>,
    pub callback_args: Vec<String>,
    pub edge_args: Vec<String>,
}

impl Default for DelibOptions {
    fn default() -> Self {
        Self {
            edges: 1,
            agents: Vec::new(),
            chat_executor: false,
            dispatcher_args: Vec::new(),
            callback_args: Vec::new(),
            edge_args: Vec::new(),
        }
    }
}

/// A deliberation fleet running in this test process.
pub struct DelibFleet {
    pub base: Fleet,
    /// `(REST, gRPC)` address of each edge-api replica.
    pub edges: Vec<(SocketAddr, SocketAddr)>,
    /// Admin address of each in-process agent, in `DelibOptions::agents` order.
    pub agent_admins: Vec<SocketAddr>,
    shutdown: CancellationToken,
    running: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

fn parse<C: clap::Parser>(name: &str, args: Vec<String>) -> C {
    C::try_parse_from(std::iter::once(name.to_owned()).chain(args))
        .unwrap_or_else(|e| panic!("{name} config: {e}"))
}

/// The flags of an agent exec-worker.
pub fn agent_args(spec: &AgentSpec) -> Vec<String> {
    let mut args = vec![
        "--agent-mode".to_owned(),
        spec.mode.to_owned(),
        "--roles".to_owned(),
        spec.roles.join(","),
        "--mock-delay-ms".to_owned(),
        spec.mock_delay_ms.to_string(),
        "--block-ms".to_owned(),
        "200".to_owned(),
    ];
    if let Some(id) = &spec.agent_id {
        args.extend(["--agent-id".to_owned(), id.clone()]);
    }
    args.extend(spec.extra.iter().cloned());
    args
}

impl DelibFleet {
    pub async fn start(opts: DelibOptions) -> DelibFleet {
        let base = Fleet::start_without_workers().await;
        let shutdown = CancellationToken::new();
        let mut running = Vec::new();
        let common = common_args(&base.redis_url, &base.prefix);

        let cfg: dispatcher::Config = parse(
            "dispatcher",
            [common.clone(), opts.dispatcher_args.clone()].concat(),
        );
        let app = dispatcher::App::build(cfg).await.expect("dispatcher");
        running.push(("dispatcher", tokio::spawn(app.run(shutdown.clone()))));

        let cfg: callback_worker::Config = parse(
            "callback-worker",
            [
                common.clone(),
                vec!["--sweep-interval-ms".into(), SWEEP_MS.to_string()],
                opts.callback_args.clone(),
            ]
            .concat(),
        );
        let app = callback_worker::App::build(cfg)
            .await
            .expect("callback-worker");
        running.push(("callback-worker", tokio::spawn(app.run(shutdown.clone()))));

        let mut agent_admins = Vec::new();
        for spec in &opts.agents {
            let cfg: exec_worker::Config =
                parse("exec-worker", [common.clone(), agent_args(spec)].concat());
            let app = exec_worker::App::build(cfg).await.expect("agent");
            agent_admins.push(app.admin_addr());
            running.push(("agent", tokio::spawn(app.run(shutdown.clone()))));
        }
        if opts.chat_executor {
            let cfg: exec_worker::Config = parse(
                "exec-worker",
                [common.clone(), vec!["--echo-delay-ms".into(), "0".into()]].concat(),
            );
            let app = exec_worker::App::build(cfg).await.expect("exec-worker");
            running.push(("exec-worker", tokio::spawn(app.run(shutdown.clone()))));
        }

        let mut edges = Vec::new();
        for _ in 0..opts.edges {
            let args = [
                redis_args(&base.redis_url, &base.prefix),
                vec![
                    "--secret".into(),
                    SECRET.into(),
                    "--http-addr".into(),
                    "127.0.0.1:0".into(),
                    "--grpc-addr".into(),
                    "127.0.0.1:0".into(),
                    "--shutdown-grace-secs".into(),
                    "5".into(),
                ],
                opts.edge_args.clone(),
            ]
            .concat();
            let cfg: edge_api::Config = parse("edge-api", args);
            let app = edge_api::App::build(cfg).await.expect("edge-api");
            edges.push((app.http_addr(), app.grpc_addr()));
            running.push(("edge-api", tokio::spawn(app.run(shutdown.clone()))));
        }
        DelibFleet {
            base,
            edges,
            agent_admins,
            shutdown,
            running,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.base.keys
    }

    pub fn client(&self) -> &Client {
        &self.base.client
    }

    /// A gRPC client of edge-api replica `i`, over a real socket.
    pub async fn grpc(&self, i: usize) -> OrchestratorServiceClient<Channel> {
        OrchestratorServiceClient::new(self.channel(i).await)
    }

    /// The REST base URL of edge-api replica `i` (`http://host:port`).
    pub fn rest(&self, i: usize) -> String {
        format!("http://{}", self.edges[i].0)
    }

    /// A channel to edge-api replica `i`.
    pub async fn channel(&self, i: usize) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.edges[i].1))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect gRPC")
    }

    /// Starts an exec-worker agent as a process (the built binary).
    pub fn spawn_agent(&self, spec: &AgentSpec) -> fleet_test_support::FleetProcess {
        let args: Vec<String> = [
            common_args(&self.base.redis_url, &self.base.prefix),
            agent_args(spec),
        ]
        .concat();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet_test_support::FleetProcess::spawn("exec-worker", &args, &[])
    }

    /// The text of `/metrics` of in-process agent `i`.
    pub async fn agent_metrics(&self, i: usize) -> String {
        reqwest::get(format!("http://{}/metrics", self.agent_admins[i]))
            .await
            .expect("agent metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Every message on `stream`, decoded.
    pub async fn entries<M: Message>(&self, stream: &str) -> Vec<M> {
        let reply: Value = self
            .client()
            .xrange(stream, "-", "+", None)
            .await
            .expect("xrange");
        parse_entries(reply)
            .expect("entries")
            .iter()
            .map(|e| {
                fleet::envelope::Envelope::<M>::from_fields(&e.fields)
                    .expect("decodes")
                    .msg
            })
            .collect()
    }

    /// Stops every component and checks each one stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, handle) in self.running {
            let result = tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 20s"));
            result
                .expect("component task")
                .unwrap_or_else(|e| panic!("{name} failed: {e:#}"));
        }
    }
}

/// A `Deliberate` request for `role` with `n` agents, `rounds` rounds and a timeout.
pub fn deliberate(
    task_id: &str,
    role: &str,
    n: i32,
    rounds: i32,
    timeout_ms: i32,
) -> pb::DeliberateRequest {
    pb::DeliberateRequest {
        task_id: task_id.into(),
        task_description: "Implement authentication for the API".into(),
        role: role.into(),
        constraints: Some(pb::DeliberationConstraints {
            requirements: vec!["tokens expire".into()],
            timeout_ms,
            ..Default::default()
        }),
        rounds,
        num_agents: n,
        ..Default::default()
    }
}

/// Opens a chat session of the echo agent ([`AGENT`]) over gRPC `CreateSession`.
pub async fn open_grpc_session(
    client: &mut OrchestratorServiceClient<Channel>,
) -> pb::CreateSessionResponse {
    client
        .create_session(pb::CreateSessionRequest {
            agent_id: AGENT.into(),
            ..Default::default()
        })
        .await
        .expect("CreateSession")
        .into_inner()
}

/// Waits (up to 15 s) until deliberation `task_id` has completed; returns its result.
pub async fn completed_deliberation(
    client: &OrchestratorServiceClient<Channel>,
    task_id: &str,
) -> pb::GetDeliberationResultResponse {
    let what = format!("deliberation {task_id} completed");
    fleet_test_support::eventually(Duration::from_secs(15), &what, || {
        let mut client = client.clone();
        let task_id = task_id.to_owned();
        async move {
            let r = client
                .get_deliberation_result(pb::GetDeliberationResultRequest { task_id })
                .await
                .ok()?
                .into_inner();
            (r.status == pb::DeliberationStatus::Completed as i32).then_some(r)
        }
    })
    .await
}

/// Waits until `n` agents of `role` are registered and ready.
pub async fn ready_agents(client: &mut OrchestratorServiceClient<Channel>, role: &str, n: usize) {
    fleet_test_support::eventually(Duration::from_secs(20), "agents ready", || {
        let mut client = client.clone();
        async move {
            let councils = client
                .list_councils(pb::ListCouncilsRequest {
                    include_agents: true,
                })
                .await
                .ok()?
                .into_inner()
                .councils;
            let c = councils.into_iter().find(|c| c.role == role)?;
            (c.ready as usize >= n).then_some(())
        }
    })
    .await
}
