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
//!
//! One file per job: [`setup`] makes the consumer ready (and refuses an update
//! that would move its position, see [`consumer_config`]), [`pull`] runs the pull
//! protocol and turns messages into events, [`policy`] decides what an outcome
//! does to a delivery, [`settle`] carries that out, and [`acks`] has the server
//! confirm acks in batches.

pub mod consumer_config;
pub mod policy;

mod acks;
mod keyed;
mod membership;
mod pull;
mod settle;
mod setup;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;

use crate::source::{Forwarding, Link, OpenError, Placement, Source};
use crate::source_spec::ConsumerSpec;
use crate::telemetry::metrics;

pub use keyed::KeyedSource;
pub use setup::SetupError;

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
    /// The partition this consumer serves, for a keyed consumer's partitions.
    partition: Option<u32>,
}

impl JetStreamSource {
    /// The pull loop of this consumer on `client`, receiving on a new inbox.
    async fn puller(
        &self,
        client: async_nats::Client,
        pinning: Option<pull::Pinning>,
    ) -> Result<(pull::Puller, async_nats::Subscriber), OpenError> {
        let inbox = client.new_inbox();
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|cause| OpenError::Subscribe { what: self.describe(), cause })?;
        let timing = if pinning.is_some() { pull::PARTITION_PULL_TIMING } else { pull::PULL_TIMING };
        let puller = pull::Puller {
            timing,
            pinning,
            acks: acks::AckConfirmer::start(client.clone()),
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream, self.consumer).into(),
            inbox: inbox.into(),
            client,
            requests: VecDeque::new(),
            outstanding: 0,
        };
        Ok((puller, subscriber))
    }
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

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        Box::pin(async move {
            let Some(client) = link.client.clone() else {
                return Err(OpenError::NoConnection(self.describe()));
            };
            let (puller, subscriber) = self.puller(client, None).await?;
            Ok(Box::pin(puller.run(self, subscriber, link)) as Forwarding)
        })
    }
}
