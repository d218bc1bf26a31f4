//! Councils: which agents serve each role, their capabilities and status, and how many members
//! a role's deliberations ask by default.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:council:<role>` | set | ids of the agents registered for the role |
//! | `<p>:council-agent:<id>` | hash | `role`, `capabilities` (JSON), `metadata` (JSON), `status` (ready / busy), `heartbeat_ms`, `last_heartbeat_ms`, `registered_ms` |
//! | `<p>:council-def:<role>` | hash | `num_agents`, `agent_type`, `config` (JSON), `created_ms` (from `CreateCouncil`) |
//! | `<p>:councils` | set | roles with a defined council |
//!
//! An agent registers (gRPC `RegisterAgent`, or an exec-worker started with `--agent-id`) and
//! heartbeats by registering again every `heartbeat_ms`. It counts as **offline** once its last
//! heartbeat is older than [`OFFLINE_AFTER_HEARTBEATS`] intervals; offline agents are never picked
//! as council members. The dispatcher picks a deliberation's members with [`Councils::pick`].

use std::collections::{BTreeMap, HashMap};

use fred::prelude::*;
use serde::Serialize;

use crate::agent::{MAX_LABEL_CHARS, check_label, excerpt};
use crate::deliberation::{MAX_AGENTS, Member};
use crate::keys::Keys;
use crate::time::now_ms;

/// An agent is offline after this many missed heartbeats.
pub const OFFLINE_AFTER_HEARTBEATS: i64 = 3;
/// Heartbeat interval of an agent that names none, ms.
pub const DEFAULT_HEARTBEAT_MS: i64 = 5_000;
/// Most capabilities (and metadata entries) per agent.
pub const MAX_CAPABILITIES: usize = 64;
/// The longest metadata value of a registered agent, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 1024;

/// An agent's status as its heartbeats say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Ready,
    Busy,
    Offline,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Ready => "ready",
            AgentStatus::Busy => "busy",
            AgentStatus::Offline => "offline",
        }
    }

    /// `ready` or `busy` (what an agent may say of itself).
    pub fn parse_reported(s: &str) -> Option<AgentStatus> {
        match s {
            "" | "ready" => Some(AgentStatus::Ready),
            "busy" => Some(AgentStatus::Busy),
            _ => None,
        }
    }
}

/// A registered agent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentRecord {
    pub agent_id: String,
    pub role: String,
    pub capabilities: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// As of now: offline when its heartbeat is stale, else what it reported.
    pub status: AgentStatus,
    pub heartbeat_ms: i64,
    pub last_heartbeat_ms: i64,
    pub registered_ms: i64,
}

impl AgentRecord {
    fn from_hash(id: &str, h: &HashMap<String, String>, now: i64) -> Option<AgentRecord> {
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        let heartbeat_ms = int("heartbeat_ms").unwrap_or(DEFAULT_HEARTBEAT_MS).max(1);
        let last = int("last_heartbeat_ms").unwrap_or(0);
        let reported = h
            .get("status")
            .and_then(|s| AgentStatus::parse_reported(s))
            .unwrap_or(AgentStatus::Ready);
        Some(AgentRecord {
            agent_id: id.to_owned(),
            role: h.get("role")?.clone(),
            capabilities: h
                .get("capabilities")
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default(),
            metadata: h
                .get("metadata")
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default(),
            status: if now - last > OFFLINE_AFTER_HEARTBEATS * heartbeat_ms {
                AgentStatus::Offline
            } else {
                reported
            },
            heartbeat_ms,
            last_heartbeat_ms: last,
            registered_ms: int("registered_ms").unwrap_or(last),
        })
    }
}

/// A registration (or heartbeat).
#[derive(Clone, Debug, Default)]
pub struct Registration {
    pub agent_id: String,
    pub role: String,
    pub capabilities: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Heartbeat interval, ms (0: [`DEFAULT_HEARTBEAT_MS`]).
    pub heartbeat_ms: i64,
    /// `ready` (default) or `busy`.
    pub status: String,
}

