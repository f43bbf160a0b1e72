//! Settles an outcome where the event came from: a core NATS reply (with
//! `Nats-Service-Error` headers for failures, as NATS micro services do) or a
//! replay output line. A requester is never left without an answer.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::json;

use crate::event::{Delivery, Event};
use crate::outcome::Outcome;
use crate::transport::{Transport, describe_body};

pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

pub async fn settle(transport: &Transport, event: Event, outcome: Outcome) {
    log_outcome(&event, &outcome);
    match event.delivery {
        Delivery::Core => {
            if let Some(reply) = &event.reply {
                let (headers, body) = reply_of(outcome);
                if let Err(err) = transport.publish(reply.clone(), headers, body).await {
                    tracing::warn!(kind = %event.kind, id = %event.id, error = %err, "reply not sent");
                    // Most often the body exceeds the server's max payload; an empty
                    // error reply still fits, so the requester is not left waiting.
                    let headers = error_headers(500, &format!("reply not sent: {err}"));
                    let _ = transport.publish(reply.clone(), Some(headers), Bytes::new()).await;
                }
            }
        }
        Delivery::Replay { line, done } => {
            if let Transport::Replay(out) = transport {
                out.line(&replay_line(line, &event.subject, &event.kind, event.id.as_str(), outcome));
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }
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

pub fn error_headers(code: u16, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // Header values cannot hold line breaks; tracebacks keep their first line.
    let first_line = message.lines().next().unwrap_or("");
    headers.insert(SERVICE_ERROR, first_line);
    headers.insert(SERVICE_ERROR_CODE, code.to_string().as_str());
    headers
}

fn replay_line(line: usize, subject: &str, kind: &str, id: &str, outcome: Outcome) -> serde_json::Value {
    let mut out = json!({
        "type": "outcome",
        "line": line,
        "subject": subject,
        "kind": kind,
        "id": id,
        "outcome": outcome.label(),
    });
    match outcome {
        Outcome::Ack { body, headers } => describe_body(&mut out, headers.as_ref(), &body),
        Outcome::Nak { delay } => {
            if let Some(delay) = delay {
                out["delay"] = json!(humantime::format_duration(delay).to_string());
            }
        }
        Outcome::Term { reason } => out["reason"] = json!(reason),
        Outcome::Error(failure) => {
            out["code"] = json!(failure.code);
            out["message"] = json!(failure.message);
        }
    }
    out
}

fn log_outcome(event: &Event, outcome: &Outcome) {
    match outcome {
        Outcome::Ack { .. } => {}
        Outcome::Error(failure) => tracing::warn!(
            kind = %event.kind, id = %event.id, code = failure.code, error = %failure.message, "event failed"
        ),
        other => tracing::info!(kind = %event.kind, id = %event.id, outcome = other.label(), "event not acked"),
    }
}
