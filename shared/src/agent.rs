//! Agent configurations: which pool runs an agent's tasks, and with which parameters.
//!
//! Stored as the hash `fleet:agent:<id>` (fields `name`, `pool`, `role`, `tenant_id`,
//! `timeout_secs`, `params` as JSON, `updated_ms`) plus the set `fleet:agent-ids`. Written by
//! edge-api (`PUT /api/v1/agents/{id}`) or loaded at start from `FLEET_AGENTS_FILE` (TOML or
//! YAML, see [`AgentsFile`]). Readers on the hot path use [`AgentStore::get_cached`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::keys::Keys;
use crate::time::now_ms;

/// The pool an agent runs in when its config names none.
pub const DEFAULT_POOL: &str = "default";

/// How long [`AgentStore::get_cached`] trusts what it read.
pub const CACHE_TTL: Duration = Duration::from_secs(2);

/// The longest deadline an agent may give its tasks: 7 days. A task's deadline is kept in
/// milliseconds since the epoch; the bound keeps that sum far from overflowing.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 86_400;

/// One agent's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Set from the URL or the file entry; ignored in a PUT body.
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// Executors of this pool run the agent's tasks (`fleet:exec:<pool>`).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Council role (DEV, QA, ARCHITECT, DEVOPS, DATA), when the agent deliberates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Deadline of each task, from its submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Passed to the executor with every task (model, prompt, command, ...).
    #[serde(default)]
    pub params: Json,
}

fn default_pool() -> String {
    DEFAULT_POOL.to_owned()
}

/// Why a config is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read agents file `{path}`: {reason}")]
    File { path: String, reason: String },
    #[error("redis: {0}")]
    Redis(#[from] Error),
}

/// Ids, names and pools are short and free of characters that would break keys or logs.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        if !valid_name(&self.id) {
            return Err(AgentError::Invalid(format!(
                "agent id `{}` must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                self.id
            )));
        }
        if self.name.trim().is_empty() || self.name.len() > 256 {
            return Err(AgentError::Invalid("name must be 1-256 characters".into()));
        }
        if !valid_name(&self.pool) {
            return Err(AgentError::Invalid(format!(
                "pool `{}` must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                self.pool
            )));
        }
        match self.timeout_secs {
            Some(0) => return Err(AgentError::Invalid("timeout_secs must be positive".into())),
            Some(t) if t > MAX_TIMEOUT_SECS => {
                return Err(AgentError::Invalid(format!(
                    "timeout_secs is {t}; the limit is {MAX_TIMEOUT_SECS} (7 days)"
                )));
            }
            _ => {}
        }
        Ok(())
    }

    fn from_hash(id: &str, h: &HashMap<String, String>) -> Option<AgentConfig> {
        Some(AgentConfig {
            id: id.to_owned(),
            name: h.get("name")?.clone(),
            pool: h.get("pool").cloned().unwrap_or_else(default_pool),
            role: h.get("role").filter(|r| !r.is_empty()).cloned(),
            tenant_id: h.get("tenant_id").filter(|t| !t.is_empty()).cloned(),
            timeout_secs: h.get("timeout_secs").and_then(|t| t.parse().ok()),
            params: h
                .get("params")
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or(Json::Null),
        })
    }
}

/// The file `FLEET_AGENTS_FILE` points at:
///
/// ```toml
/// [[agents]]
/// id = "demo"
/// name = "Demo echo agent"
/// pool = "default"
/// params = { greeting = "hi" }
/// ```
///
/// The same shape in YAML (`agents: [{id: demo, name: ...}]`) is read from `.yaml` / `.yml`.
#[derive(Debug, Deserialize)]
pub struct AgentsFile {
    pub agents: Vec<AgentConfig>,
}

impl AgentsFile {
    pub fn load(path: &Path) -> Result<AgentsFile, AgentError> {
        let file_err = |reason: String| AgentError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let file: AgentsFile = if is_yaml {
            serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| file_err(e.to_string()))?
        };
        for a in &file.agents {
            a.validate().map_err(|e| file_err(e.to_string()))?;
        }
        Ok(file)
    }
}

/// A cached read: when it was made, and what it found.
type CachedAgent = (Instant, Option<AgentConfig>);

/// Agent configs in Redis, with a short-lived read cache.
#[derive(Clone)]
pub struct AgentStore {
    client: Client,
    keys: Keys,
    cache: Arc<Mutex<HashMap<String, CachedAgent>>>,
    /// The agent of each session seen here: set when the session opens, never changed.
    session_agents: Arc<Mutex<HashMap<String, String>>>,
}

/// Sessions whose agent [`AgentStore::of_session`] remembers; past this it starts over.
const SESSION_AGENTS_KEPT: usize = 100_000;

