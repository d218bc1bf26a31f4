//! exec-worker in agent mode, in-process on a real redis-server: mock agents register and
//! heartbeat, command agents answer with their program's output, cancels stop a request, and
//! OpenAI agents stream completions from a real (local, in-test) server over a socket.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use clap::Parser;
use exec_worker::{App, Config};
use fleet::Keys;
use fleet::council::{AgentStatus, Councils};
use fleet::envelope::{
    AgentAction, AgentCancel, AgentControl, AgentMessage, AgentRequest, Callback, Envelope,
    PeerProposal,
};
use fleet::stream::entry::{StreamId, parse_read};
use fleet::stream::producer;
use fleet::time::now_ms;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Agent {
    client: Client,
    keys: Keys,
    admin: String,
    shutdown: CancellationToken,
    running: JoinHandle<anyhow::Result<()>>,
}

async fn start(extra: &[&str]) -> Agent {
    let redis = fleet_test_support::redis();
    let prefix = fleet_test_support::prefix();
    let mut args: Vec<String> = [
        "exec-worker",
        "--redis-url",
        &redis,
        "--prefix",
        &prefix,
        "--admin-addr",
        "127.0.0.1:0",
        "--block-ms",
        "100",
    ]
    .map(str::to_owned)
    .into();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let app = App::build(Config::try_parse_from(args).expect("config"))
        .await
        .expect("exec-worker builds");
    let admin = format!("http://{}", app.admin_addr());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    let client = fleet::redis::connect(&redis).await.unwrap();
    Agent {
        client,
        keys: Keys::new(&prefix),
        admin,
        shutdown,
        running,
    }
}

impl Agent {
    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap().unwrap();
    }

    async fn send(&self, stream: &str, req: AgentRequest) {
        producer::send(
            &self.client,
            stream,
            None,
            &Envelope::new(AgentMessage::Request(req)),
        )
        .await
        .unwrap();
    }

    /// Waits for the next callback matching `want`, reading the callbacks stream as it grows.
    async fn callbacks_until(&self, want: impl Fn(&[Callback]) -> bool) -> Vec<Callback> {
        let reader = self.client.clone_new();
        reader.init().await.unwrap();
        let mut last = StreamId::ZERO.to_string();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !want(&seen) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching callbacks; got {seen:?}"
            );
            let reply: Value = reader
                .xread(Some(100), Some(500), self.keys.callbacks(), last.as_str())
                .await
                .unwrap();
            for e in parse_read(reply).unwrap().into_iter().flat_map(|(_, e)| e) {
                last = e.id.to_string();
                seen.push(Envelope::<Callback>::from_fields(&e.fields).unwrap().msg);
            }
        }
        let _ = reader.quit().await;
        seen
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn request(action: AgentAction, member: &str) -> AgentRequest {
    AgentRequest {
        action,
        role: "DEV".into(),
        member: member.into(),
        deliberation_id: "d-1".into(),
        round: 1,
        rounds: 1,
        description: "Add login with JWT".into(),
        requirements: vec!["no plaintext passwords".into()],
        rubric: Default::default(),
        metadata: Default::default(),
        context: String::new(),
        peers: vec![],
        session_id: String::new(),
        task_id: String::new(),
        attempt: 0,
        task_action: String::new(),
        dependencies: vec![],
        priority: 0,
        deadline_ms: now_ms() + 30_000,
    }
}

