//! Planning events -> atomic subtasks.
//!
//! A `planning.event` (from NATS `agile.events` through nats-bridge, or gRPC
//! `ProcessPlanningEvent`) says a case moved from one state to another. The rule of the target
//! state (config: [`PlanningRules`], from `FLEET_PLANNING_RULES` or [`PlanningRules::builtin`])
//! lists the subtasks it calls for: a role, an action, a description, dependencies on other
//! actions of the same rule, a priority.
//!
//! * Each subtask's id is deterministic: UUIDv5 of `case_id/plan_id/to_state/role/action/
//!   transition` ([`subtask_id`]), where `transition` identifies the transition the event
//!   reports ([`transition_id`]). It is created as a task of the case's planning session
//!   `plan-<case_id>` (session type `planning`, created on first use), so REST
//!   `GET /api/v1/chat/{sid}/tasks/{tid}`, gRPC `StreamSessionEvents` and the deadline sweeper
//!   work on subtasks unchanged.
//! * The task itself is the "derived" record: creating an existing task id is refused, so a
//!   copy of an event derives nothing twice, and the `queued -> dispatched` compare-and-set sends
//!   each subtask to agents once (a redelivered command re-sends what an earlier delivery
//!   dispatched, as for chat tasks).
//! * **Which events are the same transition.** Copies of one transition must get the same ids,
//!   a later transition into the same state (rework: BUILD -> TEST -> BUILD) new ones. Copies
//!   come from a NATS redelivery (same message, same `event_id`), a publisher retrying the
//!   publish (without a `Nats-Msg-Id` the bridge gives it a new `event_id`,
//!   `<stream>:<sequence>:<stored at>`, but the payload, its `timestamp` included, is the same),
//!   or a gRPC retry (the same request). So the transition is keyed by the event's content with
//!   its `timestamp`, the Planning service's time of the transition, when it has one, and by its
//!   `event_id` only when it has none. Before, the ids left the transition out, so a case
//!   re-entering a state derived the ids of its first entry and got no new work while those
//!   tasks lived (the session's TTL, sliding). A publisher should therefore stamp each
//!   transition with a time fine enough to tell a case's transitions apart (two events with the
//!   same type, states and timestamp are one transition), or, without a timestamp, give each
//!   its own `Nats-Msg-Id` / gRPC `event_id` and repeat it on retries. How long copies are
//!   recognised is unchanged: while the first copy's tasks (or deliberations) exist.
//! * A `DeriveSubtasks` preview has no transition yet: its ids are those of the preview itself
//!   (stable for the same request), not those an event will create; `ProcessPlanningEvent`
//!   answers the event's own ids.
//! * Dependencies name the ids of the same transition, so a rework's QA `test` depends on the
//!   rework's DEV `implement`, never on the first entry's.
//! * A subtask goes to `fleet:agents:<role>` as an `agent.request` (action `subtask`) and to NATS
//!   `agent.requests` through `fleet:outbound` ([`AgentRequestPayload`]). Answers come back as
//!   ordinary callbacks (`result` / `error`, `seq` 0 from NATS-side runners).
//! * A subtask whose rule sets `council = N` runs instead as a **deliberation** of N members of
//!   its role (an async deliberation, queryable with `GetDeliberationResult` under the subtask
//!   id); creating it is idempotent too, and a re-entry into the state starts a new one. The
//!   built-in DESIGN rule does this for the architecture.
//! * When a subtask ends (its runner's answer, its deadline, a cancel or its session's close,
//!   or, for a council subtask, its deliberation's end), the binary that ended it tells the
//!   Planning service, when one is configured ([`notifier`]).
//!
//! Rules file (TOML; YAML with the same shape from `.yaml` / `.yml`):
//!
//! ```toml
//! [[rules]]
//! to_state = "BUILD"
//! [[rules.subtasks]]
//! role = "DEV"
//! action = "implement"
//! description = "Implement {case_id} ({plan_id})"
//! priority = 1
//! [[rules.subtasks]]
//! role = "QA"
//! action = "test"
//! description = "Test {case_id}"
//! depends_on = ["implement"]
//! priority = 2
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::PlanningEvent;
use crate::keys::Keys;
use crate::time::now_ms;

pub mod notifier;

/// Namespace of subtask ids (UUIDv5).
pub const SUBTASK_NAMESPACE: Uuid = Uuid::from_u128(0x3c0e_27b1_5d84_4f0a_8e61_94d2_7b3a_c515);

/// Session type of planning sessions.
pub const SESSION_TYPE: &str = "planning";

