//! The event: one message, its kind, and how to settle it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::LocalBoxFuture;

use crate::outcome::Outcome;

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
    /// Set for JetStream messages.
    pub stream: Option<Box<StreamMeta>>,
    /// How the outcome is settled; `None` when nobody waits for it (a core message
    /// without a reply subject).
    pub delivery: Option<Box<dyn Settle>>,
    /// Which declared source received it (declaration order), for per-source
    /// statistics and the span's consumer group.
    pub source_index: Option<u32>,
}

/// Where a JetStream message sits in its stream, for `ev.meta` and `ev.id`.
#[derive(Debug, Clone)]
pub struct StreamMeta {
    pub stream: Arc<str>,
    pub consumer: Arc<str>,
    pub delivered: u64,
    pub stream_sequence: u64,
    pub pending: u64,
    pub published: SystemTime,
}

/// How a source finishes an event: a core reply, a JetStream ack, a replay line.
/// Each source implements it for its own deliveries, so settling never asks where
/// an event came from.
pub trait Settle: Send {
    /// Reports `outcome` for `event` (whose `delivery` has been taken out).
    fn settle<'a>(self: Box<Self>, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()>;

    /// Work to run while the handler runs, such as JetStream in-progress acks;
    /// dropped when the handler ends.
    fn while_running(&self) -> Option<LocalBoxFuture<'_, ()>> {
        None
    }
}

impl std::fmt::Debug for dyn Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settle")
    }
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

impl Event {
    /// Builds an event, taking its id from `Nats-Msg-Id` when present.
    pub fn new(
        kind: Subject,
        subject: Subject,
        reply: Option<Subject>,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> Self {
        Self::with_id_or(kind, subject, reply, headers, data, generated_id)
    }

    /// A stream message: its id is `Nats-Msg-Id`, else `STREAM:seq`.
    pub fn of_stream(
        kind: Subject,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
        meta: StreamMeta,
    ) -> Self {
        let sequence_id = || EventId::Given(format!("{}:{}", meta.stream, meta.stream_sequence).into());
        let mut event = Self::with_id_or(kind, subject, None, headers, data, sequence_id);
        event.stream = Some(Box::new(meta));
        event
    }

    fn with_id_or(
        kind: Subject,
        subject: Subject,
        reply: Option<Subject>,
        headers: Option<HeaderMap>,
        data: Bytes,
        fallback: impl FnOnce() -> EventId,
    ) -> Self {
        let id = match headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            Some(value) => EventId::Given(value.as_str().into()),
            None => fallback(),
        };
        Event {
            kind,
            id,
            subject,
            reply,
            headers,
            data,
            received: SystemTime::now(),
            timeout: None,
            stream: None,
            delivery: None,
            source_index: None,
        }
    }

    /// Settles the event through the source it came from.
    pub async fn settle(mut self, outcome: Outcome) {
        if let Some(delivery) = self.delivery.take() {
            delivery.settle(&self, outcome).await;
        }
    }

    /// The `traceparent` header, looked up case-insensitively (Go clients send
    /// `Traceparent`).
    pub fn traceparent(&self) -> Option<&str> {
        header(self.headers.as_ref()?, "traceparent")
    }

    /// The W3C trace id carried by the `traceparent` header, if any.
    pub fn trace_id(&self) -> Option<&str> {
        trace_id_of(self.traceparent()?)
    }
}

/// The first value of header `name`, matched exactly first and then ignoring case.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(name) {
        return Some(value.as_str());
    }
    headers
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(*key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str())
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
        let event = Event::new("k".into(), "s".into(), None, Some(headers), Bytes::new());
        assert_eq!(event.id.as_str(), "order-7");
        let generated = Event::new("k".into(), "s".into(), None, None, Bytes::new());
        let other = Event::new("k".into(), "s".into(), None, None, Bytes::new());
        assert_ne!(generated.id.as_str(), other.id.as_str());
    }
}
