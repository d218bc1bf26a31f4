//! Every Redis key, stream and consumer-group name Fleet uses, in one place.
//!
//! All keys start with a configurable prefix (`FLEET_PREFIX`, default `fleet`) so that several
//! fleets (or several tests) can share one Redis. Keys that belong to one session share the hash
//! tag `{s:<session_id>}`, so that a single Lua script can touch the session hash, its task hashes
//! and its event log atomically, on Redis Cluster too.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:tasks` | stream | commands in (`task.submit`, `task.cancel`, `session.close`, ...) |
//! | `<p>:exec:<pool>` | stream | execution requests for the executors of a pool |
//! | `<p>:exec:<pool>:control` | stream, capped | control entries (`exec.cancel`) every executor of the pool reads |
//! | `<p>:agents:<role>` | stream | agent requests (`agent.request`) to the role's shared pool |
//! | `<p>:agents:<role>:member:<agent_id>` | stream | agent requests to one registered council member |
//! | `<p>:agents:<role>:control` | stream, capped | `agent.cancel` entries every agent of the role reads |
//! | `<p>:callbacks` | stream | executor -> orchestrator progress and results |
//! | `<p>:{s:<sid>}` | hash | session state |
//! | `<p>:{s:<sid>}:task:<tid>` | hash | task state |
//! | `<p>:{s:<sid>}:events` | stream, capped, TTL | the session's client-facing event log |
//! | `<p>:{s:<sid>}:idem:<key>` | string, TTL | `Idempotency-Key` -> task id |
//! | `<p>:fanout:<shard>` | stream, capped | live delivery to ws-gateways |
//! | `<p>:deadlines` | sorted set | `<sid>/<tid>` (tasks) and `d:<id>` (deliberations) scored by deadline (ms) |
//! | `<p>:{d:<id>}` | hash, TTL | deliberation state (see [`crate::deliberation`]) |
//! | `<p>:{d:<id>}:proposals` | hash, TTL | `<round>:<member>` -> proposal JSON |
//! | `<p>:{d:<id>}:events` | stream, capped, TTL | the deliberation's progress updates |
//! | `<p>:council:<role>` | set | agent ids registered for a role |
//! | `<p>:council-agent:<id>` | hash | a registered agent (role, capabilities, status, heartbeat) |
//! | `<p>:council-def:<role>` | hash | a council defined with `CreateCouncil` |
//! | `<p>:councils` | set | roles with a defined council |
//! | `<p>:stats` | hash | fleet-wide counters (deliberations, planning events) |
//! | `<p>:stats:latency:<kind>` | stream, capped | recent deliberation / orchestration durations (`ms`) |
//! | `<p>:outbound` | stream | what nats-bridge publishes to NATS |
//! | `<p>:dlq` | stream, capped | dead letters |
//! | `<p>:decisions` | stream, capped | deliberation decisions |
//! | `<p>:agent:<id>` | hash | agent config |
//! | `<p>:agent-ids` | set | ids of every configured agent |

use std::sync::Arc;

/// Consumer group of the dispatchers on `<p>:tasks`.
pub const GROUP_DISPATCHERS: &str = "dispatchers";
/// Consumer group of the callback-workers on `<p>:callbacks`.
pub const GROUP_CALLBACK_WORKERS: &str = "callback-workers";
/// Consumer group of the executors on `<p>:exec:<pool>` and `<p>:agents:<role>`.
pub const GROUP_EXECUTORS: &str = "executors";
/// Consumer group of the nats-bridges on `<p>:outbound`.
pub const GROUP_BRIDGE: &str = "bridge";

/// Prefix of the `<p>:deadlines` members that stand for deliberations (`d:<id>`); task members
/// are `<sid>/<tid>` and never start with it (ids cannot contain `/`).
pub const DELIBERATION_DEADLINE_PREFIX: &str = "d:";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "fleet";