/// The target state a rule applies to when a preview names none.
pub const DEFAULT_STRATEGY: &str = "BUILD";

/// Deadline of a subtask whose rule sets none, seconds.
pub const DEFAULT_SUBTASK_TIMEOUT_SECS: u64 = 3600;

/// The pool name subtasks of `role` are dispatched under: cancels and deadlines reach the
/// role's agents on `fleet:exec:agents.<role>:control`.
pub fn subtask_pool(role: &str) -> String {
    format!("agents.{role}")
}

/// Session ids of planning sessions start with this ([`session_id`]).
pub const SESSION_PREFIX: &str = "plan-";

/// The planning session of a case.
pub fn session_id(case_id: &str) -> String {
    format!("{SESSION_PREFIX}{case_id}")
}

/// The deterministic id of a subtask: UUIDv5 of `case_id/plan_id/TO_STATE/role/action/transition`,
/// where `transition` is the [`transition_id`] of the event that derived it.
pub fn subtask_id(
    case_id: &str,
    plan_id: &str,
    to_state: &str,
    role: &str,
    action: &str,
    transition: &str,
) -> String {
    let name = format!(
        "{case_id}/{plan_id}/{}/{role}/{action}/{transition}",
        to_state.to_ascii_uppercase()
    );
    Uuid::new_v5(&SUBTASK_NAMESPACE, name.as_bytes()).to_string()
}

/// The identity of the transition `event` reports (a UUIDv5): the same for every copy of one
/// transition, different for a later transition of the case into the same state. The subtask
/// ids of the event are derived from it ([`subtask_id`]).
///
/// * With a `timestamp` (the Planning service's time of the transition): the transition's
///   content, `EVENT_TYPE/case_id/plan_id/FROM_STATE/TO_STATE/timestamp` (types and states
///   upper-cased, the timestamp trimmed). `event_id` is left out on purpose: a publisher that
///   retries a publish without a `Nats-Msg-Id` gets a new `<stream>:<sequence>:<stored at>`
///   from nats-bridge, yet repeats the timestamp; a rework (BUILD -> TEST -> BUILD) is a new
///   transition with a new time. `metadata` is left out too (a retry may rewrite it).
/// * Without one: the `event_id`, the only thing that tells two such events apart (a NATS
///   redelivery keeps it; gRPC callers resend it, or leave it empty for [`event_id_of`]).
/// * With neither: the content, as with a timestamp.
pub fn transition_id(event: &PlanningEvent) -> String {
    let timestamp = event.timestamp.trim();
    let name = if timestamp.is_empty() && !event.event_id.is_empty() {
        format!("transition/event/{}", event.event_id)
    } else {
        format!(
            "transition/at/{}/{}/{}/{}/{}/{timestamp}",
            event.event_type.trim().to_ascii_uppercase(),
            event.case_id,
            event.plan_id,
            event.from_state.trim().to_ascii_uppercase(),
            event.to_state.trim().to_ascii_uppercase(),
        )
    };
    Uuid::new_v5(&SUBTASK_NAMESPACE, name.as_bytes()).to_string()
}

/// The longest deadline a rule may give a subtask, seconds (30 days).
pub const MAX_SUBTASK_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// A cycle among the `depends_on` of `rule`'s subtasks, as the actions along it (the first
/// repeated at the end), if there is one.
fn dependency_cycle(rule: &TransitionRule) -> Option<Vec<String>> {
    // Depth-first; 1 = on the current path, 2 = done.
    fn visit<'a>(
        rule: &'a TransitionRule,
        action: &'a str,
        mark: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(action) {
            Some(2) => return None,
            Some(_) => {
                let from = path.iter().position(|a| *a == action).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|a| (*a).to_owned()).collect();
                cycle.push(action.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        mark.insert(action, 1);
        path.push(action);
        let deps = rule
            .subtasks
            .iter()
            .find(|s| s.action == action)
            .map_or(&[][..], |s| &s.depends_on[..]);
        for d in deps {
            if let Some(cycle) = visit(rule, d, mark, path) {
                return Some(cycle);
            }
        }
        path.pop();
        mark.insert(action, 2);
        None
    }
    let mut mark = BTreeMap::new();
    rule.subtasks
        .iter()
        .find_map(|s| visit(rule, &s.action, &mut mark, &mut Vec::new()))
}

/// One subtask of a rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// A misspelt field (`dependencies` for `depends_on`, `timeout` for `timeout_secs`) is an
// error, not a rule that silently lacks it.
#[serde(deny_unknown_fields)]
pub struct SubtaskRule {
    pub role: String,
    pub action: String,
    /// `{case_id}`, `{plan_id}`, `{from_state}`, `{to_state}` and `{event_type}` are filled in.
    pub description: String,
    /// Actions of the same rule this one depends on.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// 1 = highest.
    #[serde(default = "one")]
    pub priority: u32,
    /// Requirements passed to the agent.
    #[serde(default)]
    pub requirements: Vec<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Run as a deliberation of this many members of the role (0: one agent, a plain task).
    #[serde(default)]
    pub council: u32,
}

fn one() -> u32 {
    1
}

/// The subtasks a transition to `to_state` calls for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionRule {
    pub to_state: String,
    pub subtasks: Vec<SubtaskRule>,
}

