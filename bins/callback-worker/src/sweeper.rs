//! The deadline sweeper: ends tasks past their deadline as `timed_out`, and deliberations past
//! theirs by the quorum rule.
//!
//! Open tasks sit in the sorted set `fleet:deadlines` scored by their deadline (member
//! `<sid>/<tid>`), open deliberations too (member `d:<id>`). Every interval the sweeper takes
//! the overdue ones, ends each still-open task by compare-and-set (so several callback-workers
//! sweeping at once end a task once), logs and fans out its `chat_error`, tells its executors to
//! stop, and removes it from the set. An overdue deliberation completes with the proposals it
//! has when they reach its quorum and times out otherwise; its stragglers get `agent.cancel`
//! ([`fleet::deliberation::Engine::expire`], which removes it from the set once it has ended;
//! one whose end lost a race to another step stays for the next sweep).

use std::collections::BTreeMap;
use std::time::Duration;

use fleet::deliberation::Engine;
use fleet::deliberation::engine::Expired;
use fleet::events::ServerMessage;
use fleet::keys::DELIBERATION_DEADLINE_PREFIX;
use fleet::session_log::{PublishOrder, SessionLog};
use fleet::task::{TaskOp, TaskStore};
use fleet::time::now_ms;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

/// Overdue tasks handled per scan.
const PER_SCAN: i64 = 500;

pub struct Sweeper {
    pub tasks: TaskStore,
    pub log: SessionLog,
    /// The order of each session's fan-out entries, shared with the callback handler.
    pub order: PublishOrder,
    pub engine: Engine,
    pub planning: Option<fleet::planning::notifier::PlanningNotifier>,
    pub every: Duration,
}

impl Sweeper {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            match self.sweep().await {
                // A full scan means more may be waiting: go again at once.
                Ok(n) if n as i64 >= PER_SCAN => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "deadline sweep failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        Ok(())
    }

    /// One scan. Returns how many overdue entries it handled.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let client = self.tasks.client();
        let key = self.tasks.keys().deadlines();
        let overdue: Vec<String> = client
            .zrangebyscore(&key, "-inf", now_ms() as f64, false, Some((0, PER_SCAN)))
            .await?;
        if overdue.is_empty() {
            return Ok(0);
        }
        let (deliberations, overdue): (Vec<String>, Vec<String>) = overdue
            .into_iter()
            .partition(|m| !m.contains('/') && m.starts_with(DELIBERATION_DEADLINE_PREFIX));
        for m in &deliberations {
            let id = &m[DELIBERATION_DEADLINE_PREFIX.len()..];
            match self.engine.expire(id).await {
                // Counted by the one call that ended it: a sweep whose end was refused (it stays
                // for the next one) or that found it ended elsewhere counts nothing.
                Ok(Expired::Ended(_)) => {
                    metrics::counter!("fleet_deliberations_expired_total").increment(1);
                }
                Ok(Expired::Refused(_)) => {}
                Ok(Expired::NotOpen) => {
                    // Ended elsewhere (or unknown): nothing to wait for, but what ended it may
                    // have died before what follows an end, which its entry being here says.
                    if let Err(e) = self.engine.settle(id).await {
                        tracing::warn!(deliberation_id = %id, error = %e, "settling an ended deliberation failed; will retry");
                    }
                }
                Err(e) => {
                    tracing::warn!(deliberation_id = %id, error = %e, "ending an overdue deliberation failed; will retry")
                }
            }
        }
        if overdue.is_empty() {
            return Ok(deliberations.len());
        }
        let mut by_session: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for m in &overdue {
            if let Some((sid, tid)) = m.split_once('/') {
                by_session.entry(sid).or_default().push(tid);
            }
        }
        for (sid, tids) in by_session {
            let message = "the task did not finish before its deadline";
            let ops: Vec<TaskOp> = tids
                .iter()
                .map(|tid| {
                    let ev = ServerMessage::chat_error(
                        sid,
                        tid,
                        None,
                        "timed_out",
                        message,
                        &Json::Null,
                    );
                    TaskOp::end("timeout", tid, "timed_out", message, ev.to_json())
                })
                .collect();
            // With a nudge when nothing new was logged: an ended task still in the set may be
            // one an earlier sweep timed out and then stopped before fanning out, and in a quiet
            // session no later entry would tell the gateways.
            let applied = crate::handler::apply_in_order(
                &self.tasks,
                &self.log,
                &self.order,
                self.planning.as_ref(),
                sid,
                &ops,
                true,
            )
            .await?;
            for t in &applied.ended {
                metrics::counter!("fleet_tasks_timed_out_total").increment(1);
                tracing::info!(session_id = %sid, task_id = %t.task_id, "task timed out");
                if !t.pool.is_empty() {
                    self.tasks
                        .cancel_on_executors(&t.pool, sid, &t.task_id, "deadline passed")
                        .await?;
                }
            }
        }
        // Whatever was overdue is handled now (ended here, or already ended).
        let _: i64 = client.zrem(&key, overdue.clone()).await?;
        Ok(overdue.len() + deliberations.len())
    }
}
