//! One trace per task across every process, and metrics on every process.
//!
//! Every binary runs as a process against real `redis-server` and `nats-server -js`, exporting
//! spans over OTLP/gRPC to a collector this test serves (the OpenTelemetry collector's own
//! `TraceService`). A chat task submitted over REST with a `traceparent` must show up as one
//! trace: edge-api (which sends the executor's request itself) -> exec-worker -> callback-worker
//! -> ws-gateway delivery, each span a child of the previous hop's. A planning event published on NATS with a `traceparent`
//! must cross nats-bridge -> dispatcher -> nats-bridge and leave on NATS `agent.requests` in the
//! same trace. Then every binary's `/metrics` must parse as Prometheus text, with its counters
//! moved by that traffic.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use fleet_e2e::{AGENT, Fleet, RestSession, SECRET, WsClient, is_final_of};
use fleet_test_support::{FleetProcess, NatsServer, eventually};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use serde_json::{Value as Json, json};

const WITHIN: Duration = Duration::from_secs(30);

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: BTreeMap<String, String>,
}

/// An in-process OTLP trace collector.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn serve() -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// The services a span's ancestry passes through, from the span up (consecutive spans of one
/// service counted once), and the parent id the ancestry ends at (outside the collected spans).
fn lineage(spans: &[Span], leaf: &Span) -> (Vec<String>, String) {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut services: Vec<String> = Vec::new();
    let mut at = leaf;
    loop {
        if services.last() != Some(&at.service) {
            services.push(at.service.clone());
        }
        match by_id.get(at.parent_span_id.as_str()) {
            Some(parent) => at = parent,
            None => return (services, at.parent_span_id.clone()),
        }
    }
}

