//! Cancel control: every executor of a pool reads `fleet:exec:<pool>:control` without a group
//! (each must see every cancel) and stops the named task if it holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::envelope::{Envelope, ExecControl, Message};
use fleet::stream::entry::{StreamId, parse_read};
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

/// Reads the control stream after `from`: its newest entry when the executor started, taken
/// before its consumer loop reads a request ([`fleet::stream::entry::newest_id`]), so that no
/// cancel of a request in hand comes before where the reader starts.
pub struct ControlReader {
    pub client: Client,
    pub stream: String,
    pub from: StreamId,
    pub cancellations: Cancellations,
}

impl ControlReader {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        follow(
            &self.client,
            &self.stream,
            self.from,
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

/// Follows control stream `stream` after entry `from` (plain `XREAD`, no group: every reader
/// sees every entry) until `shutdown`, handing each entry that decodes as `M` to `apply`.
/// Entries that do not decode are logged and skipped: control entries are hints, nothing retries
/// them. Each read continues from the last entry seen, never from `$`, which would miss what was
/// written between a read that timed out (or failed) and the next.
pub async fn follow<M: Message>(
    client: &Client,
    stream: &str,
    from: StreamId,
    shutdown: &CancellationToken,
    mut apply: impl FnMut(M),
) -> anyhow::Result<()> {
    let reader = fleet::redis::blocking_reader(client, Duration::from_millis(BLOCK_MS));
    reader.init().await?;
    let mut last = from.to_string();
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

#[cfg(test)]
mod tests {
    use fleet::envelope::ExecCancel;
    use fleet::stream::entry::newest_id;
    use fleet::stream::producer;

    use super::*;

    async fn send_cancel(client: &Client, stream: &str, task_id: &str) {
        let cancel = Envelope::new(ExecControl::Cancel(ExecCancel {
            session_id: "s".into(),
            task_id: task_id.into(),
            reason: String::new(),
        }));
        producer::send(client, stream, None, &cancel).await.unwrap();
    }

    #[tokio::test]
    async fn a_cancel_written_after_the_start_point_is_seen_though_it_came_before_the_first_read() {
        let client = fleet::redis::connect(&fleet_test_support::redis())
            .await
            .unwrap();
        let stream = format!("{}:exec:default:control", fleet_test_support::prefix());
        send_cancel(&client, &stream, "before").await;
        // The executor takes its start point, then reads a request whose cancel is written
        // before its control reader's first read.
        let from = newest_id(&client, &stream).await.unwrap();
        send_cancel(&client, &stream, "after").await;
        let (seen, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let reading = {
            let (client, stream, shutdown) = (client.clone(), stream.clone(), shutdown.clone());
            tokio::spawn(async move {
                follow(&client, &stream, from, &shutdown, |m: ExecControl| {
                    let ExecControl::Cancel(c) = m;
                    seen.send(c.task_id).unwrap();
                })
                .await
            })
        };
        assert_eq!(heard.recv().await.as_deref(), Some("after"));
        shutdown.cancel();
        reading.await.unwrap().unwrap();
        assert!(heard.try_recv().is_err(), "nothing before the start point");
    }
}
