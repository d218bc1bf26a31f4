//! Where the cost numbers come from: Redis `INFO` (CPU, commands, commandstats) and
//! `/proc/<pid>` (RSS, peak RSS, CPU time) of the fleet's processes.

use std::collections::HashMap;
use std::time::Instant;

use fred::prelude::*;

use crate::report::{CommandCost, ProcessCost, RedisCost};

/// The parts of `INFO` a run compares before and after.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RedisSnapshot {
    pub cpu_s: f64,
    pub commands: u64,
    pub used_memory: u64,
    /// command -> (calls, usec)
    pub commandstats: HashMap<String, (u64, u64)>,
}

/// Parses the text of `INFO` (any sections) into a snapshot.
pub fn parse_info(text: &str) -> RedisSnapshot {
    let mut s = RedisSnapshot::default();
    let mut cpu_sys = 0.0;
    let mut cpu_user = 0.0;
    for line in text.lines() {
        let line = line.trim();
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k {
            "used_cpu_sys" => cpu_sys = v.parse().unwrap_or(0.0),
            "used_cpu_user" => cpu_user = v.parse().unwrap_or(0.0),
            "total_commands_processed" => s.commands = v.parse().unwrap_or(0),
            "used_memory" => s.used_memory = v.parse().unwrap_or(0),
            _ => {
                if let Some(cmd) = k.strip_prefix("cmdstat_") {
                    let mut calls = 0;
                    let mut usec = 0;
                    for kv in v.split(',') {
                        match kv.split_once('=') {
                            Some(("calls", n)) => calls = n.parse().unwrap_or(0),
                            Some(("usec", n)) => usec = n.parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                    s.commandstats.insert(cmd.to_owned(), (calls, usec));
                }
            }
        }
    }
    s.cpu_s = cpu_sys + cpu_user;
    s
}

/// Takes a snapshot of `INFO` (all sections we need, commandstats included).
pub async fn redis_snapshot(client: &Client) -> anyhow::Result<RedisSnapshot> {
    let mut text = String::new();
    use fred::types::InfoKind;
    for section in [
        InfoKind::Cpu,
        InfoKind::Stats,
        InfoKind::Memory,
        InfoKind::CommandStats,
    ] {
        let t: String = client.info(Some(section)).await?;
        text.push_str(&t);
        text.push('\n');
    }
    Ok(parse_info(&text))
}

/// The cost of a window from two snapshots, per task when `tasks` > 0.
pub fn redis_cost(
    before: &RedisSnapshot,
    after: &RedisSnapshot,
    window_s: f64,
    tasks: u64,
) -> RedisCost {
    let per = |x: f64| if tasks > 0 { x / tasks as f64 } else { 0.0 };
    let cpu_s = (after.cpu_s - before.cpu_s).max(0.0);
    let commands = after.commands.saturating_sub(before.commands);
    let mut top: Vec<CommandCost> = after
        .commandstats
        .iter()
        .filter_map(|(cmd, &(calls, usec))| {
            let (c0, u0) = before.commandstats.get(cmd).copied().unwrap_or((0, 0));
            let calls = calls.saturating_sub(c0);
            let usec = usec.saturating_sub(u0);
            (calls > 0).then(|| CommandCost {
                cmd: cmd.clone(),
                calls,
                usec,
                calls_per_task: round2(per(calls as f64)),
                usec_per_task: round2(per(usec as f64)),
            })
        })
        .collect();
    top.sort_by(|a, b| b.usec.cmp(&a.usec).then_with(|| a.cmd.cmp(&b.cmd)));
    // The benchmark's own INFO calls are not the fleet's.
    top.retain(|c| c.cmd != "info");
    RedisCost {
        cpu_s: round3(cpu_s),
        cpu_util: if window_s > 0.0 {
            round3(cpu_s / window_s)
        } else {
            0.0
        },
        cpu_us_per_task: round2(per(cpu_s * 1e6)),
        commands,
        commands_per_task: round2(per(commands as f64)),
        top,
        used_memory_bytes: after.used_memory,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Memory of a process from the text of `/proc/<pid>/status`: (VmRSS, VmHWM) in KiB.
pub fn parse_status_memory(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) in clock ticks from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based over the line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on Linux everywhere).
pub const TICKS_PER_SEC: f64 = 100.0;

/// (VmRSS, VmHWM) of `pid` in KiB, or zeros when it is gone.
pub fn process_memory(pid: u32) -> (u64, u64) {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| parse_status_memory(&s))
        .unwrap_or((0, 0))
}

/// CPU seconds used so far by `pid` (all threads).
pub fn process_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat_ticks(&s))
        .map(|t| t as f64 / TICKS_PER_SEC)
        .unwrap_or(0.0)
}