/// A council defined with `CreateCouncil`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CouncilDef {
    pub role: String,
    pub num_agents: u32,
    pub agent_type: String,
    pub config: BTreeMap<String, String>,
    pub created_ms: i64,
}

/// A council as listed: its definition (if any) and its agents.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CouncilView {
    pub role: String,
    pub def: Option<CouncilDef>,
    pub agents: Vec<AgentRecord>,
}

impl CouncilView {
    pub fn count(&self, status: AgentStatus) -> usize {
        self.agents.iter().filter(|a| a.status == status).count()
    }

    /// Members wanted: the definition's size, else the number of registered agents.
    pub fn wanted(&self) -> usize {
        self.def
            .as_ref()
            .map_or(self.agents.len(), |d| d.num_agents as usize)
    }

    /// `healthy` (enough ready agents), `degraded` (some) or `down` (none).
    pub fn health(&self) -> &'static str {
        let ready = self.count(AgentStatus::Ready);
        if ready == 0 {
            "down"
        } else if ready >= self.wanted().max(1) {
            "healthy"
        } else {
            "degraded"
        }
    }
}

/// Why a council operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum CouncilError {
    #[error("{0}")]
    Invalid(String),
    #[error("a council for role {0} already exists")]
    Exists(String),
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

/// The council registry in Redis.
#[derive(Clone)]
pub struct Councils {
    client: Client,
    keys: Keys,
}

