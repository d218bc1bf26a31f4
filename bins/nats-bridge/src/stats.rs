//! What one bridge did, counted in process (the Prometheus metrics say the same per subject;
//! these exist so that a test or an operator can tell two bridges of one process apart).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    published: AtomicU64,
    publish_duplicates: AtomicU64,
}

/// Counters of one bridge. Cheap to clone; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct Stats(Arc<Counters>);

impl Stats {
    /// NATS messages written to a Fleet stream.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }

    /// NATS messages delivered again after an earlier delivery had written them.
    pub fn duplicates(&self) -> u64 {
        self.0.duplicates.load(Ordering::Relaxed)
    }

    /// NATS messages dead-lettered (and terminated).
    pub fn dead_lettered(&self) -> u64 {
        self.0.dead_lettered.load(Ordering::Relaxed)
    }

    /// Outbound entries published (and acknowledged by JetStream).
    pub fn published(&self) -> u64 {
        self.0.published.load(Ordering::Relaxed)
    }

    /// Outbound publishes JetStream reported as duplicates (a retry of a stored message).
    pub fn publish_duplicates(&self) -> u64 {
        self.0.publish_duplicates.load(Ordering::Relaxed)
    }

    pub(crate) fn add_written(&self) {
        self.0.written.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_duplicate(&self) {
        self.0.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_dead_lettered(&self) {
        self.0.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_published(&self, duplicate: bool) {
        self.0.published.fetch_add(1, Ordering::Relaxed);
        if duplicate {
            self.0.publish_duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
}
