//! The NATS side: the connection, its health, and the JetStream streams and durable consumers
//! the bridge needs.
//!
//! JetStream in brief, as the bridge uses it:
//!
//! * A **stream** stores the messages of some subjects. The bridge needs one for each subject it
//!   reads (`agile.events`, `agent.responses`) and each it publishes to (`agent.requests`,
//!   `orchestrator.events`). For each, it first asks which stream already stores the subject
//!   and uses that one (whatever its name); only when none does, it creates the configured one
//!   (name, retention, max age, storage, replicas, duplicate window). An existing stream whose
//!   settings differ from the configured ones is used as it is, with a warning.
//! * A **durable pull consumer** remembers, on the server, what was delivered and acknowledged.
//!   Every bridge pulls from the same durable, so JetStream shares the messages among them.
//!   Acks are explicit; a message not acked within `ack_wait` is delivered again, at most
//!   `max_deliver` times. Where a durable starts is fixed when it is created ([`Deliver`]):
//!   one that exists keeps its position, whatever the bridge is configured with.
//! * **`Nats-Msg-Id`**: a stream drops a message whose id it saw within its duplicate window,
//!   so a republished message is stored once.
//!
//! The client reconnects by itself, with backoff, forever; [`NatsLink`] tracks whether it is
//! connected (component `nats` of the health routes, gauge `fleet_nats_connected`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use fleet::admin::Components;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Component name of the NATS connection in `/health/ready` and `/health/detailed`.
pub const COMPONENT_NATS: &str = "nats";

/// How long a JetStream API request or publish ack may take.
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between two provisioning attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Retention policy of the streams the bridge creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Retention {
    /// Keep messages until max age (or the server's limits): other consumers can read them too.
    Limits,
    /// Keep a message until every consumer of the stream acknowledged it.
    Interest,
    /// Keep a message until one consumer acknowledged it (only one consumer per subject).
    Workqueue,
}

impl From<Retention> for stream::RetentionPolicy {
    fn from(r: Retention) -> Self {
        match r {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
        }
    }
}

/// Storage of the streams the bridge creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    File,
    Memory,
}

impl From<Storage> for stream::StorageType {
    fn from(s: Storage) -> Self {
        match s {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        }
    }
}

/// Where a durable consumer starts when the bridge creates it (`--nats-agile-deliver` for the
/// planning events durable; the agent responses durable always starts with `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Deliver {
    /// With the messages published after the durable is created: what the stream held before
    /// is left alone.
    New,
    /// With the oldest message the stream still holds.
    All,
}

impl Deliver {
    /// The policy of a durable created now on a stream; `stream_created`: no stream stored the
    /// subject when the bridge looked, so this one was created just now.
    ///
    /// `new` guards against replaying a history: a Planning service's existing stream keeps
    /// days of transitions (max age), longer than the bridge remembers what it wrote (the
    /// dedup TTL), so a durable starting at the oldest would turn each past transition into
    /// work again. A stream created just now has no history, only what was published since
    /// (a publisher that got in between its creation and the durable's): all of it is new and
    /// is delivered.
    pub fn policy(self, stream_created: bool) -> consumer::DeliverPolicy {
        match self {
            Deliver::New if !stream_created => consumer::DeliverPolicy::New,
            _ => consumer::DeliverPolicy::All,
        }
    }
}