impl Councils {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }

    /// Checks a registration; the message says what is wrong.
    pub fn validate(reg: &Registration) -> Result<&'static str, CouncilError> {
        let bad = |m: String| Err(CouncilError::Invalid(m));
        if !crate::agent::valid_name(&reg.agent_id) {
            return bad(format!(
                "agent_id `{}` must be {}",
                crate::agent::excerpt(&reg.agent_id),
                crate::agent::ID_RULE
            ));
        }
        let Some(role) = crate::deliberation::parse_role(&reg.role) else {
            return bad(format!(
                "role `{}` is not one of {}",
                reg.role.chars().take(32).collect::<String>(),
                crate::deliberation::ROLES.join(", ")
            ));
        };
        if reg.capabilities.len() > MAX_CAPABILITIES {
            return bad(format!("at most {MAX_CAPABILITIES} capabilities"));
        }
        for c in &reg.capabilities {
            if c.is_empty() {
                return bad("a capability is empty".into());
            }
            check_label("capability", c, MAX_LABEL_CHARS).map_err(CouncilError::Invalid)?;
        }
        if reg.metadata.len() > MAX_CAPABILITIES {
            return bad(format!("at most {MAX_CAPABILITIES} metadata entries"));
        }
        for (k, v) in &reg.metadata {
            check_label("metadata key", k, MAX_LABEL_CHARS).map_err(CouncilError::Invalid)?;
            // Values are free text (line breaks allowed), bounded so that a registration stays
            // small: it is read back for every member choice.
            let chars = v.chars().count();
            if chars > MAX_METADATA_VALUE_CHARS {
                return bad(format!(
                    "metadata `{}` is {chars} characters; the limit is {MAX_METADATA_VALUE_CHARS}",
                    excerpt(k)
                ));
            }
        }
        if !(0..=3_600_000).contains(&reg.heartbeat_ms) {
            return bad("heartbeat_ms must be between 0 and 3600000".into());
        }
        if AgentStatus::parse_reported(&reg.status).is_none() {
            return bad("status must be ready or busy".into());
        }
        Ok(role)
    }

    /// Registers (or refreshes) an agent. Returns the record and whether it is new.
    pub async fn register(&self, reg: &Registration) -> Result<(AgentRecord, bool), CouncilError> {
        let role = Self::validate(reg)?;
        let key = self.keys.council_agent(&reg.agent_id);
        let now = now_ms();
        let previous: Option<String> = self.client.hget(&key, "role").await?;
        let heartbeat_ms = if reg.heartbeat_ms > 0 {
            reg.heartbeat_ms
        } else {
            DEFAULT_HEARTBEAT_MS
        };
        let status = AgentStatus::parse_reported(&reg.status).unwrap_or(AgentStatus::Ready);
        let tx = self.client.multi();
        if let Some(old) = previous.as_deref().filter(|old| *old != role) {
            let _: () = tx
                .srem(self.keys.council(old), reg.agent_id.as_str())
                .await?;
        }
        let _: () = tx
            .hset(
                &key,
                [
                    ("role", role.to_owned()),
                    (
                        "capabilities",
                        serde_json::to_string(&reg.capabilities).unwrap_or_default(),
                    ),
                    (
                        "metadata",
                        serde_json::to_string(&reg.metadata).unwrap_or_default(),
                    ),
                    ("status", status.as_str().to_owned()),
                    ("heartbeat_ms", heartbeat_ms.to_string()),
                    ("last_heartbeat_ms", now.to_string()),
                ],
            )
            .await?;
        let _: () = tx.hsetnx(&key, "registered_ms", now).await?;
        let _: () = tx
            .sadd(self.keys.council(role), reg.agent_id.as_str())
            .await?;
        let _: Value = tx.exec(true).await?;
        let h: HashMap<String, String> = self.client.hgetall(&key).await?;
        let record = AgentRecord::from_hash(&reg.agent_id, &h, now_ms())
            .ok_or_else(|| CouncilError::Invalid("the agent vanished while registering".into()))?;
        Ok((record, previous.is_none()))
    }

    /// Removes an agent. Returns whether it was registered.
    pub async fn unregister(&self, agent_id: &str) -> Result<bool, CouncilError> {
        let key = self.keys.council_agent(agent_id);
        let role: Option<String> = self.client.hget(&key, "role").await?;
        let Some(role) = role else { return Ok(false) };
        let tx = self.client.multi();
        let _: () = tx.srem(self.keys.council(&role), agent_id).await?;
        let _: () = tx.del(&key).await?;
        let _: Value = tx.exec(true).await?;
        Ok(true)
    }

    /// One registered agent.
    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRecord>, CouncilError> {
        let h: HashMap<String, String> = self
            .client
            .hgetall(self.keys.council_agent(agent_id))
            .await?;
        Ok(AgentRecord::from_hash(agent_id, &h, now_ms()))
    }

    /// The agents registered for `role`, sorted by id.
    pub async fn agents(&self, role: &str) -> Result<Vec<AgentRecord>, CouncilError> {
        let mut ids: Vec<String> = self.client.smembers(self.keys.council(role)).await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.client.pipeline();
        for id in &ids {
            let _: () = pipeline.hgetall(self.keys.council_agent(id)).await?;
        }
        let hashes: Vec<HashMap<String, String>> = pipeline.all().await?;
        let now = now_ms();
        Ok(ids
            .iter()
            .zip(hashes)
            .filter_map(|(id, h)| AgentRecord::from_hash(id, &h, now))
            .collect())
    }

    /// `n` members for a deliberation of `role`: registered agents that are not offline (ready
    /// ones first, then busy ones, each by id), then pool seats `<ROLE>-<k>` for the rest.
    pub async fn pick(&self, role: &str, n: u32) -> Result<Vec<Member>, CouncilError> {
        let agents = self.agents(role).await?;
        Ok(pick_members(role, n, &agents))
    }

    /// Defines the council of `role`.
    pub async fn create(&self, def: &CouncilDef) -> Result<CouncilDef, CouncilError> {
        let Some(role) = crate::deliberation::parse_role(&def.role) else {
            return Err(CouncilError::Invalid(format!(
                "role `{}` is not one of {}",
                def.role.chars().take(32).collect::<String>(),
                crate::deliberation::ROLES.join(", ")
            )));
        };
        if !(1..=MAX_AGENTS).contains(&def.num_agents) {
            return Err(CouncilError::Invalid(format!(
                "num_agents must be between 1 and {MAX_AGENTS}"
            )));
        }
        if def.agent_type.len() > 64 || def.config.len() > MAX_CAPABILITIES {
            return Err(CouncilError::Invalid(
                "agent_type is at most 64 characters, config at most 64 entries".into(),
            ));
        }
        let key = self.keys.council_def(role);
        let created: bool = self
            .client
            .hsetnx(&key, "created_ms", def.created_ms)
            .await?;
        if !created {
            return Err(CouncilError::Exists(role.to_owned()));
        }
        let tx = self.client.multi();
        let _: () = tx
            .hset(
                &key,
                [
                    ("num_agents", def.num_agents.to_string()),
                    ("agent_type", def.agent_type.clone()),
                    (
                        "config",
                        serde_json::to_string(&def.config).unwrap_or_default(),
                    ),
                ],
            )
            .await?;
        let _: () = tx.sadd(self.keys.councils(), role).await?;
        let _: Value = tx.exec(true).await?;
        Ok(CouncilDef {
            role: role.to_owned(),
            ..def.clone()
        })
    }

    /// The definition of `role`'s council, if any.
    pub async fn def(&self, role: &str) -> Result<Option<CouncilDef>, CouncilError> {
        let h: HashMap<String, String> = self.client.hgetall(self.keys.council_def(role)).await?;
        let Some(num) = h.get("num_agents").and_then(|n| n.parse().ok()) else {
            return Ok(None);
        };
        Ok(Some(CouncilDef {
            role: role.to_owned(),
            num_agents: num,
            agent_type: h.get("agent_type").cloned().unwrap_or_default(),
            config: h
                .get("config")
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default(),
            created_ms: h
                .get("created_ms")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
        }))
    }

    /// Deletes `role`'s council and unregisters its agents (live agents register again on their
    /// next heartbeat). Returns whether it existed and how many agents were removed.
    pub async fn delete(&self, role: &str) -> Result<(bool, usize), CouncilError> {
        let ids: Vec<String> = self.client.smembers(self.keys.council(role)).await?;
        let existed: i64 = self.client.del(self.keys.council_def(role)).await?;
        let tx = self.client.multi();
        let _: () = tx.srem(self.keys.councils(), role).await?;
        for id in &ids {
            let _: () = tx.del(self.keys.council_agent(id)).await?;
        }
        let _: () = tx.del(self.keys.council(role)).await?;
        let _: Value = tx.exec(true).await?;
        Ok((existed > 0, ids.len()))
    }

    /// Every role with a definition or registered agents, in [`crate::deliberation::ROLES`] order.
    pub async fn list(&self) -> Result<Vec<CouncilView>, CouncilError> {
        let mut out = Vec::new();
        for role in crate::deliberation::ROLES {
            let def = self.def(role).await?;
            let agents = self.agents(role).await?;
            if def.is_some() || !agents.is_empty() {
                out.push(CouncilView {
                    role: role.to_owned(),
                    def,
                    agents,
                });
            }
        }
        Ok(out)
    }
}

