//! What every nats-bridge test shares: a private `nats-server -js`, the test process's
//! redis-server under a fresh key prefix, the bridge in-process (or as a process), a NATS
//! client to publish and subscribe with, and readers of what the bridge wrote.

#![allow(dead_code)] // each test binary uses its own part of this

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use clap::Parser;
use fleet::Keys;
use fleet::envelope::{
    Callback, Envelope, Message, NatsPublish, Outbound, PlanningEvent, TaskCommand,
};
use fleet::stream::entry::{StreamEntry, parse_entries};
use fleet::stream::{groups, producer};
use fleet_test_support::{FleetProcess, NatsServer, eventually};
use fred::prelude::*;
use nats_bridge::{App, Config, Stats};
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Short bounds so that redeliveries and takeovers happen within a test.
pub const FAST: &[&str] = &[
    "--nats-ack-wait-secs",
    "2",
    "--nats-pull-expires-ms",
    "500",
    "--claim-idle-ms",
    "1000",
    "--shutdown-grace-secs",
    "10",
];

/// The bridge's durable consumer on `agile.events` (its default).
pub const AGILE_DURABLE: &str = "fleet-bridge-agile";

/// The bridge's durable consumer on `agent.responses` (its default).
pub const RESPONSES_DURABLE: &str = "fleet-bridge-responses";

/// A NATS server, a Redis prefix and clients for both.
pub struct Env {
    pub nats: NatsServer,
    pub redis_url: String,
    pub prefix: String,
    pub keys: Keys,
    pub redis: Client,
    pub nc: async_nats::Client,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn start() -> Env {
        Self::with_redis(fleet_test_support::redis()).await
    }

    pub async fn with_redis(redis_url: String) -> Env {
        let nats = NatsServer::start();
        let prefix = fleet_test_support::prefix();
        let redis = fleet::redis::connect(&redis_url)
            .await
            .expect("test redis client");
        // Reconnects without limit (the default), so it outlives a server restart.
        let nc = async_nats::ConnectOptions::new()
            .connect(nats.url())
            .await
            .expect("test nats client");
        let js = jetstream::new(nc.clone());
        Env {
            nats,
            keys: Keys::new(&prefix),
            redis_url,
            prefix,
            redis,
            nc,
            js,
        }
    }

