//! The event: one message, its kind, and how to settle it.

use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::oneshot;

/// One message on its way to a handler.
#[derive(Debug)]
pub struct Event {
    /// A `Subject` only for its cheap clones: the default kind is the subject.
    pub kind: Subject,
    pub id: EventId,
    pub subject: Subject,
    pub reply: Option<Subject>,
    pub headers: Option<HeaderMap>,
    pub data: Bytes,
    pub received: SystemTime,
    /// Per-subscription handler deadline overriding `--handler-timeout`.
    pub timeout: Option<Duration>,
    pub delivery: Delivery,
}

/// `Nats-Msg-Id` header, else a unique generated id (kept inline: no allocation).
#[derive(Debug, Clone)]
pub enum EventId {
    Given(Box<str>),
    Generated([u8; NUID_LENGTH]),
}

const NUID_LENGTH: usize = 22;

fn generated_id() -> EventId {
    let mut id = [0; NUID_LENGTH];
    id.copy_from_slice(nuid::next().as_str().as_bytes());
    EventId::Generated(id)
}

impl EventId {
    pub fn as_str(&self) -> &str {
        match self {
            EventId::Given(id) => id,
            EventId::Generated(id) => std::str::from_utf8(id).unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an event came from, which decides how its outcome is settled.
#[derive(Debug)]
pub enum Delivery {
    /// Core NATS: the outcome goes to `reply`, if any.
    Core,
    /// A line of a replay file: the outcome is printed; `done` paces the replay.
    Replay { line: usize, done: Option<oneshot::Sender<()>> },
}

impl Event {
    /// Builds an event, taking its id from `Nats-Msg-Id` when present.
    pub fn new(
        kind: Subject,
        subject: Subject,
        reply: Option<Subject>,
        headers: Option<HeaderMap>,
        data: Bytes,
        delivery: Delivery,
    ) -> Self {
        let id = match headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            Some(value) => EventId::Given(value.as_str().into()),
            None => generated_id(),
        };
        Event { kind, id, subject, reply, headers, data, received: SystemTime::now(), timeout: None, delivery }
    }

    /// The W3C trace id carried by the `traceparent` header, if any.
    pub fn trace_id(&self) -> Option<&str> {
        let header = self.headers.as_ref()?.get("traceparent")?.as_str();
        trace_id_of(header)
    }
}

/// Extracts the trace id from a `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut fields = traceparent.split('-');
    let _version = fields.next()?;
    let trace_id = fields.next()?;
    let valid =
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()) && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_comes_from_a_valid_traceparent_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of("garbage"), None);
    }

    #[test]
    fn id_prefers_the_nats_msg_id_header() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "order-7");
        let event = Event::new("k".into(), "s".into(), None, Some(headers), Bytes::new(), Delivery::Core);
        assert_eq!(event.id.as_str(), "order-7");
        let generated = Event::new("k".into(), "s".into(), None, None, Bytes::new(), Delivery::Core);
        let other = Event::new("k".into(), "s".into(), None, None, Bytes::new(), Delivery::Core);
        assert_ne!(generated.id.as_str(), other.id.as_str());
    }
}
