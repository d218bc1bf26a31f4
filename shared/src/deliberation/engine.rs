//! The steps of a deliberation, each idempotent and safe to run again after a crash:
//!
//! | step | who | does |
//! |---|---|---|
//! | [`Engine::accept`] | front doors | creates the hash (`pending`), registers the deadline, sends `task.deliberate` |
//! | [`Engine::dispatch`] | dispatcher | picks members, `pending -> generating`, sends round 1 |
//! | [`Engine::on_proposal`] | callback-worker | records it; a complete round moves to the next review round or to scoring |
//! | [`Engine::on_selection`] | callback-worker | the architect's choice completes it |
//! | [`Engine::expire`] | callback-worker's sweeper | at the deadline: quorum -> completed, else timed_out; stragglers cancelled |
//! | [`Engine::request_council_cancel`] | edge-api (`CancelTask`) | a council subtask of the session: sends `task.cancel` to the dispatchers |
//! | [`Engine::cancel_deliberation`] | dispatcher (`task.cancel`, `session.close`) | any open state -> cancelled; outstanding requests cancelled |
//!
//! Every state change is a compare-and-set ([`super::store`]); requests to agents are sent after
//! the change that calls for them, so a crash in between is repaired by the redelivery of the
//! entry that caused it ([`Engine::resume`]), and duplicate requests cost work, never
//! correctness (a member's proposal for a round is recorded once).
//!
//! The end of a council subtask's deliberation is told to the Planning service, once, by the
//! step that first marks it settled, when the engine has a notifier ([`Engine::with_planning`]).

use std::collections::BTreeSet;

use fred::prelude::*;
use serde_json::json;
use uuid::Uuid;

use super::scoring::{RankedProposal, rank};
use super::store::{
    Created, DeliberationStore, DeliberationView, FinalResult, Moved, RecordOutcome, Started,
    StoreError, Transition,
};
use super::{ARCHITECT, DeliberationSpec, Member, Proposal, Status, kind, latest_per_member};
use crate::council::{CouncilError, Councils};
use crate::envelope::{
    AgentAction, AgentCancel, AgentControl, AgentMessage, AgentRequest, Alternative, Decision,
    DecisionMessage, Envelope, NatsPublish, Outbound, PeerProposal, ProposalCallback,
    SelectionCallback, TaskCancel, TaskCommand,
};
use crate::keys::Keys;
use crate::planning::notifier::PlanningNotifier;
use crate::planning::{SESSION_PREFIX, is_council_subtask};
use crate::stream::producer::{self, ProduceError};
use crate::task::CONTROL_MAXLEN;
use crate::time::now_ms;

/// Namespace of the deterministic (UUIDv5) envelope ids of decisions and outbound events, so a
/// re-emitted decision is recognised as the same one (`Nats-Msg-Id` dedup in JetStream).
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_5f0e_8c4d_4b7a_9f1e_2d3c_4b5a_6978);

/// NATS subject of orchestrator events (decisions, timeouts).
pub const SUBJECT_ORCHESTRATOR_EVENTS: &str = "orchestrator.events";
/// NATS subject of agent requests.
pub const SUBJECT_AGENT_REQUESTS: &str = "agent.requests";

/// Counters of `<p>:stats`: deliberations accepted (orchestrations included), orchestrations,
/// and (`deliberations_<status>`) ended ones by final status; `role:<ROLE>` per role.
pub const STAT_DELIBERATIONS_TOTAL: &str = "deliberations_total";
pub const STAT_ORCHESTRATIONS_TOTAL: &str = "orchestrations_total";
/// Planning events handled (first deliveries).
pub const STAT_PLANNING_EVENTS_TOTAL: &str = "planning_events_total";

/// `fleet:decisions` keeps about this many decisions.
pub const DECISIONS_MAXLEN: u64 = 100_000;
/// Durations kept per kind for the latency percentiles (about; the stream is trimmed with `~`).
pub const LATENCY_SAMPLES: i64 = 1_000;

/// Errors of a deliberation step. All but [`EngineError::SpecConflict`] are transient
/// (storage): the step can run again.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// [`Engine::accept`]: a deliberation with this id exists with another spec (it is
    /// `status`); nothing was changed or started. Not transient: the same call is refused again.
    #[error(
        "task_id `{id}` names an existing deliberation ({status}) whose spec differs from this request's; send the same request to attach to it, or use another task_id"
    )]
    SpecConflict { id: String, status: Status },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Council(#[from] CouncilError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

type Result<T> = std::result::Result<T, EngineError>;

/// Options of the engine.
#[derive(Clone, Debug, Default)]
pub struct EngineConfig {
    /// Also publish deliberation requests to NATS `agent.requests` (through `fleet:outbound`).
    pub publish_agent_requests: bool,
}

/// What [`Engine::accept`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// A new deliberation (false: one with this id existed).
    pub created: bool,
    pub status: Status,
}

/// What [`Engine::expire`] did with an overdue deliberation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// This call ended it at its deadline, `completed` (a quorum of proposals) or `timed_out`.
    /// Exactly one call answers this per deliberation: the one to count.
    Ended(Status),
    /// Its end was refused: another step moved it on meanwhile and it is still open, in this
    /// state. Its deadline entry stays; a later sweep ends it.
    Refused(Status),
    /// Nothing to end: it had ended already (by its deadline elsewhere, or by its own steps),
    /// or is unknown.
    NotOpen,
}

/// What [`Engine::cancel_deliberation`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// This call ended it `cancelled`. Exactly one call answers this per deliberation.
    Now,
    /// It had ended already, in this state: nothing changed.
    AlreadyEnded(Status),
    /// No such deliberation.
    Missing,
}

