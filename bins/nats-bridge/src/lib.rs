//! nats-bridge: the only binary that speaks NATS. It carries messages between NATS JetStream
//! and Fleet's Redis streams, so that every other binary stays Redis-Streams-only.
//!
//! | direction | from | to |
//! |---|---|---|
//! | in | `agile.events` (durable `fleet-bridge-agile`) | `planning.event` on `fleet:tasks` |
//! | in | `agent.responses` (durable `fleet-bridge-responses`) | callbacks on `fleet:callbacks` |
//! | out | `fleet:outbound` (group `bridge`) | `agent.requests`, `orchestrator.events`, any subject an entry names |
//!
//! | module | what it holds |
//! |---|---|
//! | [`wire`] | the JSON on NATS as typed structs, and its mapping to envelope kinds |
//! | [`nats`] | the connection, its health, finding or creating streams and durable consumers |
//! | [`inbound`] | the pull loops: NATS message -> entry written once -> ack (or dead letter -> term) |
//! | [`outbound`] | the `fleet:outbound` handler: entry -> JetStream publish -> ack -> XACK |
//! | [`stats`] | per-bridge counters |
//!
//! Guarantees: a NATS message is acked only after its entry is written, and a redelivered
//! message writes nothing twice (a marker written atomically with the entry); an outbound entry
//! is XACKed only after JetStream acknowledged the publish, whose `Nats-Msg-Id` (the envelope id)
//! makes a retried publish stored once. The trace context crosses in the `traceparent` header
//! both ways. Any number of bridges share the work through the durable consumers and the
//! Redis consumer group.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use fleet::admin::{self, Health};
use fleet::config::{CommonArgs, ConsumerArgs};
use fleet::keys::GROUP_BRIDGE;
use fleet::stream::{ConsumerLoop, consumer::unique_consumer_name};
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod inbound;
pub mod nats;
pub mod outbound;
pub mod stats;
pub mod wire;

pub use nats::NatsArgs;
pub use stats::Stats;

use inbound::{Inbound, PullSettings, Route, RouteKind, WRITE_ONCE};
use nats::{Deliver, NatsLink};
use outbound::{OutputStreams, Publisher};
use wire::EventTypes;

/// Health component of the `agile.events` consumer.
pub const COMPONENT_AGILE: &str = "nats-agile-consumer";
/// Health component of the `agent.responses` consumer.
pub const COMPONENT_RESPONSES: &str = "nats-responses-consumer";

#[derive(Parser, Clone, Debug)]
#[command(
    name = "nats-bridge",
    version,
    about = "Fleet nats-bridge: JetStream <-> Redis Streams, at-least-once both ways.",
    long_about = "Fleet nats-bridge: the only binary that speaks NATS. Pulls agile.events and \
agent.responses from JetStream durable consumers into fleet:tasks (planning.event) and \
fleet:callbacks, acking each message only after its entry is written (once: redeliveries are \
recognised); publishes what fleet:outbound holds (consumer group `bridge`) to JetStream with \
Nats-Msg-Id set, XACKing only after the publish ack. Creates missing streams and consumers. \
Stateless: run as many as the traffic needs."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// How the outbound stream `fleet:outbound` is read.
    #[command(flatten)]
    pub consumer: ConsumerArgs,

    /// Address of the admin server (/health, /health/ready, /health/detailed, /metrics); port 0
    /// picks a free port, logged in the `listening` line.
    #[arg(long, env = "FLEET_ADMIN_ADDR", default_value = "0.0.0.0:9105")]
    pub admin_addr: SocketAddr,

    #[command(flatten)]
    pub nats: NatsArgs,
}

/// A bridge process: built with [`App::build`], run until its shutdown token is cancelled.
pub struct App {
    cfg: Config,
    client: fred::prelude::Client,
    nats: NatsLink,
    health: Health,
    admin: TcpListener,
    stats: Stats,
}

