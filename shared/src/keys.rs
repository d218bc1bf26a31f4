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

    /// The prefix followed by `parts`. Keys are built on every task's path, several per task
    /// and process; one sized allocation and plain copies cost a fraction of `format!`.
    fn key(&self, parts: &[&str]) -> String {
        crate::text::concat_after(&self.prefix, parts)
    }

    /// Commands into the fleet: consumed by the dispatchers.
    pub fn tasks(&self) -> String {
        self.key(&[":tasks"])
    }

    /// Execution requests for the executors of `pool`.
    pub fn exec(&self, pool: &str) -> String {
        self.key(&[":exec:", pool])
    }

    /// Control entries (cancel) that every executor of `pool` reads without a group.
    pub fn exec_control(&self, pool: &str) -> String {
        self.key(&[":exec:", pool, ":control"])
    }

    /// Deliberation requests for the council agents of `role`.
    pub fn agents(&self, role: &str) -> String {
        self.key(&[":agents:", role])
    }

    /// Agent requests for one registered council member of `role`.
    pub fn agent_member(&self, role: &str, agent_id: &str) -> String {
        self.key(&[":agents:", role, ":member:", agent_id])
    }

    /// Control entries (`agent.cancel`) that every agent of `role` reads without a group.
    pub fn agents_control(&self, role: &str) -> String {
        self.key(&[":agents:", role, ":control"])
    }

    /// Deliberation state hash.
    pub fn deliberation(&self, id: &str) -> String {
        self.key(&[":{d:", id, "}"])
    }

    /// A deliberation's proposals: `<round>:<member>` -> proposal JSON.
    pub fn deliberation_proposals(&self, id: &str) -> String {
        self.key(&[":{d:", id, "}:proposals"])
    }

    /// A deliberation's progress updates.
    pub fn deliberation_events(&self, id: &str) -> String {
        self.key(&[":{d:", id, "}:events"])
    }

    /// The member of `<p>:deadlines` that stands for deliberation `id`.
    pub fn deliberation_deadline_member(id: &str) -> String {
        crate::text::concat(&[DELIBERATION_DEADLINE_PREFIX, id])
    }

    /// Agent ids registered for `role`.
    pub fn council(&self, role: &str) -> String {
        self.key(&[":council:", role])
    }

    /// A registered agent.
    pub fn council_agent(&self, agent_id: &str) -> String {
        self.key(&[":council-agent:", agent_id])
    }

    /// A council defined with `CreateCouncil`.
    pub fn council_def(&self, role: &str) -> String {
        self.key(&[":council-def:", role])
    }

    /// Roles with a defined council.
    pub fn councils(&self) -> String {
        self.key(&[":councils"])
    }

    /// Fleet-wide counters.
    pub fn stats(&self) -> String {
        self.key(&[":stats"])
    }

    /// Recent durations (ms) of finished deliberations of `kind` (`deliberate`, `orchestrate`).
    pub fn stats_latency(&self, kind: &str) -> String {
        self.key(&[":stats:latency:", kind])
    }

    /// Executor -> orchestrator callbacks.
    pub fn callbacks(&self) -> String {
        self.key(&[":callbacks"])
    }

    /// Session state hash.
    pub fn session(&self, sid: &str) -> String {
        self.key(&[":{s:", sid, "}"])
    }

    /// The session's client-facing event log.
    pub fn session_events(&self, sid: &str) -> String {
        self.key(&[":{s:", sid, "}:events"])
    }

    /// Task state hash.
    pub fn task(&self, sid: &str, tid: &str) -> String {
        self.key(&[":{s:", sid, "}:task:", tid])
    }

    /// `Idempotency-Key` -> task id, per session.
    pub fn idempotency(&self, sid: &str, key: &str) -> String {
        self.key(&[":{s:", sid, "}:idem:", key])
    }

    /// Live fan-out shard read by every ws-gateway.
    pub fn fanout(&self, shard: u32) -> String {
        let mut buf = crate::text::DigitBuf::default();
        self.key(&[":fanout:", crate::text::decimal(u64::from(shard), &mut buf)])
    }

    /// Open tasks scored by their deadline in ms; member `<sid>/<tid>`.
    pub fn deadlines(&self) -> String {
        self.key(&[":deadlines"])
    }

    /// Entries nats-bridge publishes to NATS.
    pub fn outbound(&self) -> String {
        self.key(&[":outbound"])
    }

    /// Dead letters.
    pub fn dlq(&self) -> String {
        self.key(&[":dlq"])
    }

    /// Deliberation decisions.
    pub fn decisions(&self) -> String {
        self.key(&[":decisions"])
    }

    /// Agent configuration hash.
    pub fn agent(&self, id: &str) -> String {
        self.key(&[":agent:", id])
    }

    /// Set of all configured agent ids.
    pub fn agent_ids(&self) -> String {
        self.key(&[":agent-ids"])
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
        assert_eq!(k.session("abc"), "t1:{s:abc}");
        assert_eq!(k.session_events("abc"), "t1:{s:abc}:events");
        assert_eq!(k.idempotency("abc", "k"), "t1:{s:abc}:idem:k");
    }

    #[test]
    fn stream_keys_are_named_under_the_prefix() {
        let k = Keys::new("t1");
        assert_eq!(k.tasks(), "t1:tasks");
        assert_eq!(k.exec("gpu"), "t1:exec:gpu");
        assert_eq!(k.exec_control("gpu"), "t1:exec:gpu:control");
        assert_eq!(k.callbacks(), "t1:callbacks");
        assert_eq!(k.deadlines(), "t1:deadlines");
        assert_eq!(k.fanout(0), "t1:fanout:0");
        assert_eq!(k.fanout(7), "t1:fanout:7");
        assert_eq!(k.fanout(4_294_967_295), "t1:fanout:4294967295");
        assert_eq!(k.agent_member("DEV", "a1"), "t1:agents:DEV:member:a1");
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
