//! Multi-agent deliberation: one task goes to a council of N agents; their proposals are
//! collected with a quorum (k of n) and a deadline, optionally revised in review rounds, scored
//! against a rubric, ranked, and a winner is chosen (by score, or by an ARCHITECT agent).
//!
//! ```text
//!  pending ─▶ generating ─▶ reviewing (rounds 2..) ─▶ scoring ─▶ (selecting) ─▶ completed
//!     │           │              │                       │             │
//!     └───────────┴──────────────┴───────────────────────┴─────────────┴──▶ timed_out | failed
//!                                                                                  | cancelled
//! ```
//!
//! `cancelled` is reached from any open state, only for a council subtask's deliberation,
//! through its planning session (`CancelTask` of the subtask, `CloseSession`): the dispatcher
//! runs [`engine::Engine::cancel_deliberation`].
//!
//! Who moves it:
//! * edge-api (`Deliberate`, `Orchestrate`, `StreamDeliberation`) creates the hash (`pending`)
//!   and sends `task.deliberate` to `fleet:tasks` ([`store::DeliberationStore::create`]). A
//!   request under an existing id attaches to it when it asks for the same thing (equal
//!   [`DeliberationSpec::fingerprint`]s) and is refused otherwise
//!   ([`engine::EngineError::SpecConflict`]); every later step follows the stored spec.
//! * the dispatcher picks the members ([`crate::council`]) and sends one `agent.request` per
//!   member: registered members on their own stream `<p>:agents:<role>:member:<id>`, pool seats
//!   (`DEV-2`, ...) on the role's shared stream `<p>:agents:<role>` ([`engine::Engine::dispatch`]).
//! * the callback-worker records each `proposal` (atomically, duplicates and stale rounds
//!   dropped); when a round is complete it sends the next review round, or scores, ranks and
//!   finishes ([`engine::Engine::on_proposal`]); its sweeper ends overdue deliberations
//!   ([`engine::Engine::expire`]): at least `quorum` proposals -> completed, fewer -> timed_out,
//!   and the members that did not answer get an `agent.cancel`.
//! * a finished deliberation writes a `deliberation.decision` to `fleet:decisions` and an
//!   `orchestrator.events` message to `fleet:outbound` (for NATS).
//!
//! Every step appends an update to `<p>:{d:<id>}:events`, in the same atomic script as the state
//! change: waiting `Deliberate` calls and `StreamDeliberation` follow that stream, so no
//! edge-api holds deliberation state and any replica can answer for any deliberation.

pub mod engine;
pub mod scoring;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use engine::{Engine, EngineConfig};
pub use scoring::{RankedProposal, rank};
pub use store::{DeliberationStore, DeliberationView, Update};

/// The council roles.
pub const ROLES: [&str; 5] = ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"];

/// The role of the agent that selects among the top proposals.
pub const ARCHITECT: &str = "ARCHITECT";

/// Most members one deliberation may ask.
pub const MAX_AGENTS: u32 = 16;
/// Most rounds one deliberation may run (round 1 + review rounds).
pub const MAX_ROUNDS: u32 = 5;
/// Most candidates an architect chooses among.
pub const MAX_ARCHITECT_TOP_K: u32 = 10;
/// Largest task description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
/// Most requirements per deliberation, and the largest one in bytes.
pub const MAX_REQUIREMENTS: usize = 64;
pub const MAX_REQUIREMENT_BYTES: usize = 4096;
/// Most rubric weights and metadata entries.
pub const MAX_MAP_ENTRIES: usize = 64;
/// Largest rubric description, and largest metadata value, in bytes. Both are copied into
/// every request of every member and round, so they stay small; the task itself belongs in the
/// description.
pub const MAX_RUBRIC_DESCRIPTION_BYTES: usize = 4096;
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Longest deliberation deadline, in ms (1 hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// The canonical name of a role (`dev` -> `DEV`), or `None` when it is not one.
pub fn parse_role(s: &str) -> Option<&'static str> {
    ROLES.into_iter().find(|r| r.eq_ignore_ascii_case(s.trim()))
}

