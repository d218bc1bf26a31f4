//! Redis Streams in brief, as Fleet uses them.
//!
//! * Every work stream has **one consumer group per kind of worker** (`dispatchers` on
//!   `fleet:tasks`, `callback-workers` on `fleet:callbacks`, `executors` on `fleet:exec:<pool>`,
//!   `bridge` on `fleet:outbound`). A group hands each entry to one consumer of the group.
//! * A consumer reads with `XREADGROUP ... COUNT <batch> BLOCK <ms> STREAMS <s> >` on **its own
//!   connection** (a blocking read holds the connection). What it reads sits in the group's
//!   **pending entries list** (PEL) until it `XACK`s it.
//! * A consumer acks an entry **only after the entry's effects are written**: at-least-once.
//!   Every effect is idempotent (see [`crate::task`]), so a redelivery changes nothing twice.
//! * An entry that stays pending longer than [`ConsumerConfig::claim_idle`] belonged to a consumer
//!   that died; live consumers take it over (`XPENDING ... IDLE` + `XCLAIM`). While a handler is
//!   still working on an entry, the loop renews its claim so nobody steals live work.
//! * Each delivery bumps the entry's delivery count. Past [`ConsumerConfig::max_deliveries`], or
//!   when it cannot be decoded at all, the entry goes to the dead-letter stream `fleet:dlq` with
//!   its reason ([`dlq`]) and is acked, so one poison entry never blocks a group.
//! * Consumer names are unique per process (`<worker>-<host>-<pid>-<random>`); a consumer that
//!   owns no pending entry and has been idle for long is deleted from the group.
//! * Streams are trimmed (`XTRIM MINID`) only below what every group has acknowledged.
//!
//! [`consumer::ConsumerLoop`] implements all of this once; a worker only supplies a
//! [`consumer::Handler`].

pub mod consumer;
pub mod dlq;
pub mod entry;
pub mod groups;
pub mod producer;

pub use consumer::{ConsumerConfig, ConsumerLoop, Delivery, Handler, Outcome};
pub use entry::{StreamEntry, StreamId};
pub use producer::Producer;
