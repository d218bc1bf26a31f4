//! Agent configurations: which pool runs an agent's tasks, and with which parameters.
//!
//! Stored as the hash `fleet:agent:<id>` (fields `name`, `pool`, `role`, `tenant_id`,
//! `timeout_secs`, `params` as JSON, `updated_ms`) plus the set `fleet:agent-ids`. Written by
//! edge-api (`PUT /api/v1/agents/{id}`) or loaded at start from `FLEET_AGENTS_FILE` (TOML or
//! YAML, see [`AgentsFile`]). Readers on the hot path use [`AgentStore::get_cached`].
//!
//! Validation lives here too, for every front door (REST, gRPC, the agents file) and every id
//! the fleet puts in a key: [`valid_name`] for ids (of agents, pools, sessions, tasks, ...),
//! [`check_label`] for free text kept as it came (agent names, roles, tenant and user ids), and
//! [`excerpt`] for quoting a refused value in an error message.

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

/// The longest id ([`valid_name`]), in bytes (each of its characters is one).
pub const MAX_ID_LEN: usize = 128;

/// What [`valid_name`] accepts, as error messages state it.
pub const ID_RULE: &str = "1-128 characters of A-Z a-z 0-9 - _ . : other than `.` and `..`";

/// The longest agent name, in characters.
pub const MAX_NAME_CHARS: usize = 256;

/// The longest role, tenant id or user id, in characters.
pub const MAX_LABEL_CHARS: usize = 128;

/// How many characters of a refused value an error message quotes ([`excerpt`]).
pub const EXCERPT_CHARS: usize = 64;

/// Whether `s` may be an id: of an agent, a pool, a session, a task, a deliberation, ... Ids are
/// short and free of characters that would break keys (`fleet:exec:<pool>`) or logs. `.` and
/// `..` are refused: a URL holding one as a segment (even written `%2E%2E`) is collapsed by
/// browsers, curl and URL libraries before it is sent, so a resource of that id could be created
/// but never read or deleted.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Checks free text that is kept and shown as it came (an agent's name or role, a tenant or
/// user id): at most `max_chars` characters and no control character (NUL, line breaks, tabs,
/// escapes: C0, DEL and C1), which would corrupt logs and terminals. Unicode is welcome. The
/// error names `field` and the rule broken; emptiness is the caller's to judge.
pub fn check_label(field: &str, value: &str, max_chars: usize) -> Result<(), String> {
    // Each character is at least a byte: most values are decided without counting.
    if value.len() > max_chars {
        let chars = value.chars().count();
        if chars > max_chars {
            return Err(format!(
                "{field} is {chars} characters; the limit is {max_chars}"
            ));
        }
    }
    if let Some((at, c)) = value.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "{field} must not hold control characters (U+{:04X} at character {})",
            u32::from(c),
            at + 1
        ));
    }
    Ok(())
}

/// `value` as an error message may quote it: its first [`EXCERPT_CHARS`] characters, then `…`
/// when there were more, with control characters escaped (`\0`, `\n`, `\u{1b}`). A refused
/// id can be as long as the request body; the answer should not be.
pub fn excerpt(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(EXCERPT_CHARS * 2) + 3);
    let mut chars = value.chars();
    for c in chars.by_ref().take(EXCERPT_CHARS) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

