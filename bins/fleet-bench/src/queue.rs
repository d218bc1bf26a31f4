//! `queue`: one queue hop, measured with Fleet's own stream machinery.
//!
//! The like-for-like with a job queue's "add a job -> a worker has it": the producer XADDs an
//! `exec.request` envelope with [`fleet::stream::producer::send`] (what the dispatcher does) to
//! `<prefix>:exec:<pool>`, and a [`fleet::stream::ConsumerLoop`] in group `executors` (what
//! every executor runs) hands it to a no-op [`Handler`] that records when it arrived and answers
//! `Ack`; the loop then acks the batch. Latency is intended send -> handler has it.
//!
//! Producer and consumer run in this one process on separate Redis connections, under a key
//! prefix of their own, so nothing else reads the stream. The stream is deleted afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::envelope::{Envelope, ExecMessage, ExecRequest};
use fleet::keys::{GROUP_EXECUTORS, Keys};
use fleet::stream::consumer::unique_consumer_name;
use fleet::stream::{ConsumerLoop, Delivery, Handler, Outcome, producer};
use fred::prelude::*;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::driver::{self, Meter};
use crate::report::{self, Percentiles, Report};
use crate::schedule::{Load, Window};
use crate::{Observe, RunArgs};

#[derive(clap::Args, Clone, Debug)]
pub struct QueueArgs {
    /// Key prefix of the benchmark's streams (default: a fresh `fleet-bench-<random>`).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Executor pool: the stream is `<prefix>:exec:<pool>`.
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// Entries per XREADGROUP (the consumer's `FLEET_BATCH`; Fleet's default is 256).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Entries in the handler at once (`FLEET_MAX_IN_FLIGHT`; default 512).
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,
    /// Consumer loops (as separate executors would run), each on its own connections.
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub observe: Observe,
}

/// The no-op executor: records when each request arrived, acks it.
struct Recorder {
    base: Instant,
    meter: Arc<Meter>,
    latency: Arc<Mutex<Histogram<u64>>>,
}

/// Metadata key of the intended send time (ns after the run's base instant).
const T_NS: &str = "t_ns";

impl Handler for Recorder {
    type Msg = ExecMessage;

    async fn handle(&self, batch: Vec<Delivery<ExecMessage>>) -> Vec<Outcome> {
        let at = Instant::now();
        let window = self.meter.window;
        {
            let mut h = self.latency.lock().expect("histogram lock");
            for d in &batch {
                let ExecMessage::Request(r) = &d.envelope.msg;
                let Some(ns) = r.metadata.get(T_NS).and_then(|v| v.as_u64()) else {
                    continue;
                };
                let intended = self.base + Duration::from_nanos(ns);
                if window.contains(intended) {
                    report::record(&mut h, at.saturating_duration_since(intended));
                }
            }
        }
        for _ in &batch {
            self.meter.finished(at, true);
        }
        vec![Outcome::Ack; batch.len()]
    }
}

fn request(message: &str, ns: u64) -> Envelope<ExecMessage> {
    Envelope::new(ExecMessage::Request(ExecRequest {
        session_id: "bench".into(),
        task_id: uuid::Uuid::new_v4().to_string(),
        attempt: 1,
        agent_id: "bench".into(),
        message: message.to_owned(),
        metadata: json!({ T_NS: ns }),
        params: serde_json::Value::Null,
        deadline_ms: fleet::time::now_ms() + 60_000,
    }))
}

/// The size of the `body` field of the entries this mode writes (for a like-for-like payload).
pub fn body_bytes(payload_bytes: usize) -> usize {
    use fleet::envelope::Message;
    request(&crate::e2e::payload(payload_bytes), u64::MAX / 2)
        .msg
        .encode_body()
        .map(|b| b.len())
        .unwrap_or(0)
}