/// Why a rules file is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    #[error("cannot read planning rules `{path}`: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

/// Every transition rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanningRules {
    pub rules: Vec<TransitionRule>,
}

fn sub(
    role: &str,
    action: &str,
    description: &str,
    depends_on: &[&str],
    priority: u32,
) -> SubtaskRule {
    SubtaskRule {
        role: role.into(),
        action: action.into(),
        description: description.into(),
        depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
        priority,
        requirements: Vec::new(),
        timeout_secs: None,
        council: 0,
    }
}

fn council(mut s: SubtaskRule, members: u32) -> SubtaskRule {
    s.council = members;
    s
}

/// The built-in rules.
pub static BUILTIN: LazyLock<PlanningRules> = LazyLock::new(|| PlanningRules {
    rules: vec![
        TransitionRule {
            to_state: "DESIGN".into(),
            subtasks: vec![
                council(
                    sub(
                        "ARCHITECT",
                        "design",
                        "Design the solution for {case_id}: components, interfaces and risks",
                        &[],
                        1,
                    ),
                    3,
                ),
                sub(
                    "DATA",
                    "data-model",
                    "Model the data {case_id} needs",
                    &["design"],
                    2,
                ),
            ],
        },
        TransitionRule {
            to_state: "BUILD".into(),
            subtasks: vec![
                sub(
                    "DEV",
                    "implement",
                    "Implement {case_id} as planned in {plan_id}",
                    &[],
                    1,
                ),
                sub(
                    "QA",
                    "test",
                    "Write and run the tests of {case_id}",
                    &["implement"],
                    2,
                ),
                sub(
                    "DEVOPS",
                    "deploy",
                    "Set up the deployment of {case_id}",
                    &[],
                    3,
                ),
            ],
        },
        TransitionRule {
            to_state: "TEST".into(),
            subtasks: vec![
                sub(
                    "DEVOPS",
                    "test-environment",
                    "Prepare a test environment for {case_id}",
                    &[],
                    1,
                ),
                sub(
                    "QA",
                    "verify",
                    "Verify {case_id} against its acceptance criteria",
                    &["test-environment"],
                    1,
                ),
            ],
        },
        TransitionRule {
            to_state: "DEPLOY".into(),
            subtasks: vec![
                sub(
                    "DEVOPS",
                    "release",
                    "Release {case_id} to production",
                    &[],
                    1,
                ),
                sub(
                    "QA",
                    "smoke-test",
                    "Smoke-test {case_id} in production",
                    &["release"],
                    2,
                ),
            ],
        },
    ],
});

impl PlanningRules {
    pub fn builtin() -> PlanningRules {
        BUILTIN.clone()
    }

