//! Conversions between the shared library's types and `orchestrator.v1` messages.

use std::collections::HashMap;

use fleet::council::{AgentRecord, AgentStatus, CouncilView};
use fleet::deliberation::store::{DeliberationView, Update};
use fleet::deliberation::{Check, Checks, Proposal, RankedProposal, Status};
use fleet::planning::Subtask;
use fleet::task::TaskView;
use fleet_proto::orchestrator::v1 as pb;

pub fn check(c: Option<&Check>) -> Option<pb::CheckResult> {
    Some(match c {
        Some(c) => pb::CheckResult {
            ran: true,
            passed: c.passed,
            score: c.value(),
            message: c.message.clone(),
        },
        None => pb::CheckResult::default(),
    })
}

pub fn checks(c: &Checks) -> pb::ProposalChecks {
    pb::ProposalChecks {
        policy: check(c.policy.as_ref()),
        lint: check(c.lint.as_ref()),
        dry_run: check(c.dry_run.as_ref()),
        extra: c
            .extra
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), check(Some(v))?)))
            .collect(),
        all_passed: c.all_passed(),
    }
}

/// A proposal as it arrived (not scored yet: score 0, rank 0).
pub fn unscored(id: &str, role: &str, p: &Proposal) -> pb::Proposal {
    pb::Proposal {
        id: p.id(id),
        author: p.member.clone(),
        role: role.to_owned(),
        content: p.content.clone(),
        checks: Some(checks(&p.checks)),
        score: 0.0,
        rank: 0,
        round: p.round as i32,
        agent_id: p.agent_id.clone(),
        received_ms: p.received_ms,
    }
}

pub fn ranked(id: &str, role: &str, r: &RankedProposal) -> pb::Proposal {
    pb::Proposal {
        score: r.score,
        rank: r.rank as i32,
        ..unscored(id, role, &r.proposal)
    }
}

pub fn ranked_all(id: &str, role: &str, rs: &[RankedProposal]) -> Vec<pb::Proposal> {
    rs.iter().map(|r| ranked(id, role, r)).collect()
}

pub fn deliberation_status(s: Status) -> pb::DeliberationStatus {
    match s {
        Status::Pending => pb::DeliberationStatus::Pending,
        Status::Generating | Status::Reviewing | Status::Scoring | Status::Selecting => {
            pb::DeliberationStatus::InProgress
        }
        Status::Completed => pb::DeliberationStatus::Completed,
        Status::Failed => pb::DeliberationStatus::Failed,
        Status::TimedOut => pb::DeliberationStatus::TimedOut,
        Status::Cancelled => pb::DeliberationStatus::Cancelled,
    }
}

pub fn update_status(s: Option<Status>) -> pb::UpdateStatus {
    match s {
        Some(Status::Pending) => pb::UpdateStatus::Pending,
        Some(Status::Generating) => pb::UpdateStatus::Generating,
        Some(Status::Reviewing) => pb::UpdateStatus::Reviewing,
        Some(Status::Scoring) => pb::UpdateStatus::Scoring,
        Some(Status::Selecting) => pb::UpdateStatus::Selecting,
        Some(Status::Completed) => pb::UpdateStatus::Complete,
        Some(Status::Failed) => pb::UpdateStatus::Failed,
        Some(Status::TimedOut) => pb::UpdateStatus::TimedOut,
        Some(Status::Cancelled) => pb::UpdateStatus::Cancelled,
        None => pb::UpdateStatus::Unspecified,
    }
}

/// 0..100: proposals make 90 (spread over every round), scoring and selecting 95, the end 100.
pub fn progress(status: Option<Status>, round: u32, received: u32, n: u32, rounds: u32) -> i32 {
    match status {
        None | Some(Status::Pending) => 0,
        Some(Status::Scoring | Status::Selecting) => 95,
        Some(s) if s.is_terminal() => 100,
        Some(_) => {
            let total = (n.max(1) * rounds.max(1)) as f64;
            let done = (round.saturating_sub(1) * n + received.min(n)) as f64;
            ((done / total) * 90.0).round() as i32
        }
    }
}

/// One update of a deliberation of `n` members over `rounds` rounds.
pub fn update(id: &str, role: &str, n: u32, rounds: u32, u: &Update) -> pb::DeliberationUpdate {
    let status = u.status();
    let mut out = pb::DeliberationUpdate {
        task_id: id.to_owned(),
        status: update_status(status) as i32,
        progress_percent: progress(status, u.round, u.received, n, rounds),
        current_step: u.step.clone(),
        current_agent: u.agent.clone(),
        round: u.round as i32,
        event_id: u.event_id.to_string(),
        timestamp_ms: u.event_id.ms as i64,
        ..Default::default()
    };
    if u.is_proposal()
        && let Ok(p) = serde_json::from_str::<Proposal>(&u.data)
    {
        out.current_step = format!("proposal from {} (round {})", p.member, p.round);
        out.partial_result = Some(unscored(id, role, &p));
    }
    if u.is_terminal()
        && let Ok(r) = serde_json::from_str::<fleet::deliberation::store::FinalResult>(&u.data)
    {
        out.results = ranked_all(id, role, &r.results);
        out.winner_id = r.winner_id;
        out.error = r.error;
    }
    out
}

