//! The pull protocol of one VM: it asks only for as many messages as it has
//! room for, and turns each message into an event whose delivery settles it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::JetStreamSource;
use super::acks::AckConfirmer;
use super::settle::JetStreamAck;
use crate::ack_subject;
use crate::event::{Event, KeyedMeta, StreamMeta};
use crate::outcome::Outcome;
use crate::partitioning;
use crate::source::{Link, Source};

/// How long a pull request waits on the server for messages, and the server's
/// sign of life while it waits.
pub(super) const PULL_TIMING: PullTiming =
    PullTiming { expires: Duration::from_secs(10), heartbeat: Duration::from_secs(2) };
/// A partition's pulls are short, so the pin follows its owner within seconds
/// (see [`super::keyed`]).
pub(super) const PARTITION_PULL_TIMING: PullTiming =
    PullTiming { expires: Duration::from_secs(2), heartbeat: Duration::from_secs(1) };
/// Silence after which the pull requests are taken as lost.
const HEARTBEAT_MISSED: Duration = Duration::from_secs(5);
/// How long a stopping source waits for messages already on their way.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// How long a pull request waits on the server, and how often the server
/// shows it is alive meanwhile.
#[derive(Debug, Clone, Copy)]
pub(super) struct PullTiming {
    expires: Duration,
    heartbeat: Duration,
}

/// A pull in a priority group whose server pins one client at a time: the pin
/// the server gave (sent back with every pull) and whether there is one.
pub(super) struct Pinning {
    pub(super) group: &'static str,
    pub(super) id: Option<String>,
    pub(super) pinned: Rc<Cell<bool>>,
}

/// The pull requests of one VM and the messages still owed on them.
pub(super) struct Puller {
    pub(super) timing: PullTiming,
    pub(super) pinning: Option<Pinning>,
    pub(super) acks: AckConfirmer,
    pub(super) next_subject: Subject,
    pub(super) inbox: Subject,
    pub(super) client: async_nats::Client,
    /// Messages still owed per pull request, oldest first (the server fills
    /// requests in order).
    pub(super) requests: VecDeque<(usize, Instant)>,
    pub(super) outstanding: usize,
}

impl Puller {
    pub(super) async fn run(
        mut self,
        source: Arc<JetStreamSource>,
        mut subscriber: async_nats::Subscriber,
        link: Link,
    ) {
        let capacity = link.sink.room().max(1);
        // Ask again once this much room is free, so a busy VM sends fewer, larger
        // pulls, while an idle one asks as soon as anything frees.
        let threshold = (capacity / 4).max(1);
        let js = Arc::new(jetstream::new(self.client.clone()));
        let mut last_heard = Instant::now();
        loop {
            self.forget_expired();
            let want = link.sink.room().saturating_sub(self.outstanding);
            if want > 0 && (self.outstanding == 0 || want >= threshold) {
                source.metrics.pulled(want);
                if self.pull(want).await.is_err() {
                    // Disconnected: the client reconnects; try again shortly.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                if self.requests.len() == 1 {
                    last_heard = Instant::now();
                }
            }
            let silence_limit = last_heard + HEARTBEAT_MISSED;
            tokio::select! {
                biased;
                _ = link.stop.cancelled() => break,
                message = subscriber.next() => {
                    let Some(message) = message else { break };
                    last_heard = Instant::now();
                    if let Some(mut event) = self.receive(&source, &js, message) {
                        event.source_index = Some(link.index);
                        if let Err(event) = link.sink.deliver(Box::new(event)).await {
                            event.settle(Outcome::Error(crate::outcome::Failure::cancelled())).await;
                        }
                    }
                }
                // A partition's consumer hands out one message at a time: with a
                // pull open there is nothing to gain from more room.
                _ = link.sink.room_changed(), if want == 0 || (self.outstanding > 0 && self.pinning.is_none()) => {}
                _ = tokio::time::sleep_until(silence_limit), if self.outstanding > 0 => {
                    tracing::debug!(source = %source.describe(), "pull requests unanswered; pulling afresh");
                    self.requests.clear();
                    self.outstanding = 0;
                    last_heard = Instant::now();
                }
            }
        }
        // Stop new deliveries, then hand back what already arrived: nak'ed for
        // immediate redelivery to another worker.
        if subscriber.drain().await.is_ok() {
            while let Ok(Some(message)) = tokio::time::timeout(DRAIN_LIMIT, subscriber.next()).await {
                if message.status.is_none()
                    && let Some(reply) = message.reply
                {
                    let _ = self.client.publish(reply, AckKind::Nak(None).into()).await;
                }
            }
        }
    }

    async fn pull(&mut self, batch: usize) -> Result<(), async_nats::PublishError> {
        let mut request = serde_json::json!({
            "batch": batch,
            "expires": self.timing.expires.as_nanos() as u64,
            "idle_heartbeat": self.timing.heartbeat.as_nanos() as u64,
        });
        if let Some(pinning) = &self.pinning {
            request["group"] = pinning.group.into();
            if let Some(id) = &pinning.id {
                request["id"] = id.as_str().into();
            }
        }
        let body = Bytes::from(request.to_string());
        self.client.publish_with_reply(self.next_subject.clone(), self.inbox.clone(), body).await?;
        self.requests.push_back((batch, Instant::now() + self.timing.expires));
        self.outstanding += batch;
        Ok(())
    }