/// Waits until trace `trace_id` holds a span of `leaf_service` whose lineage is `services`,
/// ending at the caller's span `root_parent`.
async fn wait_for_lineage(
    collector: &Collector,
    trace_id: &str,
    leaf_service: &str,
    services: &[&str],
    root_parent: &str,
) -> Vec<Span> {
    let found = tokio::time::timeout(WITHIN, async {
        loop {
            let spans = collector.trace(trace_id);
            let ok = spans.iter().filter(|s| s.service == leaf_service).any(|s| {
                let (chain, top) = lineage(&spans, s);
                chain == services && top == root_parent
            });
            if ok {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        let spans = collector.trace(trace_id);
        let chains: Vec<_> = spans
            .iter()
            .map(|s| (s.service.clone(), s.name.clone(), lineage(&spans, s)))
            .collect();
        panic!("no {leaf_service} span with lineage {services:?} from {root_parent}; trace {trace_id} has:\n{chains:#?}")
    })
}

/// A random W3C trace context of "the caller": (traceparent, trace id, span id).
fn caller_context() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// Every binary of the fleet as a process, each with the admin address it logged.
struct Processes {
    procs: Vec<Proc>,
    api: String,
    ws: String,
    grpc: String,
}

/// One binary of [`Processes`].
struct Proc {
    name: String,
    process: FleetProcess,
    /// Where its admin routes are (edge-api's are on its HTTP port).
    admin: SocketAddr,
}

impl Processes {
    /// Starts every binary with every port chosen by the system (port 0), each read back from
    /// the process's `listening` log line; the gateway comes before edge-api, which names the
    /// gateway's address to clients.
    async fn start(fleet: &Fleet, nats: &NatsServer, otlp: Option<SocketAddr>) -> Processes {
        Self::start_with(fleet, nats, otlp, &[]).await
    }

    /// [`Processes::start`], with `extra` environment variables for the named processes.
    async fn start_with(
        fleet: &Fleet,
        nats: &NatsServer,
        otlp: Option<SocketAddr>,
        extra: &[(&str, &'static str, &str)],
    ) -> Processes {
        let mut env: Vec<(&'static str, String)> = Vec::new();
        if let Some(addr) = otlp {
            env.extend([
                ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
                ("OTEL_TRACES_SAMPLER", "always_on".to_owned()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ]);
        }
        let (mut api, mut ws, mut grpc) = (String::new(), String::new(), String::new());
        let mut procs = Vec::new();
        for name in [
            "dispatcher",
            "callback-worker",
            "exec-worker",
            "ws-gateway",
            "edge-api",
            "nats-bridge",
        ] {
            let mut args = fleet_e2e::process_args(name, &fleet.redis_url, &fleet.prefix);
            match name {
                "edge-api" => {
                    args.extend(
                        [
                            "--http-addr",
                            "127.0.0.1:0",
                            "--grpc-addr",
                            "127.0.0.1:0",
                            "--secret",
                            SECRET,
                            "--public-ws-url",
                            &ws,
                        ]
                        .map(String::from),
                    );
                }
                "ws-gateway" => args
                    .extend(["--http-addr", "127.0.0.1:0", "--secret", SECRET].map(String::from)),
                "nats-bridge" => args.extend(["--nats-url".into(), nats.url()]),
                _ => {}
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut env = env.clone();
            env.extend(
                extra
                    .iter()
                    .filter(|(process, ..)| *process == name)
                    .map(|(_, k, v)| (*k, (*v).to_owned())),
            );
            let mut process = FleetProcess::spawn(name, &argv, &env);
            let admin = match name {
                "edge-api" => {
                    let http = process.listening("http", WITHIN).await;
                    api = format!("http://{http}");
                    grpc = format!("http://{}", process.listening("grpc", WITHIN).await);
                    http
                }
                "ws-gateway" => {
                    ws = format!("ws://{}", process.listening("http", WITHIN).await);
                    process.listening("admin", WITHIN).await
                }
                _ => process.listening("admin", WITHIN).await,
            };
            procs.push(Proc {
                name: name.to_owned(),
                process,
                admin,
            });
        }
        Processes {
            procs,
            api,
            ws,
            grpc,
        }
    }

    /// Waits until every process answers `/health/ready` (a process that fails shows its log
    /// when the test panics).
    async fn ready(&self) {
        for p in &self.procs {
            let url = format!("http://{}/health/ready", p.admin);
            eventually(WITHIN, &format!("{} ready", p.name), || async {
                let r = reqwest::get(&url).await.ok()?;
                r.status().is_success().then_some(())
            })
            .await;
        }
    }

    async fn metrics(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for Proc { name, admin, .. } in &self.procs {
            let body = reqwest::get(format!("http://{admin}/metrics"))
                .await
                .unwrap_or_else(|e| panic!("{name} /metrics: {e}"));
            assert_eq!(body.status(), 200, "{name} /metrics");
            out.insert(name.clone(), body.text().await.unwrap());
        }
        out
    }

    async fn stop(mut self) {
        for Proc { name, process, .. } in &mut self.procs {
            let status = process.terminate(Duration::from_secs(20)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "{name} did not exit cleanly ({status:?}):\n{}",
                process.log()
            );
        }
    }
}

/// Opens a session over REST, connects a WebSocket to it, and submits one task with the
/// caller's `traceparent`; returns the task id once the client holds its final event.
async fn chat_task(p: &Processes, message: &str, traceparent: Option<&str>) -> String {
    let s = RestSession::open(&p.api, AGENT).await;
    let mut ws = s.connect(&p.ws).await;
    let mut req = s.task_request(&reqwest::Client::new(), &p.api, message);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let tid = RestSession::submit_request(req).await;
    ws.until(WITHIN, |m| is_final_of(m, &tid)).await;
    ws.close().await;
    tid
}

/// Publishes a TRANSITION to BUILD on `agile.events` (once the bridge's stream takes it).
async fn publish_transition(js: &async_nats::jetstream::Context, case: &str, tp: Option<&str>) {
    let payload =
        json!({"event_type": "TRANSITION", "case_id": case, "from": "DESIGN", "to": "BUILD"})
            .to_string();
    eventually(WITHIN, "agile.events accepts a publish", || async {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", case);
        if let Some(tp) = tp {
            h.insert("traceparent", tp);
        }
        let ack = js
            .publish_with_headers("agile.events", h, payload.clone().into())
            .await
            .ok()?;
        ack.await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_task_and_a_planning_event_are_each_one_trace_across_every_process() {
    let (collector, otlp) = Collector::serve().await;
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    let p = Processes::start(&fleet, &nats, Some(otlp)).await;
    p.ready().await;

    // The chat path, from the caller's span to the gateway's delivery.
    let (tp, trace, caller) = caller_context();
    let tid = chat_task(&p, "trace me end to end", Some(&tp)).await;
    let spans = wait_for_lineage(
        &collector,
        &trace,
        "ws-gateway",
        &["ws-gateway", "callback-worker", "exec-worker", "edge-api"],
        &caller,
    )
    .await;
    let http = spans
        .iter()
        .find(|s| s.service == "edge-api" && s.parent_span_id == caller)
        .expect("edge-api's server span is the caller's child");
    assert_eq!(http.name, "POST /api/v1/chat/{session_id}/task");
    assert_eq!(http.attributes["http.response.status_code"], "202");
    let executor = spans.iter().find(|s| s.service == "exec-worker").unwrap();
    assert_eq!(executor.attributes["messaging.system"], "redis");
    assert_eq!(executor.attributes["fleet.task_id"], tid);
    assert_eq!(executor.attributes["fleet.attempt"], "1");
    assert!(
        !spans.iter().any(|s| s.service == "dispatcher"),
        "a chat task goes from edge-api to its pool without a dispatcher"
    );
    // Nothing of this task leaked into another trace.
    let elsewhere = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id != trace && s.attributes.get("fleet.task_id") == Some(&tid))
        .count();
    assert_eq!(elsewhere, 0, "spans of task {tid} outside its trace");

    // The planning path: NATS in, the dispatcher, NATS out, one trace.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut requests = client.subscribe("agent.requests").await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let (tp, trace, caller) = caller_context();
    publish_transition(&js, "US-TRACE", Some(&tp)).await;
    let spans = wait_for_lineage(
        &collector,
        &trace,
        "nats-bridge",
        &["nats-bridge", "dispatcher", "nats-bridge"],
        &caller,
    )
    .await;
    assert!(
        spans.iter().any(|s| s.service == "nats-bridge"
            && s.attributes.get("messaging.system").map(String::as_str) == Some("nats")),
        "nats-bridge spans follow the messaging conventions"
    );
    let msg = tokio::time::timeout(WITHIN, requests.next())
        .await
        .expect("a subtask request on agent.requests")
        .unwrap();
    let out_tp = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .expect("the request carries a traceparent")
        .to_string();
    assert_eq!(
        &out_tp[3..35],
        trace,
        "the request on NATS continues the event's trace"
    );

    p.stop().await;
    fleet.stop().await;
}

/// Waits until the collector holds a span that `pick` picks; returns it.
async fn wait_for_span(collector: &Collector, what: &str, pick: impl Fn(&Span) -> bool) -> Span {
    let found = tokio::time::timeout(WITHIN, async {
        loop {
            let hit = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| pick(s))
                .cloned();
            if let Some(span) = hit {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no span: {what}"))
}

/// Whether span `s` is `service`'s and has attribute `key` set to `value`.
fn span_of(s: &Span, service: &str, key: &str, value: &str) -> bool {
    s.service == service && s.attributes.get(key).map(String::as_str) == Some(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_websocket_submits_and_malformed_traceparents_each_make_one_trace() {
    use fleet_proto::orchestrator::v1 as pb;
    let (collector, otlp) = Collector::serve().await;
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    let p = Processes::start(&fleet, &nats, Some(otlp)).await;
    p.ready().await;
    let chain = ["ws-gateway", "callback-worker", "exec-worker", "edge-api"];

    // gRPC SubmitTask with the caller's `traceparent` metadata.
    let mut grpc =
        pb::orchestrator_service_client::OrchestratorServiceClient::connect(p.grpc.clone())
            .await
            .unwrap();
    let s = fleet_e2e::deliberation::open_grpc_session(&mut grpc).await;
    let url = fleet_e2e::chat_ws_url(&p.ws, &s.session_id, &s.session_token, None);
    let mut ws = WsClient::connect(&url).await;
    let (tp, trace, caller) = caller_context();
    let mut req = tonic::Request::new(pb::SubmitTaskRequest {
        session_id: s.session_id.clone(),
        session_token: s.session_token.clone(),
        message: "trace me over grpc".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    let tid = grpc.submit_task(req).await.unwrap().into_inner().task_id;
    ws.until(WITHIN, |m| is_final_of(m, &tid)).await;
    let spans = wait_for_lineage(&collector, &trace, "ws-gateway", &chain, &caller).await;
    let rpc = spans
        .iter()
        .find(|s| s.service == "edge-api" && s.parent_span_id == caller)
        .expect("edge-api's RPC span is the caller's child");
    assert_eq!(rpc.attributes["rpc.method"], "SubmitTask");

    // A WebSocket chat_message starts its own trace at the gateway; its delivery closes it.
    ws.send_chat("trace me over websocket").await;
    let queued = ws
        .until(WITHIN, |m| m.message_type == "task_queued")
        .await
        .pop()
        .unwrap();
    let tid = queued.task_id.clone().unwrap();
    ws.until(WITHIN, |m| is_final_of(m, &tid)).await;
    let exec = wait_for_span(&collector, "the WebSocket task's executor span", |sp| {
        span_of(sp, "exec-worker", "fleet.task_id", &tid)
    })
    .await;
    let ws_chain = ["ws-gateway", "callback-worker", "exec-worker", "ws-gateway"];
    let spans = wait_for_lineage(&collector, &exec.trace_id, "ws-gateway", &ws_chain, "").await;
    let root = spans
        .iter()
        .find(|sp| sp.parent_span_id.is_empty())
        .unwrap();
    assert_eq!(root.name, "ws chat_message");
    ws.close().await;

    // A malformed traceparent neither fails the request nor joins any trace: the task runs in
    // a fresh trace of its own that still spans every hop.
    for bad in [
        "00-garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let tid = chat_task(&p, "trace me from scratch", Some(bad)).await;
        let exec = wait_for_span(&collector, "the task's executor span", |sp| {
            span_of(sp, "exec-worker", "fleet.task_id", &tid)
        })
        .await;
        assert_ne!(exec.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        wait_for_lineage(&collector, &exec.trace_id, "ws-gateway", &chain, "").await;
    }

    p.stop().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberation_is_one_trace_through_its_agents_and_their_proposals() {
    use fleet_e2e::deliberation::{AgentSpec, agent_args, deliberate, ready_agents};
    use fleet_proto::orchestrator::v1 as pb;
    let (collector, otlp) = Collector::serve().await;
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    let p = Processes::start(&fleet, &nats, Some(otlp)).await;
    p.ready().await;
    // An agent, under a service name of its own (OTEL_SERVICE_NAME).
    let args = [
        fleet_e2e::common_args(&fleet.redis_url, &fleet.prefix),
        agent_args(&AgentSpec {
            agent_id: Some("agent-trace".into()),
            ..AgentSpec::mock(&["DEV"])
        }),
    ]
    .concat();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_SERVICE_NAME", "agent".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut agent = FleetProcess::spawn("exec-worker", &args, &env);
    let mut grpc =
        pb::orchestrator_service_client::OrchestratorServiceClient::connect(p.grpc.clone())
            .await
            .unwrap();
    ready_agents(&mut grpc, "DEV", 1).await;

    let (tp, trace, caller) = caller_context();
    let mut req = tonic::Request::new(deliberate("T-TRACE", "DEV", 1, 1, 20_000));
    req.metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    grpc.deliberate(req).await.unwrap();
    // The request to the agent, the agent's answer and the proposal it sent back: one trace.
    wait_for_lineage(
        &collector,
        &trace,
        "callback-worker",
        &["callback-worker", "agent", "dispatcher", "edge-api"],
        &caller,
    )
    .await;

    assert!(agent.terminate(WITHIN).await.is_some_and(|s| s.success()));
    p.stop().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_log_that_does_not_parse_is_said_not_silently_ignored() {
    let fleet = Fleet::start_without_workers().await;
    let args = fleet_e2e::common_args(&fleet.redis_url, &fleet.prefix);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [("RUST_LOG", "info,fleet=dbug".to_owned())];
    let mut process = FleetProcess::spawn("dispatcher", &args, &env);
    // Logged before it listens, so there by the time it says where it listens.
    process.listening("admin", WITHIN).await;
    let log = process.log();
    let warned = log.lines().any(|l| {
        serde_json::from_str::<Json>(l)
            .is_ok_and(|v| v["level"] == "WARN" && v["fields"]["rust_log"] == "info,fleet=dbug")
    });
    assert!(warned, "no warning about RUST_LOG:\n{log}");
    assert!(process.terminate(WITHIN).await.is_some_and(|s| s.success()));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_quieting_a_module_keeps_its_spans_in_the_trace() {
    let (collector, otlp) = Collector::serve().await;
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    // The executor's handler logs only warnings: RUST_LOG is about logs, not traces.
    let quiet = [("exec-worker", "RUST_LOG", "info,exec_worker::executor=warn")];
    let p = Processes::start_with(&fleet, &nats, Some(otlp), &quiet).await;
    p.ready().await;
    let (tp, trace, caller) = caller_context();
    chat_task(&p, "trace me quietly", Some(&tp)).await;
    wait_for_lineage(
        &collector,
        &trace,
        "ws-gateway",
        &["ws-gateway", "callback-worker", "exec-worker", "edge-api"],
        &caller,
    )
    .await;
    // Log lines written in a span still lead to its trace (`session opened`, in the span of
    // the request that opened the session).
    let edge = p.procs.iter().find(|x| x.name == "edge-api").unwrap();
    let log = edge.process.log();
    let traced = log.lines().any(|l| {
        serde_json::from_str::<Json>(l).is_ok_and(|v| {
            v["fields"]["message"] == "session opened"
                && v["trace_id"].as_str().is_some_and(|t| t.len() == 32)
                && v["span_id"].as_str().is_some_and(|s| s.len() == 16)
        })
    });
    assert!(traced, "edge-api's log lines carry no trace ids:\n{log}");
    p.stop().await;
    fleet.stop().await;
}

/// Log lines of `log` (JSON) that report a failed trace export, at any level above debug.
fn export_failure_reports(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let Ok(v) = serde_json::from_str::<Json>(l) else {
                return false;
            };
            let level = v["level"].as_str().unwrap_or_default();
            let text = v["fields"].to_string().to_lowercase();
            level != "DEBUG" && level != "TRACE" && text.contains("export")
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_holds_nothing_up_and_is_reported_once() {
    // A "collector" that takes every connection and drops it: each export fails at once, and
    // each attempt shows here as a connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    let p = Processes::start(&fleet, &nats, Some(otlp)).await;
    p.ready().await;

    // Tasks keep completing while every export fails. Six processes export: past 6 * 5
    // connections, at least one process has failed to export several times over.
    while attempts.load(std::sync::atomic::Ordering::SeqCst) < 30 {
        chat_task(&p, "nobody collects this", None).await;
    }
    let mut reported = 0;
    for proc in &p.procs {
        let reports = export_failure_reports(&proc.process.log());
        assert!(
            reports.len() <= 1,
            "{} reported the failing exporter {} times:\n{}",
            proc.name,
            reports.len(),
            reports.join("\n")
        );
        reported += reports.len();
    }
    assert!(reported > 0, "nobody reported the failing exporter");

    p.stop().await;
    fleet.stop().await;
}

/// The samples of metric family `name` in a Prometheus text exposition, summed.
fn sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Checks that `text` is Prometheus text exposition: `# HELP` / `# TYPE` lines, and samples
/// `name{label="value",...} number` whose family was declared by a `# TYPE` line.
fn assert_prometheus_text(service: &str, text: &str) {
    let mut types: HashMap<String, String> = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind), None) = (it.next(), it.next(), it.next()) else {
                panic!("{service}: bad TYPE line {line:?}");
            };
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{service}: unknown type in {line:?}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("{service}: bad sample {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{service}: bad value in {line:?}"
        );
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, Some(l)),
            None => (series, None),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{service}: bad metric name in {line:?}"
        );
        if let Some(l) = labels {
            assert!(l.ends_with('}'), "{service}: unclosed labels in {line:?}");
            let body = &l[..l.len() - 1];
            for pair in split_labels(body) {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{service}: bad label {pair:?} in {line:?}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{service}: bad label name in {line:?}"
                );
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "{service}: unquoted label value in {line:?}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "{service}: sample {line:?} has no # TYPE line"
        );
    }
    assert!(!types.is_empty(), "{service}: no metrics at all");
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_prometheus_metrics_that_move_with_traffic() {
    let nats = NatsServer::start();
    let fleet = Fleet::start_without_workers().await;
    let p = Processes::start(&fleet, &nats, None).await;
    p.ready().await;
    let before = p.metrics().await;

    chat_task(&p, "count me", None).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    publish_transition(&js, "US-METRICS", None).await;

    // What each binary must have counted, by metric family.
    let moved: [(&str, &str); 9] = [
        ("edge-api", "fleet_http_requests_total"),
        ("edge-api", "fleet_tasks_submitted_total"),
        ("dispatcher", "fleet_stream_entries_acked_total"),
        ("exec-worker", "fleet_exec_tasks_total"),
        ("callback-worker", "fleet_callbacks_total"),
        ("callback-worker", "fleet_task_duration_seconds_count"),
        ("ws-gateway", "fleet_ws_messages_sent_total"),
        ("nats-bridge", "fleet_nats_messages_in_total"),
        ("nats-bridge", "fleet_nats_messages_out_total"),
    ];
    let after = eventually(
        WITHIN,
        "every binary's counters moved and its groups sampled",
        || async {
            let now = p.metrics().await;
            // The consumer groups' lag and pending are sampled by every worker, too.
            let sampled = ["dispatcher", "callback-worker", "exec-worker"]
                .iter()
                .all(|svc| now[*svc].contains("fleet_stream_lag{"));
            let counted = moved
                .iter()
                .all(|(svc, m)| sum(&now[*svc], m) > sum(&before[*svc], m));
            (sampled && counted).then_some(now)
        },
    )
    .await;
    for (service, text) in &after {
        assert_prometheus_text(service, text);
    }
    // edge-api serves the same exposition at /health/metrics.
    let health = reqwest::get(format!("{}/health/metrics", p.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_prometheus_text("edge-api /health/metrics", &health);

    p.stop().await;
    fleet.stop().await;
}
