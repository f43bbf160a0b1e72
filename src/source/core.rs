//! Core NATS subscriptions (`bus.subscribe`), in a queue group by default so a
//! pool of workers answers each request once.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::ack;
use crate::bus::Bus;
use crate::event::{Delivery, Event};
use crate::kind::KindTemplate;
use crate::outcome::{Failure, Outcome};
use crate::source::Source;
use crate::transport::Transport;

/// A subscription declared by `bus.subscribe`.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub subject: String,
    pub kind: KindTemplate,
    pub queue: Queue,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// The worker's `--name`.
    Default,
    Named(String),
    /// `queue = false`: every worker gets every message.
    None,
}

impl SubscriptionSpec {
    pub fn queue_group(&self, worker_name: &str) -> Option<String> {
        match &self.queue {
            Queue::Default => Some(worker_name.to_string()),
            Queue::Named(name) => Some(name.clone()),
            Queue::None => None,
        }
    }

    pub fn describe(&self, worker_name: &str) -> String {
        let queue = self.queue_group(worker_name).map(|q| format!(" queue={q}")).unwrap_or_default();
        let timeout = self.timeout.map(|t| format!(" timeout={}", humantime::format_duration(t))).unwrap_or_default();
        format!("{} kind={}{queue}{timeout}", self.subject, self.kind)
    }
}

pub struct CoreSource {
    spec: SubscriptionSpec,
    description: String,
    subscriber: async_nats::Subscriber,
    transport: Transport,
}

impl CoreSource {
    /// Subscribes to every spec and waits until the server has confirmed them.
    pub async fn subscribe_all(
        client: &async_nats::Client,
        specs: &[SubscriptionSpec],
        worker_name: &str,
    ) -> Result<Vec<CoreSource>, String> {
        let mut sources = Vec::with_capacity(specs.len());
        for spec in specs {
            let source = CoreSource::subscribe(client, spec.clone(), worker_name)
                .await
                .map_err(|err| format!("cannot subscribe to {:?}: {err}", spec.subject))?;
            sources.push(source);
        }
        client.flush().await.map_err(|err| format!("cannot confirm subscriptions with NATS: {err}"))?;
        Ok(sources)
    }

    pub async fn subscribe(
        client: &async_nats::Client,
        spec: SubscriptionSpec,
        worker_name: &str,
    ) -> Result<Self, async_nats::SubscribeError> {
        let subscriber = match spec.queue_group(worker_name) {
            Some(group) => client.queue_subscribe(spec.subject.clone(), group).await?,
            None => client.subscribe(spec.subject.clone()).await?,
        };
        Ok(CoreSource {
            description: spec.describe(worker_name),
            spec,
            subscriber,
            transport: Transport::Nats(client.clone()),
        })
    }
}

impl CoreSource {
    /// Hands every message to `deliver` as an event until `stop` fires and the
    /// subscription is drained. An event `deliver` gives back (shutdown) is
    /// answered 503.
    pub async fn forward<F, Fut>(self, stop: CancellationToken, mut deliver: F)
    where
        F: FnMut(Event) -> Fut,
        Fut: Future<Output = Result<(), Event>>,
    {
        let CoreSource { spec, mut subscriber, transport, .. } = self;
        let mut draining = false;
        loop {
            let message = tokio::select! {
                message = subscriber.next() => message,
                _ = stop.cancelled(), if !draining => {
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
            let mut event =
                Event::new(kind, message.subject, message.reply, message.headers, message.payload, Delivery::Core);
            event.timeout = spec.timeout;
            if let Err(event) = deliver(event).await {
                ack::settle(&transport, event, Outcome::Error(Failure::cancelled())).await;
            }
        }
    }
}

impl Source for CoreSource {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn run(self: Box<Self>, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(self.forward(stop, move |event| {
            let bus = bus.clone();
            async move { bus.send(event).await }
        }))
    }
}
