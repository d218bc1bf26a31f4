//! `fleet-bench otlp-sink`: an OTLP/gRPC trace receiver that counts what it gets and keeps
//! nothing, so the tracing benchmark measures what exporting costs the fleet, not a backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(clap::Args, Debug)]
pub struct OtlpSinkArgs {
    /// Where to listen for OTLP/gRPC (point `OTEL_EXPORTER_OTLP_ENDPOINT` at `http://<addr>`).
    #[arg(long, default_value = "127.0.0.1:4317")]
    pub addr: SocketAddr,
    /// Print the spans received so far every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub report_secs: u64,
}

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves until Ctrl-C / SIGTERM, then prints the totals.
pub async fn run(args: OtlpSinkArgs) -> anyhow::Result<()> {
    let sink = Sink::default();
    if args.report_secs > 0 {
        let s = sink.clone();
        let every = Duration::from_secs(args.report_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                eprintln!(
                    "otlp-sink: {} spans so far",
                    s.spans.load(Ordering::Relaxed)
                );
            }
        });
    }
    eprintln!("otlp-sink listening on {}", args.addr);
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .serve_with_shutdown(args.addr, stop)
        .await?;
    println!(
        "{{\"otlp_sink\":{{\"spans\":{},\"export_requests\":{}}}}}",
        sink.spans.load(Ordering::Relaxed),
        sink.requests.load(Ordering::Relaxed)
    );
    Ok(())
}