/// NATS connection, subjects, streams and consumers. Defaults follow seed 004.
#[derive(clap::Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server(s) to connect to (comma-separated URLs).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Subject of planning events (read; become `planning.event` on fleet:tasks).
    #[arg(long, env = "FLEET_NATS_AGILE_SUBJECT", default_value = "agile.events")]
    pub nats_agile_subject: String,

    /// Stream created for the planning events subject when no stream stores it.
    #[arg(long, env = "FLEET_NATS_AGILE_STREAM", default_value = "AGILE")]
    pub nats_agile_stream: String,

    /// Durable consumer the bridges share on the planning events subject.
    #[arg(
        long,
        env = "FLEET_NATS_AGILE_DURABLE",
        default_value = "fleet-bridge-agile"
    )]
    pub nats_agile_durable: String,

    /// Where the planning events durable starts when the bridge has to create it: `new`, with
    /// the events published after it is created (what an existing stream already holds is
    /// not turned into work), or `all`, with every event the stream still holds (up to its max
    /// age; events older than --nats-dedup-ttl-secs that an earlier durable already bridged
    /// are written again). A durable that exists keeps its position either way; a stream the
    /// bridge has to create is read from its start either way.
    #[arg(long, env = "FLEET_NATS_AGILE_DELIVER", value_enum, default_value_t = Deliver::New)]
    pub nats_agile_deliver: Deliver,

    /// Subject of agent responses (read; become callbacks on fleet:callbacks).
    #[arg(
        long,
        env = "FLEET_NATS_RESPONSES_SUBJECT",
        default_value = "agent.responses"
    )]
    pub nats_responses_subject: String,

    /// Stream created for the agent responses subject when no stream stores it.
    #[arg(
        long,
        env = "FLEET_NATS_RESPONSES_STREAM",
        default_value = "AGENT_RESPONSES"
    )]
    pub nats_responses_stream: String,

    /// Durable consumer the bridges share on the agent responses subject.
    #[arg(
        long,
        env = "FLEET_NATS_RESPONSES_DURABLE",
        default_value = "fleet-bridge-responses"
    )]
    pub nats_responses_durable: String,

    /// Subject of agent requests (published from fleet:outbound: the fleet's `agent.requests`
    /// entries go to this subject; payloads must carry `task_id` and `session_id`, or
    /// `deliberation_id` and `member`).
    #[arg(
        long,
        env = "FLEET_NATS_REQUESTS_SUBJECT",
        default_value = "agent.requests"
    )]
    pub nats_requests_subject: String,

    /// Stream created for the agent requests subject when no stream stores it.
    #[arg(
        long,
        env = "FLEET_NATS_REQUESTS_STREAM",
        default_value = "AGENT_REQUESTS"
    )]
    pub nats_requests_stream: String,

    /// Subject of orchestrator events (decisions, published from fleet:outbound: the fleet's
    /// `orchestrator.events` entries go to this subject).
    #[arg(
        long,
        env = "FLEET_NATS_ORCHESTRATOR_SUBJECT",
        default_value = "orchestrator.events"
    )]
    pub nats_orchestrator_subject: String,

    /// Stream created for the orchestrator events subject when no stream stores it.
    #[arg(
        long,
        env = "FLEET_NATS_ORCHESTRATOR_STREAM",
        default_value = "ORCHESTRATOR_EVENTS"
    )]
    pub nats_orchestrator_stream: String,

    /// Event types accepted on the planning events subject (comma-separated,
    /// case-insensitive); others are dead-lettered.
    #[arg(
        long,
        env = "FLEET_NATS_EVENT_TYPES",
        value_delimiter = ',',
        default_value = "TRANSITION,CREATED,UPDATED,DELETED"
    )]
    pub nats_event_types: Vec<String>,

    /// Deliveries of one message before JetStream gives up on it (durable consumers created
    /// by the bridge).
    #[arg(long, env = "FLEET_NATS_MAX_DELIVER", default_value_t = 10)]
    pub nats_max_deliver: i64,

    /// Seconds a delivered message may stay unacknowledged before JetStream delivers it again.
    #[arg(long, env = "FLEET_NATS_ACK_WAIT_SECS", default_value_t = 30)]
    pub nats_ack_wait_secs: u64,

    /// Messages asked for per pull request.
    #[arg(long, env = "FLEET_NATS_BATCH", default_value_t = 128)]
    pub nats_batch: usize,

    /// Milliseconds a pull request waits for messages before it is renewed.
    #[arg(long, env = "FLEET_NATS_PULL_EXPIRES_MS", default_value_t = 1000)]
    pub nats_pull_expires_ms: u64,

    /// Retention of the streams the bridge creates.
    #[arg(long, env = "FLEET_NATS_RETENTION", value_enum, default_value_t = Retention::Limits)]
    pub nats_retention: Retention,

    /// Maximum age of messages in the streams the bridge creates, in seconds (0 = no limit).
    #[arg(long, env = "FLEET_NATS_MAX_AGE_SECS", default_value_t = 7 * 86_400)]
    pub nats_max_age_secs: u64,

    /// Storage of the streams the bridge creates.
    #[arg(long, env = "FLEET_NATS_STORAGE", value_enum, default_value_t = Storage::File)]
    pub nats_storage: Storage,

    /// Replicas of the streams the bridge creates (clustered JetStream).
    #[arg(long, env = "FLEET_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,

    /// Seconds within which a stream the bridge creates drops a message whose `Nats-Msg-Id`
    /// it already stored (so a retried publish is stored once).
    #[arg(long, env = "FLEET_NATS_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub nats_duplicate_window_secs: u64,

    /// Seconds the bridge remembers (in Redis) that a NATS message was written to a Fleet
    /// stream, so a redelivery within that time writes nothing twice.
    #[arg(long, env = "FLEET_NATS_DEDUP_TTL_SECS", default_value_t = 86_400)]
    pub nats_dedup_ttl_secs: u64,
}

