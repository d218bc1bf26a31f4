//! The mock agent: deterministic answers, like the seed's MOCK agent type. Content, check
//! outcomes and self-score follow from a hash of (member, description, round), so a test can
//! predict them and a re-run gives the same ranking.
//!
//! Knobs in the request's metadata (the deliberation's constraint metadata):
//! * `mock_fail_policy`: comma-separated members whose policy check fails;
//! * `mock_delay_ms`: overrides `--mock-delay-ms` for this request.

use std::time::Duration;

use fleet::deliberation::{Check, Checks};
use fleet::envelope::AgentRequest;

use super::answer::{ProposalAnswer, SelectionAnswer};
use crate::executor::{Emitter, Ending, StopWhen};

/// FNV-1a over the parts, with a separator between them.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn delay_of(req: &AgentRequest, default: Duration) -> Duration {
    req.metadata
        .get("mock_delay_ms")
        .and_then(|d| d.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(default)
}

/// Waits `delay`; false when the request must stop first.
async fn wait(delay: Duration, stop: &StopWhen) -> bool {
    if delay.is_zero() {
        return !stop.cancel.is_cancelled();
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.wait() => false,
    }
}

/// The mock proposal of `req` (no waiting).
pub fn proposal_for(req: &AgentRequest) -> ProposalAnswer {
    let round = req.round.to_string();
    let h = fingerprint(&[&req.member, &req.description, &round]);
    let headline: String = req.description.chars().take(80).collect();
    let mut content = format!(
        "[{} r{}] Proposal #{:04x} for: {headline}\nApproach: option {} of the design space, {} steps.",
        req.member,
        req.round,
        h & 0xffff,
        h % 7 + 1,
        (h >> 3) % 5 + 2
    );
    if !req.peers.is_empty() {
        let peers: Vec<&str> = req.peers.iter().map(|p| p.member.as_str()).collect();
        content.push_str(&format!("\nRevised after reading {}.", peers.join(", ")));
    }
    let fail_policy = req
        .metadata
        .get("mock_fail_policy")
        .is_some_and(|l| l.split(',').any(|m| m.trim() == req.member));
    let lint = ((h >> 8) % 101) as f64 / 100.0;
    let checks = Checks {
        policy: Some(if fail_policy {
            Check::fail("mock: policy violation requested")
        } else {
            Check::pass(1.0, "mock: no forbidden operations")
        }),
        lint: Some(Check::pass(lint, format!("mock: lint score {lint:.2}"))),
        dry_run: Some(if (h >> 16).is_multiple_of(10) {
            Check::fail("mock: dry run failed")
        } else {
            Check::pass(1.0, "mock: dry run succeeded")
        }),
        extra: Default::default(),
    };
    ProposalAnswer {
        content,
        checks,
        self_score: Some(((h >> 24) % 101) as f64 / 100.0),
    }
}

pub async fn propose(
    req: &AgentRequest,
    delay: Duration,
    stop: &StopWhen,
) -> Option<ProposalAnswer> {
    if !wait(delay_of(req, delay), stop).await {
        return None;
    }
    Some(proposal_for(req))
}

/// The mock architect picks a candidate by hash (deterministic, not always the top one).
pub async fn select(
    req: &AgentRequest,
    delay: Duration,
    stop: &StopWhen,
) -> Option<SelectionAnswer> {
    if !wait(delay_of(req, delay), stop).await || req.peers.is_empty() {
        return None;
    }
    let h = fingerprint(&[&req.member, &req.description, &req.deliberation_id]);
    let chosen = &req.peers[(h % req.peers.len() as u64) as usize];
    Some(SelectionAnswer {
        winner: chosen.member.clone(),
        rationale: format!("mock architect {} prefers {}", req.member, chosen.member),
    })
}

/// A subtask: one chunk and a result naming the action.
pub async fn subtask(
    req: &AgentRequest,
    delay: Duration,
    emit: &mut Emitter<'_>,
    stop: &StopWhen,
) -> anyhow::Result<Ending> {
    if !wait(delay_of(req, delay), stop).await {
        return Ok(Ending::Stopped);
    }
    let content = format!(
        "[{} mock] {}: done. {}",
        req.role, req.task_action, req.description
    );
    emit.chunk(&content).await?;
    Ok(Ending::Result(content))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet::envelope::AgentAction;

    pub(crate) fn request(action: AgentAction) -> AgentRequest {
        AgentRequest {
            action,
            role: "DEV".into(),
            member: "DEV-1".into(),
            deliberation_id: "d".into(),
            round: 1,
            rounds: 1,
            description: "Implement login".into(),
            requirements: vec![],
            rubric: Default::default(),
            metadata: Default::default(),
            context: String::new(),
            peers: vec![],
            session_id: String::new(),
            task_id: String::new(),
            attempt: 0,
            task_action: String::new(),
            dependencies: vec![],
            priority: 0,
            deadline_ms: i64::MAX,
        }
    }

    #[test]
    fn mock_proposals_are_deterministic_per_member_and_round() {
        let a = request(AgentAction::Propose);
        assert_eq!(proposal_for(&a), proposal_for(&a));
        let mut b = a.clone();
        b.member = "DEV-2".into();
        assert_ne!(proposal_for(&a).content, proposal_for(&b).content);
        let mut c = a.clone();
        c.metadata
            .insert("mock_fail_policy".into(), "DEV-3, DEV-1".into());
        assert!(proposal_for(&c).checks.policy_failed());
        assert!(!proposal_for(&b).checks.policy_failed());
    }
}