/// The result view of a deliberation; `provisional` ranks the proposals so far when it has not
/// been scored yet.
pub fn result(
    view: &DeliberationView,
    provisional: Vec<RankedProposal>,
) -> pb::GetDeliberationResultResponse {
    let spec = &view.spec;
    let ranked = if view.ranked.is_empty() {
        provisional
    } else {
        view.ranked.clone()
    };
    pb::GetDeliberationResultResponse {
        task_id: spec.deliberation_id.clone(),
        status: deliberation_status(view.status) as i32,
        proposals_received: ranked.len() as i32,
        results: ranked_all(&spec.deliberation_id, &spec.role, &ranked),
        winner_id: view.winner_id.clone().unwrap_or_default(),
        error: view.error.clone(),
        duration_ms: view.duration_ms(),
        role: spec.role.clone(),
        round: view.round as i32,
        rounds: spec.rounds as i32,
        num_agents: spec.num_agents as i32,
        phase: view.status.as_str().to_owned(),
        case_id: spec.case_id.clone(),
        story_id: spec.story_id.clone(),
        plan_id: spec.plan_id.clone(),
        created_ms: view.created_ms,
        deadline_ms: spec.deadline_ms,
        finished_ms: view.finished_ms.unwrap_or(0),
    }
}

pub fn subtask(s: &Subtask, state: &str) -> pb::Subtask {
    pb::Subtask {
        task_id: s.task_id.clone(),
        role: s.role.clone(),
        action: s.action.clone(),
        description: s.description.clone(),
        dependencies: s.dependencies.clone(),
        constraints: s.constraints.clone(),
        priority: s.priority as i32,
        session_id: s.session_id.clone(),
        state: state.to_owned(),
        council: s.council as i32,
    }
}

pub fn agent(a: &AgentRecord) -> pb::AgentInfo {
    pb::AgentInfo {
        agent_id: a.agent_id.clone(),
        role: a.role.clone(),
        capabilities: a.capabilities.clone(),
        status: a.status.as_str().to_owned(),
        last_heartbeat_ms: a.last_heartbeat_ms,
        registered_ms: a.registered_ms,
        metadata: a.metadata.clone().into_iter().collect::<HashMap<_, _>>(),
    }
}

pub fn council(c: &CouncilView, include_agents: bool) -> pb::Council {
    pb::Council {
        role: c.role.clone(),
        num_agents: c.wanted() as i32,
        agent_type: c
            .def
            .as_ref()
            .map(|d| d.agent_type.clone())
            .unwrap_or_default(),
        defined: c.def.is_some(),
        ready: c.count(AgentStatus::Ready) as i32,
        busy: c.count(AgentStatus::Busy) as i32,
        offline: c.count(AgentStatus::Offline) as i32,
        health: c.health().to_owned(),
        agents: if include_agents {
            c.agents.iter().map(agent).collect()
        } else {
            Vec::new()
        },
        created_ms: c.def.as_ref().map_or(0, |d| d.created_ms),
        config: c
            .def
            .as_ref()
            .map(|d| d.config.clone().into_iter().collect())
            .unwrap_or_default(),
    }
}

pub fn task(t: &TaskView) -> pb::ChatTask {
    pb::ChatTask {
        task_id: t.task_id.clone(),
        session_id: t.session_id.clone(),
        agent_id: t.agent_id.clone(),
        state: t.state.clone(),
        attempt: t.attempt as i32,
        message: t.message.clone(),
        result: t.result.clone().unwrap_or_default(),
        error_type: t
            .error
            .as_ref()
            .map(|e| e.error_type.clone())
            .unwrap_or_default(),
        error_message: t
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        chunks: t.chunks as i32,
        created_ms: t.created_ms,
        updated_ms: t.updated_ms,
        finished_ms: t.finished_ms.unwrap_or(0),
        deadline_ms: t.deadline_ms,
        metadata_json: if t.metadata.is_null() {
            String::new()
        } else {
            t.metadata.to_string()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_climbs_through_rounds_to_the_end() {
        let p = |s, r, rec| progress(Some(s), r, rec, 3, 2);
        assert_eq!(progress(None, 0, 0, 3, 2), 0);
        assert_eq!(p(Status::Generating, 1, 0), 0);
        assert_eq!(p(Status::Generating, 1, 3), 45);
        assert_eq!(p(Status::Reviewing, 2, 3), 90);
        assert_eq!(p(Status::Scoring, 2, 3), 95);
        assert_eq!(p(Status::Completed, 2, 3), 100);
        assert_eq!(p(Status::TimedOut, 1, 1), 100);
        assert_eq!(p(Status::Cancelled, 1, 1), 100);
    }

    #[test]
    fn every_status_maps_to_a_proto_status_and_cancelled_to_its_own() {
        for s in Status::ALL {
            assert_ne!(
                deliberation_status(s),
                pb::DeliberationStatus::Unspecified,
                "{s}"
            );
            assert_ne!(update_status(Some(s)), pb::UpdateStatus::Unspecified, "{s}");
        }
        assert_eq!(
            deliberation_status(Status::Cancelled),
            pb::DeliberationStatus::Cancelled
        );
        assert_eq!(
            update_status(Some(Status::Cancelled)),
            pb::UpdateStatus::Cancelled
        );
    }
}