/// Where a deliberation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Generating,
    Reviewing,
    Scoring,
    Selecting,
    Completed,
    Failed,
    TimedOut,
    /// Cancelled through its planning session; the reason is its error.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::Generating,
        Status::Reviewing,
        Status::Scoring,
        Status::Selecting,
        Status::Completed,
        Status::Failed,
        Status::TimedOut,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Generating => "generating",
            Status::Reviewing => "reviewing",
            Status::Scoring => "scoring",
            Status::Selecting => "selecting",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// What cancelling a deliberation in this state answers (REST and gRPC alike): `cancelling`
    /// while it runs, else its final status.
    pub fn cancel_answer(self) -> &'static str {
        if self.is_terminal() {
            self.as_str()
        } else {
            "cancelling"
        }
    }

    /// Nothing moves a deliberation out of a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::TimedOut | Status::Cancelled
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names of the built-in checks.
pub mod check {
    pub const POLICY: &str = "policy";
    pub const LINT: &str = "lint";
    pub const DRY_RUN: &str = "dry_run";
}

/// How proposals are scored: a weight per check name and one for the agent's own score.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rubric {
    /// What a good answer looks like, for the agents.
    #[serde(default)]
    pub description: String,
    /// Weight per check name (`policy`, `lint`, `dry_run`, or an extra check's name). Empty:
    /// [`Rubric::DEFAULT_WEIGHTS`].
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    /// Weight of the agent's self-assessed score; 0 ignores it.
    #[serde(default)]
    pub self_score_weight: f64,
}

impl Rubric {
    /// Weights used when a rubric names none.
    pub const DEFAULT_WEIGHTS: [(&'static str, f64); 3] = [
        (check::POLICY, 0.4),
        (check::LINT, 0.3),
        (check::DRY_RUN, 0.3),
    ];

    /// The weight of check `name` under this rubric (0 when it does not count).
    pub fn weight(&self, name: &str) -> f64 {
        let w = if self.weights.is_empty() {
            Self::DEFAULT_WEIGHTS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, w)| *w)
        } else {
            self.weights.get(name).copied().unwrap_or(0.0)
        };
        if w.is_finite() && w > 0.0 { w } else { 0.0 }
    }
}

/// The outcome of one check of a proposal.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub passed: bool,
    /// 0..1; `None` means 1 when passed. A failed check scores 0 whatever it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Check {
    pub fn pass(score: f64, message: impl Into<String>) -> Self {
        Self {
            passed: true,
            score: Some(score),
            message: message.into(),
        }
    }

    pub fn fail(message: impl Into<String>) -> Self {
        Self {
            passed: false,
            score: Some(0.0),
            message: message.into(),
        }
    }

    /// What the check contributes, 0..1.
    pub fn value(&self) -> f64 {
        if !self.passed {
            return 0.0;
        }
        let s = self.score.unwrap_or(1.0);
        if s.is_finite() {
            s.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// The checks a proposal reports; a check that did not run is `None` and does not count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Check>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lint: Option<Check>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<Check>,
    /// Any other check, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Check>,
}

impl Checks {
    /// Every check that ran, with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Check)> {
        [
            (check::POLICY, self.policy.as_ref()),
            (check::LINT, self.lint.as_ref()),
            (check::DRY_RUN, self.dry_run.as_ref()),
        ]
        .into_iter()
        .filter_map(|(n, c)| c.map(|c| (n, c)))
        .chain(self.extra.iter().map(|(n, c)| (n.as_str(), c)))
    }

    /// Every check that ran passed.
    pub fn all_passed(&self) -> bool {
        self.iter().all(|(_, c)| c.passed)
    }

    /// The policy check ran and failed: such a proposal ranks after every other one.
    pub fn policy_failed(&self) -> bool {
        self.policy.as_ref().is_some_and(|c| !c.passed)
    }
}

/// A council member of one deliberation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The registered agent id, or a pool seat `<ROLE>-<k>`.
    pub id: String,
    /// A registered agent (its requests go to its own stream), or a pool seat (the role's
    /// shared stream).
    pub registered: bool,
}

impl Member {
    /// The pool seat `k` (from 1) of `role`.
    pub fn seat(role: &str, k: usize) -> Member {
        Member {
            id: format!("{role}-{k}"),
            registered: false,
        }
    }

    /// The stream this member's requests go to.
    pub fn stream(&self, keys: &crate::Keys, role: &str) -> String {
        if self.registered {
            keys.agent_member(role, &self.id)
        } else {
            keys.agents(role)
        }
    }
}

