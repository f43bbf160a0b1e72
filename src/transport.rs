//! Where messages from handlers go (`nats.publish`, `nats.request`): a NATS
//! connection, or whatever a command without NATS puts in its place (replay
//! prints publishes; `check` refuses them).

use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;

/// A reply to `nats.request`.
pub struct Response {
    pub data: Bytes,
    pub headers: Option<HeaderMap>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no responders on subject {0:?}")]
    NoResponders(String),
    #[error("request to {subject:?} timed out after {}", humantime::format_duration(*.after))]
    TimedOut { subject: String, after: Duration },
    #[error("message of {size} bytes exceeded the server's max payload of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Failed(String),
    #[error("{0} is not available here: {1}")]
    Unavailable(&'static str, &'static str),
}

pub trait Transport: Send + Sync {
    fn publish(
        &self,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), TransportError>>;

    fn request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        data: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>>;

    /// The NATS connection behind this transport, for bridges that need one (KV).
    fn client(&self) -> Option<&async_nats::Client> {
        None
    }
}

/// The real thing.
pub struct NatsTransport(pub async_nats::Client);

impl Transport for NatsTransport {
    fn publish(
        &self,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let size = data.len();
            let result = match headers {
                Some(headers) => self.0.publish_with_headers(subject, headers, data).await,
                None => self.0.publish(subject, data).await,
            };
            result.map_err(|err| match err.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    TransportError::TooLarge { size, limit: self.0.server_info().max_payload }
                }
                _ => TransportError::Failed(format!("publish failed: {err}")),
            })
        })
    }

    fn request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        data: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async move {
            let mut request = async_nats::Request::new().payload(data).timeout(Some(timeout));
            if let Some(headers) = headers {
                request = request.headers(headers);
            }
            use async_nats::RequestErrorKind;
            match self.0.send_request(Subject::from(subject.as_str()), request).await {
                Ok(message) => Ok(Response { data: message.payload, headers: message.headers }),
                Err(err) => Err(match err.kind() {
                    RequestErrorKind::NoResponders => TransportError::NoResponders(subject),
                    RequestErrorKind::TimedOut => TransportError::TimedOut { subject, after: timeout },
                    _ => TransportError::Failed(format!("request to {subject:?} failed: {err}")),
                }),
            }
        })
    }

    fn client(&self) -> Option<&async_nats::Client> {
        Some(&self.0)
    }
}

/// `check`: scripts load, but nothing can be sent.
pub struct Offline;

impl Transport for Offline {
    fn publish(&self, _: Subject, _: Option<HeaderMap>, _: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Err(TransportError::Unavailable("nats.publish", "no NATS connection in `check`")) })
    }

    fn request(
        &self,
        _: String,
        _: Option<HeaderMap>,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async { Err(TransportError::Unavailable("nats.request", "no NATS connection in `check`")) })
    }
}
