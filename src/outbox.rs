//! The way replies leave a VM. One task per VM owns the publishing: an event's
//! task only queues its reply, which keeps every event's task small (a publish
//! future is larger than the rest of the event's work together) and keeps the
//! replies of a VM in order.

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ack::error_headers;
use crate::transport::Transport;

/// A message to publish.
pub struct Outgoing {
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct Outbox {
    /// `None` closes the queue once everything before it is published.
    queue: Option<mpsc::Sender<Option<Outgoing>>>,
    transport: Transport,
}

impl Outbox {
    /// Publishes in the caller's task: for the rare replies sent outside a VM.
    pub fn direct(transport: Transport) -> Self {
        Outbox { queue: None, transport }
    }

    /// Starts the publishing task on the current `LocalSet`.
    pub fn spawn_local(transport: Transport, capacity: usize) -> (Self, JoinHandle<()>) {
        let (queue, mut pending) = mpsc::channel::<Option<Outgoing>>(capacity);
        let publisher = transport.clone();
        let task = tokio::task::spawn_local(async move {
            while let Some(Some(message)) = pending.recv().await {
                deliver(&publisher, message).await;
            }
        });
        (Outbox { queue: Some(queue), transport }, task)
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub async fn send(&self, message: Outgoing) {
        match &self.queue {
            Some(queue) => {
                if let Err(unsent) = queue.send(Some(message)).await
                    && let Some(message) = unsent.0
                {
                    deliver(&self.transport, message).await;
                }
            }
            None => deliver(&self.transport, message).await,
        }
    }

    /// Lets the publishing task finish what is queued and stop.
    pub async fn close(&self) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(None).await;
        }
    }
}

async fn deliver(transport: &Transport, message: Outgoing) {
    let Outgoing { subject, headers, body } = message;
    if let Err(err) = transport.publish(subject.to_string(), headers, body).await {
        tracing::warn!(subject = %subject, error = %err, "reply not sent");
        // Most often the body exceeds the server's max payload; an empty error
        // reply still fits, so the requester is not left waiting.
        let headers = error_headers(500, &format!("reply not sent: {err}"));
        let _ = transport.publish(subject.to_string(), Some(headers), Bytes::new()).await;
    }
}
