//! `e2e` and `fanout`: the whole path, as users drive it.
//!
//! N sessions are opened with `POST /api/v1/chat/init`, each with a WebSocket to the gateway.
//! Tasks go out over the session's WebSocket (`chat_message`) or over REST
//! (`POST /api/v1/chat/{sid}/task`), with a task id the tool chooses, so every event is matched
//! to its task without waiting for the `task_queued` reply. Per task it records:
//!
//! * `accepted`: intended start -> `task_queued` (WS) or the 202 (REST);
//! * `first_chunk`: intended start -> the first `chat_streaming` of the task;
//! * `final`: intended start -> `chat_response` (the task is complete for the client);
//! * `watcher_final` (with `--watchers`): intended start -> `chat_response` on each extra
//!   connection of the session, i.e. fan-out delivery to every connected client.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use crate::driver::{self, Meter};
use crate::report::{self, Percentiles, Report};
use crate::schedule::{Load, Window};
use crate::{FleetArgs, Observe, RunArgs};

/// How tasks are submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Ws,
    Rest,
}

#[derive(clap::Args, Clone, Debug)]
pub struct E2eArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Sessions, each with its own WebSocket.
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Submit over the session's WebSocket or over REST.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    pub via: Via,
    /// Extra WebSocket connections per session that only listen (fan-out).
    #[arg(long, default_value_t = 0)]
    pub watchers: usize,
    /// Key prefix of the fleet (to wait for its streams to be idle before starting).
    #[arg(long, env = "FLEET_PREFIX", default_value = fleet::keys::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Before starting, wait up to this many seconds for the fleet's streams to have nothing
    /// undelivered or unacknowledged (what an earlier, overloaded run left behind).
    #[arg(long = "settle", default_value_t = 120.0)]
    pub settle_s: f64,
    /// Print the ids of up to this many tasks of the window that did not complete.
    #[arg(long, default_value_t = 0)]
    pub show_incomplete: usize,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub observe: Observe,
}

/// One task on its way.
struct Pending {
    intended: Instant,
    first_seen: bool,
    /// Listeners (the session's main connection and its watchers) yet to see the final event.
    listeners_left: usize,
    done: bool,
}

/// What a session's connections share.
#[derive(Default)]
struct SessionState {
    pending: HashMap<String, Pending>,
    /// Task ids sent over the WebSocket and not yet answered (`task_queued` / `error`), in order.
    unanswered: VecDeque<String>,
}

struct Session {
    id: String,
    token: String,
    state: Mutex<SessionState>,
}

/// A task to submit.
struct Job {
    task_id: String,
    intended: Instant,
}

/// The latencies of the window, recorded by every connection (and, over REST, by the requests
/// that submit) into one set of histograms made before the run starts. A histogram is about
/// 190 KB of zeroed memory: made per connection at its first recording, 192 of them (64
/// sessions) were made as the window opened, and that burst of the tool's own work delayed the
/// fleet's tasks of that moment, enough to be the 1,000/s run's p99.
struct Latencies {
    accepted: Histogram<u64>,
    first_chunk: Histogram<u64>,
    finals: Histogram<u64>,
    watcher_final: Histogram<u64>,
    no_chunk: u64,
}

impl Latencies {
    fn new() -> Arc<Mutex<Latencies>> {
        Arc::new(Mutex::new(Latencies {
            accepted: report::histogram(),
            first_chunk: report::histogram(),
            finals: report::histogram(),
            watcher_final: report::histogram(),
            no_chunk: 0,
        }))
    }
}

fn record(
    latencies: &Mutex<Latencies>,
    which: fn(&mut Latencies) -> &mut Histogram<u64>,
    d: Duration,
) {
    report::record(which(&mut latencies.lock().expect("latencies lock")), d);
}

/// The server message fields the tool reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    message_type: Cow<'a, str>,
    #[serde(borrow, default)]
    task_id: Option<Cow<'a, str>>,
}

/// The message a task carries: `payload_bytes` of one word, so the echo executor answers with
/// exactly one chunk.
pub fn payload(bytes: usize) -> String {
    "x".repeat(bytes.max(1))
}

