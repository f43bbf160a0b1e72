//! Core NATS subscriptions (`bus.subscribe`), in a queue group by default so a
//! pool of workers answers each request once. A request the intake cannot take
//! is answered 503 at once (the requester can retry elsewhere, as with NATS micro
//! services); a message without a reply subject is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::Subject;
use futures::StreamExt;
use futures::future::LocalBoxFuture;

use crate::event::{Event, Settle};
use crate::intake::Sink;
use crate::lua::context;
use crate::outcome::{Failure, Outcome};
use crate::settle::{error_headers, reply_of};
use crate::source::{Forwarding, Link, OpenError, Placement, Source};
use crate::source_spec::SubscriptionSpec;

pub struct CoreSource {
    spec: SubscriptionSpec,
    queue_group: Option<String>,
}

impl CoreSource {
    pub fn new(spec: SubscriptionSpec, worker_name: &str) -> Self {
        CoreSource { queue_group: spec.queue_group(worker_name), spec }
    }
}

impl Source for CoreSource {
    fn describe(&self) -> String {
        let queue = self.queue_group.as_deref().map(|q| format!(" queue={q}")).unwrap_or_default();
        format!("subscribe {}{queue}", self.spec.subject)
    }

    /// Queue groups run on every VM, so NATS spreads their messages over all VMs
    /// of all workers; a subscription without a group must reach the process once.
    fn placement(&self) -> Placement {
        if self.queue_group.is_some() { Placement::EveryVm } else { Placement::Once }
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        Box::pin(async move {
            let Some(client) = link.client.clone() else {
                return Err(OpenError::NoConnection(self.describe()));
            };
            let subject = self.spec.subject.clone();
            let subscribed = match &self.queue_group {
                Some(group) => client.queue_subscribe(subject, group.clone()).await,
                None => client.subscribe(subject).await,
            };
            let subscriber = subscribed.map_err(|cause| OpenError::Subscribe { what: self.describe(), cause })?;
            Ok(Box::pin(forward(self, subscriber, client, link)) as Forwarding)
        })
    }
}

/// Hands every message to the sink until `stop` fires and the subscription is
/// drained.
async fn forward(
    source: Arc<CoreSource>,
    mut subscriber: async_nats::Subscriber,
    client: async_nats::Client,
    link: Link,
) {
    let spec = &source.spec;
    // One clone per request: an `Arc` costs one count, a client several.
    let client = Arc::new(client);
    let mut draining = false;
    loop {
        let message = tokio::select! {
            message = subscriber.next() => message,
            _ = link.stop.cancelled(), if !draining => {
                draining = true;
                if let Err(err) = subscriber.drain().await {
                    tracing::warn!(subject = %spec.subject, error = %err, "cannot drain subscription");
                    break;
                }
                continue;
            }
        };
        let Some(message) = message else { break };
        let kind = spec.kind.render(&message.subject);
        let mut event = Event::new(kind, message.subject, message.reply, message.headers, message.payload);
        event.timeout = spec.timeout;
        event.source_index = Some(link.index);
        if let Some(reply) = &event.reply {
            event.delivery = Some(Box::new(CoreReply { reply: reply.clone(), client: client.clone() }));
        }
        if let Err(event) = link.sink.offer(Box::new(event)) {
            refuse(&link.sink, event, draining).await;
        }
    }
}

/// Answers a request the intake cannot take with 503, or counts the dropped message.
async fn refuse(sink: &Sink, event: Box<Event>, draining: bool) {
    let stats = sink.stats();
    let had_reply = event.reply.is_some();
    if stats.refused(had_reply) {
        tracing::warn!(
            rejected = stats.rejected.load(Ordering::Relaxed),
            dropped = stats.dropped.load(Ordering::Relaxed),
            "intake full: requests answered 503, messages without a reply subject dropped (totals so far)"
        );
    }
    if had_reply {
        let failure = if draining { Failure::cancelled() } else { Failure::overloaded() };
        event.settle(Outcome::Error(failure)).await;
    }
}

/// Settles a core request by publishing the reply.
struct CoreReply {
    reply: Subject,
    client: Arc<async_nats::Client>,
}

impl Settle for CoreReply {
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let (mut headers, body) = reply_of(outcome);
            context::continue_trace(&mut headers);
            let sent = match headers {
                Some(headers) => self.client.publish_with_headers(self.reply.clone(), headers, body).await,
                None => self.client.publish(self.reply.clone(), body).await,
            };
            if let Err(err) = sent {
                tracing::warn!(kind = %event.kind, id = %event.id, error = %err, "reply not sent");
                // Most often the body exceeds the server's max payload; an empty
                // error reply still fits, so the requester is not left waiting.
                let headers = error_headers(500, &format!("reply not sent: {err}"));
                let _ = self.client.publish_with_headers(self.reply.clone(), headers, Default::default()).await;
            }
        })
    }
}
