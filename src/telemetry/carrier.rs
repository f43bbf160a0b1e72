//! W3C trace context in outgoing NATS headers: a handler's context written into
//! the messages it sends (the caller passes it in), replacing trace headers of
//! any case (Go clients send `Traceparent`).

use async_nats::HeaderMap;
use async_nats::header::HeaderName;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The names built once: a name from a `&str` is validated and copied each time.
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);
const TRACESTATE_NAME: HeaderName = HeaderName::from_static(TRACESTATE);

pub use crate::event::header;

/// Replaces the trace headers of `headers`, whatever their case.
pub fn set_trace_headers(headers: &mut HeaderMap, traceparent: &str, tracestate: Option<&str>) {
    if headers.is_empty() {
        // Most replies: nothing to replace.
        headers.insert(TRACEPARENT_NAME, traceparent);
        if let Some(state) = tracestate.filter(|state| !state.is_empty()) {
            headers.insert(TRACESTATE_NAME, state);
        }
        return;
    }
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
    headers.insert(TRACEPARENT_NAME, traceparent);
    match tracestate {
        Some(state) if !state.is_empty() => headers.insert(TRACESTATE_NAME, state),
        _ if headers.get(TRACESTATE).is_some() => headers.insert(TRACESTATE_NAME, ""),
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