/// Whether `spec` is the deliberation of a council subtask of planning session `sid`: a
/// council subtask ([`is_council_subtask`]) whose metadata names `sid` as its session.
pub fn is_council_of_session(spec: &DeliberationSpec, sid: &str) -> bool {
    sid.starts_with(SESSION_PREFIX)
        && spec.metadata.get("session_id").map(String::as_str) == Some(sid)
        && is_council_subtask(spec)
}

/// How a callback fared, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Applied(&'static str),
    Dropped(&'static str),
}

/// The steps of deliberations over Redis.
#[derive(Clone)]
pub struct Engine {
    pub store: DeliberationStore,
    pub councils: Councils,
    pub cfg: EngineConfig,
    /// Told when a council subtask's deliberation ends ([`Engine::with_planning`]).
    pub planning: Option<PlanningNotifier>,
}

fn proposal_id(id: &str, p: &Proposal) -> String {
    p.id(id)
}

/// How many of `ranked` (best first) an architect chooses among: the top `top_k` of the
/// proposals that passed their policy check, which rank first; of all of them only when none
/// did. A proposal that failed policy is never offered while one that passed exists.
fn candidates(ranked: &[RankedProposal], top_k: u32) -> usize {
    let passed = ranked.iter().filter(|r| !r.policy_failed).count();
    let pool = if passed == 0 { ranked.len() } else { passed };
    (top_k as usize).min(pool)
}

/// `checks` with every score that is not a finite number made 0, what such a score counts
/// ([`super::Check::value`]): stored as JSON, it would read back as no score, which counts 1.
fn finite_scores(checks: &super::Checks) -> super::Checks {
    let mut checks = checks.clone();
    let extra = checks.extra.values_mut();
    for c in [&mut checks.policy, &mut checks.lint, &mut checks.dry_run]
        .into_iter()
        .flatten()
        .chain(extra)
    {
        if c.score.is_some_and(|s| !s.is_finite()) {
            c.score = Some(0.0);
        }
    }
    checks
}

impl Engine {
    pub fn new(store: DeliberationStore, councils: Councils, cfg: EngineConfig) -> Self {
        Self {
            store,
            councils,
            cfg,
            planning: None,
        }
    }

    /// This engine, telling `planning` (when set) of the end of each council subtask's
    /// deliberation that one of its steps settles: the callback-worker's (decisions, failures,
    /// timeouts) and the dispatcher's (cancels).
    pub fn with_planning(mut self, planning: Option<PlanningNotifier>) -> Self {
        self.planning = planning;
        self
    }

    fn client(&self) -> &Client {
        self.store.client()
    }

    fn keys(&self) -> &Keys {
        self.store.keys()
    }

    /// Queues what follows a new deliberation: its deadline and the counters.
    async fn queue_created(
        &self,
        pipeline: &fred::clients::Pipeline<Client>,
        spec: &DeliberationSpec,
    ) -> Result<()> {
        let keys = self.keys();
        let _: () = pipeline
            .zadd(
                keys.deadlines(),
                None,
                None,
                false,
                false,
                (
                    spec.deadline_ms as f64,
                    Keys::deliberation_deadline_member(&spec.deliberation_id),
                ),
            )
            .await?;
        let _: () = pipeline
            .hincrby(keys.stats(), STAT_DELIBERATIONS_TOTAL, 1)
            .await?;
        if spec.kind == kind::ORCHESTRATE {
            let _: () = pipeline
                .hincrby(keys.stats(), STAT_ORCHESTRATIONS_TOTAL, 1)
                .await?;
        }
        let _: () = pipeline
            .hincrby(keys.stats(), format!("role:{}", spec.role), 1)
            .await?;
        Ok(())
    }

    /// Front doors: creates the deliberation (unless one with its id exists), registers its
    /// deadline and asks the dispatchers to start it. A deliberation still `pending` is asked
    /// for again (its first writer may have died before asking), with its stored spec; the
    /// dispatchers start it once. One with this id and another spec is
    /// [`EngineError::SpecConflict`], and nothing is written.
    pub async fn accept(&self, spec: &DeliberationSpec) -> Result<Accepted> {
        let created = self.store.create(spec).await?;
        let status = match created {
            Created::New => Status::Pending,
            Created::Exists(s) => s,
            Created::Conflict(status) => {
                return Err(EngineError::SpecConflict {
                    id: spec.deliberation_id.clone(),
                    status,
                });
            }
        };
        if status == Status::Pending {
            // A retry asks with the spec stored (one stored without a fingerprint may differ
            // from this one), unless it vanished meanwhile: then this one creates it anew.
            let stored = match created {
                Created::New => None,
                _ => self.store.get(&spec.deliberation_id).await?.map(|v| v.spec),
            };
            let pipeline = self.client().pipeline();
            if created == Created::New {
                self.queue_created(&pipeline, spec).await?;
            }
            let command = stored.unwrap_or_else(|| spec.clone());
            let env = Envelope::new(TaskCommand::Deliberate(command));
            producer::queue(&pipeline, &self.keys().tasks(), None, &env).await?;
            let _: Vec<Value> = pipeline.all().await?;
        }
        Ok(Accepted {
            created: created == Created::New,
            status,
        })
    }