    /// Loads a rules file (TOML, or YAML by extension) and checks it.
    pub fn load(path: &Path) -> Result<PlanningRules, PlanningError> {
        let file_err = |reason: String| PlanningError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let rules: PlanningRules = if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| file_err(e.to_string()))?
        };
        rules.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(rules)
    }

    /// The built-in rules, or those of `path` when given.
    pub fn from_file(path: Option<&Path>) -> Result<PlanningRules, PlanningError> {
        match path {
            Some(p) => Self::load(p),
            None => Ok(Self::builtin()),
        }
    }

    /// Target states are given and have one rule each; roles are known, actions are names and
    /// unique per rule, dependencies exist and form no cycle, timeouts are 1 s to
    /// [`MAX_SUBTASK_TIMEOUT_SECS`].
    pub fn validate(&self) -> Result<(), PlanningError> {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.to_state.trim().is_empty() {
                return Err(PlanningError::Invalid(format!(
                    "rule {}: to_state is empty",
                    i + 1
                )));
            }
            // Only the first rule of a state would ever apply.
            if self.rules[..i]
                .iter()
                .any(|r| r.to_state.trim().eq_ignore_ascii_case(rule.to_state.trim()))
            {
                return Err(PlanningError::Invalid(format!(
                    "rule {}: a rule for this to_state appears twice",
                    rule.to_state
                )));
            }
            for s in &rule.subtasks {
                if crate::deliberation::parse_role(&s.role) != Some(s.role.as_str()) {
                    return Err(PlanningError::Invalid(format!(
                        "rule {}: role `{}` is not one of {}",
                        rule.to_state,
                        s.role,
                        crate::deliberation::ROLES.join(", ")
                    )));
                }
                if s.council > crate::deliberation::MAX_AGENTS {
                    return Err(PlanningError::Invalid(format!(
                        "rule {}: `{}` asks a council of {} (at most {})",
                        rule.to_state,
                        s.action,
                        s.council,
                        crate::deliberation::MAX_AGENTS
                    )));
                }
                if !crate::agent::valid_name(&s.action) {
                    return Err(PlanningError::Invalid(format!(
                        "rule {}: action `{}` is not a valid name",
                        rule.to_state, s.action
                    )));
                }
                if rule
                    .subtasks
                    .iter()
                    .filter(|o| o.action == s.action)
                    .count()
                    > 1
                {
                    return Err(PlanningError::Invalid(format!(
                        "rule {}: action `{}` appears twice",
                        rule.to_state, s.action
                    )));
                }
                for d in &s.depends_on {
                    if !rule.subtasks.iter().any(|o| &o.action == d) {
                        return Err(PlanningError::Invalid(format!(
                            "rule {}: `{}` depends on unknown action `{d}`",
                            rule.to_state, s.action
                        )));
                    }
                }
                if let Some(t) = s.timeout_secs
                    && !(1..=MAX_SUBTASK_TIMEOUT_SECS).contains(&t)
                {
                    return Err(PlanningError::Invalid(format!(
                        "rule {}: `{}` has timeout_secs {t} (1 to {MAX_SUBTASK_TIMEOUT_SECS})",
                        rule.to_state, s.action
                    )));
                }
            }
            if let Some(cycle) = dependency_cycle(rule) {
                return Err(PlanningError::Invalid(format!(
                    "rule {}: dependencies form a cycle ({}): none of its subtasks could start",
                    rule.to_state,
                    cycle.join(" -> ")
                )));
            }
        }
        Ok(())
    }

    /// The rule of `to_state` (case-insensitive).
    pub fn rule(&self, to_state: &str) -> Option<&TransitionRule> {
        self.rules
            .iter()
            .find(|r| r.to_state.eq_ignore_ascii_case(to_state.trim()))
    }

    /// The subtasks `event` calls for (none when no rule matches its target state, or for a
    /// `DELETED` event), limited to `roles` when not empty, each with `extra` requirements
    /// appended.
    pub fn derive(&self, event: &PlanningEvent, roles: &[&str], extra: &[String]) -> Vec<Subtask> {
        // A deleted case calls for no work, whatever state the event names.
        if event.event_type.trim().eq_ignore_ascii_case("DELETED") {
            return Vec::new();
        }
        let Some(rule) = self.rule(&event.to_state) else {
            return Vec::new();
        };
        let to_state = rule.to_state.to_ascii_uppercase();
        let transition = transition_id(event);
        let id_of = |role: &str, action: &str| {
            subtask_id(
                &event.case_id,
                &event.plan_id,
                &to_state,
                role,
                action,
                &transition,
            )
        };
        let fill = |t: &str| {
            t.replace("{case_id}", &event.case_id)
                .replace("{plan_id}", &event.plan_id)
                .replace("{from_state}", &event.from_state)
                .replace("{to_state}", &to_state)
                .replace("{event_type}", &event.event_type)
        };
        rule.subtasks
            .iter()
            .filter(|s| roles.is_empty() || roles.contains(&s.role.as_str()))
            .map(|s| Subtask {
                task_id: id_of(&s.role, &s.action),
                role: s.role.clone(),
                action: s.action.clone(),
                description: fill(&s.description),
                dependencies: s
                    .depends_on
                    .iter()
                    .filter_map(|d| rule.subtasks.iter().find(|o| &o.action == d))
                    .map(|o| id_of(&o.role, &o.action))
                    .collect(),
                constraints: s.requirements.iter().chain(extra).cloned().collect(),
                priority: s.priority,
                session_id: session_id(&event.case_id),
                timeout_secs: s.timeout_secs.unwrap_or(DEFAULT_SUBTASK_TIMEOUT_SECS),
                case_id: event.case_id.clone(),
                plan_id: event.plan_id.clone(),
                to_state: to_state.clone(),
                transition_id: transition.clone(),
                council: s.council,
            })
            .collect()
    }
}