pub async fn run(args: QueueArgs) -> anyhow::Result<Report> {
    let url = args
        .observe
        .redis_url
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("fleet-bench-{:08x}", rand_u32()));
    let keys = Keys::new(&prefix);
    let stream = keys.exec(&args.pool);
    let load = Load::from_args(args.run.rate, args.run.concurrency);

    let producer_client = fleet::redis::connect(&url).await?;
    let base = Instant::now();
    let run_start = base + Duration::from_millis(300);
    let window = Window::after_warmup(run_start, args.run.warmup(), args.run.duration());
    let meter = Meter::new(window, load);
    let latency = Arc::new(Mutex::new(report::histogram()));

    let stop = CancellationToken::new();
    let mut loops = tokio::task::JoinSet::new();
    let mut consumer_clients = Vec::new();
    for _ in 0..args.consumers.max(1) {
        let client = fleet::redis::connect(&url).await?;
        let mut cfg = fleet::config::ConsumerArgs {
            batch: args.batch,
            max_in_flight: args.max_in_flight,
            ..Default::default()
        }
        .consumer(
            &keys,
            stream.clone(),
            GROUP_EXECUTORS,
            unique_consumer_name("fleet-bench"),
        );
        cfg.trim = true;
        let handler = Recorder {
            base,
            meter: meter.clone(),
            latency: latency.clone(),
        };
        loops.spawn(ConsumerLoop::new(cfg, client.clone(), handler).run(stop.clone()));
        consumer_clients.push(client);
    }

    let observer = args.observe.start(window).await?;
    let message: Arc<str> = crate::e2e::payload(args.run.payload_bytes).into();
    eprintln!(
        "fleet-bench queue: {} on {stream}, {} s + {} s warm-up...",
        load.describe(),
        args.run.duration_s,
        args.run.warmup_s
    );
    tokio::time::sleep_until(run_start.into()).await;
    let send_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = driver::drive(load, run_start, &meter, |_, intended| {
        let client = producer_client.clone();
        let stream = stream.clone();
        let message = message.clone();
        let meter = meter.clone();
        let send_errors = send_errors.clone();
        let ns = intended.duration_since(base).as_nanos() as u64;
        tokio::spawn(async move {
            let env = request(&message, ns);
            if producer::send(&client, &stream, None, &env).await.is_err() {
                send_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                meter.finished(Instant::now(), false);
            }
        });
    })
    .await;

    // Drain: every entry of the window handled.
    let want = meter.offered();
    let handled_in_window = || latency.lock().expect("histogram lock").len();
    driver::wait_until(args.run.drain(), || handled_in_window() >= want).await;
    let observed = observer.finish(meter.completed()).await;
    stop.cancel();
    while let Some(r) = loops.join_next().await {
        r??;
    }
    let pending: Vec<Value> = producer_client
        .xpending(stream.as_str(), GROUP_EXECUTORS, ())
        .await
        .map(|v: Value| v.into_array())
        .unwrap_or_default();
    let pending_after = pending.first().and_then(|v| v.as_u64()).unwrap_or(0);
    let _: Result<i64, _> = producer_client.del(vec![stream.clone(), keys.dlq()]).await;

    let h = latency.lock().expect("histogram lock").clone();
    let mut r = Report::new("queue", &args.run.label_or("queue", &load), "fleet");
    r.config = json!({
        "load": load.describe(),
        "rate": args.run.rate,
        "concurrency": matches!(load, Load::Closed{..}).then_some(args.run.concurrency),
        "payload_bytes": args.run.payload_bytes,
        "body_bytes": body_bytes(args.run.payload_bytes),
        "batch": args.batch,
        "max_in_flight": args.max_in_flight,
        "consumers": args.consumers.max(1),
        "duration_s": args.run.duration_s,
        "warmup_s": args.run.warmup_s,
        "stream": stream,
    });
    r.window_s = window.secs();
    r.offered = meter.offered();
    r.completed = meter.completed();
    r.throughput_per_s = (r.completed as f64 / r.window_s).round();
    r.errors = meter.errors();
    r.incomplete = r.offered.saturating_sub(h.len());
    r.latency_ms
        .insert("final".into(), Percentiles::from_histogram(&h));
    observed.fill(&mut r);
    // The fleet's binaries are not part of this mode: only processes named with --pids count.
    if args.observe.pids.is_none() {
        r.processes.clear();
    }
    r.extra = json!({
        "entries_sent": started,
        "send_errors": send_errors.load(std::sync::atomic::Ordering::Relaxed),
        "pending_after": pending_after,
    });
    drop(consumer_clients);
    Ok(r)
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::envelope::Message;

    #[test]
    fn requests_carry_their_intended_time() {
        let env = request("hello", 42);
        let ExecMessage::Request(r) = &env.msg;
        assert_eq!(r.metadata[T_NS], 42);
        // The envelope round-trips through the stream encoding the consumer loop decodes.
        let fields: Vec<(bytes::Bytes, bytes::Bytes)> = env
            .to_fields()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (bytes::Bytes::from_static(k.as_bytes()), v))
            .collect();
        let back = Envelope::<ExecMessage>::from_fields(&fields).unwrap();
        assert_eq!(back.msg.kind(), "exec.request");
        assert!(body_bytes(64) > 64);
    }
}