/// Nanoseconds the threads of `pid` have spent waiting for a CPU (run queue), from
/// `/proc/<pid>/task/*/schedstat` (second field). Threads that ended are not counted.
pub fn process_runq_wait_s(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| parse_schedstat_wait_ns(&s))
        .sum::<u64>() as f64
        / 1e9
}

/// The run-queue wait (ns) of a `schedstat` line: `<on-cpu ns> <waiting ns> <slices>`.
pub fn parse_schedstat_wait_ns(line: &str) -> Option<u64> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of processes whose name (`/proc/<pid>/comm`) is `name` (names are cut at 15 bytes).
pub fn pids_by_name(name: &str) -> Vec<u32> {
    let want: String = name.chars().take(15).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == want)
                .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The fleet binaries looked for by name when no `--pids` are given.
pub const FLEET_BINARIES: &[&str] = &[
    "edge-api",
    "ws-gateway",
    "dispatcher",
    "callback-worker",
    "exec-worker",
];

/// Parses `name=pid,name=pid,...`.
pub fn parse_pids(spec: &str) -> anyhow::Result<Vec<(String, u32)>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|kv| {
            let (name, pid) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("`{kv}` is not name=pid"))?;
            Ok((name.trim().to_owned(), pid.trim().parse()?))
        })
        .collect()
}

/// The processes a run watches: the given ones, or every running fleet binary found by name
/// (several replicas of one binary are named `name#2`, ...).
pub fn watched_processes(given: Option<&str>) -> anyhow::Result<Vec<(String, u32)>> {
    if let Some(spec) = given {
        return parse_pids(spec);
    }
    let mut out = Vec::new();
    for name in FLEET_BINARIES {
        for (i, pid) in pids_by_name(name).into_iter().enumerate() {
            let label = if i == 0 {
                (*name).to_owned()
            } else {
                format!("{name}#{}", i + 1)
            };
            out.push((label, pid));
        }
    }
    Ok(out)
}

/// CPU counters of the watched processes (and of this process) at one moment.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    pub at: Instant,
    pub procs: Vec<f64>,
    /// Run-queue wait of each process so far, seconds.
    pub waits: Vec<f64>,
    pub own: f64,
    pub own_wait: f64,
    pub pressure_us: Option<u64>,
}

pub fn cpu_snapshot(procs: &[(String, u32)]) -> CpuSnapshot {
    CpuSnapshot {
        at: Instant::now(),
        procs: procs.iter().map(|(_, pid)| process_cpu_s(*pid)).collect(),
        waits: procs
            .iter()
            .map(|(_, pid)| process_runq_wait_s(*pid))
            .collect(),
        own: process_cpu_s(std::process::id()),
        own_wait: process_runq_wait_s(std::process::id()),
        pressure_us: cpu_pressure_total_us(),
    }
}

/// Memory and CPU of the watched processes over a window.
pub fn process_costs(
    procs: &[(String, u32)],
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    tasks: u64,
) -> Vec<ProcessCost> {
    procs
        .iter()
        .enumerate()
        .map(|(i, (name, pid))| {
            let (rss_kb, hwm_kb) = process_memory(*pid);
            let cpu_s = (after.procs.get(i).copied().unwrap_or(0.0)
                - before.procs.get(i).copied().unwrap_or(0.0))
            .max(0.0);
            let wait_s = (after.waits.get(i).copied().unwrap_or(0.0)
                - before.waits.get(i).copied().unwrap_or(0.0))
            .max(0.0);
            ProcessCost {
                name: name.clone(),
                pid: *pid,
                rss_kb,
                hwm_kb,
                cpu_s: round3(cpu_s),
                runq_wait_s: round3(wait_s),
                cpu_us_per_task: if tasks > 0 {
                    round2(cpu_s * 1e6 / tasks as f64)
                } else {
                    0.0
                },
            }
        })
        .collect()
}