impl AgentConfig {
    /// Checks every field; the error names the field and the rule it breaks.
    pub fn validate(&self) -> Result<(), AgentError> {
        let invalid = |m: String| Err(AgentError::Invalid(m));
        if !valid_name(&self.id) {
            return invalid(format!(
                "agent id `{}` must be {ID_RULE}",
                excerpt(&self.id)
            ));
        }
        if self.name.trim().is_empty() {
            return invalid(format!(
                "name must be 1-{MAX_NAME_CHARS} characters, not only spaces"
            ));
        }
        check_label("name", &self.name, MAX_NAME_CHARS).or_else(invalid)?;
        // The pool names a stream (`fleet:exec:<pool>`): it is an id.
        if !valid_name(&self.pool) {
            return invalid(format!("pool `{}` must be {ID_RULE}", excerpt(&self.pool)));
        }
        // Empty means none, as it is stored.
        if let Some(role) = &self.role {
            check_label("role", role, MAX_LABEL_CHARS).or_else(invalid)?;
        }
        if let Some(tenant) = &self.tenant_id {
            check_label("tenant_id", tenant, MAX_LABEL_CHARS).or_else(invalid)?;
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
        // The file is held to the same rules as the API.
        std::fs::write(
            &yaml_path,
            "agents:\n  - id: coder\n    name: Coder\n    role: \"DEV\\0\"\n",
        )
        .unwrap();
        let err = AgentsFile::load(&yaml_path).unwrap_err().to_string();
        assert!(
            err.contains("role must not hold control characters"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    fn agent() -> AgentConfig {
        AgentConfig {
            id: "coder".into(),
            name: "Coder".into(),
            pool: DEFAULT_POOL.into(),
            role: Some("DEV".into()),
            tenant_id: Some("acme".into()),
            timeout_secs: Some(60),
            params: Json::Null,
        }
    }

    /// The message `validate` refuses `a` with.
    fn refusal(a: &AgentConfig) -> String {
        match a.validate() {
            Err(AgentError::Invalid(m)) => m,
            other => panic!("{a:?} is not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn dot_and_dot_dot_are_not_ids() {
        for id in [".", ".."] {
            assert!(!valid_name(id), "{id}");
        }
        for id in [
            "...",
            ".a",
            "a.",
            "a..b",
            "plan-US.12",
            "x:1",
            "A_b-9",
            &"a".repeat(128),
        ] {
            assert!(valid_name(id), "{id}");
        }
        for id in ["", "a b", "a/b", "é", "a\0", &"a".repeat(129)] {
            assert!(!valid_name(id), "{id:?}");
        }
    }

    #[test]
    fn excerpts_are_short_keep_char_boundaries_and_escape_control_characters() {
        assert_eq!(excerpt("bad id"), "bad id");
        assert_eq!(
            excerpt(&"a".repeat(EXCERPT_CHARS)),
            "a".repeat(EXCERPT_CHARS)
        );
        assert_eq!(
            excerpt(&"a".repeat(10_000)),
            format!("{}…", "a".repeat(EXCERPT_CHARS))
        );
        // Multi-byte characters are cut between characters, never inside one.
        let long = "é€😀".repeat(100);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(long.starts_with(cut.trim_end_matches('…')));
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt("a\0b\nc\u{1b}"), "a\\0b\\nc\\u{1b}");
    }

    #[test]
    fn labels_are_bounded_in_characters_and_free_of_control_characters() {
        assert_eq!(check_label("role", "Développeur 开发 🚀", 128), Ok(()));
        assert_eq!(check_label("role", &"开".repeat(128), 128), Ok(()));
        assert_eq!(
            check_label("role", &"开".repeat(129), 128),
            Err("role is 129 characters; the limit is 128".into())
        );
        assert_eq!(
            check_label("user_id", "ab\0", 128),
            Err("user_id must not hold control characters (U+0000 at character 3)".into())
        );
        for c in ['\n', '\t', '\r', '\u{1b}', '\u{7f}', '\u{85}'] {
            assert!(check_label("x", &format!("a{c}"), 128).is_err(), "{c:?}");
        }
    }

    #[test]
    fn a_valid_agent_passes_unicode_and_all() {
        assert!(agent().validate().is_ok());
        let mut a = agent();
        a.name = "Agent 智能体 ünïcødé 🚀".into();
        a.role = Some("Architecte logiciel".into());
        a.tenant_id = Some("société-α".into());
        assert!(a.validate().is_ok());
        // 256 characters of 3 bytes each: the limit counts characters.
        a.name = "智".repeat(MAX_NAME_CHARS);
        assert!(a.validate().is_ok());
        // Empty role and tenant id mean none, as they are stored.
        a.role = Some(String::new());
        a.tenant_id = Some(String::new());
        assert!(a.validate().is_ok());
    }

    #[test]
    fn each_field_is_refused_with_its_name_and_rule() {
        type Edit = fn(&mut AgentConfig);
        let cases: [(Edit, &str); 13] = [
            (
                |a| a.id = "..".into(),
                "agent id `..` must be 1-128 characters",
            ),
            (|a| a.id = ".".into(), "agent id `.` must be"),
            (
                |a| a.pool = "..".into(),
                "pool `..` must be 1-128 characters",
            ),
            (|a| a.pool = "gpu pool".into(), "pool `gpu pool` must be"),
            (|a| a.name = " \t ".into(), "name must be 1-256 characters"),
            (
                |a| a.name = "x".repeat(257),
                "name is 257 characters; the limit is 256",
            ),
            (
                |a| a.name = "Co\nder".into(),
                "name must not hold control characters",
            ),
            (
                |a| a.role = Some("r".repeat(100_000)),
                "role is 100000 characters; the limit is 128",
            ),
            (
                |a| a.role = Some("DEV\0".into()),
                "role must not hold control characters (U+0000",
            ),
            (
                |a| a.role = Some("\u{1b}[31mDEV".into()),
                "role must not hold control characters",
            ),
            (
                |a| a.tenant_id = Some("t".repeat(129)),
                "tenant_id is 129 characters",
            ),
            (
                |a| a.tenant_id = Some("acme\r\n".into()),
                "tenant_id must not hold control",
            ),
            (
                |a| a.timeout_secs = Some(0),
                "timeout_secs must be positive",
            ),
        ];
        for (edit, want) in cases {
            let mut a = agent();
            edit(&mut a);
            let message = refusal(&a);
            assert!(message.contains(want), "{message:?} should say {want:?}");
        }
    }

    #[test]
    fn a_refused_id_or_pool_is_quoted_short() {
        let mut a = agent();
        a.id = "x".repeat(10_000);
        let message = refusal(&a);
        assert!(
            message.starts_with(&format!(
                "agent id `{}…` must be",
                "x".repeat(EXCERPT_CHARS)
            )),
            "{message}"
        );
        assert!(message.len() < 200, "{} bytes", message.len());
        let mut a = agent();
        a.pool = format!("é{}", "\0".repeat(10_000));
        let message = refusal(&a);
        assert!(message.len() < 400, "{} bytes", message.len());
        assert!(!message.contains('\0'), "{message:?}");
    }
}
