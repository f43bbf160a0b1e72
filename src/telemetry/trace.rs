//! Event spans exported over OTLP, configured only by the standard `OTEL_*`
//! variables. Without an endpoint nothing is set up and [`start`] is a single
//! load of an empty cell, so a worker that exports nothing pays nothing.
//!
//! An event span has a fixed shape, so it is recorded as plain data
//! ([`FinishedSpan`]) rather than through the SDK's general span machinery, and
//! encoded straight into OTLP protobuf on the exporter thread
//! ([`crate::telemetry::span_export`]). The SDK still decides what the
//! environment asks for: the sampler (`OTEL_TRACES_SAMPLER`), the ids and the
//! resource.

use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Config, IdGenerator, RandomIdGenerator, SamplingDecision, ShouldSample};

use crate::event::{Event, header};
use crate::outcome::Outcome;
use crate::telemetry::otlp_settings::{self, ExportSettings};
use crate::telemetry::otlp_wire::{Encoder, FinishedSpan};
use crate::telemetry::span_export::{SpanExporter, SpanQueue};

pub use crate::telemetry::otlp_settings::{TraceSetupError, export_requested};

/// What starting a span needs, set once when export is configured.
struct Exporting {
    sampler: Box<dyn ShouldSample>,
    ids: RandomIdGenerator,
    queue: std::sync::Arc<SpanQueue>,
}

static EXPORTING: OnceLock<Exporting> = OnceLock::new();

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

/// The exporter of a running worker; [`Tracing::shutdown`] sends the last spans.
pub struct Tracing {
    exporter: SpanExporter,
}

/// Sets up span export when an OTLP endpoint is configured; `default_service` (the
/// worker's `--name`) names the service unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` do. Returns `None` when nothing is to be exported.
pub fn init(default_service: &str) -> Result<Option<Tracing>, TraceSetupError> {
    if !export_requested() {
        return Ok(None);
    }
    let Some(settings) = otlp_settings::from_env()? else { return Ok(None) };
    let (exporter, sampler) = start_exporter(settings, default_service)?;
    let exporting = Exporting { sampler, ids: RandomIdGenerator::default(), queue: exporter.queue.clone() };
    if EXPORTING.set(exporting).is_err() {
        tracing::warn!("span export was already set up in this process; keeping the first exporter");
    }
    Ok(Some(Tracing { exporter }))
}

fn start_exporter(
    settings: ExportSettings,
    default_service: &str,
) -> Result<(SpanExporter, Box<dyn ShouldSample>), TraceSetupError> {
    // The SDK's configuration reads `OTEL_TRACES_SAMPLER` and the resource variables.
    let config = Config::default();
    let encoder = Encoder::new(&resource(&config.resource, default_service), "agent-block");
    let exporter = SpanExporter::start(settings, encoder).map_err(TraceSetupError)?;
    Ok((exporter, config.sampler))
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), with the
/// worker's name when neither names the service.
fn resource(detected: &Resource, default_service: &str) -> Resource {
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named { detected.clone() } else { Resource::builder().with_service_name(default_service.to_string()).build() }
}

impl Tracing {
    /// Exports the spans still queued, waiting at most a few seconds (an
    /// unreachable collector must not hold up shutdown).
    pub async fn shutdown(self) {
        let exporter = self.exporter;
        let flushed = tokio::task::spawn_blocking(move || exporter.shutdown(SHUTDOWN_LIMIT)).await;
        if !matches!(flushed, Ok(true)) {
            tracing::warn!("span export did not shut down in time; the last spans may be lost");
        }
    }
}

/// The span of one event, and the trace context its outgoing messages carry.
pub struct EventSpan {
    /// `None` when the sampler dropped the span: its context is still passed on.
    recording: Option<FinishedSpan>,
    /// `traceparent` naming this span, for replies, publishes and requests.
    pub traceparent: Rc<str>,
    pub tracestate: Option<Rc<str>>,
}

