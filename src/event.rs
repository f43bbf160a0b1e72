//! The event: one message, its kind, and how to settle it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::LocalBoxFuture;

use crate::outcome::{Failure, FailureCause, Outcome};
use crate::panics;

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
    /// The ack subject these were read from ([`crate::ack_subject`]), so
    /// `ev.meta` can read them again when a handler asks.
    pub ack_subject: Option<Subject>,
    /// The partition and key of a keyed consumer's message.
    pub keyed: Option<KeyedMeta>,
}

/// Where a keyed consumer's message belongs: `ev.meta.partition` and `ev.meta.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedMeta {
    pub partition: u32,
    pub key: String,
}

/// How a source finishes an event: a core reply, a JetStream ack, a replay line.
/// Each source implements it for its own deliveries, so settling never asks where
/// an event came from.
pub trait Settle: Send {
    /// Reports `outcome` for `event` (whose `delivery` has been taken out). Called
    /// once, and once more with an internal error if the first call panicked.
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()>;

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
    /// Shared: the handler's context and the span keep it too.
    Given(Arc<str>),
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

    /// The id's bytes, without the UTF-8 check `as_str` makes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            EventId::Given(id) => id.as_bytes(),
            EventId::Generated(id) => id,
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
        let sequence_id = || EventId::Given(sequence_id(&meta.stream, meta.stream_sequence));
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
    /// A panic while settling (a bug) is confined to this event: it is logged
    /// once and the event is settled again as an internal error (500), so a
    /// requester is answered and a JetStream message is nak'ed.
    pub async fn settle(mut self: Box<Self>, outcome: Outcome) {
        let Some(mut delivery) = self.delivery.take() else { return };
        let Err(panic) = panics::catch(delivery.settle(&self, outcome)).await else { return };
        tracing::error!(
            kind = %self.kind, id = %self.id, panic = %panic.message, location = %panic.location,
            "settling the event panicked; settling it as an internal error (500) instead"
        );
        let fallback = Failure::new(FailureCause::Internal, 500, "internal error while settling the event".to_string());
        if let Err(again) = panics::catch(delivery.settle(&self, Outcome::Error(fallback))).await {
            tracing::error!(
                kind = %self.kind, id = %self.id, panic = %again.message, location = %again.location,
                "settling the event as an internal error panicked too; it is left to its source's timeout"
            );
        }
    }

    /// The `traceparent` header, looked up case-insensitively (Go clients send
    /// `Traceparent`), when it is valid W3C trace context; an invalid one starts a
    /// new trace, as the W3C rules say.
    pub fn traceparent(&self) -> Option<&str> {
        header(self.headers.as_ref()?, "traceparent").filter(|value| trace_id_of(value).is_some())
    }

    /// The W3C trace id carried by the `traceparent` header, if any.
    pub fn trace_id(&self) -> Option<&str> {
        trace_id_of(self.traceparent()?)
    }
}

/// `STREAM:seq`, written without the formatting machinery (once per message).
fn sequence_id(stream: &str, sequence: u64) -> Arc<str> {
    let mut number = itoa::Buffer::new();
    let digits = number.format(sequence).as_bytes();
    // Written on the stack when it fits, so the id is allocated once.
    let mut text = [0u8; 128];
    let len = stream.len() + 1 + digits.len();
    if len > text.len() {
        return Arc::from(format!("{stream}:{sequence}"));
    }
    text[..stream.len()].copy_from_slice(stream.as_bytes());
    text[stream.len()] = b':';
    text[stream.len() + 1..len].copy_from_slice(digits);
    // A `str` followed by ASCII.
    Arc::from(std::str::from_utf8(&text[..len]).unwrap_or(stream))
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

/// The span (parent) id of a valid W3C `traceparent` value.
pub fn span_id_of(traceparent: &str) -> Option<&str> {
    trace_id_of(traceparent).map(|_| &traceparent[36..52])
}

/// Extracts the trace id from a valid W3C `traceparent` value
/// (`<version>-<trace id>-<parent id>-<flags>`): lowercase hex fields of 2, 32,
/// 16 and 2 digits, version not `ff`, neither id all zeros; version `00` has
/// exactly these four fields, a later version may append more after a `-`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let bytes = traceparent.as_bytes();
    if bytes.len() < 55 || !bytes[..55].is_ascii() || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let (version, trace_id, parent_id, flags) =
        (&traceparent[..2], &traceparent[3..35], &traceparent[36..52], &traceparent[53..55]);
    let lower_hex = |field: &str| field.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |field: &str| field.bytes().any(|b| b != b'0');
    let valid = [version, trace_id, parent_id, flags].into_iter().all(lower_hex)
        && version != "ff"
        && nonzero(trace_id)
        && nonzero(parent_id)
        && (bytes.len() == 55 || (version != "00" && bytes[55] == b'-'));
    valid.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_message_without_its_own_id_is_named_by_its_sequence() {
        assert_eq!(&*sequence_id("ORDERS", 0), "ORDERS:0");
        assert_eq!(&*sequence_id("ORDERS", 1042), "ORDERS:1042");
        assert_eq!(&*sequence_id("S", u64::MAX), "S:18446744073709551615");
        let long = "L".repeat(120);
        assert_eq!(&*sequence_id(&long, 12345678), format!("{long}:12345678"));
    }

    #[test]
    fn trace_id_comes_from_a_valid_traceparent_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of("garbage"), None);
        for invalid in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "0-04bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert_eq!(trace_id_of(invalid), None, "{invalid}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(trace_id_of(later), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    /// Panics on its first settle; records what it is settled with after.
    struct PanicsOnce(Arc<std::sync::Mutex<Vec<Outcome>>>);

    impl Settle for PanicsOnce {
        fn settle<'a>(&'a mut self, _: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
            Box::pin(async move {
                let first = self.0.lock().unwrap().is_empty();
                self.0.lock().unwrap().push(outcome);
                assert!(!first, "a bug on the settle path");
            })
        }
    }

    #[tokio::test]
    async fn a_panic_while_settling_settles_the_event_as_an_internal_error() {
        let settled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut event = Event::new("k".into(), "s".into(), None, None, Bytes::new());
        event.delivery = Some(Box::new(PanicsOnce(settled.clone())));
        Box::new(event).settle(Outcome::empty_ack()).await;
        let settled = settled.lock().unwrap();
        assert_eq!(settled.len(), 2);
        assert!(matches!(&settled[1], Outcome::Error(failure) if failure.code == 500), "{:?}", settled[1]);
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