/// Builds key names under one prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: Arc::from(prefix),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Commands into the fleet: consumed by the dispatchers.
    pub fn tasks(&self) -> String {
        format!("{}:tasks", self.prefix)
    }

    /// Execution requests for the executors of `pool`.
    pub fn exec(&self, pool: &str) -> String {
        format!("{}:exec:{pool}", self.prefix)
    }

    /// Control entries (cancel) that every executor of `pool` reads without a group.
    pub fn exec_control(&self, pool: &str) -> String {
        format!("{}:exec:{pool}:control", self.prefix)
    }

    /// Deliberation requests for the council agents of `role`.
    pub fn agents(&self, role: &str) -> String {
        format!("{}:agents:{role}", self.prefix)
    }

    /// Agent requests for one registered council member of `role`.
    pub fn agent_member(&self, role: &str, agent_id: &str) -> String {
        format!("{}:agents:{role}:member:{agent_id}", self.prefix)
    }

    /// Control entries (`agent.cancel`) that every agent of `role` reads without a group.
    pub fn agents_control(&self, role: &str) -> String {
        format!("{}:agents:{role}:control", self.prefix)
    }

    /// Deliberation state hash.
    pub fn deliberation(&self, id: &str) -> String {
        format!("{}:{{d:{id}}}", self.prefix)
    }

    /// A deliberation's proposals: `<round>:<member>` -> proposal JSON.
    pub fn deliberation_proposals(&self, id: &str) -> String {
        format!("{}:{{d:{id}}}:proposals", self.prefix)
    }

    /// A deliberation's progress updates.
    pub fn deliberation_events(&self, id: &str) -> String {
        format!("{}:{{d:{id}}}:events", self.prefix)
    }

    /// The member of `<p>:deadlines` that stands for deliberation `id`.
    pub fn deliberation_deadline_member(id: &str) -> String {
        format!("{DELIBERATION_DEADLINE_PREFIX}{id}")
    }

    /// Agent ids registered for `role`.
    pub fn council(&self, role: &str) -> String {
        format!("{}:council:{role}", self.prefix)
    }

    /// A registered agent.
    pub fn council_agent(&self, agent_id: &str) -> String {
        format!("{}:council-agent:{agent_id}", self.prefix)
    }

    /// A council defined with `CreateCouncil`.
    pub fn council_def(&self, role: &str) -> String {
        format!("{}:council-def:{role}", self.prefix)
    }

    /// Roles with a defined council.
    pub fn councils(&self) -> String {
        format!("{}:councils", self.prefix)
    }

    /// Fleet-wide counters.
    pub fn stats(&self) -> String {
        format!("{}:stats", self.prefix)
    }

    /// Recent durations (ms) of finished deliberations of `kind` (`deliberate`, `orchestrate`).
    pub fn stats_latency(&self, kind: &str) -> String {
        format!("{}:stats:latency:{kind}", self.prefix)
    }

    /// Executor -> orchestrator callbacks.
    pub fn callbacks(&self) -> String {
        format!("{}:callbacks", self.prefix)
    }

    /// Session state hash.
    pub fn session(&self, sid: &str) -> String {
        format!("{}:{{s:{sid}}}", self.prefix)
    }

    /// The session's client-facing event log.
    pub fn session_events(&self, sid: &str) -> String {
        format!("{}:{{s:{sid}}}:events", self.prefix)
    }

    /// Task state hash.
    pub fn task(&self, sid: &str, tid: &str) -> String {
        format!("{}:{{s:{sid}}}:task:{tid}", self.prefix)
    }

    /// `Idempotency-Key` -> task id, per session.
    pub fn idempotency(&self, sid: &str, key: &str) -> String {
        format!("{}:{{s:{sid}}}:idem:{key}", self.prefix)
    }

    /// Live fan-out shard read by every ws-gateway.
    pub fn fanout(&self, shard: u32) -> String {
        format!("{}:fanout:{shard}", self.prefix)
    }

    /// Open tasks scored by their deadline in ms; member `<sid>/<tid>`.
    pub fn deadlines(&self) -> String {
        format!("{}:deadlines", self.prefix)
    }

    /// Entries nats-bridge publishes to NATS.
    pub fn outbound(&self) -> String {
        format!("{}:outbound", self.prefix)
    }

    /// Dead letters.
    pub fn dlq(&self) -> String {
        format!("{}:dlq", self.prefix)
    }

    /// Deliberation decisions.
    pub fn decisions(&self) -> String {
        format!("{}:decisions", self.prefix)
    }

    /// Agent configuration hash.
    pub fn agent(&self, id: &str) -> String {
        format!("{}:agent:{id}", self.prefix)
    }

    /// Set of all configured agent ids.
    pub fn agent_ids(&self) -> String {
        format!("{}:agent-ids", self.prefix)
    }

    /// The fan-out shard of a session: a stable hash of its id modulo `shards`.
    pub fn fanout_shard(sid: &str, shards: u32) -> u32 {
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in sid.as_bytes() {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h % shards.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_share_one_hash_tag() {
        let k = Keys::new("t1");
        let tag = "{s:abc}";
        assert!(k.session("abc").contains(tag));
        assert!(k.session_events("abc").contains(tag));
        assert!(k.task("abc", "x").contains(tag));
        assert!(k.idempotency("abc", "k").contains(tag));
        assert_eq!(k.task("abc", "x"), "t1:{s:abc}:task:x");
    }

    #[test]
    fn deliberation_keys_share_one_hash_tag() {
        let k = Keys::new("t1");
        assert_eq!(k.deliberation("x"), "t1:{d:x}");
        assert!(k.deliberation_proposals("x").starts_with("t1:{d:x}:"));
        assert!(k.deliberation_events("x").starts_with("t1:{d:x}:"));
        assert_eq!(Keys::deliberation_deadline_member("x"), "d:x");
        assert_ne!(k.agent_member("DEV", "control"), k.agents_control("DEV"));
    }

    #[test]
    fn fanout_shard_is_stable_and_in_range() {
        for shards in 1..9 {
            let s = Keys::fanout_shard("0190f0a1-aaaa-7bbb-8ccc-ddddeeeeffff", shards);
            assert!(s < shards);
            assert_eq!(
                s,
                Keys::fanout_shard("0190f0a1-aaaa-7bbb-8ccc-ddddeeeeffff", shards)
            );
        }
    }
}
