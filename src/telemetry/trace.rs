//! Event spans exported over OTLP, configured only by the standard `OTEL_*`
//! variables. Without an endpoint nothing is set up and [`start`] is a single
//! load of an empty cell, so a worker that exports nothing pays nothing.
//!
//! Spans are batched by the SDK's batch processor on its own thread: a full
//! queue drops spans rather than blocking a handler, and an unreachable collector
//! only costs that thread its export timeouts. The gRPC exporter needs a tokio
//! runtime; it gets a small one of its own, so shutting the exporter down never
//! waits on a runtime that the caller itself blocks (the tonic exporter deadlocks
//! on a current-thread runtime otherwise).

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

use crate::event::Event;
use crate::outcome::Outcome;
use crate::telemetry::carrier::HeaderExtractor;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The `OTEL_*` variables that can carry a secret: headers (where collectors' API
/// keys and bearer tokens go) are secret whole, endpoints when they carry
/// credentials (`true`: a URL). Scripts and the commands they run never see them.
pub const SECRET_VARIABLES: &[(&str, bool)] = &[
    ("OTEL_EXPORTER_OTLP_HEADERS", false),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", false),
    ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", false),
    ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", false),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", true),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", true),
    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", true),
    ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", true),
];

/// How long shutdown waits for the last spans to reach the collector.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);

/// Why tracing could not be set up from the environment.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TraceSetupError(String);

/// The exporter of a running worker; [`Tracing::shutdown`] sends the last spans.
pub struct Tracing {
    provider: SdkTracerProvider,
    /// The gRPC exporter's own runtime, kept alive until shutdown.
    runtime: Option<tokio::runtime::Runtime>,
}

/// The export protocol from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
/// `OTEL_EXPORTER_OTLP_PROTOCOL`; `http/protobuf` when unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn protocol() -> Result<Protocol, TraceSetupError> {
    let name = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|var| env(var).map(|value| (var, value)));
    match name {
        None => Ok(Protocol::HttpProtobuf),
        Some((_, value)) if value.eq_ignore_ascii_case("http/protobuf") => Ok(Protocol::HttpProtobuf),
        Some((_, value)) if value.eq_ignore_ascii_case("grpc") => Ok(Protocol::Grpc),
        Some((var, value)) => Err(TraceSetupError(format!(
            "{var}={value:?} is not supported; use \"http/protobuf\" (the default) or \"grpc\""
        ))),
    }
}

/// Whether the environment asks for span export at all.
pub fn export_requested() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    !disabled && !exporter_none && endpoint.is_some()
}

/// Sets up span export when an OTLP endpoint is configured; `default_service` (the
/// worker's `--name`) names the service unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` do. Returns `None` when nothing is to be exported.
pub fn init(default_service: &str) -> Result<Option<Tracing>, TraceSetupError> {
    if !export_requested() {
        return Ok(None);
    }
    let protocol = protocol()?;
    let failed = |err: &dyn std::fmt::Display| TraceSetupError(format!("cannot set up OTLP span export: {err}"));
    let (exporter, runtime) = match protocol {
        Protocol::HttpProtobuf => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| failed(&e))?;
            (exporter, None)
        }
        Protocol::Grpc => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .map_err(|e| failed(&e))?;
            // The channel's background tasks go to the exporter's own runtime.
            let exporter = {
                let _entered = runtime.enter();
                opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(|e| failed(&e))?
            };
            (exporter, Some(runtime))
        }
    };
    let provider =
        SdkTracerProvider::builder().with_resource(resource(default_service)).with_batch_exporter(exporter).build();
    let tracer = provider.tracer("agent-block");
    if TRACER.set(tracer).is_err() {
        tracing::warn!("span export was already set up in this process; keeping the first exporter");
    }
    Ok(Some(Tracing { provider, runtime }))
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), with the
/// worker's name when neither names the service.
fn resource(default_service: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named { detected } else { Resource::builder().with_service_name(default_service.to_string()).build() }
}

impl Tracing {
    /// Exports the spans still queued, waiting at most a few seconds (an
    /// unreachable collector must not hold up shutdown). Runs off the async
    /// runtime because the SDK blocks while it flushes.
    pub async fn shutdown(mut self) {
        let provider = self.provider.clone();
        let runtime = self.runtime.take();
        let flushed = tokio::task::spawn_blocking(move || {
            let result = provider.shutdown_with_timeout(SHUTDOWN_LIMIT);
            if let Some(runtime) = runtime {
                runtime.shutdown_timeout(Duration::from_millis(100));
            }
            result
        });
        match tokio::time::timeout(SHUTDOWN_LIMIT + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "the last spans may not have been exported"),
            Ok(Err(_)) | Err(_) => tracing::warn!("span export did not shut down in time; the last spans may be lost"),
        }
    }
}

