//! JetStream durable pull consumers (`bus.consume`): at-least-once processing.
//!
//! Each VM pulls on its own connection only as many messages as it has room for
//! (free handler slots less what it already asked for), so no message ages
//! against `ack_wait` in a client buffer, and a pool shares one durable consumer
//! by capacity: an idle worker takes what a busy one cannot. Pull requests carry
//! an expiry and an idle heartbeat; a missed heartbeat means the requests were
//! lost (reconnect, server restart, fail-over), and the VM pulls afresh.
//!
//! The consumer's `backoff` is applied by this worker as the delay of each nak
//! and is not sent to the server: a server-side backoff would replace `ack_wait`
//! and apply only to ack timeouts (a plain nak is redelivered at once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind, consumer};
use async_nats::{StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::LocalBoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::event::{Event, Settle, StreamMeta};
use crate::log_limit::LogLimit;
use crate::outcome::{FailureCause, Outcome};
use crate::source::consumer_config;
use crate::source::spec::ConsumerSpec;
use crate::source::{Forwarding, Link, Placement, Source};
use crate::telemetry::{carrier, metrics};

/// How long a pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server's sign of life while a pull request waits.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which the pull requests are taken as lost.
const HEARTBEAT_MISSED: Duration = Duration::from_secs(5);
/// How long a stopping source waits for messages already on their way.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// How long the server's confirmation of a batch of acks may take.
const ACK_CONFIRM_LIMIT: Duration = Duration::from_secs(5);
/// The most acks one confirmation covers.
const ACK_BATCH: usize = 256;

/// One record per consumer and interval for settlements the server did not
/// confirm: a lost connection fails a whole batch at once.
static UNCONFIRMED_LOG: LogLimit<String> = LogLimit::new(Duration::from_secs(5));

/// Why a consumer could not be set up; a configuration mistake exits 2.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Nats(String),
}

/// A consumer made ready on the server.
pub struct JetStreamSource {
    spec: Arc<ConsumerSpec>,
    /// The stream and consumer names every event of this source carries.
    stream: Arc<str>,
    consumer: Arc<str>,
    /// The `ack_wait` the server applies, which times in-progress acks.
    ack_wait: Duration,
    /// Whether a stream captures the dead-letter subject, so its publish ack
    /// confirms a dead letter; otherwise a flush does.
    dead_letter_stored: bool,
    metrics: Arc<metrics::ConsumerMetrics>,
}