impl NatsArgs {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.nats_ack_wait_secs.max(1))
    }

    pub fn pull_expires(&self) -> Duration {
        Duration::from_millis(self.nats_pull_expires_ms.max(100))
    }

    /// How long the bridge remembers what it wrote (at least a second).
    pub fn dedup_ttl(&self) -> Duration {
        Duration::from_secs(self.nats_dedup_ttl_secs.max(1))
    }

    /// Whether a new planning events durable may replay messages older than the dedup TTL:
    /// with `--nats-agile-deliver all`, when the streams' max age is longer than the TTL (or
    /// unlimited). Such messages, if an earlier durable bridged them, are written again.
    pub fn replay_outlives_dedup(&self) -> bool {
        self.nats_agile_deliver == Deliver::All
            && (self.nats_max_age_secs == 0 || self.nats_max_age_secs > self.nats_dedup_ttl_secs)
    }

    /// What a stream storing `subject` looks like when the bridge creates it.
    pub fn stream_spec(&self, name: &str, subject: &str) -> StreamSpec {
        StreamSpec {
            name: name.to_owned(),
            subject: subject.to_owned(),
            retention: self.nats_retention.into(),
            max_age: Duration::from_secs(self.nats_max_age_secs),
            storage: self.nats_storage.into(),
            replicas: self.nats_replicas.max(1),
            duplicate_window: Duration::from_secs(self.nats_duplicate_window_secs.max(1)),
        }
    }
}

/// A stream the bridge needs for one subject.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub name: String,
    pub subject: String,
    pub retention: stream::RetentionPolicy,
    pub max_age: Duration,
    pub storage: stream::StorageType,
    pub replicas: usize,
    pub duplicate_window: Duration,
}

impl StreamSpec {
    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![self.subject.clone()],
            retention: self.retention,
            max_age: self.max_age,
            storage: self.storage,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            description: Some(format!("{} (created by Fleet's nats-bridge)", self.subject)),
            ..Default::default()
        }
    }
}

/// The stream of a subject, as [`NatsLink::ensure_stream`] found it.
pub struct EnsuredStream {
    pub stream: stream::Stream,
    /// No stream stored the subject when the bridge looked, so this one was created just now
    /// (by this bridge, or by another at the same moment).
    pub created: bool,
}

/// Why a stream or consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("looking up the stream of `{subject}`: {source}")]
    Lookup {
        subject: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("creating stream `{stream}` for `{subject}`: {source}")]
    CreateStream {
        stream: String,
        subject: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(
        "stream `{stream}` exists but does not store `{subject}`: add the subject to it or configure another stream name"
    )]
    NotCovered { stream: String, subject: String },
    #[error("creating durable consumer `{durable}` on `{stream}`: {source}")]
    Consumer {
        stream: String,
        durable: String,
        #[source]
        source: async_nats::Error,
    },
}

/// The connected NATS client, its JetStream context and its connection state.
#[derive(Clone)]
pub struct NatsLink {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    connected: watch::Receiver<bool>,
}

