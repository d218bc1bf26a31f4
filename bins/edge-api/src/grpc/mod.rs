//! The gRPC front door: `orchestrator.v1.OrchestratorService` (see
//! `proto/orchestrator/v1/orchestrator.proto`), `grpc.health.v1.Health` and server reflection
//! (v1 and v1alpha), on `FLEET_GRPC_ADDR` (default `0.0.0.0:50055`).
//!
//! | module | RPCs |
//! |---|---|
//! | [`deliberation`] | `Deliberate`, `Orchestrate`, `StreamDeliberation`, `GetDeliberationResult` |
//! | [`planning`] | `DeriveSubtasks`, `ProcessPlanningEvent` |
//! | [`councils`] | `RegisterAgent`, `UnregisterAgent`, `CreateCouncil`, `ListCouncils`, `DeleteCouncil` |
//! | [`chat`] | `CreateSession`, `SubmitTask`, `GetTask`, `CancelTask`, `CloseSession`, `RefreshSessionToken`, `StreamSessionEvents` |
//! | [`status`] | `GetStatus`, `GetMetrics` |
//!
//! No RPC keeps state in this process: a sync `Deliberate` follows the deliberation's event
//! stream in Redis (on a connection of its own), so any replica answers for any deliberation.
//! The work is the shared library's: [`fleet::session::Chat`] for chat (exactly as REST),
//! [`fleet::deliberation::Engine`] for deliberations, [`fleet::council::Councils`],
//! [`fleet::planning`]. Errors map to status codes in [`error`]. Every RPC is counted in
//! `fleet_grpc_requests_total{method,code}` and timed in
//! `fleet_grpc_request_duration_seconds{method}`.

pub mod chat;
pub mod convert;
pub mod councils;
pub mod deliberation;
pub mod error;
pub mod planning;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet::deliberation::Engine;
use fleet::planning::PlanningRules;
use fleet::session::Chat;
use fleet::session_log::SessionLog;
use fleet_proto::orchestrator::v1 as pb;
use fleet_proto::orchestrator::v1::orchestrator_service_server::{
    OrchestratorService, OrchestratorServiceServer,
};
use fred::prelude::*;
use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Longest single blocking read of a stream by a call (its blocking reader's allowance).
pub(crate) const READ_BLOCK: Duration = Duration::from_secs(1);

/// Limits of the gRPC service.
#[derive(Clone, Debug)]
pub struct GrpcLimits {
    /// Deadline of a deliberation whose request sets no timeout.
    pub default_deliberation_timeout: Duration,
    /// Sync calls (and streams) waiting at once; more answer RESOURCE_EXHAUSTED.
    pub max_waiters: usize,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        Self {
            default_deliberation_timeout: Duration::from_secs(60),
            max_waiters: 1024,
        }
    }
}

/// The `OrchestratorService` implementation. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    pub chat: Chat,
    pub engine: Engine,
    pub log: SessionLog,
    pub rules: Arc<PlanningRules>,
    pub limits: GrpcLimits,
    /// Connections held by waiting calls and streams, bounded by `max_waiters`.
    pub waiters: Arc<Semaphore>,
    pub started: Instant,
    /// Ends waiting calls and streams when the server shuts down (they answer UNAVAILABLE, and
    /// a client resumes elsewhere).
    pub shutdown: CancellationToken,
}

impl Orchestrator {
    pub fn client(&self) -> &Client {
        self.chat.tasks.client()
    }

    pub fn keys(&self) -> &fleet::Keys {
        self.chat.tasks.keys()
    }

    /// A connection of its own for a blocking reader, within the waiter bound.
    pub async fn blocking_reader(&self) -> Result<BlockingReader, Status> {
        let permit = self.waiters.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("fleet_submissions_refused_total", "reason" => "waiters").increment(1);
            Status::resource_exhausted(format!(
                "too many calls waiting on this server (limit {}); retry later or use another replica",
                self.limits.max_waiters
            ))
        })?;
        let client = fleet::redis::blocking_reader(self.client(), READ_BLOCK);
        client.init().await.map_err(error::unavailable)?;
        Ok(BlockingReader {
            client,
            _permit: permit,
        })
    }
}