    /// Dispatcher: creates the deliberation if its writer did not, picks its members (see
    /// [`Councils::pick`]), moves it `pending -> generating` and sends round 1. A redelivered
    /// command finding round 1 under way sends it again (the earlier delivery may have died
    /// before sending).
    ///
    /// Everything it does follows the spec stored with the deliberation, never the command's:
    /// a command whose spec conflicts with the stored one starts nothing
    /// (`Dropped("conflict")`).
    pub async fn dispatch(
        &self,
        spec: &DeliberationSpec,
        context: &str,
        redelivered: bool,
    ) -> Result<Handled> {
        let id = &spec.deliberation_id;
        match self.store.create(spec).await? {
            Created::New => {
                let pipeline = self.client().pipeline();
                self.queue_created(&pipeline, spec).await?;
                let _: Vec<Value> = pipeline.all().await?;
            }
            Created::Exists(_) => {}
            Created::Conflict(status) => {
                // Not from a front door (they refuse such a request before sending it): say a
                // copy of a planning event under another event id. The stored spec is the one
                // that runs, started by the command that created it.
                tracing::info!(
                    deliberation_id = %id,
                    %status,
                    "a deliberation with this id exists with another spec; this command starts nothing"
                );
                return Ok(Handled::Dropped("conflict"));
            }
        }
        let Some(mut view) = self.store.get(id).await? else {
            return Ok(Handled::Dropped("missing"));
        };
        let spec = view.spec.clone();
        let members = self.councils.pick(&spec.role, spec.num_agents).await?;
        let registered = members.iter().filter(|m| m.registered).count();
        let step = format!(
            "round 1 of {}: asked {} agents ({registered} registered, {} pool seats)",
            spec.rounds,
            members.len(),
            members.len() - registered
        );
        match self.store.start(id, &members, context, &step).await? {
            Started::Moved => {
                // What the start script stored.
                view.status = Status::Generating;
                view.round = 1;
                view.members = members;
                view.context = context.to_owned();
            }
            Started::NotPending(Status::Generating, 1) if redelivered => {
                tracing::info!(deliberation_id = %id, "re-sending round 1 an earlier delivery started");
                // The members and context the earlier delivery stored.
                let Some(now) = self.store.get(id).await? else {
                    return Ok(Handled::Dropped("missing"));
                };
                view = now;
            }
            Started::NotPending(status, _) => {
                tracing::debug!(deliberation_id = %id, %status, "already started");
                return Ok(Handled::Dropped("started"));
            }
            Started::Missing => return Ok(Handled::Dropped("missing")),
        }
        // On a re-send, members that already answered are not asked again.
        let answered = if redelivered {
            self.answered(id, 1).await?
        } else {
            BTreeSet::new()
        };
        self.send_round(&view, 1, &answered).await?;
        metrics::counter!("fleet_deliberations_started_total", "role" => spec.role.clone())
            .increment(1);
        Ok(Handled::Applied("started"))
    }

    /// The request for `member` in `round`.
    fn request(
        &self,
        view: &DeliberationView,
        member: &Member,
        round: u32,
        peers: Vec<PeerProposal>,
    ) -> AgentRequest {
        let spec = &view.spec;
        AgentRequest {
            action: if round <= 1 {
                AgentAction::Propose
            } else {
                AgentAction::Review
            },
            role: spec.role.clone(),
            member: member.id.clone(),
            deliberation_id: spec.deliberation_id.clone(),
            round,
            rounds: spec.rounds,
            description: spec.description.clone(),
            requirements: spec.requirements.clone(),
            rubric: spec.rubric.clone(),
            metadata: spec.metadata.clone(),
            context: view.context.clone(),
            peers,
            session_id: String::new(),
            task_id: String::new(),
            attempt: 0,
            task_action: String::new(),
            dependencies: Vec::new(),
            priority: 0,
            deadline_ms: spec.deadline_ms,
        }
    }

