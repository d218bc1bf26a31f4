//! `summarize`: one table over every report of a run, the ratios Fleet / peer and Fleet / limit,
//! and the targets of the benchmark issue.
//!
//! Reports are found by label (the last report of a label wins):
//! `redis-limit`, `fleet-queue-max`, `fleet-queue-1k`, `fleet-e2e-max`, `fleet-e2e-1k`,
//! `fleet-e2e-5k`, `bullmq-max`, `bullmq-1k`, `bullmq-rt-max`, `bullmq-rt-1k`, and `ws-idle-*`.
//!
//! `bullmq-rt-*` is BullMQ doing what Fleet's whole path does (`bench.js --round-trip`: the
//! client hears the job's progress and result back). It is not a target of the issue, which
//! compares the whole path with BullMQ's single hop; its ratios say how Fleet compares with the
//! same work built on the peer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::json;

use crate::report::{REPORT_KIND, Report};

#[derive(clap::Args, Clone, Debug)]
pub struct SummarizeArgs {
    /// Files of JSON lines (other lines are skipped).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Also append the summary's JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// BullMQ's jobs/s on this machine as stated by the benchmark's targets (a no-op worker
    /// did about 20k jobs/s). The throughput targets are also checked against this figure, so
    /// that a peer slowed down in one run does not make them easy; 0 skips these checks.
    #[arg(long, default_value_t = 20_000.0)]
    pub peer_reference: f64,
}

/// One target of the issue, checked against the reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    pub name: String,
    pub fleet: f64,
    /// The peer's or the limit's number, when the target compares.
    pub other: Option<f64>,
    /// fleet / other.
    pub ratio: Option<f64>,
    pub goal: String,
    pub met: bool,
    /// Why the run could not test the goal on this machine, when that is so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_runnable: Option<String>,
}

/// The reports of a run, by label (the last of each label). The peer gets its best
/// configuration: the fastest of the reports labelled `bullmq-max*` (e.g. `bullmq-max-w50`,
/// `bullmq-max-w256`) also stands as `bullmq-max`, and likewise for `bullmq-rt-max`.
pub fn collect(text: &str) -> BTreeMap<String, Report> {
    let mut out: BTreeMap<String, Report> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        if let Ok(r) = serde_json::from_str::<Report>(line)
            && r.kind == REPORT_KIND
        {
            out.insert(r.label.clone(), r);
        }
    }
    for best_of in [PEER_MAX, PEER_ROUND_TRIP_MAX] {
        if !out.contains_key(best_of)
            && let Some(best) = out
                .values()
                .filter(|r| r.label.starts_with(best_of))
                .max_by(|a, b| a.throughput_per_s.total_cmp(&b.throughput_per_s))
                .cloned()
        {
            out.insert(best_of.to_owned(), best);
        }
    }
    out
}

/// The label the peer's best max-throughput run stands under.
pub const PEER_MAX: &str = "bullmq-max";
/// The same for the peer doing the whole path's work (`bench.js --round-trip`).
pub const PEER_ROUND_TRIP_MAX: &str = "bullmq-rt-max";

fn p99(r: &Report) -> Option<f64> {
    r.latency_ms.get("final").map(|p| p.p99)
}

/// The XADD rate redis-benchmark reached at pipeline depth `p`.
pub fn limit_rps(limit: &Report, p: u64) -> Option<f64> {
    limit.extra["rows"]
        .as_array()?
        .iter()
        .find(|r| r["pipeline"].as_u64() == Some(p))?["rps"]
        .as_f64()
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| (a / b * 1000.0).round() / 1000.0)
}