/// Opens a session over REST.
async fn init_session(http: &reqwest::Client, api: &str, agent: &str) -> anyhow::Result<Session> {
    let resp = http
        .post(format!("{}/api/v1/chat/init", api.trim_end_matches('/')))
        .json(&json!({"agent_id": agent}))
        .send()
        .await
        .with_context(|| format!("cannot reach edge-api at {api}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        bail!("edge-api refused the session ({status}): {body}");
    }
    Ok(Session {
        id: body["session_id"]
            .as_str()
            .context("no session_id")?
            .to_owned(),
        token: body["session_token"]
            .as_str()
            .context("no session_token")?
            .to_owned(),
        state: Mutex::default(),
    })
}

/// Opens `n` sessions (at least one) with `fleet`'s agent, 32 at a time.
pub(crate) async fn open_sessions(
    http: &reqwest::Client,
    fleet: &FleetArgs,
    n: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let sessions: Vec<anyhow::Result<Session>> = futures::stream::iter(0..n.max(1))
        .map(|_| init_session(http, &fleet.api, &fleet.agent))
        .buffer_unordered(32)
        .collect()
        .await;
    sessions
        .into_iter()
        .map(|s| s.map(|s| (s.id, s.token)))
        .collect()
}

/// The WebSocket URL of a session.
pub fn ws_url(base: &str, sid: &str, token: &str) -> String {
    format!("{}/ws/chat/{sid}?token={token}", base.trim_end_matches('/'))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket over a plain TCP stream the caller connected itself.
pub type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(base: &str, s: &Session) -> anyhow::Result<Ws> {
    let url = ws_url(base, &s.id, &s.token);
    // No Nagle on the client: a task's frame goes out at once (the tool must not add latency).
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .with_context(|| format!("cannot connect to the gateway at {base}"))?;
    Ok(ws)
}

/// Reads one connection until `stop`; `main` is the connection that submits.
async fn listen(
    mut rx: futures::stream::SplitStream<Ws>,
    session: Arc<Session>,
    meter: Arc<Meter>,
    main: bool,
    latencies: Arc<Mutex<Latencies>>,
    stop: CancellationToken,
) {
    let window = meter.window;
    loop {
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match msg {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(_)) => break,
        };
        let at = Instant::now();
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        let mut st = session.state.lock().expect("session lock");
        match frame.message_type.as_ref() {
            "task_queued" if main => {
                if let Some(tid) = frame.task_id.as_deref() {
                    if let Some(pos) = st.unanswered.iter().position(|t| t == tid) {
                        st.unanswered.remove(pos);
                    }
                    if let Some(p) = st.pending.get(tid)
                        && window.contains(p.intended)
                    {
                        record(&latencies, |l| &mut l.accepted, at - p.intended);
                    }
                }
            }
            "error" if main => {
                // A refused chat_message: the gateway answers in order, so it is the oldest
                // unanswered one.
                if let Some(tid) = st.unanswered.pop_front()
                    && st.pending.remove(&tid).is_some()
                {
                    drop(st);
                    meter.finished(at, false);
                }
            }
            "chat_streaming" if main => {
                if let Some(tid) = frame.task_id.as_deref()
                    && let Some(p) = st.pending.get_mut(tid)
                    && !p.first_seen
                {
                    p.first_seen = true;
                    if window.contains(p.intended) {
                        record(&latencies, |l| &mut l.first_chunk, at - p.intended);
                    }
                }
            }
            "chat_response" | "chat_error" => {
                let Some(tid) = frame.task_id.as_deref() else {
                    continue;
                };
                let ok = frame.message_type == "chat_response";
                let Some(p) = st.pending.get_mut(tid) else {
                    continue;
                };
                let in_window = window.contains(p.intended);
                let latency = at - p.intended;
                let mut finished = false;
                if main {
                    if !p.done {
                        p.done = true;
                        finished = true;
                        if ok && in_window {
                            let mut l = latencies.lock().expect("latencies lock");
                            report::record(&mut l.finals, latency);
                            if !p.first_seen {
                                l.no_chunk += 1;
                            }
                        }
                    }
                } else if ok && in_window {
                    record(&latencies, |l| &mut l.watcher_final, latency);
                }
                p.listeners_left = p.listeners_left.saturating_sub(1);
                if p.listeners_left == 0 {
                    st.pending.remove(tid);
                }
                drop(st);
                if finished {
                    meter.finished(at, ok);
                }
            }
            _ => {}
        }
    }
}

/// Sends the session's tasks over its WebSocket, in order.
async fn submit_ws(
    mut tx: futures::stream::SplitSink<Ws, WsMessage>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    sub: Submitter,
    stop: CancellationToken,
) {
    while let Some(job) = jobs.recv().await {
        let frame = json!({
            "message_type": "chat_message",
            "data": {"message": &*sub.message, "task_id": job.task_id},
        });
        if tx.send(WsMessage::text(frame.to_string())).await.is_err() {
            break;
        }
    }
    // Closing now would end the session's delivery: the last tasks' events are still coming.
    stop.cancelled().await;
    let _ = tx.close().await;
}

/// What a session's submitter needs.
struct Submitter {
    session: Arc<Session>,
    message: Arc<str>,
    meter: Arc<Meter>,
}

/// Sends the session's tasks over REST, each on a request of its own (a slow answer does not
/// hold the next task back).
async fn submit_rest(
    http: reqwest::Client,
    api: String,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    sub: Submitter,
    latencies: Arc<Mutex<Latencies>>,
) {
    let Submitter {
        session,
        message,
        meter,
    } = sub;
    let url = format!(
        "{}/api/v1/chat/{}/task",
        api.trim_end_matches('/'),
        session.id
    );
    while let Some(job) = jobs.recv().await {
        let req = http
            .post(&url)
            .bearer_auth(&session.token)
            .json(&json!({"message": &*message, "task_id": job.task_id}));
        let session = session.clone();
        let meter = meter.clone();
        let latencies = latencies.clone();
        tokio::spawn(async move {
            let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
            let at = Instant::now();
            if ok {
                if meter.window.contains(job.intended) {
                    record(&latencies, |l| &mut l.accepted, at - job.intended);
                }
            } else {
                let removed = session
                    .state
                    .lock()
                    .expect("session lock")
                    .pending
                    .remove(&job.task_id)
                    .is_some();
                if removed {
                    meter.finished(at, false);
                }
            }
        });
    }
}

/// Marks `job` pending in its session. Done when the task is scheduled, before its submitter
/// sees it: the drain then waits for every task the driver started, even one still queued to
/// its submitter when the window closes.
fn register(session: &Session, job: &Job, listeners: usize, ws: bool) {
    let mut st = session.state.lock().expect("session lock");
    st.pending.insert(
        job.task_id.clone(),
        Pending {
            intended: job.intended,
            first_seen: false,
            listeners_left: listeners,
            done: false,
        },
    );
    if ws {
        st.unanswered.push_back(job.task_id.clone());
    }
}

/// Entries not yet delivered or acknowledged on the fleet's task, execution and callback streams.
async fn backlog(client: &fred::clients::Client, keys: &fleet::Keys) -> u64 {
    let mut total = 0;
    for stream in [keys.tasks(), keys.exec("default"), keys.callbacks()] {
        if let Ok(groups) = fleet::stream::groups::groups(client, &stream).await {
            for g in groups {
                total += g.pending + g.lag.unwrap_or(0);
            }
        }
    }
    total
}

/// Waits for the fleet's streams to drain; returns (seconds waited, backlog left).
async fn settle(redis_url: &str, prefix: &str, limit: Duration) -> anyhow::Result<(f64, u64)> {
    let client = fleet::redis::connect(redis_url).await?;
    let keys = fleet::Keys::new(prefix);
    let started = Instant::now();
    let mut left = backlog(&client, &keys).await;
    while left > 0 && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = backlog(&client, &keys).await;
    }
    Ok((started.elapsed().as_secs_f64(), left))
}

