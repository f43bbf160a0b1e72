//! Event spans as an OTLP `ExportTraceServiceRequest`, written straight into a
//! reused buffer. The standard exporter first converts every span into the
//! generated protobuf types, copying each key and value, and then encodes them;
//! at tens of thousands of events a second that doubled a request's cost. The
//! schema is stable (opentelemetry-proto `trace/v1`), and an event span has a
//! fixed shape, so the fields are written here directly. The tests decode the
//! output with the generated types.

use async_nats::Subject;
use bytes::Bytes;
use opentelemetry::Value;
use opentelemetry_sdk::Resource;

use crate::event::EventId;

/// What one event's span recorded, handed to the exporter when it ends.
pub struct FinishedSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The remote parent named by the message's `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_flags: u8,
    pub trace_state: Option<String>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub subject: Subject,
    pub id: EventId,
    pub kind: Subject,
    pub group: Option<std::sync::Arc<str>>,
    pub body_size: usize,
    pub delivered: Option<u64>,
    pub outcome: &'static str,
    /// The failure's code and message, for `error.type` and the status.
    pub error: Option<(u16, String)>,
}

const LEN: u8 = 2;
const FIXED64: u8 = 1;
const FIXED32: u8 = 5;
const VARINT: u8 = 0;
const SPAN_KIND_CONSUMER: u64 = 5;
const STATUS_CODE_ERROR: u64 = 2;
/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK` and `..._IS_REMOTE_MASK`.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Encodes batches of spans of one resource and instrumentation scope.
pub struct Encoder {
    /// `ResourceSpans.resource` and the start of its scope, the same in every request.
    resource_field: Vec<u8>,
    scope_field: Vec<u8>,
    /// The attributes every span has with the same value, written once.
    constant_attributes: Vec<u8>,
    span: Vec<u8>,
    /// The size of the last request, to allocate the next one at once.
    last_len: usize,
}

impl Encoder {
    pub fn new(resource: &Resource, scope_name: &str) -> Self {
        let mut attributes = Vec::new();
        for (key, value) in resource.iter() {
            put_attribute(&mut attributes, 1, key.as_str(), value);
        }
        let mut resource_field = Vec::new();
        put_bytes(&mut resource_field, 1, &attributes);
        let mut scope = Vec::new();
        put_bytes(&mut scope, 1, scope_name.as_bytes());
        let mut scope_field = Vec::new();
        put_bytes(&mut scope_field, 1, &scope);
        let mut constant_attributes = Vec::new();
        put_string_attribute(&mut constant_attributes, 9, "messaging.system", "nats");
        put_string_attribute(&mut constant_attributes, 9, "messaging.operation.type", "process");
        put_string_attribute(&mut constant_attributes, 9, "messaging.operation.name", "process");
        Encoder { resource_field, scope_field, constant_attributes, span: Vec::new(), last_len: 0 }
    }

    /// An `ExportTraceServiceRequest` holding `spans`. The spans are written
    /// once, after room for the message headers, whose lengths are known only
    /// then: the batch is never copied.
    pub fn encode(&mut self, spans: &[FinishedSpan]) -> Bytes {
        // Two keys and two varints of at most 10 bytes, the resource and the scope.
        let room = 2 * (1 + 10) + self.resource_field.len() + self.scope_field.len();
        let mut buffer = Vec::with_capacity(self.last_len.max(room + 512 * spans.len()));
        buffer.resize(room, 0);
        for span in spans {
            self.span.clear();
            put_span(&mut self.span, span, &self.constant_attributes);
            put_bytes(&mut buffer, 2, &self.span);
        }
        let scope_spans_len = self.scope_field.len() + buffer.len() - room;
        let resource_spans_len = self.resource_field.len() + 1 + varint_len(scope_spans_len as u64) + scope_spans_len;
        let mut head = Vec::with_capacity(room);
        put_key(&mut head, 1, LEN);
        put_varint(&mut head, resource_spans_len as u64);
        head.extend_from_slice(&self.resource_field);
        put_key(&mut head, 2, LEN);
        put_varint(&mut head, scope_spans_len as u64);
        head.extend_from_slice(&self.scope_field);
        let start = room - head.len();
        buffer[start..room].copy_from_slice(&head);
        self.last_len = buffer.len();
        Bytes::from(buffer).slice(start..)
    }
}

fn put_span(out: &mut Vec<u8>, span: &FinishedSpan, constant_attributes: &[u8]) {
    put_bytes(out, 1, &span.trace_id);
    put_bytes(out, 2, &span.span_id);
    if let Some(state) = span.trace_state.as_deref().filter(|state| !state.is_empty()) {
        put_bytes(out, 3, state.as_bytes());
    }
    if let Some(parent) = &span.parent_span_id {
        put_bytes(out, 4, parent);
    }
    const PREFIX: &[u8] = b"process ";
    put_key(out, 5, LEN);
    put_varint(out, (PREFIX.len() + span.subject.len()) as u64);
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(span.subject.as_bytes());
    put_key(out, 6, VARINT);
    put_varint(out, SPAN_KIND_CONSUMER);
    put_key(out, 7, FIXED64);
    out.extend_from_slice(&span.start_unix_nanos.to_le_bytes());
    put_key(out, 8, FIXED64);
    out.extend_from_slice(&span.end_unix_nanos.to_le_bytes());
    out.extend_from_slice(constant_attributes);
    put_string_attribute(out, 9, "messaging.destination.name", &span.subject);
    put_bytes_attribute(out, 9, "messaging.message.id", span.id.as_bytes());
    put_int_attribute(out, 9, "messaging.message.body.size", span.body_size as i64);
    if let Some(group) = &span.group {
        put_string_attribute(out, 9, "messaging.consumer.group.name", group);
    }
    put_string_attribute(out, 9, "agent_block.kind", &span.kind);
    if let Some(delivered) = span.delivered {
        put_int_attribute(out, 9, "agent_block.delivered", delivered as i64);
    }
    put_string_attribute(out, 9, "agent_block.outcome", span.outcome);
    if let Some((code, message)) = &span.error {
        put_string_attribute(out, 9, "error.type", itoa::Buffer::new().format(*code));
        let message_len = 1 + varint_len(message.len() as u64) + message.len();
        let status_len = if message.is_empty() { 0 } else { message_len } + 2;
        put_key(out, 15, LEN);
        put_varint(out, status_len as u64);
        if !message.is_empty() {
            put_bytes(out, 2, message.as_bytes());
        }
        put_key(out, 3, VARINT);
        put_varint(out, STATUS_CODE_ERROR);
    }
    let remote = if span.parent_span_id.is_some() { IS_REMOTE } else { 0 };
    put_key(out, 16, FIXED32);
    out.extend_from_slice(&(u32::from(span.trace_flags) | HAS_IS_REMOTE | remote).to_le_bytes());
}

/// A `KeyValue` whose value is a string, as field `field` of its message.
#[inline(always)]
fn put_string_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    put_bytes_attribute(out, field, key, value.as_bytes());
}

/// A `KeyValue` whose value is a string given as its bytes, which are UTF-8.
#[inline(always)]
fn put_bytes_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &[u8]) {
    put_key_value_head(out, field, key, 1 + varint_len(value.len() as u64) + value.len());
    put_bytes(out, 1, value);
}

/// A `KeyValue` whose value is an integer.
#[inline(always)]
fn put_int_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: i64) {
    put_key_value_head(out, field, key, 1 + varint_len(value as u64));
    put_key(out, 3, VARINT);
    put_varint(out, value as u64);
}

/// A `KeyValue`'s framing and key, up to its `AnyValue` of `any_len` bytes,
/// which the caller writes next.
#[inline(always)]
fn put_key_value_head(out: &mut Vec<u8>, field: u32, key: &str, any_len: usize) {
    let key_value_len = 1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(any_len as u64) + any_len;
    put_key(out, field, LEN);
    put_varint(out, key_value_len as u64);
    put_bytes(out, 1, key.as_bytes());
    put_key(out, 2, LEN);
    put_varint(out, any_len as u64);
}

/// A `KeyValue` of any attribute value (the resource's, written once).
fn put_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    let mut any = Vec::new();
    put_any_value(&mut any, value);
    let mut key_value = Vec::new();
    put_bytes(&mut key_value, 1, key.as_bytes());
    put_bytes(&mut key_value, 2, &any);
    put_bytes(out, field, &key_value);
}

fn put_any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(flag) => {
            put_key(out, 2, VARINT);
            put_varint(out, u64::from(*flag));
        }
        Value::I64(number) => {
            put_key(out, 3, VARINT);
            put_varint(out, *number as u64);
        }
        Value::F64(number) => {
            put_key(out, 4, FIXED64);
            out.extend_from_slice(&number.to_le_bytes());
        }
        Value::String(text) => put_bytes(out, 1, text.as_str().as_bytes()),
        other => put_bytes(out, 1, other.to_string().as_bytes()),
    }
}

#[inline(always)]
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[inline(always)]
fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

#[inline(always)]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline(always)]
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
    use prost::Message as _;

    fn finished(subject: &str, error: Option<(u16, String)>) -> FinishedSpan {
        FinishedSpan {
            trace_id: [0x4b; 16],
            span_id: [7; 8],
            parent_span_id: Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
            trace_flags: 1,
            trace_state: Some("k=v".to_string()),
            start_unix_nanos: 1_700_000_000_000_000_001,
            end_unix_nanos: 1_700_000_000_000_500_000,
            subject: subject.into(),
            id: EventId::Given("m-1".into()),
            kind: "orders".into(),
            group: Some("pool".into()),
            body_size: 300,
            delivered: Some(2),
            outcome: if error.is_some() { "error" } else { "ack" },
            error,
        }
    }

    fn decode(spans: &[FinishedSpan]) -> ExportTraceServiceRequest {
        let resource = Resource::builder_empty()
            .with_service_name("shop")
            .with_attribute(opentelemetry::KeyValue::new("replicas", 3))
            .build();
        let mut encoder = Encoder::new(&resource, "agent-block");
        // Twice, so leftovers of an earlier batch would show.
        let many: Vec<FinishedSpan> = (0..300).map(|_| finished("other", None)).collect();
        let first = ExportTraceServiceRequest::decode(encoder.encode(&many)).expect("a valid request");
        assert_eq!(first.resource_spans[0].scope_spans[0].spans.len(), 300);
        ExportTraceServiceRequest::decode(encoder.encode(spans)).expect("a valid ExportTraceServiceRequest")
    }

    fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
        span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
    }

    #[test]
    fn spans_decode_with_the_generated_types() {
        let long_subject = "orders.".to_string() + &"x".repeat(200);
        let request = decode(&[
            finished("orders.new", None),
            finished(&long_subject, Some((504, "handler timed out after 1s".to_string()))),
        ]);
        let resource_spans = &request.resource_spans[0];
        let resource = resource_spans.resource.as_ref().expect("resource");
        let service = resource.attributes.iter().find(|kv| kv.key == "service.name").expect("service.name");
        assert_eq!(service.value.clone().and_then(|v| v.value), Some(AnyValue::StringValue("shop".into())));
        let replicas = resource.attributes.iter().find(|kv| kv.key == "replicas").expect("replicas");
        assert_eq!(replicas.value.clone().and_then(|v| v.value), Some(AnyValue::IntValue(3)));
        let scope = &resource_spans.scope_spans[0];
        assert_eq!(scope.scope.as_ref().map(|s| s.name.as_str()), Some("agent-block"));
        assert_eq!(scope.spans.len(), 2);

        let ok = &scope.spans[0];
        assert_eq!(ok.name, "process orders.new");
        assert_eq!(ok.trace_id, vec![0x4b; 16]);
        assert_eq!(ok.span_id, vec![7; 8]);
        assert_eq!(ok.parent_span_id, vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(ok.trace_state, "k=v");
        assert_eq!(ok.kind, SpanKind::Consumer as i32);
        assert_eq!(ok.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(ok.end_time_unix_nano, 1_700_000_000_000_500_000);
        assert_eq!(ok.flags, 0x301);
        assert_eq!(attribute(ok, "messaging.system"), Some(AnyValue::StringValue("nats".into())));
        assert_eq!(attribute(ok, "messaging.operation.type"), Some(AnyValue::StringValue("process".into())));
        assert_eq!(attribute(ok, "messaging.operation.name"), Some(AnyValue::StringValue("process".into())));
        assert_eq!(ok.attributes.len(), 10);
        assert_eq!(attribute(ok, "messaging.destination.name"), Some(AnyValue::StringValue("orders.new".into())));
        assert_eq!(attribute(ok, "messaging.message.id"), Some(AnyValue::StringValue("m-1".into())));
        assert_eq!(attribute(ok, "messaging.message.body.size"), Some(AnyValue::IntValue(300)));
        assert_eq!(attribute(ok, "messaging.consumer.group.name"), Some(AnyValue::StringValue("pool".into())));
        assert_eq!(attribute(ok, "agent_block.kind"), Some(AnyValue::StringValue("orders".into())));
        assert_eq!(attribute(ok, "agent_block.delivered"), Some(AnyValue::IntValue(2)));
        assert_eq!(attribute(ok, "agent_block.outcome"), Some(AnyValue::StringValue("ack".into())));
        assert_eq!(attribute(ok, "error.type"), None);
        assert_eq!(ok.status, None);

        let failed = &scope.spans[1];
        assert_eq!(failed.name, format!("process {long_subject}"));
        assert_eq!(attribute(failed, "error.type"), Some(AnyValue::StringValue("504".into())));
        let status = failed.status.as_ref().expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "handler timed out after 1s");
    }

    #[test]
    fn a_root_span_has_no_parent_and_is_not_remote() {
        let mut span = finished("a", Some((500, String::new())));
        span.parent_span_id = None;
        span.trace_state = None;
        span.group = None;
        span.delivered = None;
        let request = decode(&[span]);
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.flags, 0x101);
        assert_eq!(attribute(span, "messaging.consumer.group.name"), None);
        assert_eq!(attribute(span, "agent_block.delivered"), None);
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    }

    #[test]
    fn varint_lengths_match_the_written_bytes() {
        for value in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
        }
    }
}
