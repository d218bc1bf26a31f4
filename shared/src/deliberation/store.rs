//! Deliberation state in Redis, moved only by the compare-and-set scripts
//! `src/lua/deliberation_*.lua`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:{d:<id>}` | hash, TTL | `spec` (JSON), `spec_fp` ([`DeliberationSpec::fingerprint`]), `kind`, `role`, `n`, `quorum`, `rounds`, `deadline_ms`, `architect_top_k`, `case_id`, `story_id`, `plan_id`, `status`, `round`, `members` (JSON), `member_ids`, `received:<round>`, `context`, `ranked` (JSON, once scored), `winner`, `winner_id`, `selected_by`, `architect`, `error`, `created_ms`, `started_ms`, `updated_ms`, `finished_ms`, `settled_ms` (once what follows its end is done: [`DeliberationStore::settle`]) |
//! | `<p>:{d:<id>}:proposals` | hash, TTL | `<round>:<member>` -> [`Proposal`] JSON |
//! | `<p>:{d:<id>}:events` | stream, capped, TTL | one [`Update`] per state change or proposal |
//! | `<p>:{s:<sid>}` field `council:<id>` | session hash field | a council subtask's deliberation `<id>` of planning session `<sid>` ([`DeliberationStore::register_council`]), so that closing the session finds it; expires with the session |

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::scoring::RankedProposal;
use super::{DeliberationSpec, Member, Proposal, Status};
use crate::keys::Keys;
use crate::stream::entry::{StreamEntry, StreamId, parse_entries, parse_read};
use crate::time::now_ms;

/// A deliberation's event stream keeps about this many updates.
pub const EVENTS_MAXLEN: u64 = 2_000;

macro_rules! lua {
    ($file:literal) => {
        concat!(
            include_str!("../lua/deliberation_prelude.lua"),
            include_str!(concat!("../lua/", $file))
        )
    };
}

/// The deliberation scripts, loaded by SHA and reloaded when Redis forgot them.
pub struct Scripts {
    pub create: Script,
    pub start: Script,
    pub propose: Script,
    pub transition: Script,
    pub register_council: Script,
}

/// Prefix of the planning session's hash fields naming its council subtasks' deliberations
/// (`council:<id>`), the way `open:<tid>` names its open tasks.
pub const COUNCIL_FIELD_PREFIX: &str = "council:";

/// The compiled-in scripts.
pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create: Script::from_lua(lua!("deliberation_create.lua")),
    start: Script::from_lua(lua!("deliberation_start.lua")),
    propose: Script::from_lua(lua!("deliberation_propose.lua")),
    transition: Script::from_lua(lua!("deliberation_transition.lua")),
    register_council: Script::from_lua(lua!("deliberation_session.lua")),
});

/// Errors of the deliberation store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] Error),
    #[error("unexpected script reply: {0}")]
    Reply(String),
    #[error("stored deliberation `{0}` does not decode")]
    Corrupt(String),
}

/// What `create` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    New,
    /// A deliberation with this id and the same spec (fingerprint) exists, in this state: a
    /// retry. One stored before fingerprints were has none and matches any spec.
    Exists(Status),
    /// A deliberation with this id exists, in this state, with another spec. Nothing changed.
    Conflict(Status),
}

/// What `start` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// This call moved it `pending -> generating`.
    Moved,
    /// It was not pending: its state and round.
    NotPending(Status, u32),
    Missing,
}

/// How a proposal fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    Recorded,
    /// This proposal was the last one the round waited for.
    RoundComplete,
    Duplicate,
    /// For another round, or the deliberation is not collecting proposals.
    Stale,
    Terminal,
    UnknownMember,
    Missing,
}

impl RecordOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Recorded => "recorded",
            RecordOutcome::RoundComplete => "round_complete",
            RecordOutcome::Duplicate => "duplicate",
            RecordOutcome::Stale => "stale",
            RecordOutcome::Terminal => "terminal",
            RecordOutcome::UnknownMember => "unknown_member",
            RecordOutcome::Missing => "missing",
        }
    }
}