impl AgentStore {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self {
            client,
            keys,
            cache: Arc::default(),
            session_agents: Arc::default(),
        }
    }

    /// The agent of session `sid` (`None`: no such session). A session's agent is fixed when it
    /// opens, so after the first read this costs no round trip.
    pub async fn of_session(&self, sid: &str) -> Result<Option<String>, AgentError> {
        if let Some(agent) = self.session_agents.lock().expect("session agents").get(sid) {
            return Ok(Some(agent.clone()));
        }
        // Boxed: a miss is rare, and its Redis call would otherwise make every caller's future
        // (the submit path's) kilobytes larger, copied whole on each submit.
        let agent: Option<String> =
            Box::pin(self.client.hget(self.keys.session(sid), "agent_id")).await?;
        if let Some(a) = &agent {
            let mut known = self.session_agents.lock().expect("session agents");
            if known.len() >= SESSION_AGENTS_KEPT {
                known.clear();
            }
            known.insert(sid.to_owned(), a.clone());
        }
        Ok(agent)
    }

    /// Creates or replaces an agent. Returns whether it existed before.
    pub async fn put(&self, agent: &AgentConfig) -> Result<bool, AgentError> {
        agent.validate()?;
        let key = self.keys.agent(&agent.id);
        let existed: bool = self.client.exists(&key).await?;
        let fields: Vec<(&str, String)> = vec![
            ("name", agent.name.clone()),
            ("pool", agent.pool.clone()),
            ("role", agent.role.clone().unwrap_or_default()),
            ("tenant_id", agent.tenant_id.clone().unwrap_or_default()),
            (
                "timeout_secs",
                agent
                    .timeout_secs
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            ),
            ("params", agent.params.to_string()),
            ("updated_ms", now_ms().to_string()),
        ];
        let tx = self.client.multi();
        let _: () = tx.del(&key).await?;
        let _: () = tx.hset(&key, fields).await?;
        let _: () = tx.sadd(self.keys.agent_ids(), agent.id.as_str()).await?;
        let _: Value = tx.exec(true).await?;
        self.cache.lock().expect("agent cache").remove(&agent.id);
        Ok(existed)
    }

    /// Reads an agent from Redis.
    pub async fn get(&self, id: &str) -> Result<Option<AgentConfig>, AgentError> {
        let h: HashMap<String, String> = self.client.hgetall(self.keys.agent(id)).await?;
        Ok(AgentConfig::from_hash(id, &h))
    }

    /// Reads an agent, trusting a read younger than [`CACHE_TTL`].
    pub async fn get_cached(&self, id: &str) -> Result<Option<AgentConfig>, AgentError> {
        if let Some((at, agent)) = self.cache.lock().expect("agent cache").get(id)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(agent.clone());
        }
        // Boxed, as in `of_session`: only a miss pays for the Redis call's future.
        let agent = Box::pin(self.get(id)).await?;
        self.cache
            .lock()
            .expect("agent cache")
            .insert(id.to_owned(), (Instant::now(), agent.clone()));
        Ok(agent)
    }

    /// Deletes an agent. Returns whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, AgentError> {
        let n: i64 = self.client.del(self.keys.agent(id)).await?;
        let _: i64 = self.client.srem(self.keys.agent_ids(), id).await?;
        self.cache.lock().expect("agent cache").remove(id);
        Ok(n > 0)
    }

    /// Every agent, sorted by id.
    pub async fn list(&self) -> Result<Vec<AgentConfig>, AgentError> {
        let mut ids: Vec<String> = self.client.smembers(self.keys.agent_ids()).await?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(a) = self.get(&id).await? {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Upserts every agent of a file. Returns how many.
    pub async fn load_file(&self, path: &Path) -> Result<usize, AgentError> {
        let file = AgentsFile::load(path)?;
        for a in &file.agents {
            self.put(a).await?;
        }
        Ok(file.agents.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_files_load_from_toml_and_yaml() {
        let dir = std::env::temp_dir().join(format!("fleet-agents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("agents.toml");
        std::fs::write(
            &toml_path,
            "[[agents]]\nid = \"demo\"\nname = \"Demo\"\nparams = { delay_ms = 5 }\n",
        )
        .unwrap();
        let yaml_path = dir.join("agents.yaml");
        std::fs::write(
            &yaml_path,
            "agents:\n  - id: coder\n    name: Coder\n    pool: gpu\n    role: DEV\n",
        )
        .unwrap();
        let t = AgentsFile::load(&toml_path).unwrap();
        assert_eq!(t.agents[0].pool, DEFAULT_POOL);
        assert_eq!(t.agents[0].params["delay_ms"], 5);
        let y = AgentsFile::load(&yaml_path).unwrap();
        assert_eq!(y.agents[0].pool, "gpu");
        assert_eq!(y.agents[0].role.as_deref(), Some("DEV"));

        std::fs::write(&toml_path, "[[agents]]\nid = \"bad id\"\nname = \"x\"\n").unwrap();
        let err = AgentsFile::load(&toml_path).unwrap_err().to_string();
        assert!(err.contains("bad id"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
