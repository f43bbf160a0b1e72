//! W3C trace context in NATS headers: reading `traceparent`/`tracestate` from an
//! incoming message (case-insensitively: `async_nats::HeaderMap` lookups are
//! case-sensitive and Go clients send `Traceparent`), and writing a handler's
//! context into outgoing messages (the caller passes it in).

use async_nats::HeaderMap;
use opentelemetry::propagation::Extractor;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Reads propagation fields from NATS headers for the OpenTelemetry propagator.
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

pub use crate::event::header;

/// Replaces the trace headers of `headers`, whatever their case.
pub fn set_trace_headers(headers: &mut HeaderMap, traceparent: &str, tracestate: Option<&str>) {
    let stale = headers.iter().any(|(key, _)| {
        let key: &str = key.as_ref();
        key != TRACEPARENT && key != TRACESTATE && is_trace_header(key)
    });
    if stale {
        let mut kept = HeaderMap::new();
        for (key, values) in headers.iter() {
            let key: &str = key.as_ref();
            if !is_trace_header(key) {
                for value in values {
                    kept.append(key, value.as_str());
                }
            }
        }
        *headers = kept;
    }
    headers.insert(TRACEPARENT, traceparent);
    match tracestate {
        Some(state) if !state.is_empty() => headers.insert(TRACESTATE, state),
        _ if headers.get(TRACESTATE).is_some() => headers.insert(TRACESTATE, ""),
        _ => {}
    }
}

fn is_trace_header(key: &str) -> bool {
    key.eq_ignore_ascii_case(TRACEPARENT) || key.eq_ignore_ascii_case(TRACESTATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_headers_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert("Traceparent", TP);
        headers.insert("TraceState", "k=v");
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some(TP));
        assert_eq!(extractor.get("tracestate"), Some("k=v"));
        assert_eq!(extractor.get("baggage"), None);
    }

    #[test]
    fn replaces_trace_headers_whatever_their_case() {
        let mut headers = HeaderMap::new();
        headers.insert("Traceparent", "00-11111111111111111111111111111111-2222222222222222-01");
        headers.insert("Nats-Msg-Id", "m-1");
        set_trace_headers(&mut headers, TP, Some("k=v"));
        let names: Vec<String> = headers.iter().map(|(k, _)| k.to_string()).collect();
        assert!(!names.iter().any(|n| n == "Traceparent"), "{names:?}");
        assert_eq!(headers.get("traceparent").map(|v| v.as_str()), Some(TP));
        assert_eq!(headers.get("tracestate").map(|v| v.as_str()), Some("k=v"));
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("m-1"));
    }
}