/// Ratios Fleet / peer and Fleet / limit.
pub fn ratios(runs: &BTreeMap<String, Report>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let tput = |l: &str| runs.get(l).map(|r| r.throughput_per_s);
    let mut put = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            out.insert(name.to_owned(), v);
        }
    };
    if let Some(peer) = tput("bullmq-max") {
        put(
            "fleet_queue_max_over_bullmq_max",
            tput("fleet-queue-max").and_then(|f| ratio(f, peer)),
        );
        put(
            "fleet_e2e_max_over_bullmq_max",
            tput("fleet-e2e-max").and_then(|f| ratio(f, peer)),
        );
    }
    if let (Some(f), Some(b)) = (
        runs.get("fleet-queue-1k").and_then(p99),
        runs.get("bullmq-1k").and_then(p99),
    ) {
        put("fleet_queue_p99_1k_over_bullmq_p99_1k", ratio(f, b));
    }
    if let (Some(f), Some(b)) = (
        runs.get("fleet-e2e-1k").and_then(p99),
        runs.get("bullmq-1k").and_then(p99),
    ) {
        put("fleet_e2e_p99_1k_over_bullmq_p99_1k", ratio(f, b));
    }
    // Like for like: the whole path against the peer doing the same work.
    if let (Some(f), Some(b)) = (tput("fleet-e2e-max"), tput(PEER_ROUND_TRIP_MAX)) {
        put("fleet_e2e_max_over_bullmq_rt_max", ratio(f, b));
    }
    if let (Some(f), Some(b)) = (
        runs.get("fleet-e2e-1k").and_then(p99),
        runs.get("bullmq-rt-1k").and_then(p99),
    ) {
        put("fleet_e2e_p99_1k_over_bullmq_rt_p99_1k", ratio(f, b));
    }
    if let Some(limit) = runs.get("redis-limit") {
        for p in [1u64, 16] {
            let Some(l) = limit_rps(limit, p) else {
                continue;
            };
            for (label, name) in [
                ("fleet-queue-max", "fleet_queue_max"),
                ("fleet-e2e-max", "fleet_e2e_max"),
                ("bullmq-max", "bullmq_max"),
            ] {
                put(
                    &format!("{name}_over_xadd_p{p}"),
                    tput(label).and_then(|f| ratio(f, l)),
                );
            }
        }
    }
    out
}

/// The targets that the reports can answer.
pub fn targets(runs: &BTreeMap<String, Report>) -> Vec<Target> {
    let mut out = Vec::new();
    let tput = |l: &str| runs.get(l).map(|r| r.throughput_per_s);
    let cmp = |name: &str, fleet: f64, other: f64, goal: &str, met: bool| Target {
        name: name.into(),
        fleet,
        other: Some(other),
        ratio: ratio(fleet, other),
        goal: goal.into(),
        met,
        not_runnable: None,
    };
    if let (Some(f), Some(b)) = (tput("fleet-queue-max"), tput("bullmq-max")) {
        out.push(cmp(
            "queue hop: jobs/s vs BullMQ",
            f,
            b,
            ">= 3x",
            f >= 3.0 * b,
        ));
    }
    if let (Some(f), Some(b)) = (
        runs.get("fleet-queue-1k").and_then(p99),
        runs.get("bullmq-1k").and_then(p99),
    ) {
        out.push(cmp(
            "queue hop: p99 ms at 1k/s vs BullMQ",
            f,
            b,
            "<= 1x",
            f <= b,
        ));
    }
    if let (Some(f), Some(b)) = (tput("fleet-e2e-max"), tput("bullmq-max")) {
        out.push(cmp(
            "whole path: tasks/s vs BullMQ jobs/s",
            f,
            b,
            ">= 1.5x",
            f >= 1.5 * b,
        ));
    }
    if let Some(f) = runs.get("fleet-e2e-1k").and_then(p99) {
        out.push(Target {
            name: "whole path: p99 ms at 1k/s".into(),
            fleet: f,
            other: None,
            ratio: None,
            goal: "< 5 ms".into(),
            met: f < 5.0,
            not_runnable: None,
        });
    }
    for (label, r) in runs.iter().filter(|(_, r)| r.mode == "ws-idle") {
        let bpc = r.extra["bytes_per_connection"].as_f64().unwrap_or(0.0);
        let held = r.extra["held_to_the_end"].as_f64().unwrap_or(0.0);
        out.push(Target {
            name: format!("{label}: RSS bytes per idle connection ({held} held)"),
            fleet: bpc,
            other: None,
            ratio: None,
            goal: "< 16384".into(),
            met: bpc > 0.0 && bpc < 16384.0,
            not_runnable: None,
        });
    }
    let idle: Vec<&Report> = runs.values().filter(|r| r.mode == "ws-idle").collect();
    if let Some(max_held) = idle
        .iter()
        .filter_map(|r| r.extra["held_to_the_end"].as_f64())
        .reduce(f64::max)
    {
        const GOAL: f64 = 50_000.0;
        // Each connection is a file descriptor in the gateway and in the load tool, and each
        // process needs a few more of its own (bench/run.sh counts 200): below that many open
        // files, the machine, not the gateway, decides what fits.
        const SPARE_FILES: f64 = 200.0;
        let fd_limit = idle
            .iter()
            .flat_map(|r| {
                [
                    &r.extra["gateway_nofile_limit"],
                    &r.extra["bench_nofile_limit"],
                ]
            })
            .filter_map(|v| v.as_f64())
            .reduce(f64::min);
        let met = max_held >= GOAL;
        out.push(Target {
            name: "idle connections held by one gateway".into(),
            fleet: max_held,
            other: None,
            ratio: None,
            goal: ">= 50000".into(),
            met,
            not_runnable: fd_limit
                .filter(|&l| !met && l < GOAL + SPARE_FILES)
                .map(|l| {
                    format!(
                        "open-files limit {l} here; each connection takes a file \
                         (bench/vm.sh runs it in a virtual machine)"
                    )
                }),
        });
    }
    out
}

