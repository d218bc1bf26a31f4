//! `Deliberate`, `Orchestrate`, `StreamDeliberation`, `GetDeliberationResult`.
//!
//! A request becomes a [`DeliberationSpec`] (validated: every bad field is INVALID_ARGUMENT with
//! a message, and nothing is written), the call takes a connection of its own for waiting (one of
//! `max_waiters`; none free: RESOURCE_EXHAUSTED, still before anything is written),
//! [`fleet::deliberation::Engine::accept`] creates it (or finds the one with the same task id
//! and the same spec: a retry; one with another spec is ALREADY_EXISTS, and nothing is started)
//! and asks the dispatchers to start it, and the call follows `<p>:{d:<id>}:events` on that
//! connection until the final update, the client's deadline (DEADLINE_EXCEEDED; the
//! deliberation goes on) or the client going away. A stream whose log expired under it ends
//! with the stored record's final state.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use fleet::deliberation::store::{DeliberationStore, DeliberationView, FinalResult, Update};
use fleet::deliberation::{
    DeliberationSpec, MAX_AGENTS, MAX_TIMEOUT_MS, Rubric, kind, latest_per_member, parse_role,
    rank, validate_metadata,
};
use fleet::stream::entry::StreamId;
use fleet::time::now_ms;
use fleet_proto::orchestrator::v1 as pb;
use tonic::{Request, Status};
use tracing::Span;
use uuid::Uuid;

use super::{BoxStream, Orchestrator, READ_BLOCK, client_deadline, convert, error};

/// How long a call without a deadline waits past the deliberation's own deadline (the sweeper
/// ends it shortly after; this only bounds a wait on a deliberation nobody ends).
const WAIT_PAST_DEADLINE: Duration = Duration::from_secs(60);
/// Default council size of an orchestration.
const DEFAULT_ORCHESTRATION_AGENTS: u32 = 3;
/// Default number of candidates an architect chooses among.
const DEFAULT_ARCHITECT_TOP_K: u32 = 3;

/// The fields a deliberation request and an orchestration share, before validation.
struct Draft {
    kind: &'static str,
    task_id: String,
    description: String,
    role: String,
    constraints: Option<pb::DeliberationConstraints>,
    rounds: i32,
    num_agents: i32,
    min_proposals: i32,
    architect_top_k: u32,
    custom_params: BTreeMap<String, String>,
    case_id: String,
    story_id: String,
    plan_id: String,
}

fn non_negative(what: &str, v: i32) -> Result<u32, Status> {
    u32::try_from(v).map_err(|_| Status::invalid_argument(format!("{what} must not be negative")))
}

