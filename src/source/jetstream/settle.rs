//! Carrying out what [`super::policy`] decides for a delivery: the confirmed
//! ack, nak, term, the dead letter (nak'ed instead if its publish is not
//! confirmed, so nothing is lost), and in-progress acks while a handler runs.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::{self, AckKind};
use futures::future::LocalBoxFuture;
use tokio::time::Instant;

use super::acks::AckConfirmer;
use super::policy::{self, Action};
use crate::event::{Event, Settle};
use crate::log_limit::LogLimit;
use crate::outcome::Outcome;
use crate::source_spec::ConsumerSpec;
use crate::telemetry::metrics;

/// One record per consumer and interval for settlements the server did not
/// confirm: a lost connection fails a whole batch at once.
static UNCONFIRMED_LOG: LogLimit<String> = LogLimit::new(Duration::from_secs(5));

/// Settles a JetStream message: ack, nak with backoff, or dead letter and term.
pub(super) struct JetStreamAck {
    /// The message's ack subject.
    pub(super) reply: Option<Subject>,
    /// The VM's JetStream context, shared by its messages.
    pub(super) js: Arc<jetstream::Context>,
    pub(super) acks: AckConfirmer,
    pub(super) spec: Arc<ConsumerSpec>,
    pub(super) delivered: u64,
    pub(super) ack_wait: Duration,
    pub(super) dead_letter_stored: bool,
    pub(super) received: Instant,
    pub(super) metrics: Arc<metrics::ConsumerMetrics>,
}

impl Settle for JetStreamAck {
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let result = match policy::action(&self.spec, self.delivered, &outcome) {
                // Confirmed: success is not reported until the server has the ack.
                Action::Ack => match &self.reply {
                    Some(reply) => self.acks.ack(reply.clone()).await,
                    None => Ok(()),
                },
                Action::Nak(delay) => self.send(AckKind::Nak(delay)).await,
                Action::Term => self.send(AckKind::Term).await,
                Action::DeadLetter(error) => self.dead_letter_and_term(event, &error).await,
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
                match self.send(AckKind::Progress).await {
                    Ok(()) => self.metrics.in_progress_ack(),
                    Err(err) => tracing::debug!(error = %err, "in-progress ack not sent"),
                }
                next += interval;
            }
        }))
    }
}

impl JetStreamAck {
    /// Publishes `kind` (`-NAK`, `+TERM`, `+WPI`) to the ack subject.
    async fn send(&self, kind: AckKind) -> Result<(), async_nats::Error> {
        let Some(reply) = &self.reply else { return Ok(()) };
        self.js.client().publish(reply.clone(), kind.into()).await?;
        Ok(())
    }

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
                return self.send(AckKind::Nak(self.spec.backoff_after(self.delivered))).await;
            }
            self.metrics.dead_lettered();
            tracing::warn!(kind = %event.kind, id = %event.id, dead_letter = %subject, error, "dead-lettered");
        } else {
            tracing::warn!(kind = %event.kind, id = %event.id, error, "terminated (no dead_letter subject)");
        }
        self.send(AckKind::Term).await
    }

    async fn publish_dead_letter(&self, subject: &str, event: &Event, error: &str) -> Result<(), async_nats::Error> {
        let headers = policy::dead_letter_headers(&self.spec, event, self.delivered, error);
        let subject = Subject::from(subject);
        let js = &self.js;
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
