//! `ws-idle`: how many idle WebSocket connections one gateway holds, and what each costs.
//!
//! Opens sessions over REST (many connections share a few sessions), reads the gateway's RSS,
//! opens K connections, lets them settle, reads the RSS again and reports the bytes per
//! connection; holds them for `--hold` seconds (each connection answers the gateway's pings),
//! then closes them and reads the RSS once more.
//!
//! One client address can reach one server address:port from at most ~28k ephemeral ports
//! (`net.ipv4.ip_local_port_range`); past `--per-ip` connections the tool binds its sockets to
//! 127.0.0.2, 127.0.0.3, ... (all of 127.0.0.0/8 is local on Linux). Each connection needs a
//! file descriptor in this process and in the gateway: raise `ulimit -n` for both.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::{FleetArgs, stats};

#[derive(clap::Args, Clone, Debug)]
pub struct WsIdleArgs {
    // The gateway URL needs an IPv4 host: connections spread over 127.0.0.x.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Sessions the connections are spread over.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Seconds to hold the connections once all are open.
    #[arg(long = "hold", default_value_t = 5.0)]
    pub hold_s: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_parallel: usize,
    /// New connections per second, at most (0: as fast as --connect-parallel allows). Each
    /// admission costs the gateway Redis round trips; a machine that cannot keep up with the
    /// tool's pace measures a reconnect storm, not capacity.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connections per local source address before moving to the next 127.0.0.x.
    #[arg(long, default_value_t = 25_000)]
    pub per_ip: usize,
    /// The gateway's pid (default: the one process named ws-gateway).
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// The local address connection `i` binds to: `None` (the kernel picks) for the first
/// `per_ip`, then 127.0.0.2, 127.0.0.3, ...
pub fn source_addr(i: usize, per_ip: usize) -> Option<Ipv4Addr> {
    let block = i / per_ip.max(1);
    (block > 0).then(|| Ipv4Addr::new(127, 0, 0, (1 + block).min(254) as u8))
}

/// `Max open files` (soft limit) from the text of `/proc/<pid>/limits`.
pub fn parse_nofile(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

fn nofile(pid: u32) -> Option<u64> {
    parse_nofile(&std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

/// host:port of a ws:// URL.
fn ws_addr(base: &str) -> anyhow::Result<SocketAddr> {
    let rest = base
        .strip_prefix("ws://")
        .context("--ws must be a ws:// URL")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .with_context(|| format!("--ws needs an IPv4 address and port, not `{hostport}`"))
}

async fn open_one(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    url: String,
) -> anyhow::Result<crate::e2e::RawWs> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let tcp = socket.connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    Ok(ws)
}

pub async fn run(args: WsIdleArgs) -> anyhow::Result<Report> {
    let gw_pid = match args.gateway_pid {
        Some(p) => p,
        None => {
            let pids = stats::pids_by_name("ws-gateway");
            match pids.as_slice() {
                [p] => *p,
                [] => bail!("no ws-gateway process found; pass --gateway-pid"),
                _ => bail!("several ws-gateway processes ({pids:?}); pass --gateway-pid"),
            }
        }
    };
    let own_limit = nofile(std::process::id());
    let gw_limit = nofile(gw_pid);
    for (who, limit) in [("fleet-bench", own_limit), ("ws-gateway", gw_limit)] {
        if let Some(l) = limit
            && (l as usize) < args.connections + 64
        {
            eprintln!(
                "fleet-bench ws-idle: warning: {who} may open at most {l} files; {} connections will not all fit (raise ulimit -n)",
                args.connections
            );
        }
    }
    let addr = ws_addr(&args.fleet.ws)?;
    let http = reqwest::Client::new();
    let sessions = crate::e2e::open_sessions(&http, &args.fleet, args.sessions).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, _) = stats::process_memory(gw_pid);

    eprintln!(
        "fleet-bench ws-idle: opening {} connections to {addr} over {} sessions...",
        args.connections,
        sessions.len()
    );
    let stop = CancellationToken::new();
    let failed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let opened_at = Instant::now();
    let mut first_error: Option<String> = None;
    let mut held = tokio::task::JoinSet::new();
    let mut results = futures::stream::iter(0..args.connections)
        .map(|i| {
            let (sid, token) = &sessions[i % sessions.len()];
            let url = crate::e2e::ws_url(&args.fleet.ws, sid, token);
            let source = source_addr(i, args.per_ip);
            let start = (args.connect_rate > 0.0).then(|| {
                tokio::time::Instant::from_std(opened_at)
                    + Duration::from_secs_f64(i as f64 / args.connect_rate)
            });
            async move {
                if let Some(start) = start {
                    tokio::time::sleep_until(start).await;
                }
                open_one(addr, source, url).await
            }
        })
        .buffer_unordered(args.connect_parallel.max(1));
    let mut connected: u64 = 0;
    while let Some(r) = results.next().await {
        match r {
            Ok(mut ws) => {
                connected += 1;
                let stop = stop.clone();
                let dropped = dropped.clone();
                held.spawn(async move {
                    // Reading answers the gateway's pings; nothing else arrives on an idle session.
                    loop {
                        tokio::select! {
                            m = ws.next() => match m {
                                Some(Ok(_)) => {}
                                _ => { dropped.fetch_add(1, Ordering::Relaxed); return; }
                            },
                            _ = stop.cancelled() => break,
                        }
                    }
                    let _ = ws.close(None).await;
                });
            }
            Err(e) => {
                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    drop(results);
    let connect_s = opened_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_open, hwm_open) = stats::process_memory(gw_pid);
    tokio::time::sleep(Duration::from_secs_f64(args.hold_s.max(0.0))).await;
    let (rss_held, hwm_held) = stats::process_memory(gw_pid);
    let still_open = connected - dropped.load(Ordering::Relaxed);
    stop.cancel();
    let close_deadline = Instant::now() + Duration::from_secs(20);
    while !held.is_empty() && Instant::now() < close_deadline {
        let _ = tokio::time::timeout(Duration::from_secs(1), held.join_next()).await;
    }
    held.abort_all();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_closed, _) = stats::process_memory(gw_pid);

    let per_conn = |rss_kb: u64| {
        if still_open > 0 {
            (rss_kb.saturating_sub(rss_before) as f64 * 1024.0 / still_open as f64).round()
        } else {
            0.0
        }
    };
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("ws-idle-{}", args.connections));
    let mut r = Report::new("ws-idle", &label, "fleet");
    r.config = json!({
        "connections": args.connections,
        "sessions": sessions.len(),
        "hold_s": args.hold_s,
        "per_ip": args.per_ip,
        "connect_rate": args.connect_rate,
        "ws": args.fleet.ws,
    });
    r.extra = json!({
        "connected": connected,
        "failed": failed.load(Ordering::Relaxed),
        "first_error": first_error,
        "held_to_the_end": still_open,
        "connect_seconds": (connect_s * 100.0).round() / 100.0,
        "gateway_pid": gw_pid,
        "gateway_nofile_limit": gw_limit,
        "bench_nofile_limit": own_limit,
        "gateway_rss_before_kb": rss_before,
        "gateway_rss_open_kb": rss_open,
        "gateway_rss_held_kb": rss_held,
        "gateway_hwm_kb": hwm_held.max(hwm_open),
        "gateway_rss_after_close_kb": rss_closed,
        "bytes_per_connection": per_conn(rss_held),
        "bytes_per_connection_at_open": per_conn(rss_open),
    });
    r.processes = vec![crate::report::ProcessCost {
        name: "ws-gateway".into(),
        pid: gw_pid,
        rss_kb: rss_held,
        hwm_kb: hwm_held.max(hwm_open),
        ..Default::default()
    }];
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_move_to_new_source_addresses_past_the_per_ip_bound() {
        assert_eq!(source_addr(0, 25_000), None);
        assert_eq!(source_addr(24_999, 25_000), None);
        assert_eq!(
            source_addr(25_000, 25_000),
            Some(Ipv4Addr::new(127, 0, 0, 2))
        );
        assert_eq!(
            source_addr(50_000, 25_000),
            Some(Ipv4Addr::new(127, 0, 0, 3))
        );
    }

    #[test]
    fn the_open_files_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_nofile(limits), Some(20000));
    }

    #[test]
    fn ws_addresses_parse() {
        assert_eq!(
            ws_addr("ws://127.0.0.1:8002").unwrap(),
            "127.0.0.1:8002".parse().unwrap()
        );
        assert_eq!(
            ws_addr("ws://localhost:9/x").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(ws_addr("http://x").is_err());
    }
}
