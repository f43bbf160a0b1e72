//! Replay: events from JSON lines (`{subject, data|payload, headers}`) instead of
//! NATS, one at a time, so output lines come in input order.

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::event::{Delivery, Event};
use crate::kind::subject_matches;
use crate::source::Source;
use crate::source::core::SubscriptionSpec;
use crate::transport::ReplayOutput;

pub struct ReplaySource {
    input: Box<dyn AsyncBufRead + Send + Unpin>,
    subscriptions: Vec<SubscriptionSpec>,
    output: ReplayOutput,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    subject: String,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    payload: Option<Json>,
    #[serde(default)]
    headers: Option<serde_json::Map<String, Json>>,
    #[serde(default)]
    reply: Option<String>,
}

impl ReplaySource {
    pub fn new(
        input: Box<dyn AsyncBufRead + Send + Unpin>,
        subscriptions: Vec<SubscriptionSpec>,
        output: ReplayOutput,
    ) -> Self {
        ReplaySource { input, subscriptions, output }
    }

    fn kind_of(&self, subject: &Subject) -> Subject {
        self.subscriptions
            .iter()
            .find(|s| subject_matches(&s.subject, subject))
            .map(|s| s.kind.render(subject))
            .unwrap_or_else(|| subject.clone())
    }

    fn event(&self, number: usize, text: &str) -> Result<(Event, oneshot::Receiver<()>), String> {
        let line: Line = serde_json::from_str(text).map_err(|err| format!("not an event line: {err}"))?;
        let data = match (line.data, line.payload) {
            (Some(_), Some(_)) => return Err("give either data or payload, not both".to_string()),
            (Some(data), None) => Bytes::from(data),
            (None, Some(payload)) => Bytes::from(payload.to_string()),
            (None, None) => Bytes::new(),
        };
        let headers = line.headers.map(|h| headers_of(&h)).transpose()?;
        let (done, finished) = oneshot::channel();
        let subject = Subject::from(line.subject.as_str());
        let mut event = Event::new(
            self.kind_of(&subject),
            subject,
            line.reply.map(|r| Subject::from(r.as_str())),
            headers,
            data,
            Delivery::Replay { line: number, done: Some(done) },
        );
        event.timeout =
            self.subscriptions.iter().find(|s| subject_matches(&s.subject, &line.subject)).and_then(|s| s.timeout);
        Ok((event, finished))
    }
}

fn headers_of(map: &serde_json::Map<String, Json>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in map {
        match value {
            Json::String(s) => headers.append(name.as_str(), s.as_str()),
            Json::Array(items) => {
                for item in items {
                    let Json::String(s) = item else {
                        return Err(format!("header {name:?}: list items must be strings"));
                    };
                    headers.append(name.as_str(), s.as_str());
                }
            }
            _ => return Err(format!("header {name:?}: expected a string or a list of strings")),
        }
    }
    Ok(headers)
}

impl Source for ReplaySource {
    fn describe(&self) -> String {
        "replay input".to_string()
    }

    fn run(mut self: Box<Self>, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut number = 0;
            let mut text = String::new();
            while !stop.is_cancelled() {
                text.clear();
                match self.input.read_line(&mut text).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(err) => {
                        self.output.line(&json!({ "type": "error", "line": number + 1, "message": err.to_string() }));
                        break;
                    }
                }
                number += 1;
                if text.trim().is_empty() {
                    continue;
                }
                match self.event(number, text.trim()) {
                    Ok((event, finished)) => {
                        if bus.send(event).await.is_err() {
                            break;
                        }
                        let _ = finished.await;
                    }
                    Err(message) => self.output.line(&json!({ "type": "error", "line": number, "message": message })),
                }
            }
        })
    }
}