/// Everything a deliberation needs, as the front door accepted it. Travels in `task.deliberate`
/// and is stored in the deliberation hash (`spec`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliberationSpec {
    /// The deliberation's id (the request's task id).
    pub deliberation_id: String,
    /// `deliberate` or `orchestrate`.
    pub kind: String,
    /// DEV, QA, ARCHITECT, DEVOPS or DATA.
    pub role: String,
    pub description: String,
    /// Members asked (n).
    pub num_agents: u32,
    /// Proposals needed at the deadline (k).
    pub quorum: u32,
    /// 1 + the number of review rounds.
    pub rounds: u32,
    /// Absolute deadline, ms since the epoch.
    pub deadline_ms: i64,
    #[serde(default)]
    pub rubric: Rubric,
    #[serde(default)]
    pub requirements: Vec<String>,
    /// Constraint metadata and custom parameters, passed to the agents.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Ask an ARCHITECT agent to choose among the top `architect_top_k` (0: the top score wins).
    #[serde(default)]
    pub architect_top_k: u32,
    #[serde(default)]
    pub case_id: String,
    #[serde(default)]
    pub story_id: String,
    #[serde(default)]
    pub plan_id: String,
    pub created_ms: i64,
}

/// The kinds of deliberation, for metrics and latency statistics.
pub mod kind {
    pub const DELIBERATE: &str = "deliberate";
    pub const ORCHESTRATE: &str = "orchestrate";
}