/// Runs `e2e` (or `fanout`, which is `e2e` with watchers).
pub async fn run(args: E2eArgs, mode: &str) -> anyhow::Result<Report> {
    let load = Load::from_args(args.run.rate, args.run.concurrency);
    let mut settled = None;
    if let Some(url) = &args.observe.redis_url {
        let (waited, left) = settle(
            url,
            &args.prefix,
            Duration::from_secs_f64(args.settle_s.max(0.0)),
        )
        .await?;
        if waited > 1.0 || left > 0 {
            eprintln!(
                "fleet-bench {mode}: waited {waited:.1} s for the fleet's backlog to drain ({left} entries left)"
            );
        }
        settled = Some((waited, left));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    eprintln!(
        "fleet-bench {mode}: opening {} sessions ({} connections)...",
        args.sessions,
        args.sessions * (1 + args.watchers)
    );
    let ids = open_sessions(&http, &args.fleet, args.sessions).await?;
    let sessions: Vec<Arc<Session>> = ids
        .into_iter()
        .map(|(id, token)| {
            Arc::new(Session {
                id,
                token,
                state: Mutex::default(),
            })
        })
        .collect();

    // Connect every session's main connection and its watchers.
    let mut conns: Vec<(usize, bool, Ws)> = Vec::new();
    {
        let wanted: Vec<(usize, bool)> = (0..sessions.len())
            .flat_map(|i| {
                std::iter::once((i, true)).chain((0..args.watchers).map(move |_| (i, false)))
            })
            .collect();
        let results: Vec<anyhow::Result<(usize, bool, Ws)>> = futures::stream::iter(wanted)
            .map(|(i, main)| {
                let s = sessions[i].clone();
                let base = args.fleet.ws.clone();
                async move { connect(&base, &s).await.map(|ws| (i, main, ws)) }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for r in results {
            conns.push(r?);
        }
    }
    // Let the gateway finish subscribing the connections before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let run_start = Instant::now() + Duration::from_millis(50);
    let window = Window::after_warmup(run_start, args.run.warmup(), args.run.duration());
    let meter = Meter::new(window, load);
    let stop = CancellationToken::new();
    let listeners = 1 + args.watchers;
    let message: Arc<str> = payload(args.run.payload_bytes).into();
    let latencies = Latencies::new();

    let mut readers = tokio::task::JoinSet::new();
    let mut writers = tokio::task::JoinSet::new();
    let mut queues: Vec<mpsc::UnboundedSender<Job>> = vec![];
    let mut senders: Vec<Option<mpsc::UnboundedSender<Job>>> = vec![None; sessions.len()];
    for (i, main, ws) in conns {
        let (tx, rx) = ws.split();
        let session = sessions[i].clone();
        readers.spawn(listen(
            rx,
            session.clone(),
            meter.clone(),
            main,
            latencies.clone(),
            stop.clone(),
        ));
        if main {
            let (jtx, jrx) = mpsc::unbounded_channel();
            senders[i] = Some(jtx);
            match args.via {
                Via::Ws => {
                    let sub = Submitter {
                        session,
                        message: message.clone(),
                        meter: meter.clone(),
                    };
                    writers.spawn(submit_ws(tx, jrx, sub, stop.clone()));
                }
                Via::Rest => {
                    // The socket only listens; keep its write half alive (pongs go through it).
                    let keep = tx;
                    writers.spawn(submit_rest(
                        http.clone(),
                        args.fleet.api.clone(),
                        jrx,
                        Submitter {
                            session,
                            message: message.clone(),
                            meter: meter.clone(),
                        },
                        latencies.clone(),
                    ));
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        stop.cancelled().await;
                        drop(keep);
                    });
                }
            }
        } else {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                drop(tx);
            });
        }
    }
    for s in senders {
        queues.push(s.expect("every session has a main connection"));
    }

    let observer = args.observe.start(window).await?;
    eprintln!(
        "fleet-bench {mode}: {} via {:?}, {} s + {} s warm-up...",
        load.describe(),
        args.via,
        args.run.duration_s,
        args.run.warmup_s
    );
    tokio::time::sleep_until(run_start.into()).await;
    let n_sessions = queues.len();
    let via_ws = matches!(args.via, Via::Ws);
    let started = driver::drive(load, run_start, &meter, |i, intended| {
        let s = (i as usize) % n_sessions;
        let job = Job {
            task_id: uuid::Uuid::new_v4().to_string(),
            intended,
        };
        register(&sessions[s], &job, listeners, via_ws);
        let _ = queues[s].send(job);
    })
    .await;
    drop(queues);

    // Drain: wait for the window's tasks to complete.
    let pending_in_window = || {
        sessions
            .iter()
            .map(|s| {
                s.state
                    .lock()
                    .expect("session lock")
                    .pending
                    .values()
                    .filter(|p| !p.done && window.contains(p.intended))
                    .count() as u64
            })
            .sum::<u64>()
    };
    driver::wait_until(args.run.drain(), || pending_in_window() == 0).await;
    let incomplete = pending_in_window();
    if args.show_incomplete > 0 {
        let mut shown = 0;
        'sessions: for s in &sessions {
            let st = s.state.lock().expect("session lock");
            for (tid, p) in &st.pending {
                if !p.done && window.contains(p.intended) {
                    eprintln!(
                        "incomplete: session {} task {tid} (first chunk seen: {})",
                        s.id, p.first_seen
                    );
                    shown += 1;
                    if shown >= args.show_incomplete {
                        break 'sessions;
                    }
                }
            }
        }
    }
    let observed = observer.finish(meter.completed()).await;
    stop.cancel();
    while writers.join_next().await.is_some() {}
    while readers.join_next().await.is_some() {}
    // A REST request still in flight after the drain may record later; it waits for this lock.
    let all = latencies.lock().expect("latencies lock");

    let mut r = Report::new(mode, &args.run.label_or(mode, &load), "fleet");
    r.config = json!({
        "load": load.describe(),
        "rate": args.run.rate,
        "concurrency": matches!(load, Load::Closed{..}).then_some(args.run.concurrency),
        "sessions": n_sessions,
        "watchers_per_session": args.watchers,
        "via": args.via,
        "payload_bytes": args.run.payload_bytes,
        "duration_s": args.run.duration_s,
        "warmup_s": args.run.warmup_s,
        "agent": args.fleet.agent,
        "api": args.fleet.api,
        "ws": args.fleet.ws,
    });
    r.window_s = window.secs();
    r.offered = meter.offered();
    r.completed = meter.completed();
    r.throughput_per_s = (r.completed as f64 / r.window_s).round();
    r.errors = meter.errors();
    r.incomplete = incomplete;
    for (name, h) in [
        ("accepted", &all.accepted),
        ("first_chunk", &all.first_chunk),
        ("final", &all.finals),
        ("watcher_final", &all.watcher_final),
    ] {
        if !h.is_empty() {
            r.latency_ms
                .insert(name.into(), Percentiles::from_histogram(h));
        }
    }
    observed.fill(&mut r);
    r.extra = json!({
        "tasks_started": started,
        "finals_without_chunk": all.no_chunk,
        "settle_wait_s": settled.map(|(w, _)| (w * 10.0).round() / 10.0),
        "backlog_at_start": settled.map(|(_, l)| l),
    });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_one_word_of_the_given_size() {
        let p = payload(64);
        assert_eq!(p.len(), 64);
        assert_eq!(p.split_whitespace().count(), 1);
        assert_eq!(payload(0).len(), 1);
    }

    #[test]
    fn frames_are_read_without_copying_the_rest() {
        let f: Frame = serde_json::from_str(
            r#"{"event_id":"1-0","message_type":"chat_streaming","session_id":"s","task_id":"t1","seq":2,"data":{"content":"x"},"timestamp":"now"}"#,
        )
        .unwrap();
        assert_eq!(f.message_type, "chat_streaming");
        assert_eq!(f.task_id.as_deref(), Some("t1"));
        let f: Frame =
            serde_json::from_str(r#"{"message_type":"pong","session_id":"s","data":{}}"#).unwrap();
        assert!(f.task_id.is_none());
    }

    #[test]
    fn ws_urls_carry_the_token() {
        assert_eq!(
            ws_url("ws://127.0.0.1:8002/", "s1", "tok"),
            "ws://127.0.0.1:8002/ws/chat/s1?token=tok"
        );
    }
}
