//! Fleet's shared library: everything the binaries have in common.
//!
//! | module | what it holds |
//! |---|---|
//! | [`keys`] | every Redis key, stream and group name |
//! | [`envelope`] | the stream entry envelope and the typed messages of each stream |
//! | [`stream`] | the one consumer loop (read, ack, reclaim, dead-letter, trim) and producers |
//! | [`task`] | task state and the compare-and-set Lua scripts that move it |
//! | [`session_log`] | the per-session event log and the live fan-out to gateways |
//! | [`session`] | sessions, tokens and the chat API every front door calls |
//! | [`agent`] | agent configurations |
//! | [`deliberation`] | multi-agent deliberation: state, scoring, the steps that move it |
//! | [`council`] | council registry: agents per role, heartbeats, member choice |
//! | [`planning`] | planning events -> atomic subtasks (rules, deterministic ids); reports of their ends to the Planning service |
//! | [`events`] | client-facing WebSocket / SSE messages |
//! | [`backlog`] | back-pressure from the dispatchers' backlog |
//! | [`admin`] | health and metrics routes |
//! | [`telemetry`] | logs, traces and trace-context propagation |
//! | [`config`] | flags and environment variables shared by every binary |
//! | [`redis`] | connecting to Redis |
//! | [`memory`] | returning freed memory to the OS when a process goes quiet |
//! | [`net`] | listening sockets and the HTTP server of every port, with its read timeouts |
//! | [`shutdown`] | SIGINT / SIGTERM handling and draining |
//! | [`text`] | key names, ids and timestamps built without `format!` on the hot paths |
//!
//! Invariants: binaries talk to each other only through Redis Streams; every effect of an entry
//! is written before the entry is acked and is idempotent; task state moves only through the
//! scripts in [`task`], deliberation state only through those in [`deliberation::store`]; this
//! crate never serves HTTP routes other than [`admin`].

/// Every fleet binary links this crate, so this one line chooses their allocator. mimalloc:
/// the hot paths allocate many small, short-lived buffers (stream fields, envelopes, replies),
/// and glibc's malloc took about a fifth of the workers' CPU in profiles (docs/performance.md).
/// [`memory::purge_when_idle`] makes it give freed memory back to the OS when a process goes quiet.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod agent;
pub mod backlog;
pub mod config;
pub mod council;
pub mod deliberation;
pub mod envelope;
pub mod events;
pub mod keys;
pub mod memory;
pub mod net;
pub mod planning;
pub mod redis;
pub mod session;
pub mod session_log;
pub mod shutdown;
pub mod stream;
pub mod task;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
pub mod time;

pub use keys::Keys;
