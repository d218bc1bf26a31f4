//! What a run reports: latency percentiles from HDR histograms, Redis cost, process memory and
//! CPU, rendered as a human table and as one JSON line.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, up to an hour, with 3 significant digits.
pub const HIGHEST_US: u64 = 3_600_000_000;

/// A new latency histogram (microseconds).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds")
}

/// Records a duration in microseconds (saturating at [`HIGHEST_US`], at least 1).
pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) {
    let us = (d.as_micros() as u64).clamp(1, HIGHEST_US);
    h.saturating_record(us);
}

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Reads the percentiles of a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Self {
            count: h.len(),
            mean: round3(h.mean() / 1000.0),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    /// Percentiles of raw samples in milliseconds, by nearest rank (for peers that report
    /// samples rather than a histogram; the same definition HDR uses, without its rounding).
    pub fn from_samples_ms(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |q: f64| {
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            round3(samples[rank - 1])
        };
        Self {
            count: n as u64,
            mean: round3(samples.iter().sum::<f64>() / n as f64),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: round3(samples[n - 1]),
        }
    }
}

/// Rounds to 3 decimals (microsecond resolution for milliseconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One Redis command's cost over the measured window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandCost {
    pub cmd: String,
    pub calls: u64,
    pub usec: u64,
    pub calls_per_task: f64,
    pub usec_per_task: f64,
}

/// Redis's cost over the measured window, from `INFO` deltas.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisCost {
    /// used_cpu_sys + used_cpu_user, seconds.
    pub cpu_s: f64,
    /// Redis CPU / window length: 1.0 is one core busy all the time.
    pub cpu_util: f64,
    pub cpu_us_per_task: f64,
    /// total_commands_processed (a script's inner calls are not counted by Redis here).
    pub commands: u64,
    pub commands_per_task: f64,
    /// The costliest commands (by usec), from `INFO commandstats`, scripts' inner calls included.
    pub top: Vec<CommandCost>,
    /// used_memory at the end of the window.
    pub used_memory_bytes: u64,
}

/// A process's memory and CPU over the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessCost {
    pub name: String,
    pub pid: u32,
    /// VmRSS at the end of the window, KiB.
    pub rss_kb: u64,
    /// VmHWM (peak RSS) at the end of the run, KiB.
    pub hwm_kb: u64,
    /// user + system CPU over the window, seconds.
    pub cpu_s: f64,
    /// Time its threads spent runnable but waiting for a CPU over the window, seconds
    /// (other work on the machine, or too many runnable threads).
    #[serde(default)]
    pub runq_wait_s: f64,
    pub cpu_us_per_task: f64,
}

/// How busy the machine was over the window (other work on it skews every number).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Share of the window during which some runnable task waited for a CPU
    /// (`/proc/pressure/cpu`, "some"), percent; absent where the kernel has no PSI.
    pub cpu_pressure_pct: Option<f64>,
    /// 1-minute load average at the end of the window.
    pub loadavg_1m: f64,
    /// Run-queue wait over the window of the watched processes and the load tool, seconds.
    #[serde(default)]
    pub runq_wait_s: f64,
    pub cpus: usize,
}

/// The numbers of one run. Fields that do not apply to a mode stay empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always "fleet-bench-report", so the summary can pick these lines out of a log.
    pub kind: String,
    /// `e2e`, `queue`, `ws-idle`, `fanout`, `limit`, `bullmq`.
    pub mode: String,
    /// What the run is called in the summary, e.g. `fleet-e2e-max`.
    pub label: String,
    /// `fleet`, `bullmq`, `redis`.
    pub system: String,
    /// The run's settings as given.
    pub config: serde_json::Value,
    /// Length of the measured window, seconds (warm-up excluded).
    pub window_s: f64,
    /// Tasks started (intended) inside the window.
    pub offered: u64,
    /// Tasks whose final event arrived inside the window.
    pub completed: u64,
    /// completed / window_s.
    pub throughput_per_s: f64,
    /// Tasks refused or failed (error replies, chat_error).
    pub errors: u64,
    /// Tasks of the window that had not completed when the run gave up waiting.
    pub incomplete: u64,
    /// Latencies by name (`final`, `first_chunk`, `accepted`, `watcher_final`), milliseconds.
    pub latency_ms: std::collections::BTreeMap<String, Percentiles>,
    pub redis: Option<RedisCost>,
    pub processes: Vec<ProcessCost>,
    /// CPU the load generator itself used over the window, seconds.
    pub bench_cpu_s: f64,
    /// How busy the machine was.
    #[serde(default)]
    pub host: Option<HostLoad>,
    /// Mode-specific numbers (e.g. bytes per connection, redis-benchmark rows).
    pub extra: serde_json::Value,
}

impl Report {
    pub fn new(mode: &str, label: &str, system: &str) -> Self {
        Self {
            kind: REPORT_KIND.into(),
            mode: mode.into(),
            label: label.into(),
            system: system.into(),
            config: serde_json::Value::Null,
            extra: serde_json::Value::Null,
            ..Self::default()
        }
    }