impl JetStreamSource {
    /// Creates the stream (when asked) and the consumer if missing, updates the
    /// consumer when its settings changed and the update moves no message, and
    /// checks that the server kept them.
    pub async fn prepare(client: &async_nats::Client, spec: ConsumerSpec) -> Result<Self, SetupError> {
        let js = jetstream::new(client.clone());
        let stream = match js.get_stream(&spec.stream).await {
            Ok(stream) => stream,
            Err(err) if is_stream_not_found(&err) => match &spec.create_stream {
                Some(subjects) => js
                    .create_stream(jetstream::stream::Config {
                        name: spec.stream.clone(),
                        subjects: subjects.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| SetupError::Config(format!("cannot create stream {:?}: {err}", spec.stream)))?,
                None => {
                    return Err(SetupError::Config(format!(
                        "stream {:?} does not exist; create it, or let bus.consume create it with \
                         create_stream = {{ subjects = {{ ... }} }}",
                        spec.stream
                    )));
                }
            },
            Err(err) => return Err(SetupError::Nats(format!("cannot look up stream {:?}: {err}", spec.stream))),
        };
        let applied = ensure_consumer(client, &stream, &spec).await?;
        check_applied(&spec, &consumer_config::declared(&spec), &applied)?;
        let dead_letter_stored = match &spec.dead_letter {
            Some(subject) => js.stream_by_subject(subject.as_str()).await.is_ok(),
            None => false,
        };
        let metrics = metrics::global().consumer(&spec.stream, &spec.consumer);
        Ok(JetStreamSource {
            ack_wait: applied.ack_wait,
            stream: spec.stream.as_str().into(),
            consumer: spec.consumer.as_str().into(),
            spec: Arc::new(spec),
            dead_letter_stored,
            metrics,
        })
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Creates the consumer when it does not exist; otherwise updates it to the
/// declaration if that moves no message (see [`consumer_config`]) and only when
/// something changed. Returns the configuration the server reports.
async fn ensure_consumer(
    client: &async_nats::Client,
    stream: &jetstream::stream::Stream,
    spec: &ConsumerSpec,
) -> Result<consumer::Config, SetupError> {
    let name = format!("{}/{}", spec.stream, spec.consumer);
    let cannot_send = |err: jetstream::stream::ConsumerError| {
        SetupError::Config(format!("cannot create or update consumer {name}: {err}"))
    };
    let existing = match stream.consumer_info(&spec.consumer).await {
        Ok(info) => info.config,
        Err(err) if matches!(err.kind(), ConsumerInfoErrorKind::NotFound) => {
            let created = stream.create_consumer(consumer_config::declared(spec)).await.map_err(cannot_send)?;
            return Ok(created.cached_info().config.clone());
        }
        Err(err) => return Err(SetupError::Nats(format!("cannot look up consumer {name}: {err}"))),
    };
    let version = client.server_info().version;
    let server = consumer_config::Server {
        version: &version,
        keeps_position_on_filter_change: client.is_server_compatible(2, 10, 0),
    };
    let update = consumer_config::plan_update(spec, &existing, server)
        .map_err(|refused| SetupError::Config(consumer_config::refusal_message(spec, &refused)))?;
    if update.changes.is_empty() {
        return Ok(existing);
    }
    let updated = stream.create_consumer(update.config).await.map_err(cannot_send)?;
    for change in &update.changes {
        tracing::info!(
            stream = %spec.stream, consumer = %spec.consumer, field = change.field,
            old = %change.existing, new = %change.declared, "consumer setting updated"
        );
    }
    Ok(updated.cached_info().config.clone())
}

/// Servers ignore fields they do not know (2.9 drops newer ones), so what was
/// sent is compared with what the server reports.
fn check_applied(spec: &ConsumerSpec, wanted: &consumer::Config, applied: &consumer::Config) -> Result<(), SetupError> {
    let mut differences = Vec::new();
    if applied.filter_subject != wanted.filter_subject {
        differences.push(format!("subject {:?} (server has {:?})", wanted.filter_subject, applied.filter_subject));
    }
    if applied.ack_wait != wanted.ack_wait {
        differences.push(format!("ack_wait {:?} (server has {:?})", wanted.ack_wait, applied.ack_wait));
    }
    if spec.max_deliver.is_some() && applied.max_deliver != wanted.max_deliver {
        differences.push(format!("max_deliver {} (server has {})", wanted.max_deliver, applied.max_deliver));
    }
    if spec.max_ack_pending.is_some() && applied.max_ack_pending != wanted.max_ack_pending {
        differences
            .push(format!("max_ack_pending {} (server has {})", wanted.max_ack_pending, applied.max_ack_pending));
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(SetupError::Config(format!(
        "consumer {}/{}: the server did not apply {}; an existing consumer may not allow this change \
         (delete it with `nats consumer rm {} {}`) or the server is too old for the setting",
        spec.stream,
        spec.consumer,
        differences.join(", "),
        spec.stream,
        spec.consumer
    )))
}

impl Source for JetStreamSource {
    fn describe(&self) -> String {
        format!(
            "consume {}/{} ack_wait={}",
            self.spec.stream,
            self.spec.consumer,
            humantime::format_duration(self.ack_wait)
        )
    }

    fn placement(&self) -> Placement {
        Placement::EveryVm
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, String>> {
        Box::pin(async move {
            let Some(client) = link.client.clone() else {
                return Err(format!("{}: no NATS connection", self.describe()));
            };
            let inbox = client.new_inbox();
            let subscriber = client
                .subscribe(inbox.clone())
                .await
                .map_err(|err| format!("cannot subscribe for {}: {err}", self.describe()))?;
            client.flush().await.map_err(|err| format!("cannot confirm subscriptions with NATS: {err}"))?;
            let acks = AckConfirmer::start(client.clone());
            let puller = Puller {
                acks,
                next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.spec.stream, self.spec.consumer).into(),
                inbox: inbox.into(),
                client,
                requests: VecDeque::new(),
                outstanding: 0,
            };
            Ok(Box::pin(puller.run(self, subscriber, link)) as Forwarding)
        })
    }
}

/// The pull requests of one VM and the messages still owed on them.
struct Puller {
    acks: AckConfirmer,
    next_subject: Subject,
    inbox: Subject,
    client: async_nats::Client,
    /// Messages still owed per pull request, oldest first (the server fills
    /// requests in order).
    requests: VecDeque<(usize, Instant)>,
    outstanding: usize,
}

impl Puller {
    async fn run(mut self, source: Arc<JetStreamSource>, mut subscriber: async_nats::Subscriber, link: Link) {
        let capacity = link.sink.room().max(1);
        // Ask again once this much room is free, so a busy VM sends fewer, larger
        // pulls, while an idle one asks as soon as anything frees.
        let threshold = (capacity / 4).max(1);
        let js = jetstream::new(self.client.clone());
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
                if message.status.is_none() {
                    let message = jetstream::Message { message, context: js.clone() };
                    let _ = message.ack_with(AckKind::Nak(None)).await;
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
        js: &jetstream::Context,
        message: async_nats::Message,
    ) -> Option<Event> {
        if let Some(status) = message.status {
            if status == StatusCode::IDLE_HEARTBEAT {
                return None;
            }
            if status == StatusCode::REQUEST_TERMINATED {
                let reason = message.description.as_deref().unwrap_or("");
                if reason.to_ascii_lowercase().contains("deleted") {
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
        let message = jetstream::Message { message, context: js.clone() };
        Some(event_of(source, message, &self.acks))
    }
}

fn event_of(source: &Arc<JetStreamSource>, message: jetstream::Message, acks: &AckConfirmer) -> Event {
    let spec = &source.spec;
    // The message came from this consumer, so its names are the source's.
    let (stream, consumer) = (source.stream.clone(), source.consumer.clone());
    let meta = match message.info() {
        Ok(info) => StreamMeta {
            stream,
            consumer,
            delivered: u64::try_from(info.delivered).unwrap_or(1),
            stream_sequence: info.stream_sequence,
            pending: info.pending,
            published: system_time(info.published.unix_timestamp_nanos()),
        },
        Err(_) => {
            StreamMeta { stream, consumer, delivered: 1, stream_sequence: 0, pending: 0, published: SystemTime::now() }
        }
    };
    let (delivered, stream_sequence) = (meta.delivered, meta.stream_sequence);
    let subject = message.message.subject.clone();
    let kind = spec.kind.render(&subject);
    let (headers, data) = (message.message.headers.clone(), message.message.payload.clone());
    let mut event = Event::of_stream(kind, subject, headers, data, meta);
    event.timeout = spec.timeout;
    if delivered > 1 {
        source.metrics.redelivered();
    }
    event.delivery = Some(Box::new(JetStreamAck {
        message,
        acks: acks.clone(),
        spec: spec.clone(),
        delivered,
        stream_sequence,
        ack_wait: source.ack_wait,
        dead_letter_stored: source.dead_letter_stored,
        received: Instant::now(),
        metrics: source.metrics.clone(),
    }));
    event
}

fn system_time(unix_nanos: i128) -> SystemTime {
    u64::try_from(unix_nanos).map(|n| UNIX_EPOCH + Duration::from_nanos(n)).unwrap_or(UNIX_EPOCH)
}

/// Settles a JetStream message: ack, nak with backoff, or dead letter and term.
struct JetStreamAck {
    message: jetstream::Message,
    acks: AckConfirmer,
    spec: Arc<ConsumerSpec>,
    delivered: u64,
    stream_sequence: u64,
    ack_wait: Duration,
    dead_letter_stored: bool,
    received: Instant,
    metrics: Arc<metrics::ConsumerMetrics>,
}

impl Settle for JetStreamAck {
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let result = match outcome {
                // Confirmed: success is not reported until the server has the ack.
                Outcome::Ack { .. } => match &self.message.reply {
                    Some(reply) => self.acks.ack(reply.clone()).await,
                    None => Ok(()),
                },
                Outcome::Nak { delay } => self.message.ack_with(AckKind::Nak(delay)).await,
                Outcome::Term { .. } => self.message.ack_with(AckKind::Term).await,
                Outcome::Error(failure) => {
                    let redelivery_cannot_help = failure.cause == FailureCause::BadPayload;
                    let last_delivery = self.spec.max_deliver.is_some_and(|max| self.delivered >= max as u64);
                    match failure.cause {
                        FailureCause::Cancelled | FailureCause::Overloaded => {
                            self.message.ack_with(AckKind::Nak(None)).await
                        }
                        _ if redelivery_cannot_help || last_delivery => {
                            self.dead_letter_and_term(event, &failure.message).await
                        }
                        _ => self.message.ack_with(AckKind::Nak(self.spec.backoff_after(self.delivered))).await,
                    }
                }
            };
            if let Err(err) = result
                && let Some(suppressed) = UNCONFIRMED_LOG.admit(self.spec.consumer.clone())
            {
                tracing::warn!(
                    kind = %event.kind, id = %event.id, error = %err, suppressed,
                    "JetStream ack not confirmed; the server will redeliver the message"
                );
            }
        })
    }

    /// In-progress acks from half of `ack_wait` on, so a long handler's message is
    /// not redelivered under it.
    fn while_running(&self) -> Option<LocalBoxFuture<'_, ()>> {
        let interval = self.ack_wait / 2;
        if interval.is_zero() {
            return None;
        }
        Some(Box::pin(async move {
            let mut next = self.received + interval;
            loop {
                tokio::time::sleep_until(next).await;
                match self.message.ack_with(AckKind::Progress).await {
                    Ok(()) => self.metrics.in_progress_ack(),
                    Err(err) => tracing::debug!(error = %err, "in-progress ack not sent"),
                }
                next += interval;
            }
        }))
    }
}

impl JetStreamAck {
    /// Publishes the message to the dead-letter subject, then terminates it; if
    /// the publish is not confirmed the message is nak'ed instead, so nothing is
    /// lost.
    async fn dead_letter_and_term(&self, event: &Event, error: &str) -> Result<(), async_nats::Error> {
        if let Some(subject) = &self.spec.dead_letter {
            if let Err(err) = self.publish_dead_letter(subject, event, error).await {
                tracing::warn!(
                    kind = %event.kind, id = %event.id, dead_letter = %subject, error = %err,
                    "dead letter not published; the message will be redelivered"
                );
                return self.message.ack_with(AckKind::Nak(self.spec.backoff_after(self.delivered))).await;
            }
            self.metrics.dead_lettered();
            tracing::warn!(kind = %event.kind, id = %event.id, dead_letter = %subject, error, "dead-lettered");
        } else {
            tracing::warn!(kind = %event.kind, id = %event.id, error, "terminated (no dead_letter subject)");
        }
        self.message.ack_with(AckKind::Term).await
    }

    async fn publish_dead_letter(&self, subject: &str, event: &Event, error: &str) -> Result<(), async_nats::Error> {
        let mut headers = event.headers.clone();
        carrier::continue_trace(&mut headers);
        let mut headers = headers.unwrap_or_default();
        // Header values cannot hold line breaks; tracebacks keep their first line.
        headers.insert("Agent-Block-Error", crate::headers::value(error.lines().next().unwrap_or("")));
        headers.insert("Agent-Block-Kind", event.kind.as_str());
        headers.insert("Agent-Block-Delivered", self.delivered.to_string().as_str());
        headers.insert("Agent-Block-Stream", self.spec.stream.as_str());
        headers.insert("Agent-Block-Stream-Seq", self.stream_sequence.to_string().as_str());
        let subject = Subject::from(subject);
        let js = &self.message.context;
        if self.dead_letter_stored {
            js.publish_with_headers(subject, headers, event.data.clone()).await?.await?;
        } else {
            let client = js.client();
            client.publish_with_headers(subject, headers, event.data.clone()).await?;
            client.flush().await?;
        }
        Ok(())
    }
}

/// Sends one VM's acks for one consumer and has the server confirm them in
/// batches: the acks waiting are sent together, only the last asking for a reply.
/// The server handles a consumer's acks from one connection in order, so that
/// reply confirms the whole batch: no reply message per ack, and batches do not
/// wait for each other's confirmation.
#[derive(Clone)]
struct AckConfirmer {
    pending: mpsc::UnboundedSender<PendingAck>,
}

struct PendingAck {
    reply: Subject,
    confirmed: oneshot::Sender<Result<(), String>>,
}

impl AckConfirmer {
    /// Starts the sender on the calling VM thread; it ends with the last handle.
    fn start(client: async_nats::Client) -> Self {
        let (pending, batches) = mpsc::unbounded_channel();
        tokio::task::spawn_local(confirm_batches(client, batches));
        AckConfirmer { pending }
    }

    /// Acks the message whose reply subject is `reply`, once the server confirms.
    async fn ack(&self, reply: Subject) -> Result<(), async_nats::Error> {
        let (confirmed, confirmation) = oneshot::channel();
        let stopped = || "the ack sender stopped".to_string();
        let result = match self.pending.send(PendingAck { reply, confirmed }) {
            Ok(()) => confirmation.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        result.map_err(|message| std::io::Error::other(message).into())
    }
}

async fn confirm_batches(client: async_nats::Client, mut batches: mpsc::UnboundedReceiver<PendingAck>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while batches.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let pending = std::mem::replace(&mut batch, Vec::with_capacity(ACK_BATCH));
        let Some(last) = pending.last().map(|last| last.reply.clone()) else { continue };
        // Sent now, in order; confirmed while later batches go out.
        let sent = send_acks(&client, &pending[..pending.len() - 1]).await;
        let client = client.clone();
        tokio::task::spawn_local(async move {
            let result = match sent {
                Ok(()) => confirm_last(&client, last).await,
                Err(err) => Err(err),
            };
            for ack in pending {
                let _ = ack.confirmed.send(result.clone());
            }
        });
    }
}

async fn send_acks(client: &async_nats::Client, acks: &[PendingAck]) -> Result<(), String> {
    for ack in acks {
        // An empty message acks, as `+ACK` does.
        client.publish(ack.reply.clone(), Bytes::new()).await.map_err(|err| err.to_string())?;
    }
    Ok(())
}

async fn confirm_last(client: &async_nats::Client, reply: Subject) -> Result<(), String> {
    let request = async_nats::Request::new().payload(Bytes::from_static(b"+ACK")).timeout(Some(ACK_CONFIRM_LIMIT));
    client.send_request(reply, request).await.map(drop).map_err(|err| err.to_string())
}