    fn forget_expired(&mut self) {
        let now = Instant::now();
        while let Some(&(owed, expires)) = self.requests.front() {
            if expires + self.timing.heartbeat > now {
                break;
            }
            self.requests.pop_front();
            self.outstanding -= owed;
        }
    }

    /// A status ends the oldest request; a message pays one owed on it.
    fn end_oldest_request(&mut self) {
        if let Some((owed, _)) = self.requests.pop_front() {
            self.outstanding -= owed;
        }
    }

    fn receive(
        &mut self,
        source: &Arc<JetStreamSource>,
        js: &Arc<jetstream::Context>,
        message: async_nats::Message,
    ) -> Option<Event> {
        if let Some(status) = message.status {
            if status == StatusCode::IDLE_HEARTBEAT {
                return None;
            }
            if status == StatusCode::PIN_ID_MISMATCH
                && let Some(pinning) = &mut self.pinning
            {
                // The pin moved to another client: pull again without it.
                pinning.id = None;
                pinning.pinned.set(false);
            }
            if status == StatusCode::REQUEST_TERMINATED {
                let reason = message.description.as_deref().unwrap_or("");
                // nats-server ends a pull with 409 and this description when the
                // consumer is deleted under it.
                if reason.eq_ignore_ascii_case("consumer deleted") {
                    tracing::warn!(source = %source.describe(), reason, "consumer deleted on the server");
                }
            }
            self.end_oldest_request();
            return None;
        }
        if let Some(front) = self.requests.front_mut() {
            front.0 -= 1;
            self.outstanding -= 1;
            if front.0 == 0 {
                self.requests.pop_front();
            }
        }
        if let Some(pinning) = &mut self.pinning
            && let Some(id) = message.headers.as_ref().and_then(|headers| headers.get_last(PIN_ID))
            && pinning.id.as_deref() != Some(id.as_str())
        {
            pinning.id = Some(id.as_str().to_string());
            pinning.pinned.set(true);
        }
        Some(event_of(source, message, js, &self.acks))
    }
}

fn event_of(
    source: &Arc<JetStreamSource>,
    message: async_nats::Message,
    js: &Arc<jetstream::Context>,
    acks: &AckConfirmer,
) -> Event {
    let spec = &source.spec;
    // The message came from this consumer, so its names are the source's.
    let (stream, consumer) = (source.stream.clone(), source.consumer.clone());
    let mut meta = match message.reply.as_deref().and_then(ack_subject::parse) {
        Some(at) => StreamMeta {
            stream,
            consumer,
            delivered: at.delivered,
            stream_sequence: at.stream_sequence,
            pending: at.pending,
            published: UNIX_EPOCH + Duration::from_nanos(at.published_unix_nanos),
            ack_subject: message.reply.clone(),
            keyed: None,
        },
        None => StreamMeta {
            stream,
            consumer,
            delivered: 1,
            stream_sequence: 0,
            pending: 0,
            published: SystemTime::now(),
            ack_subject: None,
            keyed: None,
        },
    };
    let delivered = meta.delivered;
    let async_nats::Message { subject, reply, headers, payload, .. } = message;
    let (subject, headers) = match (source.partition, &spec.keyed) {
        (Some(partition), Some(keyed)) => {
            let published = Subject::from(partitioning::published_subject(&subject));
            meta.keyed = Some(KeyedMeta { partition, key: keyed.key.render_str(&published) });
            (published, headers.and_then(without_pin_id))
        }
        _ => (subject, headers),
    };
    let kind = spec.kind.render(&subject);
    let mut event = Event::of_stream(kind, subject, headers, payload, meta);
    event.timeout = spec.timeout;
    source.metrics.received();
    if delivered > 1 {
        source.metrics.redelivered();
    }
    event.delivery = Some(Box::new(JetStreamAck {
        reply,
        js: js.clone(),
        acks: acks.clone(),
        spec: spec.clone(),
        delivered,
        ack_wait: source.ack_wait,
        dead_letter_stored: source.dead_letter_stored,
        received: Instant::now(),
        metrics: source.metrics.clone(),
    }));
    event
}

/// The header the server pins a client with; the pull loop's business, not the handler's.
const PIN_ID: &str = "Nats-Pin-Id";

/// `headers` without the server's pin header; `None` when nothing else is left.
fn without_pin_id(headers: HeaderMap) -> Option<HeaderMap> {
    if headers.get(PIN_ID).is_none() {
        return Some(headers);
    }
    let mut kept = HeaderMap::new();
    for (name, values) in headers.iter() {
        if AsRef::<str>::as_ref(name) != PIN_ID {
            for value in values {
                kept.append(name.clone(), value.clone());
            }
        }
    }
    (!kept.is_empty()).then_some(kept)
}