/// The throughput targets against a reference figure for the peer (jobs/s) instead of the
/// peer measured in this run.
pub fn reference_targets(runs: &BTreeMap<String, Report>, peer_jobs_per_s: f64) -> Vec<Target> {
    let mut out = Vec::new();
    if peer_jobs_per_s <= 0.0 {
        return out;
    }
    for (label, name, factor) in [
        (
            "fleet-queue-max",
            "queue hop: jobs/s vs BullMQ reference",
            3.0,
        ),
        (
            "fleet-e2e-max",
            "whole path: tasks/s vs BullMQ reference",
            1.5,
        ),
    ] {
        if let Some(f) = runs.get(label).map(|r| r.throughput_per_s) {
            out.push(Target {
                name: name.into(),
                fleet: f,
                other: Some(peer_jobs_per_s),
                ratio: ratio(f, peer_jobs_per_s),
                goal: format!(">= {factor}x"),
                met: f >= factor * peer_jobs_per_s,
                not_runnable: None,
            });
        }
    }
    out
}

/// The summary table.
pub fn table(
    runs: &BTreeMap<String, Report>,
    targets: &[Target],
    ratios: &BTreeMap<String, f64>,
) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>9}\n",
        "run",
        "tasks/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "redis us/t",
        "cmds/task",
        "errors",
        "rq wait s"
    ));
    for (label, r) in runs {
        if r.mode == "ws-idle" || r.mode == "limit" {
            continue;
        }
        let f = r.latency_ms.get("final").cloned().unwrap_or_default();
        let (rcpu, cmds) = r
            .redis
            .as_ref()
            .map(|x| (x.cpu_us_per_task, x.commands_per_task))
            .unwrap_or((0.0, 0.0));
        // Seconds the measured processes spent waiting for a CPU over the window.
        let wait = r
            .host
            .as_ref()
            .map(|h| format!("{:.1}", h.runq_wait_s))
            .unwrap_or_default();
        s.push_str(&format!(
            "{:<22} {:>9.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.1} {:>9.2} {:>6} {:>9}\n",
            label,
            r.throughput_per_s,
            f.p50,
            f.p90,
            f.p99,
            f.p999,
            f.max,
            rcpu,
            cmds,
            r.errors,
            wait
        ));
    }
    if let Some(l) = runs.get("redis-limit") {
        for p in [1u64, 16] {
            if let Some(rps) = limit_rps(l, p) {
                let lat = l
                    .latency_ms
                    .get(&format!("xadd_p{p}"))
                    .cloned()
                    .unwrap_or_default();
                s.push_str(&format!(
                    "{:<22} {:>9.0} {:>9.3} {:>9} {:>9.3} {:>9} {:>9.3}\n",
                    format!("redis XADD -P {p}"),
                    rps,
                    lat.p50,
                    "",
                    lat.p99,
                    "",
                    lat.max
                ));
            }
        }
    }
    for (label, r) in runs.iter().filter(|(_, r)| r.mode == "ws-idle") {
        s.push_str(&format!(
            "{label}: {} connections held, {} bytes RSS each (gateway RSS {} -> {} KiB, {} KiB after they closed; open-files limit {})\n",
            r.extra["held_to_the_end"], r.extra["bytes_per_connection"],
            r.extra["gateway_rss_before_kb"], r.extra["gateway_rss_held_kb"],
            r.extra["gateway_rss_after_close_kb"], r.extra["gateway_nofile_limit"]
        ));
    }
    if !ratios.is_empty() {
        s.push_str("\nratios\n");
        for (k, v) in ratios {
            s.push_str(&format!("  {k:<44} {v:.3}\n"));
        }
    }
    if !targets.is_empty() {
        s.push_str("\ntargets\n");
        for t in targets {
            let other = t.other.map(|o| format!("{o:.3}")).unwrap_or_default();
            let ratio = t.ratio.map(|o| format!("{o:.2}x")).unwrap_or_default();
            s.push_str(&format!(
                "  {:<50} fleet {:>10.3}  other {:>10}  {:>7}  goal {:<9} {}\n",
                t.name,
                t.fleet,
                other,
                ratio,
                t.goal,
                match (t.met, &t.not_runnable) {
                    (true, _) => "MET".to_owned(),
                    (false, None) => "NOT MET".to_owned(),
                    (false, Some(why)) => format!("NOT RUNNABLE HERE ({why})"),
                }
            ));
        }
    }
    s
}