    /// The bridge's arguments for this environment, then `extra` (which overrides [`FAST`]).
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--redis-url",
            &self.redis_url,
            "--prefix",
            &self.prefix,
            "--nats-url",
            &self.nats.url(),
            "--admin-addr",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .into();
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend(pair.iter().map(|s| (*s).to_owned()));
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Starts a bridge in this process.
    pub async fn bridge(&self, extra: &[&str]) -> Bridge {
        let cfg = Config::try_parse_from(
            std::iter::once("nats-bridge".to_owned()).chain(self.args(extra)),
        )
        .expect("bridge config parses");
        let app = App::build(cfg).await.expect("bridge builds");
        let admin = app.admin_addr();
        let stats = app.stats();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run(shutdown.clone()));
        self.wait_streams().await;
        Bridge {
            admin,
            stats,
            shutdown,
            handle,
        }
    }

    /// Starts the built `nats-bridge` binary, its admin server on a port the system chooses;
    /// returns it and that admin address.
    pub async fn bridge_process(&self, extra: &[&str]) -> (FleetProcess, SocketAddr) {
        let args = self.args(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut bridge = FleetProcess::spawn("nats-bridge", &refs, &[]);
        let admin = bridge.listening("admin", Duration::from_secs(30)).await;
        (bridge, admin)
    }

    /// Publishes `payload` to JetStream subject `subject` with `headers`, waiting for the ack.
    pub async fn publish(&self, subject: &str, headers: HeaderMap, payload: impl Into<String>) {
        let payload: String = payload.into();
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    /// Publishes, retrying (same `Nats-Msg-Id`) until JetStream acknowledges it: what a
    /// well-behaved publisher does across a server restart.
    pub async fn publish_until_acked(&self, subject: &str, msg_id: &str, payload: String) {
        loop {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", msg_id);
            let sent = self
                .js
                .publish_with_headers(subject.to_owned(), h, payload.clone().into())
                .await;
            if let Ok(ack) = sent
                && ack.await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the JetStream stream storing `subject` is listed (the bridge creates it).
    /// Listed is not yet ready to take publishes: see [`wait_streams`](Self::wait_streams).
    pub async fn wait_stream(&self, subject: &str) -> String {
        eventually(
            Duration::from_secs(20),
            &format!("a stream for {subject}"),
            || async { self.js.stream_by_subject(subject.to_owned()).await.ok() },
        )
        .await
    }

    /// Waits until the streams of the subjects the bridge reads accept publishes: until the
    /// bridge's durable consumer exists on each.
    ///
    /// A stream being listed ([`wait_stream`](Self::wait_stream)) is not enough. nats-server
    /// 2.9 lists a new stream (`stream_by_subject`) before it has set up its store and
    /// subscribed to its subjects; a publish in between gets "no responders", which async-nats
    /// reports as `StreamNotFound`, and nothing is stored. Under CPU load that window is wide
    /// enough to hit (a publisher spawned right after a listed-only wait died on its first ack,
    /// and the test then waited for entries that were never published). The server answers
    /// the stream's creation only once the stream listens, and the bridge creates its durable
    /// only after that answer: a stream with the bridge's durable on it takes publishes.
    pub async fn wait_streams(&self) {
        for (subject, durable) in [
            ("agile.events", AGILE_DURABLE),
            ("agent.responses", RESPONSES_DURABLE),
        ] {
            eventually(
                Duration::from_secs(20),
                &format!("the bridge's durable `{durable}` on the stream of {subject}"),
                || self.try_consumer_info(subject, durable),
            )
            .await;
        }
    }

    /// XADDs an outbound publish; returns its envelope.
    pub async fn outbound(&self, subject: &str, payload: &str) -> Envelope<Outbound> {
        let env = Envelope::new(Outbound::Publish(NatsPublish {
            subject: subject.to_owned(),
            payload: payload.to_owned(),
            headers: Default::default(),
        }));
        producer::send(&self.redis, &self.keys.outbound(), None, &env)
            .await
            .expect("xadd outbound");
        env
    }

    pub async fn entries(&self, stream: &str) -> Vec<StreamEntry> {
        let v: Value = self
            .redis
            .xrange(stream, "-", "+", None)
            .await
            .expect("xrange");
        parse_entries(v).expect("entries")
    }

    pub async fn len(&self, stream: &str) -> u64 {
        self.redis.xlen(stream).await.expect("xlen")
    }

    pub async fn planning_events(&self) -> Vec<(Envelope<TaskCommand>, PlanningEvent)> {
        self.entries(&self.keys.tasks())
            .await
            .into_iter()
            .map(|e| {
                let env = Envelope::<TaskCommand>::from_fields(&e.fields).expect("task entry");
                let TaskCommand::PlanningEvent(p) = env.msg.clone() else {
                    panic!("not a planning event: {}", env.msg.kind());
                };
                (env, p)
            })
            .collect()
    }

    pub async fn callbacks(&self) -> Vec<Envelope<Callback>> {
        self.entries(&self.keys.callbacks())
            .await
            .into_iter()
            .map(|e| Envelope::<Callback>::from_fields(&e.fields).expect("callback entry"))
            .collect()
    }

    /// Waits until `stream` holds at least `n` entries.
    pub async fn wait_len(&self, stream: &str, n: u64, within: Duration) {
        eventually(within, &format!("{n} entries in {stream}"), || async {
            (self.len(stream).await >= n).then_some(())
        })
        .await;
    }

    /// Waits until the group `bridge` on the outbound stream has nothing pending.
    pub async fn wait_outbound_drained(&self) {
        eventually(
            Duration::from_secs(20),
            "nothing pending in group bridge",
            || async {
                let g = groups::group(&self.redis, &self.keys.outbound(), "bridge")
                    .await
                    .ok()
                    .flatten()?;
                (g.pending == 0 && g.lag.unwrap_or(0) == 0).then_some(())
            },
        )
        .await;
    }

    /// The durable consumer `durable` on the stream of `subject`.
    pub async fn consumer_info(&self, subject: &str, durable: &str) -> jetstream::consumer::Info {
        let name = self
            .js
            .stream_by_subject(subject.to_owned())
            .await
            .expect("stream");
        let stream = self.js.get_stream(name).await.expect("get stream");
        let mut c: jetstream::consumer::PullConsumer =
            stream.get_consumer(durable).await.expect("consumer");
        c.info().await.expect("consumer info").clone()
    }

    /// Like [`consumer_info`](Self::consumer_info), `None` while the consumer does not exist.
    pub async fn try_consumer_info(
        &self,
        subject: &str,
        durable: &str,
    ) -> Option<jetstream::consumer::Info> {
        let name = self.js.stream_by_subject(subject.to_owned()).await.ok()?;
        let stream = self.js.get_stream(name).await.ok()?;
        let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(durable).await.ok()?;
        c.info().await.ok().cloned()
    }

    /// Messages stored in the stream of `subject`.
    pub async fn stored(&self, subject: &str) -> u64 {
        let name = self
            .js
            .stream_by_subject(subject.to_owned())
            .await
            .expect("stream");
        let mut stream = self.js.get_stream(name).await.expect("get stream");
        stream.info().await.expect("stream info").state.messages
    }
}

/// A bridge running in this process.
pub struct Bridge {
    pub admin: SocketAddr,
    pub stats: Stats,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Bridge {
    /// Stops it and checks it stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("bridge stops within 20s")
            .expect("bridge task")
            .expect("bridge run");
    }

    /// `GET /health/ready`: status code and body.
    pub async fn ready(&self) -> (u16, Json) {
        health(self.admin, "/health/ready").await
    }
}

/// `GET path` on an admin server: status code and JSON body.
pub async fn health(admin: SocketAddr, path: &str) -> (u16, Json) {
    match reqwest::get(format!("http://{admin}{path}")).await {
        Ok(r) => {
            let code = r.status().as_u16();
            (code, r.json().await.unwrap_or(Json::Null))
        }
        Err(_) => (0, Json::Null),
    }
}

/// A JSON payload of an agile event.
pub fn transition(case_id: &str, from: &str, to: &str) -> String {
    serde_json::json!({"event_type": "TRANSITION", "case_id": case_id, "from": from, "to": to})
        .to_string()
}

/// `traceparent` of a made-up publisher span.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The trace id of a `traceparent`.
pub fn trace_id(tp: &str) -> &str {
    tp.split('-').nth(1).unwrap_or("")
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, *v);
    }
    h
}