/// Starts the span of `event`, a child of the span its headers name; `None` when
/// no exporter is set up. `group` gives the queue group or durable consumer.
pub fn start(event: &Event, group: impl FnOnce() -> Option<std::sync::Arc<str>>) -> Option<EventSpan> {
    let exporting = EXPORTING.get()?;
    Some(start_with(exporting.sampler.as_ref(), &exporting.ids, event, group))
}

/// The remote parent named by a valid `traceparent`: trace id, span id, flags.
fn parent_of(event: &Event) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = event.traceparent()?;
    let trace_id = TraceId::from_hex(&value[3..35]).ok()?;
    let span_id = SpanId::from_hex(&value[36..52]).ok()?;
    let flags = u8::from_str_radix(&value[53..55], 16).ok()?;
    Some((trace_id, span_id, TraceFlags::new(flags)))
}

fn start_with(
    sampler: &dyn ShouldSample,
    ids: &RandomIdGenerator,
    event: &Event,
    group: impl FnOnce() -> Option<std::sync::Arc<str>>,
) -> EventSpan {
    let start_unix_nanos = unix_nanos();
    let parent = parent_of(event);
    let trace_state = match (&parent, event.headers.as_ref().and_then(|h| header(h, "tracestate"))) {
        (Some(_), Some(state)) => state.parse::<TraceState>().unwrap_or_default(),
        _ => TraceState::default(),
    };
    let trace_id = parent.map_or_else(|| ids.new_trace_id(), |(trace_id, _, _)| trace_id);
    let parent_context = parent.map(|(trace_id, span_id, flags)| {
        Context::new().with_remote_span_context(SpanContext::new(trace_id, span_id, flags, true, trace_state.clone()))
    });
    let sampled =
        sampler.should_sample(parent_context.as_ref(), trace_id, event.subject.as_str(), &SpanKind::Consumer, &[], &[]);
    let span_id = ids.new_span_id();
    let parent_flags = parent.map_or(TraceFlags::default(), |(_, _, flags)| flags);
    let record = sampled.decision == SamplingDecision::RecordAndSample;
    let flags = if record { parent_flags.with_sampled(true) } else { parent_flags.with_sampled(false) };
    let state = sampled.trace_state.header();
    let tracestate = (!state.is_empty()).then_some(state);
    let traceparent = traceparent(&trace_id.to_bytes(), &span_id.to_bytes(), flags.to_u8());
    let recording = record.then(|| FinishedSpan {
        trace_id: trace_id.to_bytes(),
        span_id: span_id.to_bytes(),
        parent_span_id: parent.map(|(_, span_id, _)| span_id.to_bytes()),
        trace_flags: flags.to_u8(),
        trace_state: tracestate.as_deref().map(str::to_string),
        start_unix_nanos,
        end_unix_nanos: start_unix_nanos,
        subject: event.subject.clone(),
        id: event.id.clone(),
        kind: event.kind.clone(),
        group: group(),
        body_size: event.data.len(),
        delivered: event.stream.as_ref().map(|stream| stream.delivered),
        outcome: "",
        error: None,
    });
    EventSpan { recording, traceparent, tracestate: tracestate.map(Rc::from) }
}

/// `00-<trace id>-<span id>-<flags>` in lowercase hex.
fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> Rc<str> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    fn hex(out: &mut [u8], bytes: &[u8]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
    }
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex(&mut text[3..35], trace_id);
    hex(&mut text[36..52], span_id);
    hex(&mut text[53..55], &[flags]);
    // SAFETY: the text is ASCII: the template and the digits written into it.
    Rc::from(unsafe { std::str::from_utf8_unchecked(&text) })
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64)
}