impl Drop for Tracing {
    /// A runtime cannot be dropped on an async thread; on early exits it is
    /// left to stop in the background.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The span of one event, and the trace context its outgoing messages carry.
pub struct EventSpan {
    span: Span,
    /// `traceparent` naming this span, for replies, publishes and requests.
    pub traceparent: String,
    pub tracestate: Option<String>,
    pub trace_id: String,
    pub span_id: String,
}

/// Starts the span of `event`, a child of the span its headers name; `None` when
/// no exporter is set up. `group` gives the queue group or durable consumer.
pub fn start(event: &Event, group: impl FnOnce() -> Option<String>) -> Option<EventSpan> {
    let tracer = TRACER.get()?;
    Some(start_with(tracer, event, group().as_deref()))
}

fn start_with(tracer: &SdkTracer, event: &Event, group: Option<&str>) -> EventSpan {
    let parent = match &event.headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => Context::new(),
    };
    let mut attributes = Vec::with_capacity(8);
    attributes.push(KeyValue::new("messaging.system", "nats"));
    attributes.push(KeyValue::new("messaging.destination.name", event.subject.to_string()));
    attributes.push(KeyValue::new("messaging.operation.type", "process"));
    attributes.push(KeyValue::new("messaging.operation.name", "process"));
    attributes.push(KeyValue::new("messaging.message.id", event.id.to_string()));
    attributes.push(KeyValue::new("messaging.message.body.size", event.data.len() as i64));
    if let Some(group) = group {
        attributes.push(KeyValue::new("messaging.consumer.group.name", group.to_string()));
    }
    attributes.push(KeyValue::new("agent_block.kind", event.kind.to_string()));
    if let Some(stream) = &event.stream {
        attributes.push(KeyValue::new("agent_block.delivered", stream.delivered as i64));
    }
    let span = tracer
        .span_builder(format!("process {}", event.subject))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    let context = span.span_context();
    let trace_id = context.trace_id().to_string();
    let span_id = context.span_id().to_string();
    let traceparent = format!("00-{trace_id}-{span_id}-{:02x}", context.trace_flags().to_u8());
    let state = context.trace_state().header();
    let tracestate = (!state.is_empty()).then_some(state);
    EventSpan { span, traceparent, tracestate, trace_id, span_id }
}

impl EventSpan {
    /// Records what the handler did: `agent_block.outcome`, and for a failure the
    /// error status, `error.type` and the message.
    pub fn record(&mut self, outcome: &Outcome) {
        self.span.set_attribute(KeyValue::new("agent_block.outcome", outcome.label()));
        if let Outcome::Error(failure) = outcome {
            self.span.set_attribute(KeyValue::new("error.type", failure.code.to_string()));
            self.span.set_status(Status::Error { description: Cow::Owned(failure.message.clone()) });
        }
    }

    pub fn end(mut self) {
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    #[test]
    fn an_event_span_continues_the_incoming_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let tracer = provider.tracer("test");
        let mut headers = HeaderMap::new();
        headers.insert("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let event = Event::new("orders".into(), "orders.new".into(), None, Some(headers), "{}".into());
        let mut span = start_with(&tracer, &event, Some("pool"));
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(span.traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!span.traceparent.contains("00f067aa0ba902b7"), "the handler's span is a new child");
        span.record(&Outcome::Error(crate::outcome::Failure::timeout(Duration::from_secs(1))));
        span.end();
        let spans = exporter.get_finished_spans().expect("spans");
        let span = &spans[0];
        assert_eq!(span.name, "process orders.new");
        assert_eq!(span.span_kind, SpanKind::Consumer);
        assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(matches!(span.status, Status::Error { .. }));
        let attribute = |key: &str| span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone());
        assert_eq!(attribute("messaging.consumer.group.name").map(|v| v.to_string()), Some("pool".to_string()));
        assert_eq!(attribute("messaging.message.body.size").map(|v| v.to_string()), Some("2".to_string()));
        assert_eq!(attribute("agent_block.outcome").map(|v| v.to_string()), Some("error".to_string()));
    }
}
