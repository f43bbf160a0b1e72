//! Replay: events from JSON lines (`{subject, data|payload, headers}`) instead of
//! NATS, one at a time, so output lines come in input order. Outcomes and the
//! handlers' publishes are printed as JSON lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::{BoxFuture, LocalBoxFuture};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::oneshot;

use crate::event::{Event, Settle};
use crate::kind::subject_matches;
use crate::outcome::Outcome;
use crate::source::{Forwarding, Link, OpenError, Placement, Source};
use crate::source_spec::SourceSpec;
use crate::transport::{Response, Transport, TransportError};

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

pub struct ReplaySource {
    input: Mutex<Option<Box<dyn AsyncBufRead + Send + Unpin>>>,
    sources: Vec<SourceSpec>,
    output: ReplayOutput,
    /// Set when an input line could not be read as an event.
    had_bad_line: Arc<AtomicBool>,
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
    pub fn new(input: Box<dyn AsyncBufRead + Send + Unpin>, sources: Vec<SourceSpec>, output: ReplayOutput) -> Self {
        ReplaySource { input: Mutex::new(Some(input)), sources, output, had_bad_line: Default::default() }
    }

    /// Set once the replay met a line that is not an event.
    pub fn bad_lines(&self) -> Arc<AtomicBool> {
        self.had_bad_line.clone()
    }

    fn matching(&self, subject: &str) -> Option<&SourceSpec> {
        self.sources.iter().find(|s| subject_matches(s.subject_and_kind().0, subject))
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
        let source = self.matching(&subject);
        let kind = source.map(|s| s.subject_and_kind().1.render(&subject)).unwrap_or_else(|| subject.clone());
        let mut event = Event::new(kind, subject, line.reply.map(|r| Subject::from(r.as_str())), headers, data);
        event.timeout = source.and_then(SourceSpec::timeout);
        event.delivery = Some(Box::new(ReplayLine { line: number, output: self.output.clone(), done: Some(done) }));
        Ok((event, finished))
    }

    async fn forward(self: Arc<Self>, link: Link) {
        let Some(mut input) = self.input.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let mut number = 0;
        let mut text = String::new();
        while !link.stop.is_cancelled() {
            text.clear();
            match input.read_line(&mut text).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    self.reject(number + 1, &err.to_string());
                    break;
                }
            }
            number += 1;
            if text.trim().is_empty() {
                continue;
            }
            match self.event(number, text.trim()) {
                Ok((event, finished)) => {
                    if link.sink.deliver(Box::new(event)).await.is_err() {
                        break;
                    }
                    let _ = finished.await;
                }
                Err(message) => self.reject(number, &message),
            }
        }
    }

    fn reject(&self, line: usize, message: &str) {
        self.had_bad_line.store(true, Ordering::SeqCst);
        self.output.line(&json!({ "type": "error", "line": line, "message": message }));
    }
}

fn headers_of(map: &serde_json::Map<String, Json>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in map {
        match value {
            Json::String(s) => crate::headers::append(&mut headers, name, s)?,
            Json::Array(items) => {
                for item in items {
                    let Json::String(s) = item else {
                        return Err(format!("header {name:?}: list items must be strings"));
                    };
                    crate::headers::append(&mut headers, name, s)?;
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

    fn placement(&self) -> Placement {
        Placement::Once
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        Box::pin(async move { Ok(Box::pin(self.forward(link)) as Forwarding) })
    }
}

/// Settles a replayed event by printing its outcome; `done` paces the replay.
struct ReplayLine {
    line: usize,
    output: ReplayOutput,
    done: Option<oneshot::Sender<()>>,
}

impl Settle for ReplayLine {
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            self.output.line(&outcome_line(self.line, event, outcome));
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        })
    }
}

fn outcome_line(line: usize, event: &Event, outcome: Outcome) -> Json {
    let mut out = json!({
        "type": "outcome",
        "line": line,
        "subject": event.subject.as_str(),
        "kind": event.kind.as_str(),
        "id": event.id.as_str(),
        "outcome": outcome.label(),
    });
    match outcome {
        Outcome::Ack { body, headers } => describe_body(&mut out, headers.as_ref(), &body),
        Outcome::Nak { delay } => {
            if let Some(delay) = delay {
                out["delay"] = json!(humantime::format_duration(delay).to_string());
            }
        }
        Outcome::Term { reason } => out["reason"] = json!(reason),
        Outcome::Error(failure) => {
            out["code"] = json!(failure.code);
            out["message"] = json!(failure.message);
        }
    }
    out
}

/// Handlers' publishes during a replay, printed as lines; requests have no one
/// to answer them.
pub struct ReplayTransport(pub ReplayOutput);

impl Transport for ReplayTransport {
    fn publish(
        &self,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let mut line = json!({ "type": "publish", "subject": subject.as_str() });
        describe_body(&mut line, headers.as_ref(), &data);
        self.0.line(&line);
        Box::pin(async { Ok(()) })
    }

    fn request(
        &self,
        _: String,
        _: Option<HeaderMap>,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async { Err(TransportError::Unavailable("nats.request", "replay runs without NATS")) })
    }
}

/// Adds `data` (text), `payload` (when the body is JSON) and `headers` to a line.
fn describe_body(line: &mut Json, headers: Option<&HeaderMap>, data: &[u8]) {
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