impl EventSpan {
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Records what the handler did: `agent_block.outcome`, and for a failure the
    /// error status, `error.type` and the message.
    pub fn record(&mut self, outcome: &Outcome) {
        if let Some(span) = self.recording.as_mut() {
            span.outcome = outcome.label();
            if let Outcome::Error(failure) = outcome {
                span.error = Some((failure.code, failure.message.clone()));
            }
        }
    }

    pub fn end(self) {
        if let (Some(mut span), Some(exporting)) = (self.recording, EXPORTING.get()) {
            span.end_unix_nanos = unix_nanos();
            exporting.queue.push(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use opentelemetry_sdk::trace::Sampler;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn event_with(traceparent: Option<&str>) -> Event {
        let headers = traceparent.map(|value| {
            let mut headers = HeaderMap::new();
            headers.insert("Traceparent", value);
            headers.insert("tracestate", "k=v");
            headers
        });
        Event::new("orders".into(), "orders.new".into(), None, headers, "{}".into())
    }

    fn parent_based(root: Sampler) -> Sampler {
        Sampler::ParentBased(Box::new(root))
    }

    #[test]
    fn an_event_span_continues_the_incoming_trace() {
        let ids = RandomIdGenerator::default();
        let sampler = parent_based(Sampler::AlwaysOn);
        let mut span = start_with(&sampler, &ids, &event_with(Some(PARENT)), || Some("pool".into()));
        assert_eq!(span.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(&*span.traceparent, format!("00-{}-{}-01", span.trace_id(), span.span_id()));
        assert_ne!(span.span_id(), "00f067aa0ba902b7", "the handler's span is a new child");
        assert_eq!(span.tracestate.as_deref(), Some("k=v"));
        span.record(&Outcome::Error(crate::outcome::Failure::timeout(Duration::from_secs(1))));
        let recorded = span.recording.as_ref().expect("a sampled span records");
        assert_eq!(recorded.parent_span_id, Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        assert_eq!(recorded.group.as_deref(), Some("pool"));
        assert_eq!(recorded.body_size, 2);
        assert_eq!(recorded.outcome, "error");
        assert_eq!(recorded.error.as_ref().map(|(code, _)| *code), Some(504));
        assert_eq!(recorded.trace_state.as_deref(), Some("k=v"));
    }

    #[test]
    fn a_message_without_valid_trace_context_starts_a_sampled_root() {
        let ids = RandomIdGenerator::default();
        let sampler = parent_based(Sampler::AlwaysOn);
        for traceparent in [None, Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")] {
            let span = start_with(&sampler, &ids, &event_with(traceparent), || None);
            assert_ne!(span.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(span.traceparent.ends_with("-01"), "{}", span.traceparent);
            assert_eq!(span.tracestate, None, "no trace state without a parent");
            let recorded = span.recording.expect("recorded");
            assert_eq!(recorded.parent_span_id, None);
            assert_eq!(recorded.group, None);
        }
    }

    #[test]
    fn traceparent_is_lowercase_hex_in_w3c_layout() {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap().to_bytes();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap().to_bytes();
        assert_eq!(&*traceparent(&trace_id, &span_id, 1), PARENT);
        assert_eq!(&*traceparent(&[0xff; 16], &[0xab; 8], 0), format!("00-{}-{}-00", "f".repeat(32), "ab".repeat(8)));
    }

    #[test]
    fn a_dropped_span_records_nothing_and_passes_an_unsampled_context_on() {
        let ids = RandomIdGenerator::default();
        let off = start_with(&Sampler::AlwaysOff, &ids, &event_with(None), || None);
        assert!(off.recording.is_none());
        assert!(off.traceparent.ends_with("-00"), "{}", off.traceparent);
        let unsampled_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let sampler = parent_based(Sampler::AlwaysOn);
        let child = start_with(&sampler, &ids, &event_with(Some(unsampled_parent)), || None);
        assert!(child.recording.is_none(), "parent-based sampling follows an unsampled parent");
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(child.traceparent.ends_with("-00"));
    }
}