impl NatsLink {
    /// Starts connecting to `url` and returns at once: the client keeps (re)connecting in the
    /// background with backoff, and reports each change to `components` and the gauge.
    pub async fn connect(
        url: &str,
        name: &str,
        components: Components,
    ) -> Result<NatsLink, async_nats::ConnectError> {
        let (tx, rx) = watch::channel(false);
        components.set(COMPONENT_NATS, false, "connecting");
        metrics::gauge!("fleet_nats_connected").set(0.0);
        let on_event = components.clone();
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect() // and reconnects without limit (the default)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(JETSTREAM_TIMEOUT))
            .event_callback(move |event| {
                let (tx, components) = (tx.clone(), on_event.clone());
                async move {
                    let up = match event {
                        async_nats::Event::Connected => true,
                        async_nats::Event::Disconnected | async_nats::Event::Closed => false,
                        other => {
                            tracing::info!(event = %other, "nats event");
                            return;
                        }
                    };
                    if up {
                        tracing::info!("connected to NATS");
                    } else {
                        tracing::warn!(%event, "NATS connection lost; reconnecting");
                    }
                    components.set(
                        COMPONENT_NATS,
                        up,
                        if up {
                            "connected"
                        } else {
                            "disconnected; reconnecting"
                        },
                    );
                    metrics::gauge!("fleet_nats_connected").set(if up { 1.0 } else { 0.0 });
                    tx.send_replace(up);
                }
            })
            .connect(url)
            .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(JETSTREAM_TIMEOUT)
            .build(client.clone());
        Ok(NatsLink {
            client,
            js,
            connected: rx,
        })
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until connected; `false` if `shutdown` came first.
    pub async fn wait_connected(&self, shutdown: &CancellationToken) -> bool {
        let mut rx = self.connected.clone();
        tokio::select! {
            r = rx.wait_for(|up| *up) => r.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    }

    /// Resolves when the connection is lost (at once if it is not up).
    pub async fn disconnected(&self) {
        let mut rx = self.connected.clone();
        let _ = rx.wait_for(|up| !*up).await;
    }

    /// The stream that stores `spec.subject`: the existing one, or the configured one created.
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<EnsuredStream, ProvisionError> {
        let lookup = |source: async_nats::Error| ProvisionError::Lookup {
            subject: spec.subject.clone(),
            source,
        };
        match self.js.stream_by_subject(spec.subject.clone()).await {
            Ok(name) => {
                let stream = self
                    .js
                    .get_stream(&name)
                    .await
                    .map_err(|e| lookup(e.into()))?;
                if name != spec.name {
                    tracing::info!(subject = %spec.subject, stream = %name, configured = %spec.name,
                        "the subject is stored by an existing stream; using it");
                }
                warn_on_differences(spec, &stream.cached_info().config);
                Ok(EnsuredStream {
                    stream,
                    created: false,
                })
            }
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                let stream =
                    self.js
                        .get_or_create_stream(spec.config())
                        .await
                        .map_err(|source| ProvisionError::CreateStream {
                            stream: spec.name.clone(),
                            subject: spec.subject.clone(),
                            source: source.into(),
                        })?;
                let cfg = &stream.cached_info().config;
                if !cfg
                    .subjects
                    .iter()
                    .any(|s| subject_matches(s, &spec.subject))
                {
                    return Err(ProvisionError::NotCovered {
                        stream: spec.name.clone(),
                        subject: spec.subject.clone(),
                    });
                }
                tracing::info!(stream = %spec.name, subject = %spec.subject, "stream ready");
                warn_on_differences(spec, cfg);
                Ok(EnsuredStream {
                    stream,
                    created: true,
                })
            }
            Err(e) => Err(lookup(e.into())),
        }
    }

    /// The durable pull consumer `durable` on `stream`, filtered to `subject`: the existing one
    /// (at its position, whatever `deliver` says), or a new one starting as `deliver` says,
    /// with explicit acks, `ack_wait` and `max_deliver`.
    pub async fn ensure_consumer(
        &self,
        stream: &stream::Stream,
        durable: &str,
        subject: &str,
        deliver: consumer::DeliverPolicy,
        ack_wait: Duration,
        max_deliver: i64,
    ) -> Result<consumer::PullConsumer, ProvisionError> {
        let stream_name = stream.cached_info().config.name.clone();
        let config = consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            description: Some(format!("Fleet nats-bridge: {subject}")),
            deliver_policy: deliver,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver,
            filter_subject: subject.to_owned(),
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(durable, config)
            .await
            .map_err(|source| ProvisionError::Consumer {
                stream: stream_name.clone(),
                durable: durable.to_owned(),
                source: source.into(),
            })?;
        let have = &consumer.cached_info().config;
        if have.ack_wait != ack_wait
            || have.max_deliver != max_deliver
            || (!have.filter_subject.is_empty() && have.filter_subject != subject)
            || have.ack_policy != consumer::AckPolicy::Explicit
        {
            tracing::warn!(
                stream = %stream_name, durable,
                ack_wait_s = have.ack_wait.as_secs_f64(), max_deliver = have.max_deliver,
                filter = %have.filter_subject, ack_policy = ?have.ack_policy,
                "the existing durable consumer differs from the configured one; using it as it is"
            );
        }
        Ok(consumer)
    }
}

/// Whether the stream subject `pattern` (with `*` / `>` wildcards) covers `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn warn_on_differences(spec: &StreamSpec, have: &stream::Config) {
    if have.duplicate_window < spec.duplicate_window {
        tracing::warn!(
            stream = %have.name,
            have_s = have.duplicate_window.as_secs(),
            want_s = spec.duplicate_window.as_secs(),
            "the stream's duplicate window is shorter than configured: a publish retried after it may be stored twice"
        );
    }
    if have.retention != spec.retention
        || have.storage != spec.storage
        || have.max_age != spec.max_age
        || have.num_replicas != spec.replicas
    {
        tracing::warn!(
            stream = %have.name,
            retention = ?have.retention, storage = ?have.storage,
            max_age_s = have.max_age.as_secs(), replicas = have.num_replicas,
            "the existing stream's settings differ from the configured ones; using it as it is"
        );
    }
}