/// One derived subtask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subtask {
    pub task_id: String,
    pub role: String,
    pub action: String,
    pub description: String,
    /// Task ids it depends on.
    pub dependencies: Vec<String>,
    pub constraints: Vec<String>,
    pub priority: u32,
    pub session_id: String,
    pub timeout_secs: u64,
    pub case_id: String,
    pub plan_id: String,
    pub to_state: String,
    /// The [`transition_id`] of the event that derived it.
    #[serde(default)]
    pub transition_id: String,
    /// Members of the deliberation it runs as (0: a plain task for one agent).
    pub council: u32,
}

impl Subtask {
    /// The deliberation this subtask runs as (when its rule asks for a council). Every copy of
    /// its transition asks for the same spec (the deliberation's fingerprint), so its metadata
    /// names the transition, not the event id, which differs between copies.
    pub fn deliberation_spec(&self, now_ms: i64) -> crate::deliberation::DeliberationSpec {
        let n = self.council.max(1);
        crate::deliberation::DeliberationSpec {
            deliberation_id: self.task_id.clone(),
            kind: crate::deliberation::kind::DELIBERATE.into(),
            role: self.role.clone(),
            description: self.description.clone(),
            num_agents: n,
            quorum: crate::deliberation::DeliberationSpec::majority(n),
            rounds: 1,
            deadline_ms: now_ms + (self.timeout_secs * 1000) as i64,
            rubric: Default::default(),
            requirements: self.constraints.clone(),
            metadata: [
                ("action", self.action.clone()),
                ("to_state", self.to_state.clone()),
                ("transition_id", self.transition_id.clone()),
                ("session_id", self.session_id.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            architect_top_k: 0,
            case_id: self.case_id.clone(),
            story_id: String::new(),
            plan_id: self.plan_id.clone(),
            created_ms: now_ms,
        }
    }
}

/// Whether `spec` is the deliberation of a council subtask ([`Subtask::deliberation_spec`]):
/// its id is the [`subtask_id`] its case, plan, target state, role, action and transition
/// give, and its session a planning session. The id check keeps out a plain deliberation whose
/// caller's metadata happens to use the same keys.
pub fn is_council_subtask(spec: &crate::deliberation::DeliberationSpec) -> bool {
    let meta = |k: &str| spec.metadata.get(k).map(String::as_str);
    let (Some(action), Some(to_state), Some(transition), Some(sid)) = (
        meta("action"),
        meta("to_state"),
        meta("transition_id"),
        meta("session_id"),
    ) else {
        return false;
    };
    sid == session_id(&spec.case_id)
        && spec.deliberation_id
            == subtask_id(
                &spec.case_id,
                &spec.plan_id,
                to_state,
                &spec.role,
                action,
                transition,
            )
}

/// The JSON published to NATS `agent.requests` for a subtask: what a NATS-side runner needs,
/// including the task and session ids its `agent.responses` answer must carry back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRequestPayload {
    pub task_id: String,
    pub session_id: String,
    pub attempt: u32,
    pub role: String,
    pub action: String,
    pub description: String,
    pub dependencies: Vec<String>,
    pub constraints: Vec<String>,
    pub priority: u32,
    /// Hydrated context ("" when none).
    pub context: String,
    pub deadline_ms: i64,
    pub case_id: String,
    pub plan_id: String,
    pub event_id: String,
}

/// Checks the ids of a planning event; the message says what is wrong.
pub fn validate_event(event: &PlanningEvent) -> Result<(), PlanningError> {
    if !crate::agent::valid_name(&event.case_id) || event.case_id.len() > 120 {
        return Err(PlanningError::Invalid(
            "case_id must be 1-120 characters of A-Z a-z 0-9 - _ . :".into(),
        ));
    }
    if !event.plan_id.is_empty() && !crate::agent::valid_name(&event.plan_id) {
        return Err(PlanningError::Invalid(format!(
            "plan_id must be {}",
            crate::agent::ID_RULE
        )));
    }
    if event.event_type.trim().is_empty() || event.event_type.len() > 64 {
        return Err(PlanningError::Invalid(
            "event_type must be 1-64 characters".into(),
        ));
    }
    for (what, s) in [
        ("from_state", &event.from_state),
        ("to_state", &event.to_state),
        ("timestamp", &event.timestamp),
    ] {
        if s.len() > 64 {
            return Err(PlanningError::Invalid(format!(
                "{what} is at most 64 characters"
            )));
        }
    }
    // A transition says where the case went; without it no rule applies and nothing happens.
    if event.event_type.trim().eq_ignore_ascii_case("TRANSITION")
        && event.to_state.trim().is_empty()
    {
        return Err(PlanningError::Invalid("a TRANSITION needs to_state".into()));
    }
    Ok(())
}

static ENSURE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"-- Create the planning session of a case unless it exists; refresh the TTL of an open one
-- (a closed one expires as it would: events for its case must not keep it closed for good).
-- KEYS: 1 session. ARGV: 1 now_ms, 2 sid, 3 case_id, 4 ttl ms. Returns its state.
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  redis.call('HSET', KEYS[1], 'session_id', ARGV[2], 'type', 'planning', 'agent_id', '',
    'agent_name', 'planning', 'tenant_id', '', 'user_id', '', 'state', 'open',
    'metadata', cjson.encode({ case_id = ARGV[3] }), 'created_ms', ARGV[1],
    'last_activity_ms', ARGV[1], 'tasks_total', '0')
  st = 'open'
end
if st == 'open' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return st"#,
    )
});