/// What `record` did, and where the deliberation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub outcome: RecordOutcome,
    /// Proposals of the current round so far.
    pub received: u32,
    pub n: u32,
    pub round: u32,
    pub rounds: u32,
    pub status: Option<Status>,
}

/// A compare-and-set move (see `lua/deliberation_transition.lua`).
#[derive(Clone, Debug)]
pub struct Transition {
    /// Allowed current states; empty: any non-terminal one.
    pub from: Vec<Status>,
    /// Required current round.
    pub round: Option<u32>,
    pub to: Status,
    /// The update's words, agent, payload and received count.
    pub step: String,
    pub agent: String,
    pub data: String,
    pub received: u32,
    /// Fields to set with the move.
    pub fields: Vec<(&'static str, String)>,
}

impl Transition {
    pub fn new(from: &[Status], to: Status, step: impl Into<String>) -> Self {
        Self {
            from: from.to_vec(),
            round: None,
            to,
            step: step.into(),
            agent: String::new(),
            data: String::new(),
            received: 0,
            fields: Vec::new(),
        }
    }

    pub fn field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.fields.push((name, value.into()));
        self
    }
}

/// What a transition did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moved {
    Applied,
    /// Not from an allowed state (or round): where it is.
    Refused(Status, u32),
    Terminal(Status),
    Missing,
}

/// A deliberation as stored, for reads.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliberationView {
    pub spec: DeliberationSpec,
    pub status: Status,
    pub round: u32,
    pub members: Vec<Member>,
    /// Proposals received per round.
    pub received: BTreeMap<u32, u32>,
    /// The final ranking (stored once scored).
    pub ranked: Vec<RankedProposal>,
    /// The winning member, once chosen.
    pub winner: Option<String>,
    pub winner_id: Option<String>,
    pub selected_by: String,
    /// The architect member asked to choose, if any.
    pub architect: Option<String>,
    pub error: String,
    pub context: String,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub updated_ms: i64,
    /// What follows its end (counted in the stats, deadline dropped) was done.
    pub settled: bool,
}

impl DeliberationView {
    fn from_hash(id: &str, h: HashMap<String, String>) -> Result<Option<Self>, StoreError> {
        let Some(status) = h.get("status") else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt(id.to_owned());
        let spec: DeliberationSpec = h
            .get("spec")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(corrupt)?;
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        let text = |k: &str| h.get(k).filter(|v| !v.is_empty()).cloned();
        let received = h
            .iter()
            .filter_map(|(k, v)| {
                let r = k.strip_prefix("received:")?.parse().ok()?;
                Some((r, v.parse().unwrap_or(0)))
            })
            .collect();
        Ok(Some(DeliberationView {
            status: Status::parse(status).ok_or_else(corrupt)?,
            round: int("round").unwrap_or(0) as u32,
            members: h
                .get("members")
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or_default(),
            received,
            ranked: h
                .get("ranked")
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or_default(),
            winner: text("winner"),
            winner_id: text("winner_id"),
            selected_by: text("selected_by").unwrap_or_default(),
            architect: text("architect"),
            error: text("error").unwrap_or_default(),
            context: text("context").unwrap_or_default(),
            created_ms: int("created_ms").unwrap_or(spec.created_ms),
            started_ms: int("started_ms"),
            finished_ms: int("finished_ms"),
            updated_ms: int("updated_ms").unwrap_or(0),
            settled: h.contains_key("settled_ms"),
            spec,
        }))
    }

    /// Proposals received in the current round.
    pub fn received_now(&self) -> u32 {
        self.received.get(&self.round).copied().unwrap_or(0)
    }

    /// How long it ran (to now when still running), ms.
    pub fn duration_ms(&self) -> i64 {
        (self.finished_ms.unwrap_or_else(now_ms) - self.created_ms).max(0)
    }
}

/// One progress update, as read from `<p>:{d:<id>}:events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub event_id: StreamId,
    /// The deliberation's status after the step (raw, see [`Status`]).
    pub status: String,
    pub round: u32,
    /// Proposals of the round so far.
    pub received: u32,
    pub step: String,
    /// The member the step is about ("" when none).
    pub agent: String,
    /// JSON payload: a [`Proposal`] on proposal updates, the [`FinalResult`] on the final one.
    pub data: String,
}