/// Why a spec is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl DeliberationSpec {
    /// Checks every bound; the message says what is wrong, for an INVALID_ARGUMENT answer.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let bad = |m: String| Err(InvalidSpec(m));
        if !crate::agent::valid_name(&self.deliberation_id) {
            return bad(format!("task_id must be {}", crate::agent::ID_RULE));
        }
        if parse_role(&self.role) != Some(self.role.as_str()) {
            return bad(format!(
                "role `{}` is not one of {}",
                self.role.chars().take(32).collect::<String>(),
                ROLES.join(", ")
            ));
        }
        if self.description.trim().is_empty() {
            return bad("task_description must not be empty".into());
        }
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return bad(format!(
                "task_description is {} bytes; the limit is {MAX_DESCRIPTION_BYTES}",
                self.description.len()
            ));
        }
        if !(1..=MAX_AGENTS).contains(&self.num_agents) {
            return bad(format!(
                "num_agents must be between 1 and {MAX_AGENTS} (it is {})",
                self.num_agents
            ));
        }
        if !(1..=self.num_agents).contains(&self.quorum) {
            return bad(format!(
                "min_proposals must be between 1 and num_agents ({}); it is {}",
                self.num_agents, self.quorum
            ));
        }
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return bad(format!(
                "rounds must be between 1 and {MAX_ROUNDS} (it is {})",
                self.rounds
            ));
        }
        if self.requirements.len() > MAX_REQUIREMENTS {
            return bad(format!("at most {MAX_REQUIREMENTS} requirements"));
        }
        if self
            .requirements
            .iter()
            .any(|r| r.len() > MAX_REQUIREMENT_BYTES)
        {
            return bad(format!(
                "each requirement must be at most {MAX_REQUIREMENT_BYTES} bytes"
            ));
        }
        if self.metadata.len() > MAX_MAP_ENTRIES || self.rubric.weights.len() > MAX_MAP_ENTRIES {
            return bad(format!(
                "at most {MAX_MAP_ENTRIES} metadata entries and rubric weights"
            ));
        }
        validate_metadata("metadata", &self.metadata)?;
        if self.rubric.description.len() > MAX_RUBRIC_DESCRIPTION_BYTES {
            return bad(format!(
                "rubric description is {} bytes; the limit is {MAX_RUBRIC_DESCRIPTION_BYTES}",
                self.rubric.description.len()
            ));
        }
        for (name, w) in &self.rubric.weights {
            if !crate::agent::valid_name(name) {
                return bad(format!("rubric weight name `{name}` is not a valid name"));
            }
            if !w.is_finite() || *w < 0.0 {
                return bad(format!(
                    "rubric weight `{name}` must be a finite number >= 0"
                ));
            }
        }
        let sw = self.rubric.self_score_weight;
        if !sw.is_finite() || sw < 0.0 {
            return bad("rubric self_score_weight must be a finite number >= 0".into());
        }
        // Weights that are all 0 count nothing: every proposal would score 0, and the author id
        // alone would choose the winner.
        if !self.rubric.weights.is_empty()
            && self.rubric.weights.values().all(|w| *w == 0.0)
            && sw == 0.0
        {
            return bad(
                "rubric weights are all 0 (and self_score_weight is 0): no proposal could score; give a check a weight > 0, or no weights for the defaults"
                    .into(),
            );
        }
        if self.architect_top_k == 1 || self.architect_top_k > MAX_ARCHITECT_TOP_K {
            return bad(format!(
                "architect_top_k must be between 2 and {MAX_ARCHITECT_TOP_K}"
            ));
        }
        for (what, id) in [
            ("case_id", &self.case_id),
            ("story_id", &self.story_id),
            ("plan_id", &self.plan_id),
        ] {
            if !id.is_empty() && !crate::agent::valid_name(id) {
                return bad(format!("{what} must be {}", crate::agent::ID_RULE));
            }
        }
        if self.deadline_ms <= self.created_ms {
            return bad("the deadline must be after the start".into());
        }
        Ok(())
    }

    /// The default quorum of `n` members: a majority.
    pub fn majority(n: u32) -> u32 {
        n / 2 + 1
    }

    /// A fingerprint of what this spec asks for: the SHA-256 (hex) of its canonical encoding.
    /// Two requests for one deliberation id are the same request (a retry) exactly when their
    /// fingerprints are equal; it is stored with the deliberation (`spec_fp`) and compared by
    /// the create script.
    ///
    /// Every field counts except those that legitimately differ between retries of one request:
    /// the id (the key itself), `created_ms`, and the absolute `deadline_ms`, which counts as the
    /// timeout it was made from (`deadline_ms - created_ms`). Deterministic across processes and
    /// versions: a field added to the spec must leave the encoding of specs that do not use it
    /// unchanged (skip it when it has its default), or a retry across an upgrade would conflict.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Canonical<'a> {
            v: u32,
            kind: &'a str,
            role: &'a str,
            description: &'a str,
            num_agents: u32,
            quorum: u32,
            rounds: u32,
            timeout_ms: i64,
            rubric_description: &'a str,
            rubric_weights: Vec<(&'a str, f64)>,
            self_score_weight: f64,
            requirements: &'a [String],
            metadata: &'a BTreeMap<String, String>,
            architect_top_k: u32,
            case_id: &'a str,
            story_id: &'a str,
            plan_id: &'a str,
        }
        // -0.0 and 0.0 weigh the same; `+ 0.0` makes them encode the same too.
        let canonical = Canonical {
            v: 1,
            kind: &self.kind,
            role: &self.role,
            description: &self.description,
            num_agents: self.num_agents,
            quorum: self.quorum,
            rounds: self.rounds,
            timeout_ms: self.deadline_ms.saturating_sub(self.created_ms),
            rubric_description: &self.rubric.description,
            rubric_weights: self
                .rubric
                .weights
                .iter()
                .map(|(k, w)| (k.as_str(), w + 0.0))
                .collect(),
            self_score_weight: self.rubric.self_score_weight + 0.0,
            requirements: &self.requirements,
            metadata: &self.metadata,
            architect_top_k: self.architect_top_k,
            case_id: &self.case_id,
            story_id: &self.story_id,
            plan_id: &self.plan_id,
        };
        let bytes = serde_json::to_vec(&canonical).expect("a spec always serializes");
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Checks the entries of a key/value map passed to the agents (`field` names it in the message):
/// names as ids are ([`crate::agent::ID_RULE`]), values at most
/// [`MAX_METADATA_VALUE_BYTES`]. Front doors that merge several maps into
/// [`DeliberationSpec::metadata`] check each first, so the message names the one at fault.
pub fn validate_metadata<'a>(
    field: &str,
    entries: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), InvalidSpec> {
    for (k, v) in entries {
        if !crate::agent::valid_name(k) {
            return Err(InvalidSpec(format!(
                "{field} key `{}` must be {}",
                crate::agent::excerpt(k),
                crate::agent::ID_RULE
            )));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(InvalidSpec(format!(
                "{field} value of `{k}` is {} bytes; the limit is {MAX_METADATA_VALUE_BYTES}",
                v.len()
            )));
        }
    }
    Ok(())
}

