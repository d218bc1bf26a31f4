//! What agents answer, and how a free-text answer (a program's stdout, a model's reply) carries
//! its structured part: an optional **last line of JSON**.
//!
//! * A proposal may end with `{"checks": {"policy": {"passed": true}, "lint": {"passed": true,
//!   "score": 0.8}, "dry_run": {...}, "extra": {...}}, "self_score": 0.7}`; the line is removed
//!   from the content. Without it, no check ran.
//! * A selection is `{"winner": "<member or proposal id>", "rationale": "..."}`; without that
//!   line, the first candidate named in the text wins.

use fleet::deliberation::Checks;
use fleet::envelope::{AgentAction, AgentRequest};
use serde::Deserialize;

/// A proposal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProposalAnswer {
    pub content: String,
    pub checks: Checks,
    pub self_score: Option<f64>,
}

/// A selection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelectionAnswer {
    pub winner: String,
    pub rationale: String,
}

#[derive(Deserialize)]
struct Trailer {
    #[serde(default)]
    checks: Option<Checks>,
    #[serde(default)]
    self_score: Option<f64>,
    #[serde(default)]
    winner: Option<String>,
    #[serde(default)]
    rationale: Option<String>,
}

/// Splits `text` into its body and its trailing JSON object line, if it has one.
fn split_trailer(text: &str) -> (String, Option<Trailer>) {
    let trimmed = text.trim_end();
    let (body, last) = match trimmed.rfind('\n') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    let last = last.trim();
    if last.starts_with('{')
        && let Ok(t) = serde_json::from_str::<Trailer>(last)
        && (t.checks.is_some() || t.self_score.is_some() || t.winner.is_some())
    {
        return (body.trim_end().to_owned(), Some(t));
    }
    (trimmed.to_owned(), None)
}

/// A proposal from free text.
pub fn parse_proposal(text: &str) -> ProposalAnswer {
    let (content, trailer) = split_trailer(text);
    let (checks, self_score) = trailer
        .map(|t| (t.checks.unwrap_or_default(), t.self_score))
        .unwrap_or_default();
    ProposalAnswer {
        content,
        checks,
        self_score: self_score.filter(|s| s.is_finite()),
    }
}

/// A selection among `req.peers` from free text; `None` when it names no candidate.
pub fn parse_selection(text: &str, req: &AgentRequest) -> Option<SelectionAnswer> {
    let (body, trailer) = split_trailer(text);
    if let Some(Trailer {
        winner: Some(w),
        rationale,
        ..
    }) = trailer
    {
        return Some(SelectionAnswer {
            winner: w,
            rationale: rationale.unwrap_or(body),
        });
    }
    // The candidate named first in the text.
    req.peers
        .iter()
        .filter_map(|p| body.find(&p.member).map(|at| (at, p)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, p)| SelectionAnswer {
            winner: p.member.clone(),
            rationale: body.clone(),
        })
}

/// The instructions an LLM agent gets for `req`.
pub fn system_prompt(req: &AgentRequest) -> String {
    match req.action {
        AgentAction::Select => "You are the ARCHITECT of a council of software agents. Choose \
             the best of the candidate proposals for the task. End your answer with one line of \
             JSON: {\"winner\": \"<member of the chosen candidate>\", \"rationale\": \"<why>\"}."
            .to_owned(),
        AgentAction::Subtask => format!(
            "You are a {} agent of a software engineering fleet. Carry out the task you are \
             given and answer with the result.",
            req.role
        ),
        _ => format!(
            "You are a {} agent in a council of software agents deliberating on a task \
             (round {} of {}). Answer with your proposal. You may end with one line of JSON \
             reporting checks you ran and your confidence: {{\"checks\": {{\"policy\": \
             {{\"passed\": true}}, \"lint\": {{\"passed\": true, \"score\": 0.9}}}}, \
             \"self_score\": 0.8}}.",
            req.role,
            req.round.max(1),
            req.rounds.max(1)
        ),
    }
}

/// The task as an LLM agent reads it.
pub fn user_prompt(req: &AgentRequest) -> String {
    let mut out = format!("Task: {}\n", req.description);
    if !req.requirements.is_empty() {
        out.push_str("\nRequirements:\n");
        for r in &req.requirements {
            out.push_str(&format!("- {r}\n"));
        }
    }
    if !req.rubric.description.is_empty() {
        out.push_str(&format!(
            "\nWhat a good answer looks like: {}\n",
            req.rubric.description
        ));
    }
    if !req.context.is_empty() {
        out.push_str(&format!("\nContext:\n{}\n", req.context));
    }
    if !req.dependencies.is_empty() {
        out.push_str(&format!(
            "\nDepends on tasks: {}\n",
            req.dependencies.join(", ")
        ));
    }
    match req.action {
        AgentAction::Review if !req.peers.is_empty() => {
            out.push_str("\nYour peers proposed (revise your proposal in their light):\n");
            for p in &req.peers {
                out.push_str(&format!("\n### {}\n{}\n", p.member, p.content));
            }
        }
        AgentAction::Select => {
            out.push_str("\nCandidates:\n");
            for p in &req.peers {
                out.push_str(&format!(
                    "\n### {} (rank {}, score {:.2})\n{}\n",
                    p.member, p.rank, p.score, p.content
                ));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::envelope::PeerProposal;

    #[test]
    fn a_trailing_json_line_carries_checks() {
        let a = parse_proposal(
            "Use JWT.\nRotate keys.\n{\"checks\": {\"policy\": {\"passed\": false}}, \"self_score\": 0.5}\n",
        );
        assert_eq!(a.content, "Use JWT.\nRotate keys.");
        assert!(a.checks.policy_failed());
        assert_eq!(a.self_score, Some(0.5));
        let plain = parse_proposal("Just text\n{not json");
        assert_eq!(plain.content, "Just text\n{not json");
        assert_eq!(plain.checks, Checks::default());
    }

    #[test]
    fn selections_come_from_json_or_the_first_named_candidate() {
        let mut req = crate::agent::mock::tests::request(AgentAction::Select);
        req.peers = ["DEV-1", "DEV-2"]
            .map(|m| PeerProposal {
                member: m.into(),
                ..Default::default()
            })
            .to_vec();
        let s = parse_selection(
            "I pick\n{\"winner\": \"DEV-2\", \"rationale\": \"simpler\"}",
            &req,
        )
        .unwrap();
        assert_eq!(
            (s.winner.as_str(), s.rationale.as_str()),
            ("DEV-2", "simpler")
        );
        let s = parse_selection("DEV-2 is better than DEV-1", &req).unwrap();
        assert_eq!(s.winner, "DEV-2");
        assert!(parse_selection("no idea", &req).is_none());
    }
}