impl Update {
    fn from_entry(e: &StreamEntry) -> Update {
        let num = |k: &str| e.get_str(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Update {
            event_id: e.id,
            status: e.get_str("status").unwrap_or_default().to_owned(),
            round: num("round"),
            received: num("received"),
            step: e.get_str("step").unwrap_or_default().to_owned(),
            agent: e.get_str("agent").unwrap_or_default().to_owned(),
            data: e.get_str("d").unwrap_or_default().to_owned(),
        }
    }

    pub fn status(&self) -> Option<Status> {
        Status::parse(&self.status)
    }

    /// The last update a deliberation gets.
    pub fn is_terminal(&self) -> bool {
        self.status().is_some_and(Status::is_terminal)
    }

    /// A proposal update (the payload is the proposal).
    pub fn is_proposal(&self) -> bool {
        self.step == "proposal"
    }
}

/// The payload of a deliberation's final update.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FinalResult {
    pub status: String,
    #[serde(default)]
    pub results: Vec<RankedProposal>,
    #[serde(default)]
    pub winner: String,
    #[serde(default)]
    pub winner_id: String,
    #[serde(default)]
    pub selected_by: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub duration_ms: i64,
}

/// Deliberation state in Redis.
#[derive(Clone)]
pub struct DeliberationStore {
    client: Client,
    keys: Keys,
    /// Deliberations, their proposals and event streams expire this long after their last change.
    ttl_ms: i64,
}

fn strs(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_string().unwrap_or_default())
            .collect(),
        other => vec![other.as_string().unwrap_or_default()],
    }
}

fn status_of(s: Option<&String>) -> Result<Status, StoreError> {
    s.and_then(|s| Status::parse(s))
        .ok_or_else(|| StoreError::Reply(format!("unknown status {s:?}")))
}

/// The shortest life a deliberation's keys get: the longest deliberation (its timeout, at most
/// [`super::MAX_TIMEOUT_MS`]) and an hour more to read its result, whatever the session TTL.
pub const MIN_TTL_MS: i64 = 2 * super::MAX_TIMEOUT_MS as i64;

