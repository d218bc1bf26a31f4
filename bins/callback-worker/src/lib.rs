//! callback-worker: Consumes fleet:callbacks: moves task state, logs and fans out client events, ends overdue tasks.