pub fn run(args: SummarizeArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    for f in &args.files {
        text.push_str(&std::fs::read_to_string(f)?);
        text.push('\n');
    }
    let runs = collect(&text);
    let mut targets = targets(&runs);
    targets.extend(reference_targets(&runs, args.peer_reference));
    let ratios = ratios(&runs);
    print!("{}", table(&runs, &targets, &ratios));
    let line = serde_json::to_string(&json!({
        "kind": "fleet-bench-summary",
        "runs": runs.iter().map(|(k, r)| (k.clone(), json!({
            "throughput_per_s": r.throughput_per_s,
            "final_ms": r.latency_ms.get("final"),
            "first_chunk_ms": r.latency_ms.get("first_chunk"),
            "redis_cpu_us_per_task": r.redis.as_ref().map(|x| x.cpu_us_per_task),
            "redis_commands_per_task": r.redis.as_ref().map(|x| x.commands_per_task),
            "errors": r.errors,
            "incomplete": r.incomplete,
            "host": r.host,
            "extra": r.extra,
        }))).collect::<BTreeMap<_, _>>(),
        "ratios": ratios,
        "targets": targets,
    }))?;
    crate::report::emit_json_line(&line, args.json_out.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Percentiles;

    fn run(label: &str, mode: &str, tput: f64, p99: f64) -> Report {
        let mut r = Report::new(mode, label, "fleet");
        r.throughput_per_s = tput;
        r.latency_ms.insert(
            "final".into(),
            Percentiles {
                p99,
                ..Default::default()
            },
        );
        r
    }

    #[test]
    fn the_peer_is_taken_at_its_best_configuration() {
        let lines = [
            run("bullmq-max-w50", "bullmq", 5000.0, 9.0),
            run("bullmq-max-w256", "bullmq", 4000.0, 9.0),
        ]
        .iter()
        .map(Report::json_line)
        .collect::<Vec<_>>()
        .join("\n");
        let runs = collect(&lines);
        assert_eq!(runs["bullmq-max"].throughput_per_s, 5000.0);
        assert_eq!(runs["bullmq-max"].label, "bullmq-max-w50");
    }

    #[test]
    fn ratios_and_targets_come_from_labelled_reports() {
        let mut limit = Report::new("limit", "redis-limit", "redis");
        limit.extra =
            json!({"rows": [{"pipeline": 1, "rps": 100000.0}, {"pipeline": 16, "rps": 400000.0}]});
        let lines = [
            run("fleet-queue-max", "queue", 60000.0, 9.0),
            run("fleet-queue-1k", "queue", 1000.0, 1.0),
            run("fleet-e2e-max", "e2e", 20000.0, 20.0),
            run("fleet-e2e-1k", "e2e", 1000.0, 6.0),
            run("bullmq-max", "bullmq", 20000.0, 30.0),
            run("bullmq-1k", "bullmq", 1000.0, 1.1),
            run("bullmq-rt-max-w50", "bullmq-round-trip", 8000.0, 40.0),
            run("bullmq-rt-max-w256", "bullmq-round-trip", 5000.0, 60.0),
            run("bullmq-rt-1k", "bullmq-round-trip", 1000.0, 12.0),
            limit,
        ]
        .iter()
        .map(Report::json_line)
        .collect::<Vec<_>>()
        .join("\nsome log line\n");
        let runs = collect(&lines);
        // The ten reports and the peer's best round trip standing as `bullmq-rt-max`.
        assert_eq!(runs.len(), 11);
        assert_eq!(runs["bullmq-rt-max"].label, "bullmq-rt-max-w50");
        let r = ratios(&runs);
        assert_eq!(r["fleet_queue_max_over_bullmq_max"], 3.0);
        assert_eq!(r["fleet_e2e_max_over_bullmq_max"], 1.0);
        assert_eq!(r["fleet_e2e_max_over_bullmq_rt_max"], 2.5);
        assert_eq!(r["fleet_e2e_p99_1k_over_bullmq_rt_p99_1k"], 0.5);
        assert_eq!(r["fleet_queue_max_over_xadd_p1"], 0.6);
        assert_eq!(r["fleet_queue_max_over_xadd_p16"], 0.15);
        let t = targets(&runs);
        let met: Vec<(&str, bool)> = t.iter().map(|t| (t.name.as_str(), t.met)).collect();
        assert_eq!(
            met,
            [
                ("queue hop: jobs/s vs BullMQ", true),
                ("queue hop: p99 ms at 1k/s vs BullMQ", true),
                ("whole path: tasks/s vs BullMQ jobs/s", false),
                ("whole path: p99 ms at 1k/s", false),
            ]
        );
        let reference = reference_targets(&runs, 20000.0);
        assert_eq!(
            reference.iter().map(|t| t.met).collect::<Vec<_>>(),
            [true, false]
        );
        assert!(reference_targets(&runs, 0.0).is_empty());
        let table = table(&runs, &t, &r);
        assert!(table.contains("redis XADD -P 16"));
        assert!(table.contains("NOT MET"));
    }

    fn idle(label: &str, held: f64, nofile: f64) -> Report {
        let mut r = Report::new("ws-idle", label, "fleet");
        r.extra = json!({"held_to_the_end": held, "bytes_per_connection": 7000.0,
            "gateway_nofile_limit": nofile, "bench_nofile_limit": nofile});
        r
    }

    fn connections_target(reports: &[Report]) -> Target {
        let lines = reports.iter().map(Report::json_line).collect::<Vec<_>>();
        let t = targets(&collect(&lines.join("\n")));
        t.into_iter()
            .find(|t| t.name == "idle connections held by one gateway")
            .expect("the connections target")
    }

    #[test]
    fn fifty_thousand_connections_that_the_open_files_limit_forbids_are_not_runnable_here() {
        let t = connections_target(&[
            idle("ws-idle-10000", 10_000.0, 20_000.0),
            idle("ws-idle-max", 19_500.0, 20_000.0),
        ]);
        assert!(!t.met);
        assert_eq!(t.fleet, 19_500.0);
        let why = t
            .not_runnable
            .clone()
            .expect("the machine's limit is named");
        assert!(why.contains("20000"), "{why}");
        assert!(
            why.contains("bench/vm.sh"),
            "the way around it is named: {why}"
        );
        let shown = table(&BTreeMap::new(), &[t], &BTreeMap::new());
        assert!(shown.contains("NOT RUNNABLE HERE"), "{shown}");

        // With files enough, falling short is the gateway's own miss.
        let t = connections_target(&[idle("ws-idle-max", 30_000.0, 1_048_576.0)]);
        assert!(!t.met);
        assert_eq!(t.not_runnable, None);
        let shown = table(&BTreeMap::new(), &[t], &BTreeMap::new());
        assert!(
            shown.contains("NOT MET") && !shown.contains("RUNNABLE"),
            "{shown}"
        );

        let t = connections_target(&[idle("ws-idle-max", 50_000.0, 1_048_576.0)]);
        assert!(t.met);
        assert_eq!(t.not_runnable, None);
    }
}