/// Sleeps for `backoff` (unless `shutdown` comes first, then `false`) and doubles it.
pub async fn back_off(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn stream_subjects_match_with_wildcards() {
        assert!(subject_matches("agile.events", "agile.events"));
        assert!(subject_matches("agile.*", "agile.events"));
        assert!(subject_matches("agile.>", "agile.events"));
        assert!(subject_matches(">", "agile.events"));
        assert!(!subject_matches("agile.*", "agile.events.x"));
        assert!(!subject_matches("agile", "agile.events"));
        assert!(!subject_matches("agent.requests", "agent.responses"));
    }

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn args(extra: &[&str]) -> NatsArgs {
        Args::try_parse_from(std::iter::once("nats-bridge").chain(extra.iter().copied()))
            .expect("flags parse")
            .nats
    }

    #[test]
    fn a_new_agile_durable_starts_at_new_messages_unless_told_or_the_stream_is_new() {
        let default = args(&[]).nats_agile_deliver;
        assert_eq!(default, Deliver::New);
        assert_eq!(default.policy(false), consumer::DeliverPolicy::New);
        assert_eq!(
            default.policy(true),
            consumer::DeliverPolicy::All,
            "a stream created just now holds no history"
        );
        let all = args(&["--nats-agile-deliver", "all"]).nats_agile_deliver;
        assert_eq!(all, Deliver::All);
        assert_eq!(all.policy(false), consumer::DeliverPolicy::All);
        assert!(
            Args::try_parse_from(["nats-bridge", "--nats-agile-deliver", "last"]).is_err(),
            "only `new` and `all`"
        );
    }

    #[test]
    fn replaying_past_the_dedup_ttl_is_flagged_only_with_all() {
        assert!(!args(&[]).replay_outlives_dedup(), "the default is `new`");
        assert!(args(&["--nats-agile-deliver", "all"]).replay_outlives_dedup());
        assert!(
            args(&["--nats-agile-deliver", "all", "--nats-max-age-secs", "0"])
                .replay_outlives_dedup(),
            "no max age: the stream keeps everything"
        );
        assert!(
            !args(&[
                "--nats-agile-deliver",
                "all",
                "--nats-max-age-secs",
                "3600",
                "--nats-dedup-ttl-secs",
                "3600"
            ])
            .replay_outlives_dedup()
        );
    }
}
