//! fleet-bench: how fast a fleet is, how close to what Redis allows, and how it compares.
//!
//! | mode | measures |
//! |---|---|
//! | `e2e` | the whole path: N sessions submit over WebSocket or REST; submit -> first chunk and submit -> final event, tasks/s |
//! | `fanout` | `e2e` with extra listening connections per session: delivery of live events to every client |
//! | `queue` | one queue hop with Fleet's own stream machinery: `producer::send` of an `exec.request` -> a `ConsumerLoop` handler has it (then acks) |
//! | `ws-idle` | idle WebSocket connections held by one gateway, and its RSS per connection |
//! | `limit` | what Redis allows: `redis-benchmark` XADD of an entry like Fleet's, pipelined and not |
//! | `summarize` | the table and ratios (Fleet / peer, Fleet / limit) over the JSON lines of a run |
//!
//! Every mode prints a human table and then one JSON line (a [`report::Report`]); `--json-out`
//! appends the line to a file too. Open-loop latencies are measured from each task's intended
//! start ([`schedule`]), so a stalled server is charged for the whole stall.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod driver;
pub mod e2e;
pub mod limit;
pub mod otlp_sink;
pub mod queue;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod summary;
pub mod ws_idle;

use report::Report;
use schedule::{Load, Window};

#[derive(Parser, Debug)]
#[command(
    name = "fleet-bench",
    version,
    about = "Fleet's load tool: throughput, latency percentiles, Redis cost and memory of a running fleet.",
    long_about = "Fleet's load tool.\n\n\
        Drives a running fleet the way users do (e2e, fanout, ws-idle), or Fleet's stream \
        machinery alone (queue), or Redis alone (limit), and prints a table and one JSON line. \
        bench/run.sh runs everything on one machine, with the BullMQ peer, and summarizes."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole path: sessions submit tasks over WebSocket or REST and wait for the answer.
    E2e(e2e::E2eArgs),
    /// `e2e` with listening connections per session (default 3): fan-out delivery latency.
    Fanout(e2e::E2eArgs),
    /// One queue hop with Fleet's stream machinery: XADD of an exec.request -> ConsumerLoop.
    Queue(queue::QueueArgs),
    /// Idle WebSocket connections on one gateway and its RSS per connection.
    WsIdle(ws_idle::WsIdleArgs),
    /// What Redis allows: redis-benchmark XADD of an entry like Fleet's, pipelined and not.
    Limit(limit::LimitArgs),
    /// The summary table and ratios over the JSON lines of a run.
    Summarize(summary::SummarizeArgs),
    /// An OTLP/gRPC trace receiver that only counts spans (for the tracing-cost runs).
    OtlpSink(otlp_sink::OtlpSinkArgs),
}

/// Where the fleet under test answers, shared by the modes that open sessions.
#[derive(clap::Args, Clone, Debug)]
pub struct FleetArgs {
    /// edge-api base URL.
    #[arg(long, env = "FLEET_API_URL", default_value = "http://127.0.0.1:8001")]
    pub api: String,
    /// ws-gateway base URL (ws://host:port).
    #[arg(long, env = "FLEET_WS_URL", default_value = "ws://127.0.0.1:8002")]
    pub ws: String,
    /// The agent every session talks to (an echo agent without delay measures the fleet).
    #[arg(long, default_value = "bench")]
    pub agent: String,
}

/// Load shape and length, shared by the modes that run tasks.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Open loop at this many tasks per second (omit for closed loop at --concurrency). Each task
    /// is started at its intended time by a pacing thread (to tens of microseconds), and its
    /// latency is measured from that time.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: tasks in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long = "duration", default_value_t = 10.0)]
    pub duration_s: f64,
    /// Warm-up seconds: run but not measured.
    #[arg(long = "warmup", default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Size of each task's message (one word, so an echo answers with one chunk).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Seconds to wait after the window for its tasks to complete.
    #[arg(long = "drain", default_value_t = 10.0)]
    pub drain_s: f64,
    /// Name of the run in the report (default: mode and load).
    #[arg(long)]
    pub label: Option<String>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

impl RunArgs {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s.max(0.1))
    }
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s.max(0.0))
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_s.max(0.0))
    }
    pub fn label_or(&self, mode: &str, load: &Load) -> String {
        self.label.clone().unwrap_or_else(|| match load {
            Load::Open { rate } => format!("{mode}-{rate}"),
            Load::Closed { .. } => format!("{mode}-max"),
        })
    }
}

