//! `GetStatus` and `GetMetrics`: fleet-wide numbers from Redis (so every replica answers the
//! same), plus this process's uptime.

use std::collections::{BTreeSet, HashMap};

use fleet::backlog::group_backlog;
use fleet::council::AgentStatus;
use fleet::deliberation::engine::{
    LATENCY_SAMPLES, STAT_DELIBERATIONS_TOTAL, STAT_ORCHESTRATIONS_TOTAL,
    STAT_PLANNING_EVENTS_TOTAL,
};
use fleet::deliberation::{ROLES, kind};
use fleet::keys::{GROUP_DISPATCHERS, GROUP_EXECUTORS};
use fleet::stream::entry::parse_entries;
use fleet_proto::orchestrator::v1 as pb;
use fred::prelude::*;
use tonic::{Request, Status};

use super::{Orchestrator, error};

/// Nearest-rank percentiles of durations in ms.
pub fn summary(mut samples: Vec<f64>) -> pb::LatencySummary {
    samples.retain(|s| s.is_finite());
    if samples.is_empty() {
        return pb::LatencySummary::default();
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    pb::LatencySummary {
        count: samples.len() as i64,
        p50_ms: at(0.50),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
        max_ms: *samples.last().unwrap_or(&0.0),
    }
}

impl Orchestrator {
    async fn latencies(&self, which: &str) -> Result<Vec<f64>, Status> {
        let reply: Value = self
            .client()
            .xrevrange(
                self.keys().stats_latency(which),
                "+",
                "-",
                Some(LATENCY_SAMPLES as u64),
            )
            .await
            .map_err(error::unavailable)?;
        Ok(parse_entries(reply)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.get_str("ms").and_then(|v| v.parse().ok()))
            .collect())
    }

    #[tracing::instrument(skip_all)]
    pub async fn get_status_rpc(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<pb::GetStatusResponse, Status> {
        let mut out = pb::GetStatusResponse {
            status: "healthy".into(),
            uptime_seconds: self.started.elapsed().as_secs() as i64,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let stats: Result<HashMap<String, i64>, _> =
            self.client().hgetall(self.keys().stats()).await;
        let Ok(stats) = stats else {
            out.status = "degraded".into();
            return Ok(out);
        };
        let n = |k: &str| stats.get(k).copied().unwrap_or(0);
        out.deliberations_total = n(STAT_DELIBERATIONS_TOTAL);
        out.deliberations_completed = n("deliberations_completed");
        out.deliberations_failed = n("deliberations_failed");
        out.deliberations_timed_out = n("deliberations_timed_out");
        out.deliberations_cancelled = n("deliberations_cancelled");
        out.orchestrations_total = n(STAT_ORCHESTRATIONS_TOTAL);
        out.planning_events_total = n(STAT_PLANNING_EVENTS_TOTAL);
        let councils = self.engine.councils.list().await.map_err(error::council)?;
        out.councils = councils.iter().filter(|c| c.def.is_some()).count() as i32;
        for role in ROLES {
            let c = councils.iter().find(|c| c.role == role);
            let count = |s| c.map_or(0, |c| c.count(s) as i32);
            out.roles.push(pb::RoleCount {
                role: role.into(),
                agents_ready: count(AgentStatus::Ready),
                agents_busy: count(AgentStatus::Busy),
                agents_offline: count(AgentStatus::Offline),
                deliberations: n(&format!("role:{role}")),
            });
        }
        Ok(out)
    }

    #[tracing::instrument(skip_all)]
    pub async fn get_metrics_rpc(
        &self,
        _req: Request<pb::GetMetricsRequest>,
    ) -> Result<pb::GetMetricsResponse, Status> {
        let deliberation = summary(self.latencies(kind::DELIBERATE).await?);
        let orchestration = summary(self.latencies(kind::ORCHESTRATE).await?);
        let councils = self.engine.councils.list().await.map_err(error::council)?;
        let backlog = |stream: String, group: &'static str| async move {
            group_backlog(self.client(), &stream, group)
                .await
                .map(|n| n as i64)
                .map_err(error::unavailable)
        };
        let dispatch_backlog = backlog(self.keys().tasks(), GROUP_DISPATCHERS).await?;
        let agents = self.chat.agents.list().await.map_err(error::unavailable)?;
        let pools: BTreeSet<&str> = agents.iter().map(|a| a.pool.as_str()).collect();
        let mut exec_backlog = HashMap::with_capacity(pools.len());
        for pool in pools {
            let n = backlog(self.keys().exec(pool), GROUP_EXECUTORS).await?;
            exec_backlog.insert(pool.to_owned(), n);
        }
        Ok(pb::GetMetricsResponse {
            deliberation: Some(deliberation),
            orchestration: Some(orchestration),
            agents_per_role: councils
                .iter()
                .map(|c| (c.role.clone(), c.agents.len() as i32))
                .collect(),
            councils: councils
                .iter()
                .map(|c| pb::CouncilHealth {
                    role: c.role.clone(),
                    health: c.health().into(),
                    ready: c.count(AgentStatus::Ready) as i32,
                    wanted: c.wanted() as i32,
                })
                .collect(),
            dispatch_backlog,
            exec_backlog,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s = super::summary((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.count, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(super::summary(vec![]).count, 0);
        assert_eq!(super::summary(vec![7.0]).p99_ms, 7.0);
    }
}