impl Orchestrator {
    /// A validated spec, or INVALID_ARGUMENT saying what is wrong.
    fn spec(&self, d: Draft) -> Result<DeliberationSpec, Status> {
        let role = parse_role(&d.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "role `{}` is not one of {}",
                d.role.chars().take(32).collect::<String>(),
                fleet::deliberation::ROLES.join(", ")
            ))
        })?;
        let c = d.constraints.unwrap_or_default();
        let mut rounds = non_negative("rounds", d.rounds)?.max(1);
        let max_iterations = non_negative("max_iterations", c.max_iterations)?;
        if max_iterations > 0 {
            rounds = rounds.min(max_iterations);
        }
        let num_agents = non_negative("num_agents", d.num_agents)?;
        let quorum = match non_negative("min_proposals", d.min_proposals)? {
            0 => DeliberationSpec::majority(num_agents.clamp(1, MAX_AGENTS)),
            k => k,
        };
        let timeout_ms = match (
            non_negative("timeout_ms", c.timeout_ms)?,
            non_negative("timeout_seconds", c.timeout_seconds)?,
        ) {
            (0, 0) => self.limits.default_deliberation_timeout.as_millis() as u64,
            (0, s) => u64::from(s) * 1000,
            (ms, _) => u64::from(ms),
        };
        if timeout_ms > MAX_TIMEOUT_MS {
            return Err(Status::invalid_argument(format!(
                "the timeout must be at most {} seconds",
                MAX_TIMEOUT_MS / 1000
            )));
        }
        let rubric = c.rubric.unwrap_or_default();
        // Each map on its own first, so the message names the field at fault; the merged one
        // is checked again with the spec.
        let invalid = |e: fleet::deliberation::InvalidSpec| Status::invalid_argument(e.0);
        validate_metadata("metadata", &c.metadata).map_err(invalid)?;
        validate_metadata("custom_params", &d.custom_params).map_err(invalid)?;
        let mut metadata: BTreeMap<String, String> = c.metadata.into_iter().collect();
        metadata.extend(d.custom_params);
        let now = now_ms();
        let spec = DeliberationSpec {
            deliberation_id: if d.task_id.is_empty() {
                Uuid::now_v7().to_string()
            } else {
                d.task_id
            },
            kind: d.kind.to_owned(),
            role: role.to_owned(),
            description: d.description,
            num_agents,
            quorum,
            rounds,
            deadline_ms: now + timeout_ms as i64,
            rubric: Rubric {
                description: rubric.description,
                weights: rubric.weights.into_iter().collect(),
                self_score_weight: rubric.self_score_weight,
            },
            requirements: c.requirements,
            metadata,
            architect_top_k: d.architect_top_k,
            case_id: d.case_id,
            story_id: d.story_id,
            plan_id: d.plan_id,
            created_ms: now,
        };
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(spec)
    }

    fn deliberate_draft(req: pb::DeliberateRequest) -> Draft {
        Draft {
            kind: kind::DELIBERATE,
            task_id: req.task_id,
            description: req.task_description,
            role: req.role,
            constraints: req.constraints,
            rounds: req.rounds,
            num_agents: req.num_agents,
            min_proposals: req.min_proposals,
            architect_top_k: 0,
            custom_params: BTreeMap::new(),
            case_id: req.case_id,
            story_id: req.story_id,
            plan_id: req.plan_id,
        }
    }

    /// Creates the deliberation (or finds the one with its id and spec) and asks for it to
    /// start; ALREADY_EXISTS when its id names a deliberation with another spec.
    async fn accept(&self, spec: &DeliberationSpec) -> Result<(), Status> {
        self.chat.backpressure.check().map_err(error::chat)?;
        let accepted = self.engine.accept(spec).await.map_err(error::engine)?;
        tracing::info!(
            created = accepted.created,
            status = %accepted.status,
            role = %spec.role,
            n = spec.num_agents,
            rounds = spec.rounds,
            "deliberation accepted"
        );
        Ok(())
    }

    /// Follows deliberation `id` on `reader` until it ends, the client's deadline, or shutdown.
    /// The caller takes `reader` (a waiter slot) before it accepts the deliberation, so a call
    /// refused for want of a slot has started nothing.
    async fn wait_for_end(
        &self,
        id: &str,
        client: Option<Instant>,
        reader: super::BlockingReader,
    ) -> Result<DeliberationView, Status> {
        let store = &self.engine.store;
        let view = store
            .get(id)
            .await
            .map_err(error::store)?
            .ok_or_else(|| Status::not_found(format!("deliberation `{id}` not found")))?;
        if view.status.is_terminal() {
            return Ok(view);
        }
        let own_deadline = Instant::now()
            + Duration::from_millis((view.spec.deadline_ms - now_ms()).max(0) as u64)
            + WAIT_PAST_DEADLINE;
        let until = client.map_or(own_deadline, |c| c.min(own_deadline));
        let mut after = StreamId::ZERO;
        let mut status = view.status;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Status::unavailable(format!(
                    "this server is shutting down; deliberation `{id}` goes on: call again (any replica answers)"
                )));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(format!(
                    "deliberation `{id}` is still {status}; it goes on: query GetDeliberationResult later"
                )));
            }
            let block = left.min(READ_BLOCK).as_millis().max(1) as u64;
            let read = tokio::select! {
                r = DeliberationStore::read_updates(&reader.client, self.keys(), id, after, 256, Some(block)) => r,
                _ = self.shutdown.cancelled() => continue,
            };
            let updates = read.map_err(error::store)?;
            if updates.is_empty() {
                // The log may have expired or been trimmed: the hash has the last word.
                let view = store.get(id).await.map_err(error::store)?;
                match view {
                    Some(v) if v.status.is_terminal() => return Ok(v),
                    Some(v) => status = v.status,
                    None => {
                        return Err(Status::not_found(format!("deliberation `{id}` expired")));
                    }
                }
                continue;
            }
            for u in &updates {
                after = u.event_id;
                if let Some(s) = u.status() {
                    status = s;
                }
            }
            if updates.iter().any(Update::is_terminal) {
                return store
                    .get(id)
                    .await
                    .map_err(error::store)?
                    .ok_or_else(|| Status::not_found(format!("deliberation `{id}` expired")));
            }
        }
    }

    fn deliberate_response(view: &DeliberationView) -> pb::DeliberateResponse {
        let spec = &view.spec;
        pb::DeliberateResponse {
            task_id: spec.deliberation_id.clone(),
            status: convert::deliberation_status(view.status) as i32,
            results: convert::ranked_all(&spec.deliberation_id, &spec.role, &view.ranked),
            winner_id: view.winner_id.clone().unwrap_or_default(),
            duration_ms: view.duration_ms(),
            error: view.error.clone(),
            proposals_received: view.ranked.len() as i32,
            num_agents: spec.num_agents as i32,
        }
    }

    #[tracing::instrument(skip_all, fields(task_id))]
    pub async fn deliberate_rpc(
        &self,
        req: Request<pb::DeliberateRequest>,
    ) -> Result<pb::DeliberateResponse, Status> {
        let deadline = client_deadline(&req);
        let spec = self.spec(Self::deliberate_draft(req.into_inner()))?;
        Span::current().record("task_id", spec.deliberation_id.as_str());
        let reader = self.blocking_reader().await?;
        self.accept(&spec).await?;
        let view = self
            .wait_for_end(&spec.deliberation_id, deadline, reader)
            .await?;
        Ok(Self::deliberate_response(&view))
    }

    #[tracing::instrument(skip_all, fields(task_id))]
    pub async fn orchestrate_rpc(
        &self,
        req: Request<pb::OrchestrateRequest>,
    ) -> Result<pb::OrchestrateResponse, Status> {
        let deadline = client_deadline(&req);
        let req = req.into_inner();
        let o = req.options.unwrap_or_default();
        let role = parse_role(&req.role).unwrap_or_default();
        let num_agents = match o.num_agents {
            0 => self
                .engine
                .councils
                .def(role)
                .await
                .map_err(error::council)?
                .map_or(DEFAULT_ORCHESTRATION_AGENTS, |d| d.num_agents) as i32,
            n => n,
        };
        let rounds = match o.rounds {
            0 if o.enable_peer_review => 2,
            r => r,
        };
        let architect_top_k = if o.use_architect_agent {
            match non_negative("architect_top_k", o.architect_top_k)? {
                0 => DEFAULT_ARCHITECT_TOP_K,
                k => k,
            }
        } else {
            0
        };
        let spec = self.spec(Draft {
            kind: kind::ORCHESTRATE,
            task_id: req.task_id,
            description: req.task_description,
            role: req.role,
            constraints: req.constraints,
            rounds,
            num_agents,
            min_proposals: o.min_proposals,
            architect_top_k,
            custom_params: o.custom_params.into_iter().collect(),
            case_id: req.case_id,
            story_id: req.story_id,
            plan_id: req.plan_id,
        })?;
        Span::current().record("task_id", spec.deliberation_id.as_str());
        let reader = self.blocking_reader().await?;
        self.accept(&spec).await?;
        let view = self
            .wait_for_end(&spec.deliberation_id, deadline, reader)
            .await?;
        let spec = &view.spec;
        let candidates = convert::ranked_all(&spec.deliberation_id, &spec.role, &view.ranked);
        let winner = view
            .winner_id
            .as_ref()
            .and_then(|w| candidates.iter().find(|c| &c.id == w).cloned());
        Ok(pb::OrchestrateResponse {
            execution_id: spec.deliberation_id.clone(),
            status: convert::deliberation_status(view.status) as i32,
            winner,
            candidates,
            duration_ms: view.duration_ms(),
            selected_by: view.selected_by.clone(),
            error: view.error.clone(),
            case_id: spec.case_id.clone(),
            story_id: spec.story_id.clone(),
            plan_id: spec.plan_id.clone(),
        })
    }

    #[tracing::instrument(skip_all, fields(task_id))]
    pub async fn stream_deliberation_rpc(
        &self,
        req: Request<pb::DeliberateRequest>,
    ) -> Result<BoxStream<pb::DeliberationUpdate>, Status> {
        let mut req = req.into_inner();
        let after = match std::mem::take(&mut req.last_event_id) {
            id if id.is_empty() => StreamId::ZERO,
            id => id.parse().map_err(|_| {
                Status::invalid_argument("last_event_id is not an event id (<ms>-<seq>)")
            })?,
        };
        let spec = self.spec(Self::deliberate_draft(req))?;
        Span::current().record("task_id", spec.deliberation_id.as_str());
        let reader = self.blocking_reader().await?;
        self.accept(&spec).await?;
        let view = self
            .engine
            .store
            .get(&spec.deliberation_id)
            .await
            .map_err(error::store)?
            .ok_or_else(|| Status::not_found("the deliberation vanished"))?;
        struct State {
            me: Orchestrator,
            reader: super::BlockingReader,
            view: DeliberationView,
            after: StreamId,
            pending: VecDeque<Update>,
            done: bool,
        }
        let state = State {
            me: self.clone(),
            reader,
            view,
            after,
            pending: VecDeque::new(),
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                let spec = &st.view.spec;
                if let Some(u) = st.pending.pop_front() {
                    st.done = u.is_terminal();
                    let update = convert::update(
                        &spec.deliberation_id,
                        &spec.role,
                        spec.num_agents,
                        spec.rounds,
                        &u,
                    );
                    return Some((Ok(update), st));
                }
                if st.me.shutdown.is_cancelled() {
                    st.done = true;
                    return Some((
                        Err(Status::unavailable(
                            "this server is shutting down; the deliberation goes on: stream it again (any replica answers)",
                        )),
                        st,
                    ));
                }
                let read = tokio::select! {
                    r = DeliberationStore::read_updates(
                        &st.reader.client,
                        st.me.keys(),
                        &spec.deliberation_id,
                        st.after,
                        256,
                        Some(READ_BLOCK.as_millis() as u64),
                    ) => r,
                    _ = st.me.shutdown.cancelled() => continue,
                };
                match read {
                    Ok(updates) if updates.is_empty() => {
                        // The log may have expired or been trimmed past its final update: the
                        // hash has the last word (as in `wait_for_end`).
                        match st.me.engine.store.get(&spec.deliberation_id).await {
                            Ok(Some(v)) if v.status.is_terminal() => {
                                st.done = true;
                                // Resumed after the final update, which the log still holds:
                                // nothing is left to send.
                                let store = &st.me.engine.store;
                                match store.newest_update(&spec.deliberation_id).await {
                                    Ok(Some(newest)) if newest <= st.after => return None,
                                    Ok(_) => {}
                                    Err(e) => return Some((Err(error::store(e)), st)),
                                }
                                let update = final_update(&v);
                                return Some((Ok(update), st));
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => {
                                st.done = true;
                                let id = &spec.deliberation_id;
                                return Some((
                                    Err(Status::not_found(format!("deliberation `{id}` expired"))),
                                    st,
                                ));
                            }
                            Err(e) => {
                                st.done = true;
                                return Some((Err(error::store(e)), st));
                            }
                        }
                    }
                    Ok(updates) => {
                        if let Some(last) = updates.last() {
                            st.after = last.event_id;
                        }
                        st.pending.extend(updates);
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(error::store(e)), st));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    #[tracing::instrument(skip_all, fields(task_id))]
    pub async fn get_deliberation_result_rpc(
        &self,
        req: Request<pb::GetDeliberationResultRequest>,
    ) -> Result<pb::GetDeliberationResultResponse, Status> {
        let id = req.into_inner().task_id;
        Span::current().record("task_id", id.as_str());
        if id.is_empty() {
            return Err(Status::invalid_argument("task_id is required"));
        }
        let not_found = || {
            Status::not_found(format!(
                "deliberation `{}` not found",
                id.chars().take(128).collect::<String>()
            ))
        };
        if !fleet::agent::valid_name(&id) {
            return Err(not_found());
        }
        let store = &self.engine.store;
        let view = store
            .get(&id)
            .await
            .map_err(error::store)?
            .ok_or_else(not_found)?;
        let provisional = if view.ranked.is_empty() {
            rank(
                latest_per_member(store.proposals(&id).await.map_err(error::store)?),
                &view.spec.rubric,
            )
        } else {
            Vec::new()
        };
        Ok(convert::result(&view, provisional))
    }
}

/// The final update of an ended deliberation whose log no longer has it, from the stored
/// record: the status, results and winner a final log entry carries. It has no `event_id`, not
/// being an entry of the log.
fn final_update(view: &DeliberationView) -> pb::DeliberationUpdate {
    let spec = &view.spec;
    let result = FinalResult {
        status: view.status.as_str().to_owned(),
        results: view.ranked.clone(),
        winner: view.winner.clone().unwrap_or_default(),
        winner_id: view.winner_id.clone().unwrap_or_default(),
        selected_by: view.selected_by.clone(),
        error: view.error.clone(),
        duration_ms: view.duration_ms(),
    };
    let u = Update {
        event_id: StreamId::ZERO,
        status: view.status.as_str().to_owned(),
        round: view.round,
        received: view.ranked.len() as u32,
        step: match view.winner.as_deref() {
            Some(w) => format!("{}: {w} wins ({})", view.status, view.selected_by),
            None => view.status.to_string(),
        },
        agent: view.winner.clone().unwrap_or_default(),
        data: serde_json::to_string(&result).expect("a result serializes"),
    };
    let mut out = convert::update(
        &spec.deliberation_id,
        &spec.role,
        spec.num_agents,
        spec.rounds,
        &u,
    );
    out.event_id = String::new();
    out.timestamp_ms = view.finished_ms.unwrap_or(view.updated_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_numbers_are_refused_with_their_name() {
        let e = non_negative("rounds", -1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("rounds"));
        assert_eq!(non_negative("x", 3).unwrap(), 3);
    }
}
