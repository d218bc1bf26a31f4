//! The load tool against a real fleet: `fleet-bench e2e` and `fleet-bench fanout`, as a user runs
//! them (`bench/run.sh` does), report every task they offered as completed, with one latency
//! per task in each histogram, over WebSocket and over REST.

use fleet_e2e::{AGENT, Fleet, Options};
use fleet_test_support::bin_path;
use serde_json::Value as Json;

/// Runs `fleet-bench <mode>` at 200 tasks/s for one second against `fleet`; returns its JSON line.
async fn bench(fleet: &Fleet, mode: &str, extra: &[&str]) -> Json {
    let (api, ws) = (fleet.api(), fleet.ws());
    let mut args = vec![
        mode,
        "--api",
        &api,
        "--ws",
        &ws,
        "--agent",
        AGENT,
        "--prefix",
        &fleet.prefix,
        "--redis-url",
        &fleet.redis_url,
        "--no-procs",
        "--sessions",
        "4",
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0",
    ];
    args.extend_from_slice(extra);
    let out = tokio::process::Command::new(bin_path("fleet-bench"))
        .args(&args)
        .output()
        .await
        .expect("run fleet-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleet-bench {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with(r#"{"kind":"fleet-bench-report""#))
        .unwrap_or_else(|| panic!("no JSON report in:\n{stdout}"));
    serde_json::from_str(line).expect("the report is JSON")
}

/// Every task offered in the window completed, and `names` each hold one latency per task.
fn assert_complete(report: &Json, names: &[(&str, u64)]) {
    assert_eq!(report["offered"], 200, "200/s for 1 s offers 200: {report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(
        report["incomplete"], 0,
        "every task of the window ended: {report}"
    );
    // `completed` counts the finals that arrived inside the window (the throughput), so the
    // last tasks' finals, which arrive after it, are not in it.
    let completed = report["completed"].as_u64().unwrap();
    assert!(0 < completed && completed <= 200, "{report}");
    assert_eq!(report["extra"]["finals_without_chunk"], 0, "{report}");
    for (name, per_task) in names {
        let l = &report["latency_ms"][name];
        assert_eq!(l["count"], 200 * per_task, "{name}: {report}");
        let (p50, p99, max) = (
            l["p50"].as_f64().unwrap(),
            l["p99"].as_f64().unwrap(),
            l["max"].as_f64().unwrap(),
        );
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= max,
            "{name} percentiles in order: {report}"
        );
    }
    assert!(
        report["redis"]["commands_per_task"].as_f64().unwrap() > 0.0,
        "Redis cost is read from INFO: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_reports_every_task_it_offered() {
    let fleet = Fleet::start(Options::default()).await;

    let ws = bench(&fleet, "e2e", &["--via", "ws"]).await;
    assert_complete(&ws, &[("accepted", 1), ("first_chunk", 1), ("final", 1)]);
    assert!(ws["latency_ms"].get("watcher_final").is_none(), "{ws}");

    let rest = bench(&fleet, "e2e", &["--via", "rest"]).await;
    assert_complete(&rest, &[("accepted", 1), ("first_chunk", 1), ("final", 1)]);

    let fanout = bench(&fleet, "fanout", &["--watchers", "2"]).await;
    assert_complete(&fanout, &[("final", 1), ("watcher_final", 2)]);

    fleet.stop().await;
}