/// Creates the planning session of `case_id` unless it exists. Returns its id and state.
pub async fn ensure_session(
    client: &Client,
    keys: &Keys,
    case_id: &str,
    ttl_ms: i64,
) -> Result<(String, String), PlanningError> {
    let sid = session_id(case_id);
    let state: String = ENSURE_SESSION
        .evalsha_with_reload::<String, _, Vec<Value>>(
            client,
            vec![keys.session(&sid)],
            vec![
                now_ms().into(),
                sid.as_str().into(),
                case_id.into(),
                ttl_ms.into(),
            ],
        )
        .await?;
    Ok((sid, state))
}

/// An event id for an event that carries none: stable for the same content.
pub fn event_id_of(event: &PlanningEvent) -> String {
    let name = format!(
        "{}/{}/{}/{}/{}/{}",
        event.event_type,
        event.case_id,
        event.plan_id,
        event.from_state,
        event.to_state,
        event.timestamp
    );
    Uuid::new_v5(&SUBTASK_NAMESPACE, name.as_bytes()).to_string()
}

/// Metadata stored on a subtask's task hash.
pub fn task_metadata(s: &Subtask, event_id: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "subtask",
        "role": s.role,
        "action": s.action,
        "dependencies": s.dependencies,
        "constraints": s.constraints,
        "priority": s.priority,
        "case_id": s.case_id,
        "plan_id": s.plan_id,
        "to_state": s.to_state,
        "event_id": event_id,
        "transition_id": s.transition_id,
    })
}

