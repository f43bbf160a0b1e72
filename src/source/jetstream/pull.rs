//! The pull protocol of one VM: it asks only for as many messages as it has
//! room for, and turns each message into an event whose delivery settles it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::JetStreamSource;
use super::acks::AckConfirmer;
use super::settle::JetStreamAck;
use crate::ack_subject;
use crate::event::{Event, StreamMeta};
use crate::outcome::Outcome;
use crate::source::{Link, Source};

/// How long a pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server's sign of life while a pull request waits.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which the pull requests are taken as lost.
const HEARTBEAT_MISSED: Duration = Duration::from_secs(5);
/// How long a stopping source waits for messages already on their way.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// The pull requests of one VM and the messages still owed on them.
pub(super) struct Puller {
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
                        if let Err(event) = link.sink.deliver(event).await {
                            event.settle(Outcome::Error(crate::outcome::Failure::cancelled())).await;
                        }
                    }
                }
                _ = link.sink.room_changed(), if want == 0 || self.outstanding > 0 => {}
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
        let request = serde_json::json!({
            "batch": batch,
            "expires": PULL_EXPIRES.as_nanos() as u64,
            "idle_heartbeat": PULL_HEARTBEAT.as_nanos() as u64,
        });
        let body = Bytes::from(request.to_string());
        self.client.publish_with_reply(self.next_subject.clone(), self.inbox.clone(), body).await?;
        self.requests.push_back((batch, Instant::now() + PULL_EXPIRES));
        self.outstanding += batch;
        Ok(())
    }

    fn forget_expired(&mut self) {
        let now = Instant::now();
        while let Some(&(owed, expires)) = self.requests.front() {
            if expires + PULL_HEARTBEAT > now {
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
    let meta = match message.reply.as_deref().and_then(ack_subject::parse) {
        Some(at) => StreamMeta {
            stream,
            consumer,
            delivered: at.delivered,
            stream_sequence: at.stream_sequence,
            pending: at.pending,
            published: UNIX_EPOCH + Duration::from_nanos(at.published_unix_nanos),
            ack_subject: message.reply.clone(),
        },
        None => StreamMeta {
            stream,
            consumer,
            delivered: 1,
            stream_sequence: 0,
            pending: 0,
            published: SystemTime::now(),
            ack_subject: None,
        },
    };
    let delivered = meta.delivered;
    let async_nats::Message { subject, reply, headers, payload, .. } = message;
    let kind = spec.kind.render(&subject);
    let mut event = Event::of_stream(kind, subject, headers, payload, meta);
    event.timeout = spec.timeout;
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