impl DeliberationStore {
    /// A store whose deliberations expire `ttl_ms` (the session TTL, at least [`MIN_TTL_MS`])
    /// after their last change: a TTL shorter than a deliberation's timeout would let a quiet
    /// one vanish before its deadline.
    pub fn new(client: Client, keys: Keys, ttl_ms: i64) -> Self {
        Self {
            client,
            keys,
            ttl_ms: ttl_ms.max(MIN_TTL_MS),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Vec<String>, StoreError> {
        let reply: Value = script.evalsha_with_reload(&self.client, keys, args).await?;
        Ok(strs(&reply))
    }

    fn head(&self, now: i64) -> Vec<Value> {
        vec![
            now.into(),
            self.ttl_ms.into(),
            (EVENTS_MAXLEN as i64).into(),
        ]
    }

    /// Creates the deliberation as `pending`, unless one with its id exists; then compares
    /// their specs' fingerprints ([`DeliberationSpec::fingerprint`]), atomically.
    pub async fn create(&self, spec: &DeliberationSpec) -> Result<Created, StoreError> {
        let id = &spec.deliberation_id;
        let mut args = self.head(now_ms());
        args.push(spec.fingerprint().into());
        let spec_json = serde_json::to_string(spec).expect("a spec always serializes");
        let fields: [(&str, String); 12] = [
            ("spec", spec_json),
            ("kind", spec.kind.clone()),
            ("role", spec.role.clone()),
            ("n", spec.num_agents.to_string()),
            ("quorum", spec.quorum.to_string()),
            ("rounds", spec.rounds.to_string()),
            ("deadline_ms", spec.deadline_ms.to_string()),
            ("architect_top_k", spec.architect_top_k.to_string()),
            ("case_id", spec.case_id.clone()),
            ("story_id", spec.story_id.clone()),
            ("plan_id", spec.plan_id.clone()),
            ("created_ms", spec.created_ms.to_string()),
        ];
        for (k, v) in fields {
            args.push(k.into());
            args.push(v.into());
        }
        let reply = self
            .eval(
                &SCRIPTS.create,
                vec![
                    self.keys.deliberation(id),
                    self.keys.deliberation_events(id),
                ],
                args,
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("created") => Ok(Created::New),
            Some("exists") => Ok(Created::Exists(status_of(reply.get(1))?)),
            Some("conflict") => Ok(Created::Conflict(status_of(reply.get(1))?)),
            other => Err(StoreError::Reply(format!("create: {other:?}"))),
        }
    }

    /// Moves it `pending -> generating` with its members and hydrated context.
    pub async fn start(
        &self,
        id: &str,
        members: &[Member],
        context: &str,
        step: &str,
    ) -> Result<Started, StoreError> {
        let mut args = self.head(now_ms());
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        args.push(
            serde_json::to_string(members)
                .expect("members serialize")
                .into(),
        );
        args.push(ids.join(",").into());
        args.push((members.len() as i64).into());
        args.push(step.into());
        args.push(context.into());
        let reply = self
            .eval(
                &SCRIPTS.start,
                vec![
                    self.keys.deliberation(id),
                    self.keys.deliberation_events(id),
                ],
                args,
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("started") => Ok(Started::Moved),
            Some("missing") => Ok(Started::Missing),
            _ => Ok(Started::NotPending(
                status_of(reply.first())?,
                reply.get(1).and_then(|r| r.parse().ok()).unwrap_or(0),
            )),
        }
    }

    /// Records `proposal` for deliberation `id` (see `lua/deliberation_propose.lua`).
    pub async fn record(&self, id: &str, proposal: &Proposal) -> Result<Recorded, StoreError> {
        let mut args = self.head(now_ms());
        args.push(proposal.member.as_str().into());
        args.push(proposal.round.to_string().into());
        args.push(
            serde_json::to_string(proposal)
                .expect("a proposal serializes")
                .into(),
        );
        let r = self
            .eval(
                &SCRIPTS.propose,
                vec![
                    self.keys.deliberation(id),
                    self.keys.deliberation_proposals(id),
                    self.keys.deliberation_events(id),
                ],
                args,
            )
            .await?;
        let num = |i: usize| r.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        let outcome = match r.first().map(String::as_str) {
            Some("recorded") => RecordOutcome::Recorded,
            Some("round_complete") => RecordOutcome::RoundComplete,
            Some("duplicate") => RecordOutcome::Duplicate,
            Some("stale") => RecordOutcome::Stale,
            Some("terminal") => RecordOutcome::Terminal,
            Some("unknown_member") => RecordOutcome::UnknownMember,
            Some("missing") => RecordOutcome::Missing,
            other => return Err(StoreError::Reply(format!("propose: {other:?}"))),
        };
        Ok(Recorded {
            outcome,
            received: num(1),
            n: num(2),
            round: num(3),
            rounds: num(4),
            status: r.get(5).and_then(|s| Status::parse(s)),
        })
    }

    /// Applies `t` by compare-and-set (see `lua/deliberation_transition.lua`).
    pub async fn transition(&self, id: &str, t: &Transition) -> Result<Moved, StoreError> {
        let mut args = self.head(now_ms());
        let from = if t.from.is_empty() {
            "*".to_owned()
        } else {
            t.from
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        args.push(from.into());
        args.push(t.round.map(|r| r.to_string()).unwrap_or_default().into());
        args.push(t.to.as_str().into());
        args.push(t.step.as_str().into());
        args.push(t.agent.as_str().into());
        args.push(t.data.as_str().into());
        args.push(t.received.to_string().into());
        for (k, v) in &t.fields {
            args.push((*k).into());
            args.push(v.as_str().into());
        }
        let r = self
            .eval(
                &SCRIPTS.transition,
                vec![
                    self.keys.deliberation(id),
                    self.keys.deliberation_events(id),
                ],
                args,
            )
            .await?;
        let round = r.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(match r.first().map(String::as_str) {
            Some("applied") => Moved::Applied,
            Some("refused") => Moved::Refused(status_of(r.get(1))?, round),
            Some("terminal") => Moved::Terminal(status_of(r.get(1))?),
            Some("missing") => Moved::Missing,
            other => return Err(StoreError::Reply(format!("transition: {other:?}"))),
        })
    }

    /// Registers deliberation `id` as a council subtask of planning session `sid` while the
    /// session is open (`council:<id>` on the session hash, in the session's slot). Returns the
    /// session's state: `open` when registered, `missing` for no session; any other state
    /// (closed) wrote nothing.
    pub async fn register_council(&self, sid: &str, id: &str) -> Result<String, StoreError> {
        let reply = self
            .eval(
                &SCRIPTS.register_council,
                vec![self.keys.session(sid)],
                vec![
                    format!("{COUNCIL_FIELD_PREFIX}{id}").into(),
                    now_ms().into(),
                ],
            )
            .await?;
        reply
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Reply("register_council: empty".into()))
    }

    /// The deliberations registered with planning session `sid` ([`Self::register_council`]),
    /// running or ended.
    pub async fn session_councils(&self, sid: &str) -> Result<Vec<String>, StoreError> {
        let fields: Vec<String> = self.client.hkeys(self.keys.session(sid)).await?;
        Ok(fields
            .into_iter()
            .filter_map(|f| f.strip_prefix(COUNCIL_FIELD_PREFIX).map(str::to_owned))
            .collect())
    }

    /// The state of session `sid` (`open`, `closed`), `None` when it does not exist.
    pub async fn session_state(&self, sid: &str) -> Result<Option<String>, StoreError> {
        Ok(self.client.hget(self.keys.session(sid), "state").await?)
    }

    /// Marks ended deliberation `id` settled: true for the one call that marked it, so that what
    /// follows an end is counted once however many steps (a redelivery, a sweep) run it.
    pub async fn settle(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .client
            .hsetnx(self.keys.deliberation(id), "settled_ms", now_ms())
            .await?)
    }

    /// Reads a deliberation.
    pub async fn get(&self, id: &str) -> Result<Option<DeliberationView>, StoreError> {
        let h: HashMap<String, String> = self.client.hgetall(self.keys.deliberation(id)).await?;
        DeliberationView::from_hash(id, h)
    }

    /// Every proposal received, of every round, ordered by (round, member).
    pub async fn proposals(&self, id: &str) -> Result<Vec<Proposal>, StoreError> {
        let h: HashMap<String, String> = self
            .client
            .hgetall(self.keys.deliberation_proposals(id))
            .await?;
        let mut out: Vec<Proposal> = h
            .values()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        out.sort_by(|a, b| (a.round, &a.member).cmp(&(b.round, &b.member)));
        Ok(out)
    }

    /// The event id of deliberation `id`'s newest update, if its log holds one.
    pub async fn newest_update(&self, id: &str) -> Result<Option<StreamId>, StoreError> {
        let reply: Value = self
            .client
            .xrevrange(self.keys.deliberation_events(id), "+", "-", Some(1))
            .await?;
        Ok(parse_entries(reply)
            .map_err(|e| StoreError::Reply(e.to_string()))?
            .first()
            .map(|e| e.id))
    }

    /// Updates of deliberation `id` after `after`, at most `count`; with `block_ms`, waits that
    /// long for the first one. `reader` must be a connection of its own when blocking.
    pub async fn read_updates(
        reader: &Client,
        keys: &Keys,
        id: &str,
        after: StreamId,
        count: u64,
        block_ms: Option<u64>,
    ) -> Result<Vec<Update>, StoreError> {
        let reply: Value = reader
            .xread(
                Some(count),
                block_ms,
                keys.deliberation_events(id),
                after.to_string(),
            )
            .await?;
        Ok(parse_read(reply)
            .map_err(|e| StoreError::Reply(e.to_string()))?
            .into_iter()
            .flat_map(|(_, e)| e)
            .map(|e| Update::from_entry(&e))
            .collect())
    }
}
