//! Where messages from handlers and replies go: NATS, or standard output for replay.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use serde_json::{Map, Value as Json, json};

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
    #[error("{0}")]
    Failed(String),
    #[error("{0} is not available here: {1}")]
    Unavailable(&'static str, &'static str),
}

/// The output of the replay command: one JSON line per outcome and per publish.
#[derive(Clone)]
pub struct ReplayOutput(Arc<Mutex<Box<dyn Write + Send>>>);

impl ReplayOutput {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ReplayOutput(Arc::new(Mutex::new(out)))
    }

    pub fn line(&self, value: &Json) {
        let mut out = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Replay output is the command's product; a closed stdout ends it anyway.
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

#[derive(Clone)]
pub enum Transport {
    Nats(async_nats::Client),
    Replay(ReplayOutput),
    /// `check`: scripts load, but nothing can be sent.
    Offline,
}

impl Transport {
    pub async fn publish(
        &self,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> Result<(), TransportError> {
        match self {
            Transport::Nats(client) => {
                let result = match headers {
                    Some(headers) => client.publish_with_headers(subject, headers, data).await,
                    None => client.publish(subject, data).await,
                };
                result.map_err(|err| TransportError::Failed(format!("publish failed: {err}")))
            }
            Transport::Replay(out) => {
                let mut line = json!({ "type": "publish", "subject": subject.as_str() });
                describe_body(&mut line, headers.as_ref(), &data);
                out.line(&line);
                Ok(())
            }
            Transport::Offline => Err(TransportError::Unavailable("nats.publish", "no NATS connection in `check`")),
        }
    }

    pub async fn request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        data: Bytes,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let client = match self {
            Transport::Nats(client) => client,
            Transport::Replay(_) => {
                return Err(TransportError::Unavailable("nats.request", "replay runs without NATS"));
            }
            Transport::Offline => {
                return Err(TransportError::Unavailable("nats.request", "no NATS connection in `check`"));
            }
        };
        let mut request = async_nats::Request::new().payload(data).timeout(Some(timeout));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        use async_nats::RequestErrorKind;
        match client.send_request(Subject::from(subject.as_str()), request).await {
            Ok(message) => Ok(Response { data: message.payload, headers: message.headers }),
            Err(err) => Err(match err.kind() {
                RequestErrorKind::NoResponders => TransportError::NoResponders(subject),
                RequestErrorKind::TimedOut => TransportError::TimedOut { subject, after: timeout },
                _ => TransportError::Failed(format!("request to {subject:?} failed: {err}")),
            }),
        }
    }
}

/// Adds `data` (text), `payload` (when the body is JSON) and `headers` to a replay line.
pub fn describe_body(line: &mut Json, headers: Option<&HeaderMap>, data: &[u8]) {
    line["data"] = Json::String(String::from_utf8_lossy(data).into_owned());
    if let Ok(payload) = serde_json::from_slice::<Json>(data) {
        line["payload"] = payload;
    }
    if let Some(headers) = headers {
        let mut map = Map::new();
        for (name, values) in headers.iter() {
            let values: Vec<Json> = values.iter().map(|v| Json::String(v.as_str().to_string())).collect();
            let value = if values.len() == 1 { values[0].clone() } else { Json::Array(values) };
            map.insert(name.to_string(), value);
        }
        line["headers"] = Json::Object(map);
    }
}