impl App {
    /// Connects to Redis, starts connecting to NATS (in the background: the bridge starts, and
    /// reports itself degraded, while NATS is unreachable) and binds the admin port.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        admin::prometheus();
        let client = cfg.common.connect().await?;
        WRITE_ONCE.load(&client).await?;
        let keys = cfg.common.keys();
        let health = Health::new(
            "nats-bridge",
            client.clone(),
            vec![(keys.outbound(), GROUP_BRIDGE.to_owned())],
        );
        let nats = NatsLink::connect(
            &cfg.nats.nats_url,
            &health.instance,
            health.components.clone(),
        )
        .await?;
        let admin = fleet::net::bind(cfg.admin_addr, "FLEET_ADMIN_ADDR").await?;
        tracing::info!(admin = %admin.local_addr()?, "listening");
        Ok(App {
            cfg,
            client,
            nats,
            health,
            admin,
            stats: Stats::default(),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// This bridge's counters.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Bridges until `shutdown`, then finishes what is in hand (within the grace period).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            cfg,
            client,
            nats,
            health,
            admin,
            stats,
        } = self;
        let keys = cfg.common.keys();
        let n = &cfg.nats;
        let components = health.components.clone();
        let instance = health.instance.clone();
        let admin_stop = CancellationToken::new();
        let admin_task = admin::spawn(
            admin,
            admin::router(health),
            cfg.common.http_read_timeout(),
            admin_stop.clone(),
        );

        let settings = PullSettings {
            batch: n.nats_batch.max(1),
            expires: n.pull_expires(),
            ack_wait: n.ack_wait(),
            max_deliver: n.nats_max_deliver,
            dedup_ttl: n.dedup_ttl(),
        };
        if n.replay_outlives_dedup() {
            tracing::warn!(
                dedup_ttl_s = settings.dedup_ttl.as_secs(),
                max_age_s = n.nats_max_age_secs,
                "--nats-agile-deliver all with a dedup TTL shorter than the streams' max age (0 = none): \
                 a planning events durable created now replays what the stream holds, and events \
                 older than the TTL that were bridged before become work again"
            );
        }
        let routes = [
            (
                "agile-events",
                Route {
                    kind: RouteKind::Planning(EventTypes::new(&n.nats_event_types)),
                    spec: n.stream_spec(&n.nats_agile_stream, &n.nats_agile_subject),
                    durable: n.nats_agile_durable.clone(),
                    deliver: n.nats_agile_deliver,
                    target: keys.tasks(),
                    component: COMPONENT_AGILE,
                },
            ),
            (
                "agent-responses",
                Route {
                    kind: RouteKind::Responses,
                    spec: n.stream_spec(&n.nats_responses_stream, &n.nats_responses_subject),
                    durable: n.nats_responses_durable.clone(),
                    // As before: responses answer requests Fleet sent, so one waiting in the
                    // stream when the durable is created is still wanted.
                    deliver: Deliver::All,
                    target: keys.callbacks(),
                    component: COMPONENT_RESPONSES,
                },
            ),
        ];

        let mut workers = JoinSet::new();
        for (name, route) in routes {
            let inbound = Inbound::new(
                route,
                nats.clone(),
                client.clone(),
                keys.dlq(),
                settings.clone(),
                components.clone(),
                stats.clone(),
                instance.clone(),
            );
            let stop = shutdown.clone();
            workers.spawn(async move { (name, inbound.run(stop).await) });
        }

        let streams = Arc::new(OutputStreams::new(
            vec![
                n.stream_spec(&n.nats_requests_stream, &n.nats_requests_subject),
                n.stream_spec(&n.nats_orchestrator_stream, &n.nats_orchestrator_subject),
            ],
            components.clone(),
        ));
        let provisioning = {
            let (streams, nats, stop) = (streams.clone(), nats.clone(), shutdown.clone());
            tokio::spawn(async move { streams.ensure_at_start(&nats, &stop).await })
        };
        let consumer = cfg.consumer.consumer(
            &keys,
            keys.outbound(),
            GROUP_BRIDGE,
            unique_consumer_name("nats-bridge"),
        );
        let publisher = Publisher {
            nats: nats.clone(),
            streams,
            requests_subject: n.nats_requests_subject.clone(),
            orchestrator_subject: n.nats_orchestrator_subject.clone(),
            max_deliveries: consumer.max_deliveries,
            stats,
            shutdown: shutdown.clone(),
        };
        let looped = ConsumerLoop::new(consumer, client.clone(), publisher);
        let stop = shutdown.clone();
        workers.spawn(async move { ("outbound", looped.run(stop).await.map_err(Into::into)) });

        let result = fleet::shutdown::supervise(workers, shutdown, cfg.common.grace()).await;
        provisioning.abort();
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), nats.client.flush()).await;
        let _ = client.quit().await;
        tracing::info!("nats-bridge stopped");
        result
    }
}