/// The `some ... total=<us>` counter of the text of `/proc/pressure/cpu`.
pub fn parse_psi_some_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Microseconds some task has waited for a CPU since boot, if the kernel keeps PSI.
pub fn cpu_pressure_total_us() -> Option<u64> {
    parse_psi_some_total(&std::fs::read_to_string("/proc/pressure/cpu").ok()?)
}

/// The 1-minute load average.
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The machine's load over a window.
pub fn host_load(before: &CpuSnapshot, after: &CpuSnapshot) -> crate::report::HostLoad {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    crate::report::HostLoad {
        cpu_pressure_pct: match (before.pressure_us, after.pressure_us) {
            (Some(a), Some(b)) if secs > 0.0 => {
                Some(((b.saturating_sub(a)) as f64 / (secs * 1e6) * 100.0).round())
            }
            _ => None,
        },
        loadavg_1m: loadavg_1m(),
        runq_wait_s: round3(
            (after.waits.iter().sum::<f64>() + after.own_wait
                - before.waits.iter().sum::<f64>()
                - before.own_wait)
                .max(0.0),
        ),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_parsed_and_deltas_are_per_task() {
        let before = parse_info(
            "# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.5\r\n# Stats\r\ntotal_commands_processed:100\r\n\
             # Commandstats\r\ncmdstat_xadd:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=3,usec=30,usec_per_call=10.00\r\n",
        );
        assert_eq!(before.cpu_s, 4.0);
        assert_eq!(before.commands, 100);
        assert_eq!(before.commandstats["xadd"], (10, 100));
        let after = parse_info(
            "used_cpu_sys:2.5\nused_cpu_user:4.5\ntotal_commands_processed:1100\nused_memory:4096\n\
             cmdstat_xadd:calls=1010,usec=2100\ncmdstat_evalsha:calls=500,usec=9000\ncmdstat_info:calls=9,usec=90\n",
        );
        let cost = redis_cost(&before, &after, 10.0, 500);
        assert_eq!(cost.cpu_s, 3.0);
        assert_eq!(cost.cpu_util, 0.3);
        assert_eq!(cost.cpu_us_per_task, 6000.0);
        assert_eq!(cost.commands, 1000);
        assert_eq!(cost.commands_per_task, 2.0);
        assert_eq!(cost.used_memory_bytes, 4096);
        let names: Vec<&str> = cost.top.iter().map(|c| c.cmd.as_str()).collect();
        assert_eq!(names, ["evalsha", "xadd"]);
        assert_eq!(cost.top[1].calls_per_task, 2.0);
        assert_eq!(cost.top[1].usec_per_task, 4.0);
    }

    #[test]
    fn proc_files_are_parsed() {
        let status = "Name:\tdispatcher\nVmHWM:\t   12345 kB\nVmRSS:\t   10000 kB\nThreads:\t3\n";
        assert_eq!(parse_status_memory(status), (10000, 12345));
        let stat =
            "4242 (callback worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }

    #[test]
    fn schedstat_wait_is_the_second_field() {
        assert_eq!(
            parse_schedstat_wait_ns("780984915 1473974657 1565\n"),
            Some(1_473_974_657)
        );
        assert_eq!(parse_schedstat_wait_ns("1"), None);
    }

    #[test]
    fn cpu_pressure_is_read() {
        let psi = "some avg10=97.96 avg60=89.61 avg300=85.03 total=3517379604\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_total(psi), Some(3_517_379_604));
        assert_eq!(parse_psi_some_total(""), None);
    }

    #[test]
    fn pid_lists_parse() {
        assert_eq!(
            parse_pids("dispatcher=12, edge-api=34").unwrap(),
            vec![("dispatcher".to_owned(), 12), ("edge-api".to_owned(), 34)]
        );
        assert!(parse_pids("dispatcher").is_err());
    }
}
