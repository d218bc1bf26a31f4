//! The admin HTTP surface every binary serves: `GET /health` (liveness), `GET /health/ready`
//! (readiness: Redis answers and no component is down), `GET /health/detailed` (Redis latency,
//! lag / pending / consumers of the groups the binary works with, components, uptime) and
//! `GET /metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::stream::groups;

/// Latency buckets (seconds) of every `_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // A second recorder in one process (tests run several apps) keeps the first.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawn metrics upkeep");
        handle
    })
}

/// A component's health, set by the component (e.g. the NATS connection of nats-bridge).
#[derive(Clone, Default)]
pub struct Components(Arc<Mutex<BTreeMap<&'static str, (bool, String)>>>);

impl Components {
    pub fn set(&self, name: &'static str, up: bool, detail: impl Into<String>) {
        self.0
            .lock()
            .expect("components lock")
            .insert(name, (up, detail.into()));
    }

    fn snapshot(&self) -> BTreeMap<&'static str, (bool, String)> {
        self.0.lock().expect("components lock").clone()
    }
}

/// What the health routes report on.
#[derive(Clone)]
pub struct Health {
    pub service: &'static str,
    pub instance: String,
    pub client: Client,
    pub started: Instant,
    /// `(stream, group)` pairs whose lag and pending are reported.
    pub watched: Vec<(String, String)>,
    pub components: Components,
}

impl Health {
    pub fn new(service: &'static str, client: Client, watched: Vec<(String, String)>) -> Self {
        Self {
            service,
            instance: crate::stream::consumer::unique_consumer_name(service),
            client,
            started: Instant::now(),
            watched,
            components: Components::default(),
        }
    }

    async fn redis_ping(&self) -> Result<Duration, String> {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(2), self.client.ping::<String>(None)).await {
            Ok(Ok(_)) => Ok(t.elapsed()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2s".into()),
        }
    }

    fn components_up(&self) -> bool {
        self.components.snapshot().values().all(|(up, _)| *up)
    }
}

/// The admin routes, to serve on their own port or merge into an API router.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/health", get(live))
        .route("/health/", get(live))
        .route("/health/ready", get(ready))
        .route("/health/detailed", get(detailed))
        .route("/health/metrics", get(metrics_text))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(health))
}

async fn live(State(h): State<Arc<Health>>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "service": h.service,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": h.started.elapsed().as_secs(),
    }))
}

async fn ready(State(h): State<Arc<Health>>) -> Response {
    let redis = h.redis_ping().await;
    let ok = redis.is_ok() && h.components_up();
    let body = Json(json!({
        "status": if ok { "ready" } else { "degraded" },
        "redis": redis.is_ok(),
        "components": h.components.snapshot().into_iter()
            .map(|(k, (up, d))| (k.to_owned(), json!({"up": up, "detail": d})))
            .collect::<serde_json::Map<_, _>>(),
    }));
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn detailed(State(h): State<Arc<Health>>) -> Response {
    let redis = h.redis_ping().await;
    let mut streams = Vec::new();
    if redis.is_ok() {
        for (stream, group) in &h.watched {
            let info = groups::group(&h.client, stream, group).await.ok().flatten();
            let consumers = groups::consumers(&h.client, stream, group)
                .await
                .unwrap_or_default();
            streams.push(json!({
                "stream": stream,
                "group": group,
                "exists": info.is_some(),
                "lag": info.as_ref().and_then(|i| i.lag),
                "pending": info.as_ref().map(|i| i.pending),
                "consumers": consumers,
            }));
        }
    }
    let ok = redis.is_ok() && h.components_up();
    let body = Json(json!({
        "status": if ok { "healthy" } else { "degraded" },
        "service": h.service,
        "instance": h.instance,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": h.started.elapsed().as_secs(),
        "redis": match &redis {
            Ok(d) => json!({"reachable": true, "latency_ms": d.as_secs_f64() * 1000.0}),
            Err(e) => json!({"reachable": false, "error": e}),
        },
        "streams": streams,
        "components": h.components.snapshot().into_iter()
            .map(|(k, (up, d))| (k.to_owned(), json!({"up": up, "detail": d})))
            .collect::<serde_json::Map<_, _>>(),
    }));
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn metrics_text() -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// Serves `router` on a bound `listener` until `shutdown` (see [`crate::net::serve`]: a client
/// gets `read_timeout` to send a request).
pub fn spawn(
    listener: TcpListener,
    router: Router,
    read_timeout: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(crate::net::serve(listener, router, read_timeout, shutdown))
}