/// One proposal as the callback-worker stores it (`<p>:{d:<id>}:proposals`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub member: String,
    /// Which process answered.
    #[serde(default)]
    pub agent_id: String,
    pub round: u32,
    pub content: String,
    #[serde(default)]
    pub checks: Checks,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_score: Option<f64>,
    #[serde(default)]
    pub received_ms: i64,
}

impl Proposal {
    /// `<deliberation>:<round>:<member>`.
    pub fn id(&self, deliberation_id: &str) -> String {
        format!("{deliberation_id}:{}:{}", self.round, self.member)
    }
}

/// Which proposals count: each member's newest one (a revision replaces its earlier rounds).
pub fn latest_per_member(proposals: Vec<Proposal>) -> Vec<Proposal> {
    let mut by_member: BTreeMap<String, Proposal> = BTreeMap::new();
    for p in proposals {
        match by_member.get(&p.member) {
            Some(have) if have.round >= p.round => {}
            _ => {
                by_member.insert(p.member.clone(), p);
            }
        }
    }
    by_member.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> DeliberationSpec {
        DeliberationSpec {
            deliberation_id: "d-1".into(),
            kind: kind::DELIBERATE.into(),
            role: "DEV".into(),
            description: "Implement auth".into(),
            num_agents: 3,
            quorum: 2,
            rounds: 1,
            deadline_ms: 2_000,
            created_ms: 1_000,
            ..Default::default()
        }
    }

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!(parse_role("dev"), Some("DEV"));
        assert_eq!(parse_role(" DevOps "), Some("DEVOPS"));
        assert_eq!(parse_role("CEO"), None);
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert!(Status::TimedOut.is_terminal() && !Status::Selecting.is_terminal());
        assert!(Status::Cancelled.is_terminal());
    }

    #[test]
    fn specs_are_validated_with_clear_messages() {
        assert_eq!(spec().validate(), Ok(()));
        type Change = Box<dyn Fn(&mut DeliberationSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|s| s.description = "  ".into()),
                "must not be empty",
            ),
            (Box::new(|s| s.role = "CEO".into()), "is not one of"),
            (Box::new(|s| s.num_agents = 0), "num_agents"),
            (Box::new(|s| s.num_agents = 10_000), "num_agents"),
            (Box::new(|s| s.rounds = 9), "rounds"),
            (Box::new(|s| s.quorum = 4), "min_proposals"),
            (Box::new(|s| s.deliberation_id = "a b".into()), "task_id"),
            (
                Box::new(|s| {
                    s.rubric.weights.insert("lint".into(), f64::NAN);
                }),
                "finite",
            ),
            (
                Box::new(|s| {
                    s.rubric.weights.insert("policy".into(), 0.0);
                    s.rubric.weights.insert("lint".into(), -0.0);
                }),
                "rubric weights are all 0",
            ),
            (Box::new(|s| s.architect_top_k = 1), "architect_top_k"),
            (Box::new(|s| s.case_id = "x/y".into()), "case_id"),
            (
                Box::new(|s| s.rubric.description = "r".repeat(4097)),
                "rubric description is 4097 bytes; the limit is 4096",
            ),
            (
                Box::new(|s| {
                    s.metadata.insert("has space".into(), "v".into());
                }),
                "metadata key `has space` must be 1-128 characters",
            ),
            (
                Box::new(|s| {
                    s.metadata.insert(String::new(), "v".into());
                }),
                "metadata key `` must be",
            ),
            (
                Box::new(|s| {
                    s.metadata.insert("k".repeat(129), "v".into());
                }),
                "metadata key",
            ),
            (
                Box::new(|s| {
                    s.metadata.insert("notes".into(), "v".repeat(4097));
                }),
                "metadata value of `notes` is 4097 bytes; the limit is 4096",
            ),
        ];
        for (change, want) in cases {
            let mut s = spec();
            change(&mut s);
            let err = s.validate().unwrap_err().0;
            assert!(err.contains(want), "{err} should mention {want}");
        }
        // Some weight > 0, or a weighed self-score, is something to score by.
        let mut s = spec();
        s.rubric.weights.insert("policy".into(), 0.0);
        s.rubric.weights.insert("security".into(), 1.0);
        assert_eq!(s.validate(), Ok(()));
        let mut s = spec();
        s.rubric.weights.insert("policy".into(), 0.0);
        s.rubric.self_score_weight = 1.0;
        assert_eq!(s.validate(), Ok(()));
        // At the limits is fine.
        let mut s = spec();
        s.rubric.description = "r".repeat(MAX_RUBRIC_DESCRIPTION_BYTES);
        s.metadata
            .insert("k".repeat(128), "v".repeat(MAX_METADATA_VALUE_BYTES));
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn the_fingerprint_ignores_timestamps_and_nothing_else() {
        let base = spec();
        let fp = base.fingerprint();
        // Pinned: fingerprints are stored, so a change of the encoding would make every retry
        // across an upgrade a conflict.
        assert_eq!(
            fp,
            "87593723889642e63f976c46ea3869276d8b6b500c1357047d186960287e3f4b"
        );
        // A retry made later: the same timeout from another start.
        let mut retry = base.clone();
        retry.created_ms += 5_000;
        retry.deadline_ms += 5_000;
        assert_eq!(retry.fingerprint(), fp);
        // A weight of -0.0 is the weight 0.0.
        let (mut zero, mut negative_zero) = (base.clone(), base.clone());
        zero.rubric.weights.insert("lint".into(), 0.0);
        negative_zero.rubric.weights.insert("lint".into(), -0.0);
        assert_eq!(zero.fingerprint(), negative_zero.fingerprint());
        // Any other field is another request.
        type Change = Box<dyn Fn(&mut DeliberationSpec)>;
        let changes: Vec<(&str, Change)> = vec![
            ("kind", Box::new(|s| s.kind = kind::ORCHESTRATE.into())),
            ("role", Box::new(|s| s.role = "QA".into())),
            ("description", Box::new(|s| s.description.push('!'))),
            ("num_agents", Box::new(|s| s.num_agents = 4)),
            ("quorum", Box::new(|s| s.quorum = 3)),
            ("rounds", Box::new(|s| s.rounds = 2)),
            ("timeout", Box::new(|s| s.deadline_ms += 1)),
            (
                "rubric description",
                Box::new(|s| s.rubric.description = "short".into()),
            ),
            (
                "rubric weights",
                Box::new(|s| {
                    s.rubric.weights.insert("lint".into(), 1.0);
                }),
            ),
            (
                "self_score_weight",
                Box::new(|s| s.rubric.self_score_weight = 0.5),
            ),
            (
                "requirements",
                Box::new(|s| s.requirements = vec!["fast".into()]),
            ),
            (
                "metadata",
                Box::new(|s| {
                    s.metadata.insert("lang".into(), "rust".into());
                }),
            ),
            ("architect_top_k", Box::new(|s| s.architect_top_k = 2)),
            ("case_id", Box::new(|s| s.case_id = "US-2".into())),
            ("story_id", Box::new(|s| s.story_id = "S-2".into())),
            ("plan_id", Box::new(|s| s.plan_id = "P-2".into())),
        ];
        let mut seen = std::collections::BTreeSet::from([fp.clone()]);
        for (what, change) in changes {
            let mut s = base.clone();
            change(&mut s);
            assert!(
                seen.insert(s.fingerprint()),
                "{what} changes the fingerprint"
            );
        }
        // Requirements in another order are another request (the agents see them in order).
        let (mut ab, mut ba) = (base.clone(), base);
        ab.requirements = vec!["a".into(), "b".into()];
        ba.requirements = vec!["b".into(), "a".into()];
        assert_ne!(ab.fingerprint(), ba.fingerprint());
    }

    #[test]
    fn the_newest_round_of_each_member_counts() {
        let p = |m: &str, r: u32| Proposal {
            member: m.into(),
            round: r,
            content: format!("{m}{r}"),
            ..Default::default()
        };
        let latest = latest_per_member(vec![p("a", 1), p("b", 1), p("a", 2)]);
        let names: Vec<String> = latest.iter().map(|p| p.content.clone()).collect();
        assert_eq!(names, ["a2", "b1"]);
    }

    #[test]
    fn rubric_weights_default_and_ignore_bad_values() {
        let r = Rubric::default();
        assert_eq!(r.weight("policy"), 0.4);
        assert_eq!(r.weight("security"), 0.0);
        let mut r = Rubric::default();
        r.weights.insert("security".into(), 2.0);
        r.weights.insert("lint".into(), -1.0);
        assert_eq!(r.weight("security"), 2.0);
        assert_eq!(r.weight("lint"), 0.0);
        assert_eq!(r.weight("policy"), 0.0);
    }
}