/// The member choice of [`Councils::pick`], on a snapshot of the registry.
pub fn pick_members(role: &str, n: u32, agents: &[AgentRecord]) -> Vec<Member> {
    let mut live: Vec<&AgentRecord> = agents
        .iter()
        .filter(|a| a.status != AgentStatus::Offline)
        .collect();
    live.sort_by(|a, b| {
        (a.status == AgentStatus::Busy, &a.agent_id)
            .cmp(&(b.status == AgentStatus::Busy, &b.agent_id))
    });
    let mut members: Vec<Member> = live
        .into_iter()
        .take(n as usize)
        .map(|a| Member {
            id: a.agent_id.clone(),
            registered: true,
        })
        .collect();
    let mut k = 1;
    while members.len() < n as usize {
        let seat = Member::seat(role, k);
        k += 1;
        // A registered agent may be called like a seat; never ask one member twice.
        if !members.iter().any(|m| m.id == seat.id) {
            members.push(seat);
        }
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, status: AgentStatus) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            role: "DEV".into(),
            capabilities: vec![],
            metadata: BTreeMap::new(),
            status,
            heartbeat_ms: 1000,
            last_heartbeat_ms: 0,
            registered_ms: 0,
        }
    }

    fn registration() -> Registration {
        Registration {
            agent_id: "dev-1".into(),
            role: "DEV".into(),
            capabilities: vec!["rust".into(), "größe".into()],
            metadata: [("model".to_owned(), "line one\nline two".to_owned())].into(),
            heartbeat_ms: 0,
            status: String::new(),
        }
    }

    /// The message `validate` refuses `reg` with.
    fn refusal(reg: &Registration) -> String {
        match Councils::validate(reg) {
            Err(CouncilError::Invalid(m)) => m,
            other => panic!("{reg:?} is not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn registrations_are_refused_with_the_field_and_the_rule_they_break() {
        Councils::validate(&registration()).expect("a valid registration");
        let mut r = registration();
        r.agent_id = format!("bad id {}", "x".repeat(200));
        let m = refusal(&r);
        assert!(
            m.starts_with("agent_id `bad id xxx") && m.contains("…` must be 1-128"),
            "{m}"
        );
        let mut r = registration();
        r.capabilities.push("tab\there".into());
        assert_eq!(
            refusal(&r),
            "capability must not hold control characters (U+0009 at character 4)"
        );
        let mut r = registration();
        r.capabilities.push("c".repeat(129));
        assert_eq!(
            refusal(&r),
            "capability is 129 characters; the limit is 128"
        );
        let mut r = registration();
        r.capabilities.push(String::new());
        assert_eq!(refusal(&r), "a capability is empty");
        let mut r = registration();
        r.metadata.insert("k\0".into(), "v".into());
        assert!(refusal(&r).starts_with("metadata key must not hold control"));
        let mut r = registration();
        r.metadata.insert("notes".into(), "n".repeat(1025));
        assert_eq!(
            refusal(&r),
            "metadata `notes` is 1025 characters; the limit is 1024"
        );
    }

    #[test]
    fn live_registered_agents_come_first_then_pool_seats() {
        let agents = [
            agent("b", AgentStatus::Busy),
            agent("c", AgentStatus::Ready),
            agent("a", AgentStatus::Offline),
        ];
        let ids: Vec<String> = pick_members("DEV", 4, &agents)
            .into_iter()
            .map(|m| format!("{}{}", m.id, if m.registered { "*" } else { "" }))
            .collect();
        assert_eq!(ids, ["c*", "b*", "DEV-1", "DEV-2"]);
        let ids: Vec<String> = pick_members("DEV", 1, &agents)
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["c"]);
    }

    #[test]
    fn seats_never_collide_with_registered_ids() {
        let agents = [agent("DEV-1", AgentStatus::Ready)];
        let ids: Vec<String> = pick_members("DEV", 3, &agents)
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["DEV-1", "DEV-2", "DEV-3"]);
    }

    #[test]
    fn stale_heartbeats_read_as_offline() {
        let h: HashMap<String, String> = [
            ("role", "QA"),
            ("status", "busy"),
            ("heartbeat_ms", "1000"),
            ("last_heartbeat_ms", "10000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let now = 10_000 + 3 * 1000;
        assert_eq!(
            AgentRecord::from_hash("x", &h, now).unwrap().status,
            AgentStatus::Busy
        );
        assert_eq!(
            AgentRecord::from_hash("x", &h, now + 1).unwrap().status,
            AgentStatus::Offline
        );
    }

    #[test]
    fn registrations_are_validated() {
        let ok = Registration {
            agent_id: "a1".into(),
            role: "dev".into(),
            ..Default::default()
        };
        assert_eq!(Councils::validate(&ok).unwrap(), "DEV");
        let mut bad = ok.clone();
        bad.role = "CEO".into();
        assert!(Councils::validate(&bad).is_err());
        let mut bad = ok.clone();
        bad.agent_id = "a b".into();
        assert!(Councils::validate(&bad).is_err());
        let mut bad = ok;
        bad.status = "sleeping".into();
        assert!(Councils::validate(&bad).is_err());
    }
}
