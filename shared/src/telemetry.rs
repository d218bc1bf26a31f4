//! Logs and traces.
//!
//! * Logs: `tracing-subscriber` with the filter from `RUST_LOG` (default `info`; it filters
//!   logs only, traces keep every `info` span), formatted `pretty` on a terminal and as JSON
//!   lines otherwise (`FLEET_LOG_FORMAT` overrides); JSON lines start with the `trace_id` and
//!   `span_id` of their span when traces are on.
//! * Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set
//!   and `OTEL_SDK_DISABLED` is not `true`, spans are exported over OTLP/gRPC with the standard
//!   `OTEL_*` variables (service name, sampler, resource attributes, `OTEL_BSP_*`); another
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` than `grpc` is warned about. A failing collector is logged
//!   once per outage ([`ReportFailures`]). Otherwise no exporter exists at all.
//! * Propagation: the W3C `traceparent` of the current span rides in every stream entry (`tp`)
//!   and NATS message; consumers continue the trace from it ([`continue_from`]).

use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use tracing::Dispatch;
use tracing::dispatcher::WeakDispatch;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `pretty` on a terminal, `json` otherwise.
    #[default]
    Auto,
    Pretty,
    Json,
}

/// Keeps the trace exporter alive; call [`Telemetry::shutdown`] before exit to flush it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
    !disabled && endpoint
}

/// Installs the global subscriber (and the OTLP exporter when configured) for `service`.
/// Must be called inside the Tokio runtime.
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<Telemetry> {
    // A `RUST_LOG` that does not parse falls back to `info`, said once the logs are up.
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|v| (v, e.to_string())),
        ),
    };
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let dispatch_cell = Arc::new(OnceLock::new());
    // `RUST_LOG` filters the logs only: a span it leaves out of the logs is still traced (and
    // still carries the trace on), so quieting a module never cuts a trace in two.
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        Box::new(json_layer(dispatch_cell.clone(), std::io::stderr))
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .compact()
                .with_writer(std::io::stderr),
        )
    };

    let provider = if otlp_configured() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let exporter = ReportFailures::new(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?,
        );
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| service.to_owned());
        let resource = Resource::builder()
            .with_service_name(service_name)
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new(
                    "service.instance.id",
                    crate::stream::consumer::unique_consumer_name(service),
                ),
            ])
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    // Traces get every span and event at `info` and above (Fleet's spans are all `info`),
    // whatever `RUST_LOG` says.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(LevelFilter::INFO)
    });

    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(otel),
    );
    let _ = dispatch_cell.set(dispatch.downgrade());
    dispatch.try_init()?;
    if let Some((value, error)) = bad_filter {
        tracing::warn!(rust_log = %value, %error, "RUST_LOG is not a valid filter; logging at info");
    }
    if provider.is_some()
        && let Some(protocol) = unsupported_protocol(|k| std::env::var(k).ok())
    {
        tracing::warn!(
            %protocol,
            endpoint = %otlp_endpoint(),
            "OTEL_EXPORTER_OTLP_PROTOCOL {protocol} is not supported: spans are exported over \
             OTLP/gRPC (point the endpoint at the collector's gRPC port, usually 4317)"
        );
    }
    Ok(Telemetry { provider })
}

/// The OTLP protocol asked for (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
/// `OTEL_EXPORTER_OTLP_PROTOCOL`, read through `var`) when it is not `grpc`, the only one the
/// exporter speaks.
fn unsupported_protocol(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|k| var(k).filter(|v| !v.trim().is_empty()))
    .filter(|p| !p.trim().eq_ignore_ascii_case("grpc"))
}

/// The configured OTLP traces endpoint, for messages.
fn otlp_endpoint() -> String {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    .unwrap_or_default()
}

/// A span exporter that reports a failing collector once per outage (a warning at the first
/// failed export, a line when exports succeed again) rather than at every batch, as the SDK
/// does with the errors its exporter returns (so none is returned). Exports run
/// on the batch processor's own thread: spans are queued without waiting, and dropped when
/// the queue is full, so a collector that is down never holds up the work being traced.
#[derive(Debug)]
struct ReportFailures<E> {
    inner: E,
    failing: std::sync::atomic::AtomicBool,
}

impl<E> ReportFailures<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn record(&self, result: &opentelemetry_sdk::error::OTelSdkResult) {
        use std::sync::atomic::Ordering::Relaxed;
        match result {
            Err(e) if !self.failing.swap(true, Relaxed) => tracing::warn!(
                endpoint = %otlp_endpoint(),
                error = %e,
                "cannot export traces; spans are dropped until the collector answers (not \
                 logged again until then)"
            ),
            Ok(()) if self.failing.swap(false, Relaxed) => {
                tracing::info!(endpoint = %otlp_endpoint(), "exporting traces again")
            }
            _ => {}
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for ReportFailures<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.record(&result);
        // Reported above; an error would have the SDK log it again at every failed batch.
        Ok(())
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The JSON log layer writing to `writer`; `dispatch` is set to the subscriber's dispatch once
/// it is built (see [`WithTraceIds`]).
fn json_layer<S, W>(dispatch: Arc<OnceLock<WeakDispatch>>, writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .map_event_format(|inner| WithTraceIds { inner, dispatch })
        .with_writer(writer)
}

/// JSON log lines that start with the `trace_id` and `span_id` of the span they were written
/// in (when traces are on), so a log line leads to its trace in Jaeger and back.
///
/// The formatter runs inside the subscriber, where `Span::current()` sees no subscriber; it
/// reads the span's OpenTelemetry context through the dispatch it belongs to, set once the
/// subscriber is built.
struct WithTraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let ids = (|| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let span = ctx.parent_span()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let otel = cx.span();
            let sc = otel.span_context();
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        })();
        match (ids, line.strip_prefix('{')) {
            (Some((trace, span)), Some(rest)) => {
                write!(
                    writer,
                    "{{\"trace_id\":\"{trace}\",\"span_id\":\"{span}\",{rest}"
                )
            }
            _ => writer.write_str(&line),
        }
    }
}

/// The W3C `traceparent` of the current span, when tracing is on and the span is sampled or
/// recording.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    Some(format_traceparent(sc))
}

/// Formats a span context as a W3C `traceparent`.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent` (version 00).
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Makes a server `span` a child of the caller's span, from the request's `traceparent` header
/// (HTTP and gRPC alike), when it carries one.
pub fn continue_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    let tp = headers.get("traceparent").and_then(|v| v.to_str().ok());
    continue_from(span, tp, false);
}