/// A Redis connection used for blocking reads; closed when dropped (also when the call is
/// cancelled mid-read).
pub struct BlockingReader {
    pub client: Client,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for BlockingReader {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

/// The client's deadline from `grpc-timeout`, if it sent one.
pub fn client_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    // Answer a little before the client gives up, so it gets our DEADLINE_EXCEEDED and message.
    let margin = (d / 10).min(Duration::from_millis(100));
    Some(Instant::now() + d - margin)
}

/// The server span of an RPC (OpenTelemetry RPC conventions), continuing the caller's trace
/// when it sent `traceparent` metadata.
fn rpc_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    fleet::telemetry::continue_from_headers(&span, req.headers());
    span
}

/// Runs `work` as RPC `method`: counts it by status code and times it.
pub async fn observe<T>(
    method: &'static str,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = work.await;
    let code = match &result {
        Ok(_) => "OK".to_owned(),
        Err(s) => format!("{:?}", s.code()),
    };
    let numeric = result.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
    tracing::Span::current().record("rpc.grpc.status_code", numeric);
    metrics::counter!("fleet_grpc_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("fleet_grpc_request_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    if let Err(s) = &result {
        tracing::debug!(method, code = ?s.code(), message = s.message(), "rpc failed");
    }
    result
}

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl OrchestratorService for Orchestrator {
    async fn deliberate(
        &self,
        req: Request<pb::DeliberateRequest>,
    ) -> Result<Response<pb::DeliberateResponse>, Status> {
        observe("Deliberate", self.deliberate_rpc(req))
            .await
            .map(Response::new)
    }

    async fn orchestrate(
        &self,
        req: Request<pb::OrchestrateRequest>,
    ) -> Result<Response<pb::OrchestrateResponse>, Status> {
        observe("Orchestrate", self.orchestrate_rpc(req))
            .await
            .map(Response::new)
    }

    type StreamDeliberationStream = BoxStream<pb::DeliberationUpdate>;

    async fn stream_deliberation(
        &self,
        req: Request<pb::DeliberateRequest>,
    ) -> Result<Response<Self::StreamDeliberationStream>, Status> {
        observe("StreamDeliberation", self.stream_deliberation_rpc(req))
            .await
            .map(Response::new)
    }

    async fn get_deliberation_result(
        &self,
        req: Request<pb::GetDeliberationResultRequest>,
    ) -> Result<Response<pb::GetDeliberationResultResponse>, Status> {
        observe(
            "GetDeliberationResult",
            self.get_deliberation_result_rpc(req),
        )
        .await
        .map(Response::new)
    }

    async fn derive_subtasks(
        &self,
        req: Request<pb::DeriveSubtasksRequest>,
    ) -> Result<Response<pb::DeriveSubtasksResponse>, Status> {
        observe("DeriveSubtasks", self.derive_subtasks_rpc(req))
            .await
            .map(Response::new)
    }

    async fn process_planning_event(
        &self,
        req: Request<pb::PlanningEventRequest>,
    ) -> Result<Response<pb::PlanningEventResponse>, Status> {
        observe("ProcessPlanningEvent", self.process_planning_event_rpc(req))
            .await
            .map(Response::new)
    }

    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        observe("RegisterAgent", self.register_agent_rpc(req))
            .await
            .map(Response::new)
    }

    async fn unregister_agent(
        &self,
        req: Request<pb::UnregisterAgentRequest>,
    ) -> Result<Response<pb::UnregisterAgentResponse>, Status> {
        observe("UnregisterAgent", self.unregister_agent_rpc(req))
            .await
            .map(Response::new)
    }

    async fn create_council(
        &self,
        req: Request<pb::CreateCouncilRequest>,
    ) -> Result<Response<pb::CreateCouncilResponse>, Status> {
        observe("CreateCouncil", self.create_council_rpc(req))
            .await
            .map(Response::new)
    }

    async fn list_councils(
        &self,
        req: Request<pb::ListCouncilsRequest>,
    ) -> Result<Response<pb::ListCouncilsResponse>, Status> {
        observe("ListCouncils", self.list_councils_rpc(req))
            .await
            .map(Response::new)
    }

    async fn delete_council(
        &self,
        req: Request<pb::DeleteCouncilRequest>,
    ) -> Result<Response<pb::DeleteCouncilResponse>, Status> {
        observe("DeleteCouncil", self.delete_council_rpc(req))
            .await
            .map(Response::new)
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        observe("CreateSession", self.create_session_rpc(req))
            .await
            .map(Response::new)
    }

    async fn submit_task(
        &self,
        req: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        observe("SubmitTask", self.submit_task_rpc(req))
            .await
            .map(Response::new)
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::ChatTask>, Status> {
        observe("GetTask", self.get_task_rpc(req))
            .await
            .map(Response::new)
    }

    async fn cancel_task(
        &self,
        req: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        observe("CancelTask", self.cancel_task_rpc(req))
            .await
            .map(Response::new)
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        observe("CloseSession", self.close_session_rpc(req))
            .await
            .map(Response::new)
    }

    async fn refresh_session_token(
        &self,
        req: Request<pb::RefreshSessionTokenRequest>,
    ) -> Result<Response<pb::RefreshSessionTokenResponse>, Status> {
        observe("RefreshSessionToken", self.refresh_session_token_rpc(req))
            .await
            .map(Response::new)
    }

    type StreamSessionEventsStream = BoxStream<pb::SessionEvent>;

    async fn stream_session_events(
        &self,
        req: Request<pb::StreamSessionEventsRequest>,
    ) -> Result<Response<Self::StreamSessionEventsStream>, Status> {
        observe("StreamSessionEvents", self.stream_session_events_rpc(req))
            .await
            .map(Response::new)
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        observe("GetStatus", self.get_status_rpc(req))
            .await
            .map(Response::new)
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        observe("GetMetrics", self.get_metrics_rpc(req))
            .await
            .map(Response::new)
    }
}

/// Serves the orchestrator service, health and reflection on `listener` until `shutdown`; then
/// marks the services NOT_SERVING, ends waiting calls and streams, and lets unary calls finish.
/// A client gets `read_timeout` to send its first bytes (else its connection is closed), and an
/// HTTP/2 connection quiet for as long is pinged and closed when the ping is not answered in
/// as long, as on the REST port ([`fleet::net`]).
pub async fn serve(
    listener: TcpListener,
    orchestrator: Orchestrator,
    read_timeout: std::time::Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            fleet_proto::ORCHESTRATOR_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let streams_stop = orchestrator.shutdown.clone();
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health
                .set_service_status(
                    fleet_proto::ORCHESTRATOR_SERVICE,
                    tonic_health::ServingStatus::NotServing,
                )
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            streams_stop.cancel();
        }
    };
    tracing::info!(%addr, "gRPC listening (orchestrator.v1.OrchestratorService, health, reflection)");
    let incoming = fleet::net::first_bytes_within(listener, read_timeout, shutdown.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(read_timeout))
        .http2_keepalive_timeout(Some(read_timeout))
        .trace_fn(rpc_span)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(OrchestratorServiceServer::new(orchestrator))
        .serve_with_incoming_shutdown(incoming, signal)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_into_deadlines_with_a_margin() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        let d = client_deadline(&req).unwrap();
        let left = d.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_millis(1900) && left > Duration::from_millis(1800));
        req.metadata_mut()
            .insert("grpc-timeout", "bogus".parse().unwrap());
        assert!(client_deadline(&req).is_none());
        assert!(client_deadline(&Request::new(())).is_none());
    }
}