/// Subtasks by role, for previews.
pub fn by_role(subtasks: &[Subtask]) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    for s in subtasks {
        *out.entry(s.role.as_str()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(to: &str) -> PlanningEvent {
        PlanningEvent {
            event_id: "e1".into(),
            event_type: "TRANSITION".into(),
            case_id: "US-123".into(),
            plan_id: "P-1".into(),
            from_state: "DESIGN".into(),
            to_state: to.into(),
            timestamp: String::new(),
            metadata: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_deleted_case_derives_nothing() {
        let rules = PlanningRules::builtin();
        let mut e = event("BUILD");
        assert_eq!(rules.derive(&e, &[], &[]).len(), 3);
        e.event_type = "deleted".into();
        assert!(rules.derive(&e, &[], &[]).is_empty());
    }

    #[test]
    fn build_derives_dev_qa_devops_with_qa_after_dev() {
        let rules = PlanningRules::builtin();
        rules.validate().unwrap();
        let subtasks = rules.derive(&event("build"), &[], &["use rust".into()]);
        let roles: Vec<&str> = subtasks.iter().map(|s| s.role.as_str()).collect();
        assert_eq!(roles, ["DEV", "QA", "DEVOPS"]);
        assert_eq!(subtasks[1].dependencies, [subtasks[0].task_id.clone()]);
        assert!(subtasks[0].description.contains("US-123"));
        assert_eq!(subtasks[0].constraints, ["use rust"]);
        assert_eq!(subtasks[0].session_id, "plan-US-123");
        // Deterministic ids.
        let again = rules.derive(&event("BUILD"), &[], &[]);
        assert_eq!(again[0].task_id, subtasks[0].task_id);
        assert_ne!(
            rules.derive(&event("DEPLOY"), &[], &[])[0].task_id,
            subtasks[0].task_id
        );
        assert!(rules.derive(&event("DONE"), &[], &[]).is_empty());
        assert_eq!(rules.derive(&event("BUILD"), &["QA"], &[]).len(), 1);
        // DESIGN's architecture is a council deliberation with a valid spec.
        let design = rules.derive(&event("DESIGN"), &[], &[]);
        assert_eq!(
            (design[0].role.as_str(), design[0].council),
            ("ARCHITECT", 3)
        );
        let spec = design[0].deliberation_spec(1_000);
        assert_eq!(spec.deliberation_id, design[0].task_id);
        spec.validate().unwrap();
    }

    #[test]
    fn a_council_subtask_is_told_from_a_deliberation_that_only_looks_like_one() {
        let design = PlanningRules::builtin().derive(&event("DESIGN"), &[], &[]);
        let spec = design[0].deliberation_spec(1_000);
        assert!(is_council_subtask(&spec));
        // A gRPC deliberation with the same metadata but an id of its own.
        let mut lookalike = spec.clone();
        lookalike.deliberation_id = "d-1".into();
        assert!(!is_council_subtask(&lookalike));
        // The same id in another case's session.
        let mut elsewhere = spec.clone();
        elsewhere
            .metadata
            .insert("session_id".into(), session_id("US-9"));
        assert!(!is_council_subtask(&elsewhere));
        let mut plain = spec;
        plain.metadata.clear();
        assert!(!is_council_subtask(&plain));
    }

    #[test]
    fn ids_are_those_the_docs_show() {
        // docs/grpc.md's grpcurl session: a preview, and an event without a timestamp.
        let rules = PlanningRules::builtin();
        let preview = PlanningEvent {
            event_id: String::new(),
            event_type: "PREVIEW".into(),
            case_id: "US-123".into(),
            plan_id: "P-9".into(),
            from_state: String::new(),
            to_state: "BUILD".into(),
            timestamp: String::new(),
            metadata: serde_json::Value::Null,
        };
        let p = rules.derive(&preview, &["DEV", "QA"], &[]);
        assert_eq!(p[0].task_id, "7a2da2e3-13d4-5ff9-a6d5-d02252ba0932");
        assert_eq!(p[1].task_id, "59a6f2a1-b230-54af-a960-9052807c6e9c");
        let e = PlanningEvent {
            event_id: "AGILE:1001:1733500000000000000".into(),
            event_type: "TRANSITION".into(),
            from_state: "DESIGN".into(),
            ..preview
        };
        let d = rules.derive(&e, &[], &[]);
        assert_eq!(d[0].task_id, "5abf75d1-c30a-5fed-9ed7-6107c61cd3e4");
        assert_eq!(d[0].transition_id, transition_id(&e));
    }

    #[test]
    fn rules_files_load_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("fleet-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.toml");
        std::fs::write(
            &path,
            "[[rules]]\nto_state = \"REVIEW\"\n[[rules.subtasks]]\nrole = \"QA\"\naction = \"review\"\ndescription = \"Review {case_id}\"\n",
        )
        .unwrap();
        let rules = PlanningRules::load(&path).unwrap();
        assert_eq!(rules.derive(&event("review"), &[], &[]).len(), 1);
        std::fs::write(
            &path,
            "[[rules]]\nto_state = \"X\"\n[[rules.subtasks]]\nrole = \"QA\"\naction = \"a\"\ndescription = \"d\"\ndepends_on = [\"b\"]\n",
        )
        .unwrap();
        let err = PlanningRules::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown action"), "{err}");
        let yaml = dir.join("rules.yaml");
        std::fs::write(
            &yaml,
            "rules:\n  - to_state: SHIP\n    subtasks:\n      - {role: DEVOPS, action: ship, description: Ship it}\n",
        )
        .unwrap();
        assert_eq!(
            PlanningRules::load(&yaml).unwrap().rules[0].subtasks[0].priority,
            1
        );
        std::fs::remove_dir_all(dir).ok();
    }

    /// The rules of `toml`, loaded from a file as `FLEET_PLANNING_RULES` would be.
    fn load_toml(name: &str, toml: &str) -> Result<PlanningRules, PlanningError> {
        let dir = std::env::temp_dir().join(format!("fleet-rules-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.toml");
        std::fs::write(&path, toml).unwrap();
        let rules = PlanningRules::load(&path);
        std::fs::remove_dir_all(dir).ok();
        rules
    }

    #[test]
    fn rules_files_with_cycles_repeated_states_or_bad_timeouts_are_refused() {
        let sub = |action: &str, deps: &str, extra: &str| {
            format!(
                "[[rules.subtasks]]\nrole = \"DEV\"\naction = \"{action}\"\ndescription = \"d\"\ndepends_on = [{deps}]\n{extra}"
            )
        };
        let cycle = format!(
            "[[rules]]\nto_state = \"BUILD\"\n{}{}{}",
            sub("a", "\"c\"", ""),
            sub("b", "\"a\"", ""),
            sub("c", "\"b\"", "")
        );
        let err = load_toml("cycle", &cycle).unwrap_err().to_string();
        assert!(err.contains("cycle (a -> c -> b -> a)"), "{err}");
        let own = format!("[[rules]]\nto_state = \"BUILD\"\n{}", sub("a", "\"a\"", ""));
        let err = load_toml("self", &own).unwrap_err().to_string();
        assert!(err.contains("cycle (a -> a)"), "{err}");
        // A diamond is no cycle.
        let diamond = format!(
            "[[rules]]\nto_state = \"BUILD\"\n{}{}{}{}",
            sub("a", "", ""),
            sub("b", "\"a\"", ""),
            sub("c", "\"a\"", ""),
            sub("d", "\"b\", \"c\"", "")
        );
        assert_eq!(
            load_toml("diamond", &diamond).unwrap().rules[0]
                .subtasks
                .len(),
            4
        );

        let twice = format!(
            "[[rules]]\nto_state = \"BUILD\"\n{}[[rules]]\nto_state = \"build\"\n{}",
            sub("a", "", ""),
            sub("b", "", "")
        );
        let err = load_toml("twice", &twice).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        let blank = format!("[[rules]]\nto_state = \" \"\n{}", sub("a", "", ""));
        let err = load_toml("blank", &blank).unwrap_err().to_string();
        assert!(err.contains("to_state is empty"), "{err}");

        for t in ["0", "9223372036854775807"] {
            let bad = format!(
                "[[rules]]\nto_state = \"BUILD\"\n{}",
                sub("a", "", &format!("timeout_secs = {t}\n"))
            );
            let err = load_toml("timeout", &bad).unwrap_err().to_string();
            assert!(err.contains(&format!("timeout_secs {t}")), "{err}");
        }
    }

    #[test]
    fn rules_files_with_unknown_fields_are_refused() {
        let toml = "[[rules]]\nto_state = \"BUILD\"\n[[rules.subtasks]]\nrole = \"DEV\"\naction = \"implement\"\ndescription = \"d\"\n[[rules.subtasks]]\nrole = \"QA\"\naction = \"test\"\ndescription = \"d\"\ndependencies = [\"implement\"]\n";
        let err = load_toml("unknown", toml).unwrap_err().to_string();
        assert!(err.contains("unknown field `dependencies`"), "{err}");
        let dir = std::env::temp_dir().join(format!("fleet-rules-{}-yaml", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("rules.yml");
        std::fs::write(
            &yaml,
            "rules:\n  - to_state: SHIP\n    subtasks:\n      - {role: DEVOPS, action: ship, description: Ship it, timeout: 60}\n",
        )
        .unwrap();
        let err = PlanningRules::load(&yaml).unwrap_err().to_string();
        std::fs::remove_dir_all(dir).ok();
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn a_deleted_event_type_is_recognised_with_surrounding_blanks() {
        let mut e = event("BUILD");
        e.event_type = " DELETED ".into();
        assert!(PlanningRules::builtin().derive(&e, &[], &[]).is_empty());
    }

    #[test]
    fn transitions_without_a_target_and_huge_timestamps_are_refused() {
        let mut e = event("");
        let err = validate_event(&e).unwrap_err().to_string();
        assert!(err.contains("TRANSITION needs to_state"), "{err}");
        e.event_type = "UPDATED".into();
        assert!(validate_event(&e).is_ok());
        let mut e = event("BUILD");
        e.timestamp = "1".repeat(100_000);
        let err = validate_event(&e).unwrap_err().to_string();
        assert!(err.contains("timestamp is at most 64"), "{err}");
    }

    #[test]
    fn events_are_validated() {
        assert!(validate_event(&event("BUILD")).is_ok());
        let mut e = event("BUILD");
        e.case_id = "a/b".into();
        assert!(validate_event(&e).is_err());
        let mut e = event("BUILD");
        e.event_type = String::new();
        assert!(validate_event(&e).is_err());
    }
}