    /// The one JSON line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a report always serializes")
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let push = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("  {k:<22} {v}\n"));
        };
        out.push_str(&format!(
            "== {} ({} / {}) ==\n",
            self.label, self.system, self.mode
        ));
        if self.window_s > 0.0 {
            push(&mut out, "window", format!("{:.1} s", self.window_s));
            push(
                &mut out,
                "throughput",
                format!(
                    "{:.0} tasks/s ({} completed, {} offered, {} errors, {} incomplete)",
                    self.throughput_per_s,
                    self.completed,
                    self.offered,
                    self.errors,
                    self.incomplete
                ),
            );
        }
        if !self.latency_ms.is_empty() {
            out.push_str(&format!(
                "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
            ));
            for (name, p) in &self.latency_ms {
                out.push_str(&format!(
                    "  {:<22} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
                    name, p.count, p.p50, p.p90, p.p99, p.p999, p.max, p.mean
                ));
            }
        }
        if let Some(r) = &self.redis {
            push(
                &mut out,
                "redis cpu",
                format!(
                    "{:.2} s ({:.0}% of a core), {:.1} us/task",
                    r.cpu_s,
                    r.cpu_util * 100.0,
                    r.cpu_us_per_task
                ),
            );
            push(
                &mut out,
                "redis commands",
                format!("{} ({:.2}/task)", r.commands, r.commands_per_task),
            );
            for c in r.top.iter().take(8) {
                push(
                    &mut out,
                    &format!("  {}", c.cmd),
                    format!(
                        "{:.2} calls/task, {:.2} us/task",
                        c.calls_per_task, c.usec_per_task
                    ),
                );
            }
        }
        for p in &self.processes {
            push(
                &mut out,
                &format!("{} [{}]", p.name, p.pid),
                format!(
                    "rss {} KiB, peak {} KiB, cpu {:.2} s ({:.1} us/task), waited for a cpu {:.2} s",
                    p.rss_kb, p.hwm_kb, p.cpu_s, p.cpu_us_per_task, p.runq_wait_s
                ),
            );
        }
        if let Some(h) = &self.host {
            push(
                &mut out,
                "host",
                format!(
                    "{} cpus, load {:.2}, run-queue wait of the measured processes {:.2} s, cpu pressure {}",
                    h.cpus,
                    h.loadavg_1m,
                    h.runq_wait_s,
                    h.cpu_pressure_pct
                        .map(|p| format!("{p:.0}% of the window"))
                        .unwrap_or_else(|| "n/a".into())
                ),
            );
        }
        if self.bench_cpu_s > 0.0 {
            push(
                &mut out,
                "fleet-bench cpu",
                format!("{:.2} s", self.bench_cpu_s),
            );
        }
        if let Some(obj) = self.extra.as_object() {
            for (k, v) in obj {
                if !v.is_object() && !v.is_array() {
                    push(&mut out, k, v.to_string());
                }
            }
        }
        out
    }
}

/// The `kind` of every report line.
pub const REPORT_KIND: &str = "fleet-bench-report";

/// Prints a report: the table on stderr-free stdout, then the JSON line last.
pub fn emit(report: &Report, json_out: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{}", report.table());
    emit_json_line(&report.json_line(), json_out)
}

/// Prints a JSON line and appends it to `json_out` when given.
pub fn emit_json_line(line: &str, json_out: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!("{line}");
    if let Some(path) = json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_of_a_histogram_are_in_milliseconds() {
        let mut h = histogram();
        for i in 1..=1000u64 {
            record(&mut h, Duration::from_micros(i * 10));
        }
        let p = Percentiles::from_histogram(&h);
        assert_eq!(p.count, 1000);
        // HDR keeps 3 significant digits: values are within 0.1% of the exact ones.
        assert!((p.p50 - 5.0).abs() <= 0.01, "{p:?}");
        assert!((p.p99 - 9.9).abs() <= 0.01, "{p:?}");
        assert!((p.max - 10.0).abs() <= 0.01, "{p:?}");
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
    }

    #[test]
    fn an_empty_histogram_reports_zeros() {
        assert_eq!(
            Percentiles::from_histogram(&histogram()),
            Percentiles::default()
        );
    }

    #[test]
    fn sample_percentiles_use_nearest_rank() {
        let mut s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::from_samples_ms(&mut s);
        assert_eq!(p.p50, 50.0);
        assert_eq!(p.p90, 90.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.p999, 100.0);
        assert_eq!(p.max, 100.0);
        assert_eq!(p.mean, 50.5);
    }

    #[test]
    fn the_table_names_every_latency_and_the_json_is_one_line() {
        let mut r = Report::new("e2e", "fleet-e2e-max", "fleet");
        r.window_s = 10.0;
        r.completed = 12345;
        r.throughput_per_s = 1234.5;
        let mut h = histogram();
        record(&mut h, Duration::from_micros(1500));
        r.latency_ms
            .insert("final".into(), Percentiles::from_histogram(&h));
        r.latency_ms
            .insert("first_chunk".into(), Percentiles::from_histogram(&h));
        let t = r.table();
        assert!(t.contains("fleet-e2e-max"));
        assert!(t.contains("final"));
        assert!(t.contains("first_chunk"));
        assert!(t.contains("1234 tasks/s") || t.contains("1235 tasks/s"));
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let back: Report = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