    /// Sends `round`'s requests to every member not in `skip`. Review rounds carry the peers'
    /// proposals of the previous round.
    async fn send_round(
        &self,
        view: &DeliberationView,
        round: u32,
        skip: &BTreeSet<String>,
    ) -> Result<()> {
        let id = &view.spec.deliberation_id;
        let previous: Vec<Proposal> = if round > 1 {
            self.store
                .proposals(id)
                .await?
                .into_iter()
                .filter(|p| p.round == round - 1)
                .collect()
        } else {
            Vec::new()
        };
        let pipeline = self.client().pipeline();
        for member in view.members.iter().filter(|m| !skip.contains(&m.id)) {
            let peers = previous
                .iter()
                .filter(|p| p.member != member.id)
                .map(|p| PeerProposal {
                    proposal_id: proposal_id(id, p),
                    member: p.member.clone(),
                    content: p.content.clone(),
                    score: 0.0,
                    rank: 0,
                })
                .collect();
            let req = self.request(view, member, round, peers);
            self.queue_request(&pipeline, &member.stream(self.keys(), &view.spec.role), req)
                .await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    async fn queue_request(
        &self,
        pipeline: &fred::clients::Pipeline<Client>,
        stream: &str,
        req: AgentRequest,
    ) -> Result<()> {
        if self.cfg.publish_agent_requests {
            let payload = serde_json::to_string(&req).expect("a request serializes");
            let env = Envelope::new(Outbound::Publish(NatsPublish {
                subject: SUBJECT_AGENT_REQUESTS.into(),
                payload,
                headers: Default::default(),
            }));
            producer::queue(pipeline, &self.keys().outbound(), None, &env).await?;
        }
        let env = Envelope::new(AgentMessage::Request(req));
        producer::queue(pipeline, stream, None, &env).await?;
        Ok(())
    }

    /// Callback-worker: records a proposal; the last one of a round moves the deliberation on.
    pub async fn on_proposal(&self, cb: &ProposalCallback, redelivered: bool) -> Result<Handled> {
        let id = &cb.deliberation_id;
        let proposal = Proposal {
            member: cb.member.clone(),
            agent_id: cb.agent_id.clone(),
            round: cb.round,
            content: cb.content.clone(),
            checks: finite_scores(&cb.checks),
            self_score: cb.self_score.filter(|s| s.is_finite()),
            received_ms: now_ms(),
        };
        let rec = self.store.record(id, &proposal).await?;
        match rec.outcome {
            RecordOutcome::RoundComplete => {
                self.complete_round(id, rec.round).await?;
            }
            // An earlier delivery may have died before the step this one would have taken, or
            // before what follows the end it made.
            RecordOutcome::Duplicate | RecordOutcome::Stale | RecordOutcome::Terminal
                if redelivered =>
            {
                self.resume(id).await?;
            }
            _ => {}
        }
        Ok(match rec.outcome {
            RecordOutcome::Recorded | RecordOutcome::RoundComplete => {
                Handled::Applied(rec.outcome.as_str())
            }
            other => Handled::Dropped(other.as_str()),
        })
    }

    /// Moves on after `round` got every proposal: the next review round, or scoring.
    async fn complete_round(&self, id: &str, round: u32) -> Result<()> {
        let Some(mut view) = self.store.get(id).await? else {
            return Ok(());
        };
        if view.status.is_terminal() || view.round != round {
            return Ok(());
        }
        let rounds = view.spec.rounds;
        if round < rounds {
            let mut t = Transition::new(
                &[Status::Generating, Status::Reviewing],
                Status::Reviewing,
                format!("round {} of {rounds}: reviewing peers", round + 1),
            )
            .field("round", (round + 1).to_string());
            t.round = Some(round);
            if self.store.transition(id, &t).await? == Moved::Applied {
                view.round = round + 1;
                view.status = Status::Reviewing;
                self.send_round(&view, round + 1, &BTreeSet::new()).await?;
            }
            return Ok(());
        }
        self.finalize(view).await
    }

    /// Scores the proposals; asks the architect or completes.
    async fn finalize(&self, view: DeliberationView) -> Result<()> {
        let id = view.spec.deliberation_id.clone();
        let mut t = Transition::new(
            &[Status::Generating, Status::Reviewing, Status::Scoring],
            Status::Scoring,
            "scoring proposals",
        );
        t.received = view.received_now();
        if self.store.transition(&id, &t).await? != Moved::Applied {
            return Ok(());
        }
        let ranked = rank(
            latest_per_member(self.store.proposals(&id).await?),
            &view.spec.rubric,
        );
        if ranked.is_empty() {
            self.end_unsuccessfully(&view, Status::Failed, "no proposals to score".into())
                .await?;
            return Ok(());
        }
        if candidates(&ranked, view.spec.architect_top_k) >= 2 {
            return self.select(view, ranked).await;
        }
        self.complete(&view, ranked, 0, "score".into(), &[Status::Scoring])
            .await?;
        Ok(())
    }

    /// Asks an ARCHITECT agent to choose among the top candidates.
    async fn select(&self, view: DeliberationView, ranked: Vec<RankedProposal>) -> Result<()> {
        let id = &view.spec.deliberation_id;
        let top_k = candidates(&ranked, view.spec.architect_top_k);
        let architect = self
            .councils
            .pick(ARCHITECT, 1)
            .await?
            .into_iter()
            .next()
            .unwrap_or_else(|| Member::seat(ARCHITECT, 1));
        let t = Transition::new(
            &[Status::Scoring],
            Status::Selecting,
            format!("architect {} choosing among the top {top_k}", architect.id),
        )
        .field(
            "ranked",
            serde_json::to_string(&ranked).expect("ranked proposals serialize"),
        )
        .field("architect", architect.id.clone());
        let mut t = t;
        t.agent = architect.id.clone();
        if self.store.transition(id, &t).await? != Moved::Applied {
            return Ok(());
        }
        let candidates = ranked[..top_k]
            .iter()
            .map(|r| PeerProposal {
                proposal_id: r.proposal.id(id),
                member: r.proposal.member.clone(),
                content: r.proposal.content.clone(),
                score: r.score,
                rank: r.rank,
            })
            .collect();
        let mut req = self.request(&view, &architect, view.round, candidates);
        req.action = AgentAction::Select;
        req.role = ARCHITECT.into();
        req.member = architect.id.clone();
        let pipeline = self.client().pipeline();
        self.queue_request(&pipeline, &architect.stream(self.keys(), ARCHITECT), req)
            .await?;
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Callback-worker: the architect's choice completes the deliberation. A choice that is not
    /// among the candidates falls back to the top score.
    pub async fn on_selection(&self, cb: &SelectionCallback) -> Result<Handled> {
        let Some(view) = self.store.get(&cb.deliberation_id).await? else {
            return Ok(Handled::Dropped("missing"));
        };
        if view.status != Status::Selecting || view.architect.as_deref() != Some(&cb.member) {
            return Ok(Handled::Dropped("stale"));
        }
        let ranked = view.ranked.clone();
        let top_k = candidates(&ranked, view.spec.architect_top_k);
        let id = &view.spec.deliberation_id;
        let chosen = ranked[..top_k]
            .iter()
            .position(|r| r.proposal.member == cb.winner || r.proposal.id(id) == cb.winner);
        let (index, selected_by) = match chosen {
            Some(i) => (i, format!("architect:{}", cb.member)),
            None => (
                0,
                format!("score (architect {} chose no candidate)", cb.member),
            ),
        };
        self.complete(&view, ranked, index, selected_by, &[Status::Selecting])
            .await?;
        Ok(Handled::Applied("selected"))
    }

    /// Completes with `ranked[winner]` as the winner. True when this call ended it (false: it
    /// was not in a state of `from` any more).
    async fn complete(
        &self,
        view: &DeliberationView,
        ranked: Vec<RankedProposal>,
        winner: usize,
        selected_by: String,
        from: &[Status],
    ) -> Result<bool> {
        let id = &view.spec.deliberation_id;
        let w = &ranked[winner];
        let winner_id = w.proposal.id(id);
        let result = FinalResult {
            status: Status::Completed.as_str().into(),
            results: ranked.clone(),
            winner: w.proposal.member.clone(),
            winner_id: winner_id.clone(),
            selected_by: selected_by.clone(),
            error: String::new(),
            duration_ms: (now_ms() - view.created_ms).max(0),
        };
        let mut t = Transition::new(
            from,
            Status::Completed,
            format!("complete: {} wins ({selected_by})", w.proposal.member),
        )
        .field(
            "ranked",
            serde_json::to_string(&ranked).expect("ranked proposals serialize"),
        )
        .field("winner", w.proposal.member.clone())
        .field("winner_id", winner_id)
        .field("selected_by", selected_by);
        t.agent = w.proposal.member.clone();
        t.received = ranked.len() as u32;
        t.data = serde_json::to_string(&result).expect("a result serializes");
        let moved = self.store.transition(id, &t).await?;
        self.ended_here(id, moved).await
    }

    /// Ends it `timed_out` or `failed` with what came in, ranked, and no winner. True when this
    /// call ended it (false: it had ended already).
    async fn end_unsuccessfully(
        &self,
        view: &DeliberationView,
        status: Status,
        error: String,
    ) -> Result<bool> {
        let moved = self
            .end_without_winner(view, status, error.clone(), &error)
            .await?;
        self.ended_here(&view.spec.deliberation_id, moved).await
    }

    /// After a move of deliberation `id` to an end: when it `moved` here, runs what follows the
    /// end on it as stored ([`Engine::after_end`]). True when this call ended it.
    async fn ended_here(&self, id: &str, moved: Moved) -> Result<bool> {
        if moved != Moved::Applied {
            return Ok(false);
        }
        if let Some(done) = self.store.get(id).await? {
            self.after_end(&done).await?;
        }
        Ok(true)
    }

    /// Moves `view`'s deliberation to final `status` (from any open state) with what came in
    /// ranked, no winner, `error` as its error and `step` as its last update's words.
    async fn end_without_winner(
        &self,
        view: &DeliberationView,
        status: Status,
        step: String,
        error: &str,
    ) -> Result<Moved> {
        let id = &view.spec.deliberation_id;
        let ranked = rank(
            latest_per_member(self.store.proposals(id).await?),
            &view.spec.rubric,
        );
        let result = FinalResult {
            status: status.as_str().into(),
            results: ranked.clone(),
            error: error.to_owned(),
            duration_ms: (now_ms() - view.created_ms).max(0),
            ..Default::default()
        };
        let mut t = Transition::new(&[], status, step)
            .field(
                "ranked",
                serde_json::to_string(&ranked).expect("ranked proposals serialize"),
            )
            .field("error", error);
        t.received = ranked.len() as u32;
        t.data = serde_json::to_string(&result).expect("a result serializes");
        Ok(self.store.transition(id, &t).await?)
    }

    /// The deliberation `id` when it is a council subtask of planning session `sid`
    /// ([`is_council_of_session`]).
    pub async fn council_of(&self, sid: &str, id: &str) -> Result<Option<DeliberationView>> {
        if !sid.starts_with(SESSION_PREFIX) || !crate::agent::valid_name(id) {
            return Ok(None);
        }
        Ok(self
            .store
            .get(id)
            .await?
            .filter(|v| is_council_of_session(&v.spec, sid)))
    }

    /// Front doors (`CancelTask`): when `id` names a council subtask of planning session `sid`,
    /// asks the dispatchers to cancel its deliberation with the same `task.cancel` a task
    /// cancel sends, unless it has ended, and answers its status as read (`None`: `id` is no
    /// council subtask of `sid`).
    pub async fn request_council_cancel(
        &self,
        sid: &str,
        id: &str,
        reason: &str,
    ) -> Result<Option<Status>> {
        let Some(view) = self.council_of(sid, id).await? else {
            return Ok(None);
        };
        if !view.status.is_terminal() {
            let env = Envelope::new(TaskCommand::Cancel(TaskCancel {
                session_id: sid.to_owned(),
                task_id: id.to_owned(),
                reason: reason.to_owned(),
            }));
            producer::send(self.client(), &self.keys().tasks(), None, &env).await?;
        }
        Ok(Some(view.status))
    }

    /// Dispatcher: ends deliberation `id` `cancelled` with `reason` as its error, from whatever
    /// open state it is in (one compare-and-set: `pending`, any round, scoring, selecting), with
    /// what came in ranked and no winner. Then the members that had not answered its round (and
    /// an architect asked to choose) get an `agent.cancel`, and what follows every end runs
    /// (the failure event on `orchestrator.events`, stats, Planning's report, its deadline entry
    /// dropped). One that had ended already is left as it is ([`Cancelled::AlreadyEnded`]); a
    /// redelivered command finding it cancelled sends the cancels again and finishes what a
    /// crash may have left undone.
    pub async fn cancel_deliberation(
        &self,
        id: &str,
        reason: &str,
        redelivered: bool,
    ) -> Result<Cancelled> {
        let Some(view) = self.store.get(id).await? else {
            return Ok(Cancelled::Missing);
        };
        let outcome = if view.status.is_terminal() {
            Cancelled::AlreadyEnded(view.status)
        } else {
            let step = format!("cancelled: {reason}");
            match self
                .end_without_winner(&view, Status::Cancelled, step, reason)
                .await?
            {
                Moved::Applied => Cancelled::Now,
                Moved::Terminal(s) => Cancelled::AlreadyEnded(s),
                Moved::Missing => return Ok(Cancelled::Missing),
                // From any open state and round: only an end refuses it.
                Moved::Refused(s, _) => {
                    return Err(StoreError::Reply(format!("cancel refused in state {s}")).into());
                }
            }
        };
        let again = outcome == Cancelled::AlreadyEnded(Status::Cancelled);
        if outcome == Cancelled::Now || again {
            let Some(done) = self.store.get(id).await? else {
                return Ok(outcome);
            };
            if outcome == Cancelled::Now || redelivered {
                self.stop_outstanding(&done, reason).await?;
            }
            if outcome == Cancelled::Now || !done.settled {
                self.after_end(&done).await?;
            }
        }
        if let Cancelled::AlreadyEnded(status) = outcome {
            tracing::info!(deliberation_id = %id, %status, "the deliberation had ended; the cancel changes nothing");
        }
        Ok(outcome)
    }

    /// Sends `agent.cancel` to whoever still works on ended deliberation `view`: the members
    /// without a proposal in its round, and the architect asked to choose when none was chosen.
    async fn stop_outstanding(&self, view: &DeliberationView, reason: &str) -> Result<()> {
        let id = &view.spec.deliberation_id;
        if view.round >= 1 && !view.members.is_empty() {
            let answered = self.answered(id, view.round).await?;
            let stragglers: Vec<String> = view
                .members
                .iter()
                .filter(|m| !answered.contains(&m.id))
                .map(|m| m.id.clone())
                .collect();
            self.cancel(id, &view.spec.role, &stragglers, reason)
                .await?;
        }
        if let Some(architect) = &view.architect
            && view.winner.is_none()
        {
            self.cancel(id, ARCHITECT, std::slice::from_ref(architect), reason)
                .await?;
        }
        Ok(())
    }

    /// Redelivery repair: re-runs whatever step the deliberation's state says is due.
    pub async fn resume(&self, id: &str) -> Result<()> {
        let Some(view) = self.store.get(id).await? else {
            return Ok(());
        };
        match view.status {
            Status::Generating | Status::Reviewing => {
                if view.received_now() as usize >= view.members.len() {
                    self.complete_round(id, view.round).await?;
                } else {
                    // The requests of this round may never have been sent.
                    let answered = self.answered(id, view.round).await?;
                    self.send_round(&view, view.round, &answered).await?;
                }
            }
            Status::Scoring => self.finalize(view).await?,
            // Whatever ended it may have died before what follows an end.
            s if s.is_terminal() && !view.settled => self.after_end(&view).await?,
            _ => {}
        }
        Ok(())
    }

    /// Members with a proposal in `round`.
    async fn answered(&self, id: &str, round: u32) -> Result<BTreeSet<String>> {
        Ok(self
            .store
            .proposals(id)
            .await?
            .into_iter()
            .filter(|p| p.round == round)
            .map(|p| p.member)
            .collect())
    }

    /// Sweeper: deliberation `id` is overdue but no longer open ([`Expired::NotOpen`]). Whatever
    /// ended it may have died before what follows an end (its deadline entry, still there, says
    /// so): that is finished here, each part once. One settled already, or unknown, only loses
    /// its entry.
    pub async fn settle(&self, id: &str) -> Result<()> {
        match self.store.get(id).await? {
            Some(view) if view.status.is_terminal() && !view.settled => self.after_end(&view).await,
            _ => {
                let _: i64 = self
                    .client()
                    .zrem(
                        self.keys().deadlines(),
                        Keys::deliberation_deadline_member(id),
                    )
                    .await
                    .map_err(StoreError::from)?;
                Ok(())
            }
        }
    }

    /// Sweeper: deliberation `id` reached its deadline. With at least `quorum` proposals it
    /// completes on what came in (each member's newest proposal; no architect step), otherwise it
    /// times out. Members that had not answered the current round (or the architect) get an
    /// `agent.cancel` first, so whoever sees the end sees the cancels too.
    ///
    /// Says what happened ([`Expired`]): only the call whose compare-and-set ended it answers
    /// [`Expired::Ended`], so counting those counts each expired deliberation once, however
    /// many sweeps (or sweepers) saw it overdue.
    pub async fn expire(&self, id: &str) -> Result<Expired> {
        let Some(view) = self.store.get(id).await? else {
            return Ok(Expired::NotOpen);
        };
        self.expire_as_read(view).await
    }

    /// [`Engine::expire`] on the deliberation as read in `view`, which may be stale by the time
    /// its compare-and-set runs: a callback-worker can move it on meanwhile (say the last
    /// proposal arrives at the deadline and scoring hands it to an architect, `selecting`), or
    /// another sweeper end it. The refused end then leaves it open ([`Expired::Refused`]), and
    /// its deadline entry is what brings the sweeper back to end it (the architect request is
    /// already past its deadline, so no answer will). The entry is removed only once the
    /// deliberation is seen to have ended. Public so tests can replay those races.
    #[doc(hidden)]
    pub async fn expire_as_read(&self, view: DeliberationView) -> Result<Expired> {
        let id = view.spec.deliberation_id.as_str();
        let spec = &view.spec;
        let before = view.status;
        let timed_out = Expired::Ended(Status::TimedOut);
        let completed = Expired::Ended(Status::Completed);
        let ended_here = match view.status {
            s if s.is_terminal() => return Ok(Expired::NotOpen),
            Status::Pending => self
                .end_unsuccessfully(
                    &view,
                    Status::TimedOut,
                    "no dispatcher started the deliberation before its deadline".into(),
                )
                .await?
                .then_some(timed_out),
            Status::Selecting => {
                let architect = view.architect.clone().unwrap_or_default();
                // Stop the straggler first: when the end is visible, so is the cancel.
                self.cancel(
                    id,
                    ARCHITECT,
                    std::slice::from_ref(&architect),
                    "deadline passed",
                )
                .await?;
                let ranked = view.ranked.clone();
                self.complete(
                    &view,
                    ranked,
                    0,
                    format!("score (architect {architect} did not answer before the deadline)"),
                    &[Status::Selecting],
                )
                .await?
                .then_some(completed)
            }
            _ => {
                let latest = latest_per_member(self.store.proposals(id).await?);
                let answered = self.answered(id, view.round).await?;
                let stragglers: Vec<String> = view
                    .members
                    .iter()
                    .filter(|m| !answered.contains(&m.id))
                    .map(|m| m.id.clone())
                    .collect();
                // Stop the stragglers first: when the end is visible, so are the cancels.
                self.cancel(id, &spec.role, &stragglers, "deadline passed")
                    .await?;
                if latest.len() as u32 >= spec.quorum {
                    let mut t = Transition::new(
                        &[Status::Generating, Status::Reviewing, Status::Scoring],
                        Status::Scoring,
                        format!(
                            "deadline: scoring {} of {} proposals (quorum {})",
                            latest.len(),
                            spec.num_agents,
                            spec.quorum
                        ),
                    );
                    t.received = latest.len() as u32;
                    if self.store.transition(id, &t).await? == Moved::Applied {
                        // Read again now that no proposal can be recorded (only `generating` and
                        // `reviewing` take them): one recorded since the read above is in the
                        // event log, and is scored with the others.
                        let latest = latest_per_member(self.store.proposals(id).await?);
                        let ranked = rank(latest, &spec.rubric);
                        self.complete(
                            &view,
                            ranked,
                            0,
                            "score (quorum at the deadline)".into(),
                            &[Status::Scoring],
                        )
                        .await?
                        .then_some(completed)
                    } else {
                        None
                    }
                } else {
                    self.end_unsuccessfully(
                        &view,
                        Status::TimedOut,
                        format!(
                            "only {} of {} agents answered before the deadline (quorum {})",
                            latest.len(),
                            spec.num_agents,
                            spec.quorum
                        ),
                    )
                    .await?
                    .then_some(timed_out)
                }
            }
        };
        // An end applied here already dropped the deadline (`after_end`).
        if let Some(ended) = ended_here {
            return Ok(ended);
        }
        // One that was refused leaves the entry for the next sweep unless another step ended it
        // meanwhile (its `after_end` may not have run yet if it crashed: drop it here then).
        let now = self.store.get(id).await?;
        match now.map(|v| v.status) {
            Some(status) if !status.is_terminal() => {
                tracing::info!(
                    deliberation_id = %id,
                    was = %before,
                    %status,
                    "the deadline's end was refused (another step moved it on); the next sweep ends it"
                );
                Ok(Expired::Refused(status))
            }
            _ => {
                let _: i64 = self
                    .client()
                    .zrem(
                        self.keys().deadlines(),
                        Keys::deliberation_deadline_member(id),
                    )
                    .await?;
                Ok(Expired::NotOpen)
            }
        }
    }

    /// Tells `members` of `role` to stop working on deliberation `id`.
    pub async fn cancel(
        &self,
        id: &str,
        role: &str,
        members: &[String],
        reason: &str,
    ) -> Result<()> {
        let members: Vec<&String> = members.iter().filter(|m| !m.is_empty()).collect();
        if members.is_empty() {
            return Ok(());
        }
        let pipeline = self.client().pipeline();
        for m in &members {
            let env = Envelope::new(AgentControl::Cancel(AgentCancel {
                deliberation_id: id.to_owned(),
                member: (*m).clone(),
                reason: reason.to_owned(),
            }));
            producer::queue(
                &pipeline,
                &self.keys().agents_control(role),
                Some(CONTROL_MAXLEN),
                &env,
            )
            .await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        metrics::counter!("fleet_deliberation_stragglers_cancelled_total")
            .increment(members.len() as u64);
        tracing::info!(deliberation_id = %id, role, stragglers = members.len(), "cancelled stragglers");
        Ok(())
    }

    /// What follows an end, each part once however often this runs (a step that died halfway
    /// through it is finished by its redelivery, [`Engine::resume`], or by the sweeper,
    /// [`Engine::settle`]): the decision (or the failure) is published first, under
    /// deterministic envelope ids (a repeat is recognisable), then the first call to mark it
    /// settled counts it in the stats and latency and tells Planning of a council subtask's end
    /// (best effort, in the background), and last its deadline entry is dropped, so a failure
    /// anywhere before leaves the entry that brings the sweeper back.
    async fn after_end(&self, view: &DeliberationView) -> Result<()> {
        let keys = self.keys();
        let spec = &view.spec;
        if view.status == Status::Completed {
            self.emit_decision(view).await?;
        } else {
            self.emit_failure(view).await?;
        }
        let first = !view.settled && self.store.settle(&spec.deliberation_id).await?;
        if first && let Some(planning) = &self.planning {
            // Here rather than after the counters: a call that fails below is finished by one
            // that is not the first, which would not report it.
            planning.deliberation_ended(view);
        }
        let duration = view.duration_ms();
        let pipeline = self.client().pipeline();
        if first {
            let _: () = pipeline
                .hincrby(
                    keys.stats(),
                    format!("deliberations_{}", view.status.as_str()),
                    1,
                )
                .await?;
            let latency = keys.stats_latency(if spec.kind == kind::ORCHESTRATE {
                kind::ORCHESTRATE
            } else {
                kind::DELIBERATE
            });
            let _: () = pipeline
                .xadd(
                    &latency,
                    false,
                    fred::types::streams::XCap::try_from(("MAXLEN", "~", LATENCY_SAMPLES))?,
                    "*",
                    vec![
                        ("ms", duration.to_string()),
                        ("status", view.status.as_str().to_owned()),
                    ],
                )
                .await?;
        }
        let _: () = pipeline
            .zrem(
                keys.deadlines(),
                Keys::deliberation_deadline_member(&spec.deliberation_id),
            )
            .await?;
        let _: Vec<Value> = pipeline.all().await?;
        if first {
            metrics::histogram!("fleet_deliberation_duration_seconds", "outcome" => view.status.as_str())
                .record(duration as f64 / 1000.0);
            tracing::info!(
                deliberation_id = %spec.deliberation_id,
                status = %view.status,
                winner = view.winner.as_deref().unwrap_or(""),
                duration_ms = duration,
                "deliberation ended"
            );
        }
        Ok(())
    }

    /// Publishes to NATS `orchestrator.events` that a deliberation ended without a winner
    /// (deterministic envelope id: a repeat is recognisable).
    async fn emit_failure(&self, view: &DeliberationView) -> Result<()> {
        let spec = &view.spec;
        let payload = json!({
            "event_type": format!("deliberation.{}", view.status.as_str()),
            "deliberation_id": spec.deliberation_id,
            "kind": spec.kind,
            "role": spec.role,
            "status": view.status.as_str(),
            "case_id": spec.case_id,
            "story_id": spec.story_id,
            "plan_id": spec.plan_id,
            "error": view.error,
            "proposals_received": view.ranked.len(),
            "duration_ms": view.duration_ms(),
        });
        let env = Envelope::with_id(
            Uuid::new_v5(
                &ID_NAMESPACE,
                format!("outbound:{}", spec.deliberation_id).as_bytes(),
            ),
            Outbound::Publish(NatsPublish {
                subject: SUBJECT_ORCHESTRATOR_EVENTS.into(),
                payload: payload.to_string(),
                headers: Default::default(),
            }),
        );
        producer::send(self.client(), &self.keys().outbound(), None, &env).await?;
        Ok(())
    }

    /// Writes the decision of a completed deliberation to `fleet:decisions` and NATS
    /// `orchestrator.events` (deterministic envelope ids: a repeat is recognisable).
    pub async fn emit_decision(&self, view: &DeliberationView) -> Result<()> {
        let Some(decision) = decision_of(view) else {
            return Ok(());
        };
        let id = &view.spec.deliberation_id;
        let mut payload = serde_json::to_value(&decision).expect("a decision serializes");
        payload["event_type"] = "deliberation.completed".into();
        let pipeline = self.client().pipeline();
        let env = Envelope::with_id(
            Uuid::new_v5(&ID_NAMESPACE, format!("decision:{id}").as_bytes()),
            DecisionMessage::Decision(decision),
        );
        producer::queue(
            &pipeline,
            &self.keys().decisions(),
            Some(DECISIONS_MAXLEN),
            &env,
        )
        .await?;
        let env = Envelope::with_id(
            Uuid::new_v5(&ID_NAMESPACE, format!("outbound:{id}").as_bytes()),
            Outbound::Publish(NatsPublish {
                subject: SUBJECT_ORCHESTRATOR_EVENTS.into(),
                payload: payload.to_string(),
                headers: Default::default(),
            }),
        );
        producer::queue(&pipeline, &self.keys().outbound(), None, &env).await?;
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }
}

/// The decision of a completed deliberation.
pub fn decision_of(view: &DeliberationView) -> Option<Decision> {
    let spec = &view.spec;
    let winner_id = view.winner_id.clone()?;
    let w = view
        .ranked
        .iter()
        .find(|r| r.proposal.id(&spec.deliberation_id) == winner_id)?;
    Some(Decision {
        deliberation_id: spec.deliberation_id.clone(),
        kind: spec.kind.clone(),
        role: spec.role.clone(),
        case_id: spec.case_id.clone(),
        story_id: spec.story_id.clone(),
        plan_id: spec.plan_id.clone(),
        winner: w.proposal.member.clone(),
        winner_id,
        winner_content: w.proposal.content.clone(),
        score: w.score,
        selected_by: view.selected_by.clone(),
        alternatives: view
            .ranked
            .iter()
            .map(|r| Alternative {
                proposal_id: r.proposal.id(&spec.deliberation_id),
                member: r.proposal.member.clone(),
                score: r.score,
                rank: r.rank,
                all_passed: r.all_passed,
            })
            .collect(),
        decided_ms: view.finished_ms.unwrap_or_else(now_ms),
        duration_ms: view.duration_ms(),
    })
}
