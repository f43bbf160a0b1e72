//! What a handler did with an event, in terms every source can settle:
//! core NATS replies, JetStream ack/nak/term, replay output.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;

#[derive(Debug)]
pub enum Outcome {
    /// Success; `body` and `headers` are the reply.
    Ack { body: Bytes, headers: Option<HeaderMap> },
    /// Asked for redelivery, after `delay` when given.
    Nak { delay: Option<Duration> },
    /// Asked never to see the event again.
    Term { reason: String },
    /// The event failed.
    Error(Failure),
}

/// A failed event: the code and message a requester sees, and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u16,
    pub message: String,
    pub cause: FailureCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The handler raised an error.
    Handler,
    /// The handler read `ev.payload` and the body is not JSON.
    BadPayload,
    /// No handler for the kind and no `bus.on_any`.
    NoHandler,
    /// The handler ran past its deadline.
    Timeout,
    /// Shutdown cancelled the event before it finished.
    Cancelled,
    /// The worker's intake was full.
    Overloaded,
    /// The runtime could not run the handler or encode its result.
    Internal,
}

impl Failure {
    pub fn new(cause: FailureCause, code: u16, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), cause }
    }

    pub fn no_handler(kind: &str) -> Self {
        Failure::new(FailureCause::NoHandler, 404, format!("no handler for kind {kind:?}"))
    }

    pub fn timeout(limit: Duration) -> Self {
        Failure::new(
            FailureCause::Timeout,
            504,
            format!("handler timed out after {}", humantime::format_duration(limit)),
        )
    }

    pub fn cancelled() -> Self {
        Failure::new(FailureCause::Cancelled, 503, "worker shutting down; try again")
    }

    pub fn overloaded() -> Self {
        Failure::new(FailureCause::Overloaded, 503, "worker overloaded; try again")
    }
}

impl Outcome {
    pub fn empty_ack() -> Self {
        Outcome::Ack { body: Bytes::new(), headers: None }
    }

    /// A short name for logs, spans and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack { .. } => "ack",
            Outcome::Nak { .. } => "nak",
            Outcome::Term { .. } => "term",
            Outcome::Error(_) => "error",
        }
    }

    /// The error a core NATS requester receives, or `None` for a successful reply.
    pub fn error_reply(&self) -> Option<(u16, String)> {
        match self {
            Outcome::Ack { .. } => None,
            Outcome::Nak { .. } => Some((503, "handler asked for redelivery".to_string())),
            Outcome::Term { reason } => Some((500, reason.clone())),
            Outcome::Error(failure) => Some((failure.code, failure.message.clone())),
        }
    }
}