/// Makes `span` a child of the writer of an entry (its `tp`), so every hop of a task is one
/// trace. A redelivered entry's span also links the writer (and says `fleet.redelivered`), so
/// each retry shows as a second consumer span under the same parent, marked as such.
pub fn continue_from(span: &tracing::Span, tp: Option<&str>, redelivered: bool) {
    let Some(sc) = tp.and_then(parse_traceparent) else {
        return;
    };
    if redelivered {
        span.add_link_with_attributes(sc.clone(), vec![KeyValue::new("fleet.redelivered", true)]);
    }
    let _ = span.set_parent(Context::new().with_remote_span_context(sc));
}

/// Links `span` to the writer of an entry it handles together with others (a batch whose
/// parent is another entry's writer): per OpenTelemetry messaging conventions, a batch span is
/// the child of one message and links the rest.
pub fn link_to(span: &tracing::Span, tp: Option<&str>) {
    if let Some(sc) = tp.and_then(parse_traceparent) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_log_lines_carry_the_trace_and_span_ids_of_their_span() {
        let out = Capture::default();
        let provider = SdkTracerProvider::builder().build();
        let writer = out.clone();
        let cell = Arc::new(OnceLock::new());
        let dispatch = Dispatch::new(
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
                .with(json_layer(cell.clone(), move || writer.clone())),
        );
        cell.set(dispatch.downgrade()).unwrap();
        let tp = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("work");
            let tp = span.in_scope(|| {
                tracing::info!("inside");
                current_traceparent().expect("a traceparent inside a span")
            });
            tracing::info!("outside");
            tp
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["message"], "inside");
        assert_eq!(lines[0]["trace_id"], tp[3..35], "{text}");
        assert_eq!(lines[0]["span_id"], tp[36..52], "{text}");
        assert_eq!(lines[0]["span"]["name"], "work");
        assert_eq!(lines[1]["fields"]["message"], "outside");
        assert!(lines[1].get("trace_id").is_none(), "{text}");
    }

    #[test]
    fn only_grpc_is_a_supported_otlp_protocol() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(unsupported_protocol(env(&[])), None);
        assert_eq!(
            unsupported_protocol(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])),
            None
        );
        assert_eq!(
            unsupported_protocol(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])),
            Some("http/protobuf".to_owned())
        );
        // The traces-specific variable wins.
        assert_eq!(
            unsupported_protocol(env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ])),
            None
        );
    }

    #[test]
    fn traceparents_round_trip_and_reject_garbage() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(format_traceparent(&sc), tp);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
