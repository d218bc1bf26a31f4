//! Cancel control: every executor of a pool reads `fleet:exec:<pool>:control` without a group
//! (each must see every cancel) and stops the named task if it holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::envelope::{Envelope, ExecControl, Message};
use fleet::stream::entry::parse_read;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

/// Cancels remembered for tasks not (yet) held here are forgotten after this long.
const REMEMBER: Duration = Duration::from_secs(600);
/// Milliseconds one read of a control stream blocks waiting for entries.
const BLOCK_MS: u64 = 1000;

#[derive(Default)]
struct Inner {
    running: HashMap<String, CancellationToken>,
    cancelled: HashMap<String, Instant>,
}

/// Tasks running here, and cancels received for tasks not running here.
#[derive(Clone, Default)]
pub struct Cancellations(Arc<Mutex<Inner>>);

impl Cancellations {
    /// Registers a task about to run; `None` when it was already cancelled.
    pub fn start(&self, task_id: &str) -> Option<CancellationToken> {
        let mut inner = self.0.lock().expect("cancellations lock");
        if inner.cancelled.contains_key(task_id) {
            return None;
        }
        let token = CancellationToken::new();
        inner.running.insert(task_id.to_owned(), token.clone());
        Some(token)
    }

    pub fn finish(&self, task_id: &str) {
        self.0
            .lock()
            .expect("cancellations lock")
            .running
            .remove(task_id);
    }

    /// Stops `task_id` if it runs here, and remembers the cancel in case it arrives later.
    pub fn cancel(&self, task_id: &str) -> bool {
        let mut inner = self.0.lock().expect("cancellations lock");
        let now = Instant::now();
        inner
            .cancelled
            .retain(|_, at| now.duration_since(*at) < REMEMBER);
        inner.cancelled.insert(task_id.to_owned(), now);
        match inner.running.get(task_id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

impl Cancellations {
    /// Stops every running request whose key starts with `prefix`. Returns how many.
    pub fn cancel_prefix(&self, prefix: &str) -> usize {
        let inner = self.0.lock().expect("cancellations lock");
        let mut n = 0;
        for (key, token) in inner.running.iter() {
            if key.starts_with(prefix) {
                token.cancel();
                n += 1;
            }
        }
        n
    }
}

/// Reads the control stream from its end.
pub struct ControlReader {
    pub client: Client,
    pub stream: String,
    pub cancellations: Cancellations,
}

impl ControlReader {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        follow(
            &self.client,
            &self.stream,
            &shutdown,
            |msg: ExecControl| match msg {
                ExecControl::Cancel(c) => {
                    if self.cancellations.cancel(&c.task_id) {
                        tracing::info!(task_id = %c.task_id, reason = %c.reason, "cancelling task");
                    }
                }
            },
        )
        .await
    }
}

/// Follows control stream `stream` from its end (plain `XREAD`, no group: every reader sees
/// every entry) until `shutdown`, handing each entry that decodes as `M` to `apply`. Entries
/// that do not decode are logged and skipped: control entries are hints, nothing retries them.
pub async fn follow<M: Message>(
    client: &Client,
    stream: &str,
    shutdown: &CancellationToken,
    mut apply: impl FnMut(M),
) -> anyhow::Result<()> {
    let reader = fleet::redis::blocking_reader(client, Duration::from_millis(BLOCK_MS));
    reader.init().await?;
    let mut last = "$".to_owned();
    while !shutdown.is_cancelled() {
        let reply: Result<Value, _> = reader
            .xread(Some(256), Some(BLOCK_MS), stream, last.as_str())
            .await;
        let streams = match reply.map(parse_read) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(stream, error = %e, "unreadable control reply");
                continue;
            }
            Err(e) => {
                tracing::warn!(stream, error = %e, "control read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        for entry in streams.into_iter().flat_map(|(_, e)| e) {
            last = entry.id.to_string();
            match Envelope::<M>::from_fields(&entry.fields) {
                Ok(env) => apply(env.msg),
                Err(e) => {
                    tracing::warn!(stream, entry = %entry.id, error = %e, "ignoring undecodable control entry")
                }
            }
        }
    }
    let _ = reader.quit().await;
    Ok(())
}
