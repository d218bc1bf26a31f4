//! `limit`: what this Redis allows for the operation every hop of Fleet starts with, an XADD of
//! an envelope-sized entry, measured with `redis-benchmark` unpipelined and pipelined.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::json;

use crate::report::{Percentiles, Report};

#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The task message size (as the other modes' --payload-bytes); the entry's body is the
    /// size of Fleet's MessagePack exec.request carrying it.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// XADDs per unpipelined run (the pipelined runs send this many times --pipeline-factor).
    #[arg(long, default_value_t = 300_000)]
    pub requests: u64,
    #[arg(long, default_value_t = 5)]
    pub pipeline_factor: u64,
    /// Client connections.
    #[arg(long, default_value_t = 50)]
    pub clients: u32,
    /// Pipeline depths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16])]
    pub pipelines: Vec<u32>,
    #[arg(long, default_value = "redis-benchmark")]
    pub redis_benchmark: String,
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// One row of `redis-benchmark --csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvRow {
    pub rps: f64,
    pub latency: Percentiles,
}

/// Parses `redis-benchmark --csv` output (header line, then one row).
pub fn parse_csv(out: &str) -> anyhow::Result<CsvRow> {
    let mut lines = out.lines().map(str::trim).filter(|l| l.starts_with('"'));
    let header = split_csv(lines.next().context("no CSV header")?);
    let row = split_csv(lines.next().context("no CSV row")?);
    let get = |name: &str| -> f64 {
        header
            .iter()
            .position(|h| h == name)
            .and_then(|i| row.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let rps = get("rps");
    if rps <= 0.0 {
        bail!("no rps in redis-benchmark output: {out}");
    }
    Ok(CsvRow {
        rps,
        latency: Percentiles {
            count: 0,
            mean: get("avg_latency_ms"),
            p50: get("p50_latency_ms"),
            p90: 0.0,
            p99: get("p99_latency_ms"),
            p999: 0.0,
            max: get("max_latency_ms"),
        },
    })
}

fn split_csv(line: &str) -> Vec<String> {
    // Quoted fields; the command field may hold spaces but not quotes.
    line.split("\",\"")
        .map(|f| f.trim_matches('"').to_owned())
        .collect()
}

/// The XADD redis-benchmark sends: the six envelope fields with Fleet's sizes.
pub fn xadd_args(key: &str, body_bytes: usize) -> Vec<String> {
    let id = uuid::Uuid::now_v7().to_string();
    let ts = fleet::time::now_ms().to_string();
    [
        "XADD",
        key,
        "*",
        "v",
        "1",
        "kind",
        "exec.request",
        "id",
        &id,
        "tp",
        "",
        "ts",
        &ts,
        "body",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(std::iter::once("b".repeat(body_bytes.max(1))))
    .collect()
}

pub async fn run(args: LimitArgs) -> anyhow::Result<Report> {
    let body = crate::queue::body_bytes(args.payload_bytes);
    let key = format!("fleet-bench-limit-{}", std::process::id());
    let client = fleet::redis::connect(&args.redis_url).await?;
    let mut rows = Vec::new();
    let mut r = Report::new(
        "limit",
        args.label.as_deref().unwrap_or("redis-limit"),
        "redis",
    );
    for &p in &args.pipelines {
        let n = if p > 1 {
            args.requests * args.pipeline_factor
        } else {
            args.requests
        };
        eprintln!(
            "fleet-bench limit: redis-benchmark XADD x{n}, -P {p}, -c {}...",
            args.clients
        );
        let out = tokio::process::Command::new(&args.redis_benchmark)
            .args(["-u", &args.redis_url, "--csv", "-n", &n.to_string()])
            .args(["-c", &args.clients.to_string(), "-P", &p.to_string()])
            .args(xadd_args(&key, body))
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("cannot run {}", args.redis_benchmark))?;
        let _: Result<i64, _> = fred::interfaces::KeysInterface::del(&client, &key).await;
        if !out.status.success() {
            bail!(
                "redis-benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let row = parse_csv(&String::from_utf8_lossy(&out.stdout))?;
        r.latency_ms
            .insert(format!("xadd_p{p}"), row.latency.clone());
        rows.push(json!({
            "pipeline": p,
            "requests": n,
            "clients": args.clients,
            "rps": row.rps.round(),
        }));
    }
    r.config = json!({
        "payload_bytes": args.payload_bytes,
        "body_bytes": body,
        "clients": args.clients,
        "tool": "redis-benchmark",
    });
    r.throughput_per_s = rows
        .first()
        .and_then(|row| row["rps"].as_f64())
        .unwrap_or(0.0);
    r.extra = json!({ "rows": rows });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_csv_is_parsed() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"XADD k * v 1 kind exec.request tp  body xx\",\"22988.51\",\"0.225\",\"0.048\",\"0.167\",\"0.383\",\"2.847\",\"6.447\"\n";
        let row = parse_csv(out).unwrap();
        assert_eq!(row.rps, 22988.51);
        assert_eq!(row.latency.p50, 0.167);
        assert_eq!(row.latency.p99, 2.847);
        assert_eq!(row.latency.max, 6.447);
        assert!(parse_csv("garbage").is_err());
    }

    #[test]
    fn the_xadd_has_the_envelope_fields() {
        let a = xadd_args("k", 100);
        assert_eq!(&a[..3], ["XADD", "k", "*"]);
        assert_eq!(a.len(), 3 + 12);
        assert_eq!(a.last().unwrap().len(), 100);
        assert_eq!(a[a.len() - 2], "body");
    }
}