/// What a run watches besides its own clients: Redis and the fleet's processes.
#[derive(clap::Args, Clone, Debug)]
pub struct Observe {
    /// Redis to read INFO from (CPU, commands, commandstats); omit to skip.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Processes to report RSS and CPU of, as name=pid,name=pid (default: the fleet binaries
    /// running on this machine, found by name).
    #[arg(long)]
    pub pids: Option<String>,
    /// Report no processes.
    #[arg(long)]
    pub no_procs: bool,
}

/// Snapshots taken at the start and the end of the window.
pub struct Observer {
    procs: Vec<(String, u32)>,
    task: tokio::task::JoinHandle<Snapshots>,
    window: Window,
}

struct Snapshots {
    redis: Option<(stats::RedisSnapshot, stats::RedisSnapshot)>,
    cpu: (stats::CpuSnapshot, stats::CpuSnapshot),
}

/// The costs over the window.
pub struct Observed {
    redis: Option<report::RedisCost>,
    processes: Vec<report::ProcessCost>,
    bench_cpu_s: f64,
    host: Option<report::HostLoad>,
}

impl Observed {
    pub fn fill(self, r: &mut Report) {
        r.redis = self.redis;
        r.processes = self.processes;
        r.bench_cpu_s = (self.bench_cpu_s * 1000.0).round() / 1000.0;
        r.host = self.host;
    }
}

impl Observe {
    /// Starts watching: snapshots are taken when the window starts and when it ends.
    pub async fn start(&self, window: Window) -> anyhow::Result<Observer> {
        let procs = if self.no_procs {
            Vec::new()
        } else {
            stats::watched_processes(self.pids.as_deref())?
        };
        let client = match &self.redis_url {
            Some(url) => Some(fleet::redis::connect(url).await?),
            None => None,
        };
        let p = procs.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(window.start.into()).await;
            let cpu0 = stats::cpu_snapshot(&p);
            let r0 = match &client {
                Some(c) => stats::redis_snapshot(c).await.ok(),
                None => None,
            };
            tokio::time::sleep_until(window.end.into()).await;
            let cpu1 = stats::cpu_snapshot(&p);
            let r1 = match &client {
                Some(c) => stats::redis_snapshot(c).await.ok(),
                None => None,
            };
            Snapshots {
                redis: r0.zip(r1),
                cpu: (cpu0, cpu1),
            }
        });
        Ok(Observer {
            procs,
            task,
            window,
        })
    }
}

impl Observer {
    /// The costs, per task of `tasks` (the window's completed tasks).
    pub async fn finish(self, tasks: u64) -> Observed {
        let Ok(s) = self.task.await else {
            return Observed {
                redis: None,
                processes: Vec::new(),
                bench_cpu_s: 0.0,
                host: None,
            };
        };
        let secs = self.window.secs();
        let (c0, c1) = &s.cpu;
        Observed {
            redis: s.redis.map(|(a, b)| stats::redis_cost(&a, &b, secs, tasks)),
            processes: stats::process_costs(&self.procs, c0, c1, tasks),
            bench_cpu_s: (c1.own - c0.own).max(0.0),
            host: Some(stats::host_load(c0, c1)),
        }
    }
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (report, json_out): (Report, Option<PathBuf>) = match cli.command {
        Command::E2e(a) => {
            let out = a.run.json_out.clone();
            (e2e::run(a, "e2e").await?, out)
        }
        Command::Fanout(mut a) => {
            if a.watchers == 0 {
                a.watchers = 3;
            }
            let out = a.run.json_out.clone();
            (e2e::run(a, "fanout").await?, out)
        }
        Command::Queue(a) => {
            let out = a.run.json_out.clone();
            (queue::run(a).await?, out)
        }
        Command::WsIdle(a) => {
            let out = a.json_out.clone();
            (ws_idle::run(a).await?, out)
        }
        Command::Limit(a) => {
            let out = a.json_out.clone();
            (limit::run(a).await?, out)
        }
        Command::Summarize(a) => return summary::run(a),
        Command::OtlpSink(a) => return otlp_sink::run(a).await,
    };
    report::emit(&report, json_out.as_deref())
}