fn proposals(cbs: &[Callback]) -> Vec<&fleet::envelope::ProposalCallback> {
    cbs.iter()
        .filter_map(|c| match c {
            Callback::Proposal(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_mock_agent_registers_answers_on_its_own_stream_and_unregisters() {
    let agent = start(&[
        "--agent-mode",
        "mock",
        "--roles",
        "dev",
        "--agent-id",
        "a1",
        "--capabilities",
        "rust,sql",
        "--heartbeat-ms",
        "100",
    ])
    .await;
    let councils = Councils::new(agent.client.clone(), agent.keys.clone());
    let record =
        fleet_test_support::eventually(Duration::from_secs(10), "a1 registered", || async {
            councils.agent("a1").await.unwrap()
        })
        .await;
    assert_eq!(record.role, "DEV");
    assert_eq!(record.capabilities, ["rust", "sql"]);
    assert_eq!(record.status, AgentStatus::Ready);

    agent
        .send(
            &agent.keys.agent_member("DEV", "a1"),
            request(AgentAction::Propose, "a1"),
        )
        .await;
    let cbs = agent.callbacks_until(|c| !proposals(c).is_empty()).await;
    let p = proposals(&cbs)[0];
    assert_eq!(
        (p.member.as_str(), p.agent_id.as_str(), p.round),
        ("a1", "a1", 1)
    );
    assert!(p.content.contains("Add login with JWT"));
    assert!(p.checks.policy.is_some() && p.checks.lint.is_some());

    agent.stop().await;
    assert!(
        councils.agent("a1").await.unwrap().is_none(),
        "unregistered on stop"
    );
}

#[tokio::test]
async fn a_command_agent_answers_with_its_program_and_selects() {
    let agent = start(&[
        "--agent-mode",
        "command",
        "--roles",
        "DEV,ARCHITECT",
        "--command",
        r#"input=$(cat); case "$input" in *'"action":"select"'*) echo 'I choose'; echo '{"winner": "DEV-2", "rationale": "smaller"}';; *) echo 'Plan: hash with argon2'; echo '{"checks": {"lint": {"passed": true, "score": 0.5}}, "self_score": 0.75}';; esac"#,
    ])
    .await;
    agent
        .send(
            &agent.keys.agents("DEV"),
            request(AgentAction::Propose, "DEV-1"),
        )
        .await;
    let mut select = request(AgentAction::Select, "ARCHITECT-1");
    select.role = "ARCHITECT".into();
    select.peers = ["DEV-1", "DEV-2"]
        .map(|m| PeerProposal {
            member: m.into(),
            content: format!("by {m}"),
            ..Default::default()
        })
        .to_vec();
    agent.send(&agent.keys.agents("ARCHITECT"), select).await;
    let cbs = agent
        .callbacks_until(|c| {
            !proposals(c).is_empty() && c.iter().any(|c| matches!(c, Callback::Selection(_)))
        })
        .await;
    let p = proposals(&cbs)[0];
    assert_eq!(p.content, "Plan: hash with argon2");
    assert_eq!(p.checks.lint.as_ref().unwrap().score, Some(0.5));
    assert_eq!(p.self_score, Some(0.75));
    let Some(Callback::Selection(s)) = cbs.iter().find(|c| matches!(c, Callback::Selection(_)))
    else {
        unreachable!()
    };
    assert_eq!(
        (s.winner.as_str(), s.rationale.as_str()),
        ("DEV-2", "smaller")
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_command_agent_that_prints_too_much_answers_a_failed_proposal() {
    // 2 MB on stdout, past the 1 MiB the agent reads: it answers at once, not at the deadline.
    let agent = start(&[
        "--agent-mode",
        "command",
        "--roles",
        "DEV",
        "--command",
        r#"cat >/dev/null; head -c 2000000 /dev/zero | tr '\0' x; echo 'never read' >&2"#,
    ])
    .await;
    let mut req = request(AgentAction::Propose, "DEV-1");
    req.deadline_ms = now_ms() + 600_000;
    agent.send(&agent.keys.agents("DEV"), req).await;
    let cbs = agent.callbacks_until(|c| !proposals(c).is_empty()).await;
    let p = proposals(&cbs)[0];
    let dry_run = p.checks.dry_run.as_ref().expect("a failed dry_run check");
    assert!(!dry_run.passed);
    assert!(
        p.content.contains("printed more than 1048576 bytes"),
        "{}",
        p.content
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_cancel_stops_a_request_in_hand() {
    let agent = start(&[
        "--agent-mode",
        "mock",
        "--roles",
        "QA",
        "--mock-delay-ms",
        "60000",
    ])
    .await;
    let mut req = request(AgentAction::Propose, "QA-1");
    req.role = "QA".into();
    agent.send(&agent.keys.agents("QA"), req).await;
    // The request is in hand once the group delivered it.
    let keys = agent.keys.clone();
    let client = agent.client.clone();
    fleet_test_support::eventually(Duration::from_secs(10), "request delivered", || {
        let (client, keys) = (client.clone(), keys.clone());
        async move {
            let g = fleet::stream::groups::group(&client, &keys.agents("QA"), "executors")
                .await
                .ok()
                .flatten()?;
            (g.pending == 1).then_some(())
        }
    })
    .await;
    producer::send(
        &agent.client,
        &agent.keys.agents_control("QA"),
        None,
        &Envelope::new(AgentControl::Cancel(AgentCancel {
            deliberation_id: "d-1".into(),
            member: "QA-1".into(),
            reason: "deadline passed".into(),
        })),
    )
    .await
    .unwrap();
    fleet_test_support::eventually(
        Duration::from_secs(10),
        "cancelled request counted",
        || async {
            agent
                .metrics()
                .await
                .lines()
                .any(|l| {
                    l.starts_with("fleet_agent_requests_total")
                        && l.contains("outcome=\"cancelled\"")
                })
                .then_some(())
        },
    )
    .await;
    agent.stop().await;
}

/// Subtask `t-1` (action `implement`) of planning session `plan-US-1`, for role DEV.
fn subtask() -> AgentRequest {
    let mut subtask = request(AgentAction::Subtask, "");
    subtask.deliberation_id.clear();
    subtask.session_id = "plan-US-1".into();
    subtask.task_id = "t-1".into();
    subtask.attempt = 1;
    subtask.task_action = "implement".into();
    subtask
}

/// What the fake OpenAI server saw.
type Seen = Arc<Mutex<Vec<(Option<String>, Json)>>>;

/// A tiny OpenAI-compatible server: streams a fixed answer as server-sent events.
async fn openai_server(seen: Seen) -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(
            move |headers: axum::http::HeaderMap, body: axum::Json<Json>| {
                let seen = seen.clone();
                async move {
                    let auth = headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    seen.lock().unwrap().push((auth, body.0));
                    let deltas = [
                        "Use ",
                        "JWT with ",
                        "short expiry.\n",
                        "{\"checks\": {\"policy\": {\"passed\": true}}, \"self_score\": 0.9}",
                    ];
                    let mut sse = String::new();
                    for d in deltas {
                        let event =
                            serde_json::json!({"choices": [{"index": 0, "delta": {"content": d}}]});
                        sse.push_str(&format!("data: {event}\n\n"));
                    }
                    sse.push_str("data: [DONE]\n\n");
                    ([(header::CONTENT_TYPE, "text/event-stream")], sse).into_response()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_openai_agent_streams_a_completion_into_a_proposal_and_a_subtask() {
    let seen: Seen = Arc::default();
    let base = openai_server(seen.clone()).await;
    let agent = start(&[
        "--agent-mode",
        "openai",
        "--roles",
        "DEV",
        "--openai-base-url",
        &base,
        "--openai-model",
        "tiny-llm",
        "--openai-api-key",
        "sk-test",
    ])
    .await;
    agent
        .send(
            &agent.keys.agents("DEV"),
            request(AgentAction::Propose, "DEV-1"),
        )
        .await;
    agent.send(&agent.keys.agents("DEV"), subtask()).await;

    let cbs = agent
        .callbacks_until(|c| {
            !proposals(c).is_empty() && c.iter().any(|c| matches!(c, Callback::Result(_)))
        })
        .await;
    let p = proposals(&cbs)[0];
    assert_eq!(p.content, "Use JWT with short expiry.");
    assert!(p.checks.policy.as_ref().unwrap().passed);
    assert_eq!(p.self_score, Some(0.9));

    let chunks: Vec<&str> = cbs
        .iter()
        .filter_map(|c| match c {
            Callback::Chunk(c) if c.task_id == "t-1" => Some(c.content.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks.len(), 4, "one chunk per streamed delta");
    let Some(Callback::Result(r)) = cbs.iter().find(|c| matches!(c, Callback::Result(_))) else {
        unreachable!()
    };
    assert_eq!((r.session_id.as_str(), r.seq), ("plan-US-1", 6));
    assert!(r.content.starts_with("Use JWT"));

    let seen = seen.lock().unwrap().clone();
    let (auth, body) = &seen[0];
    assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
    assert_eq!(body["model"], "tiny-llm");
    assert_eq!(body["stream"], true);
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("Add login with JWT") && user.contains("no plaintext passwords"));
    agent.stop().await;
}

/// A model server that answers every completion with `body` as `content_type`, status 200.
async fn model_server(content_type: &'static str, body: String) -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, content_type)], body).into_response() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_openai_reply_without_its_answer_fails_the_subtask_saying_why() {
    let streamed = format!(
        "data: {}\n\ndata: {}\n\n",
        serde_json::json!({"choices": [{"index": 0, "delta": {"content": "half an "}}]}),
        serde_json::json!({"error": {"message": "the server is overloaded"}}),
    );
    for (content_type, body, said) in [
        (
            "application/json",
            serde_json::json!({"error": {"message": "model `m` is still loading"}}).to_string(),
            "model `m` is still loading",
        ),
        (
            "application/json",
            "{\"choices\": [".to_owned(),
            "does not parse",
        ),
        ("text/event-stream", streamed, "the server is overloaded"),
    ] {
        let base = model_server(content_type, body).await;
        let agent = start(&[
            "--agent-mode",
            "openai",
            "--roles",
            "DEV",
            "--openai-base-url",
            &base,
            "--openai-model",
            "m",
        ])
        .await;
        agent.send(&agent.keys.agents("DEV"), subtask()).await;
        let cbs = agent
            .callbacks_until(|c| {
                c.iter()
                    .any(|c| matches!(c, Callback::Result(_) | Callback::Error(_)))
            })
            .await;
        let end = cbs
            .iter()
            .find(|c| matches!(c, Callback::Result(_) | Callback::Error(_)));
        let Some(Callback::Error(e)) = end else {
            panic!("{content_type}: the subtask should fail, got {end:?}");
        };
        assert_eq!(e.error_type, "completion_failed");
        assert!(e.message.contains(said), "{}", e.message);
        agent.stop().await;
    }
}
