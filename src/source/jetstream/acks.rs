//! Confirmed acks, in batches.

use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// How long the server's confirmation of a batch of acks may take.
const ACK_CONFIRM_LIMIT: Duration = Duration::from_secs(5);
/// The most acks one confirmation covers.
const ACK_BATCH: usize = 256;

/// Sends one VM's acks for one consumer and has the server confirm them in
/// batches: the acks waiting are sent together, only the last asking for a reply.
/// The server handles a consumer's acks from one connection in order, so that
/// reply confirms the whole batch: no reply message per ack, and batches do not
/// wait for each other's confirmation.
#[derive(Clone)]
pub(super) struct AckConfirmer {
    pending: mpsc::UnboundedSender<PendingAck>,
}

struct PendingAck {
    reply: Subject,
    confirmed: oneshot::Sender<Result<(), String>>,
}

impl AckConfirmer {
    /// Starts the sender on the calling VM thread; it ends with the last handle.
    pub(super) fn start(client: async_nats::Client) -> Self {
        let (pending, batches) = mpsc::unbounded_channel();
        tokio::task::spawn_local(confirm_batches(client, batches));
        AckConfirmer { pending }
    }

    /// Acks the message whose reply subject is `reply`, once the server confirms.
    pub(super) async fn ack(&self, reply: Subject) -> Result<(), async_nats::Error> {
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
