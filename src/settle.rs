//! Settling an outcome: logs what failed, then lets the event's own delivery
//! report it (core reply, JetStream ack, replay line). Also the NATS micro error
//! reply format shared by every core reply.

use async_nats::HeaderMap;
use bytes::Bytes;

use std::time::Duration;

use crate::event::Event;
use crate::log_limit::LogLimit;
use crate::outcome::Outcome;

pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

pub async fn settle(event: Box<Event>, outcome: Outcome) {
    log_outcome(&event, &outcome);
    event.settle(outcome).await;
}

/// The reply message for a core request.
pub fn reply_of(outcome: Outcome) -> (Option<HeaderMap>, Bytes) {
    if let Some((code, message)) = outcome.error_reply() {
        return (Some(error_headers(code, &message)), Bytes::new());
    }
    match outcome {
        Outcome::Ack { body, headers } => (headers, body),
        _ => unreachable!("error_reply covers every outcome but ack"),
    }
}

/// The error a NATS micro error reply carries: its code (500 when missing or
/// unreadable) and message; `None` for a reply that is not an error.
pub fn service_error(headers: Option<&HeaderMap>) -> Option<(u16, &str)> {
    let headers = headers?;
    let message = headers.get(SERVICE_ERROR)?.as_str();
    let code = headers.get(SERVICE_ERROR_CODE).and_then(|code| code.as_str().parse().ok()).unwrap_or(500);
    Some((code, message))
}

/// The headers of a NATS micro error reply.
pub fn error_headers(code: u16, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // Tracebacks keep their first line; other control characters become spaces.
    let first_line = message.lines().next().unwrap_or("");
    headers.insert(SERVICE_ERROR, crate::headers::value(first_line));
    headers.insert(SERVICE_ERROR_CODE, code.to_string().as_str());
    headers
}

/// Failures are logged once per kind, code and interval.
static FAILURES: LogLimit<(String, u16)> = LogLimit::new(Duration::from_secs(5));

fn log_outcome(event: &Event, outcome: &Outcome) {
    match outcome {
        Outcome::Ack { .. } => {}
        Outcome::Error(failure) => {
            if let Some(suppressed) = FAILURES.admit((event.kind.to_string(), failure.code)) {
                tracing::warn!(
                    kind = %event.kind, id = %event.id, code = failure.code, error = %failure.message, suppressed,
                    "event failed"
                );
            }
        }
        other => tracing::info!(kind = %event.kind, id = %event.id, outcome = other.label(), "event not acked"),
    }
}
