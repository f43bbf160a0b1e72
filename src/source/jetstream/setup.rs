//! Making a consumer ready: the stream (created when asked), the consumer
//! (created, or updated only where the update moves no message), and a check that
//! the server kept what was sent.

use std::sync::Arc;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer};

use super::{JetStreamSource, consumer_config};
use crate::source_spec::ConsumerSpec;
use crate::telemetry::metrics;

/// Why a consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The declaration does not fit what the server has; the message says how to fix it.
    #[error("{0}")]
    Config(String),
    /// The server refused to create what was declared.
    #[error("{context}")]
    Refused {
        context: String,
        #[source]
        cause: async_nats::Error,
    },
    /// The server could not be asked.
    #[error("{context}")]
    Lookup {
        context: String,
        #[source]
        cause: async_nats::Error,
    },
}

impl SetupError {
    /// Whether the script's declaration must change (as opposed to the server
    /// or the connection failing).
    pub fn is_declaration(&self) -> bool {
        matches!(self, SetupError::Config(_) | SetupError::Refused { .. })
    }
}

impl JetStreamSource {
    /// Creates the stream (when asked) and the consumer if missing, updates the
    /// consumer when its settings changed and the update moves no message, and
    /// checks that the server kept them.
    pub async fn prepare(client: &async_nats::Client, spec: ConsumerSpec) -> Result<Self, SetupError> {
        let js = jetstream::new(client.clone());
        let stream = match js.get_stream(&spec.stream).await {
            Ok(stream) => stream,
            Err(err) if is_stream_not_found(&err) => match &spec.create_stream {
                Some(subjects) => js
                    .create_stream(jetstream::stream::Config {
                        name: spec.stream.clone(),
                        subjects: subjects.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|cause| SetupError::Refused {
                        context: format!("cannot create stream {:?}", spec.stream),
                        cause: cause.into(),
                    })?,
                None => {
                    return Err(SetupError::Config(format!(
                        "stream {:?} does not exist; create it, or let bus.consume create it with \
                         create_stream = {{ subjects = {{ ... }} }}",
                        spec.stream
                    )));
                }
            },
            Err(cause) => {
                return Err(SetupError::Lookup {
                    context: format!("cannot look up stream {:?}", spec.stream),
                    cause: cause.into(),
                });
            }
        };
        let applied = ensure_consumer(client, &stream, &spec).await?;
        check_applied(&spec, &consumer_config::declared(&spec), &applied)?;
        let dead_letter_stored = match &spec.dead_letter {
            Some(subject) => js.stream_by_subject(subject.as_str()).await.is_ok(),
            None => false,
        };
        let metrics = metrics::global().consumer(&spec.stream, &spec.consumer);
        Ok(JetStreamSource {
            ack_wait: applied.ack_wait,
            stream: spec.stream.as_str().into(),
            consumer: spec.consumer.as_str().into(),
            spec: Arc::new(spec),
            dead_letter_stored,
            metrics,
            partition: None,
        })
    }
}

pub(super) fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Creates the consumer when it does not exist; otherwise updates it to the
/// declaration if that moves no message (see [`consumer_config`]) and only when
/// something changed. Returns the configuration the server reports.
async fn ensure_consumer(
    client: &async_nats::Client,
    stream: &jetstream::stream::Stream,
    spec: &ConsumerSpec,
) -> Result<consumer::Config, SetupError> {
    let name = format!("{}/{}", spec.stream, spec.consumer);
    let cannot_send = |cause: jetstream::stream::ConsumerError| SetupError::Refused {
        context: format!("cannot create or update consumer {name}"),
        cause: cause.into(),
    };
    let existing = match stream.consumer_info(&spec.consumer).await {
        Ok(info) => info.config,
        Err(err) if matches!(err.kind(), ConsumerInfoErrorKind::NotFound) => {
            let created = stream.create_consumer(consumer_config::declared(spec)).await.map_err(cannot_send)?;
            return Ok(created.cached_info().config.clone());
        }
        Err(cause) => {
            return Err(SetupError::Lookup { context: format!("cannot look up consumer {name}"), cause: cause.into() });
        }
    };
    let version = client.server_info().version;
    let server = consumer_config::Server {
        version: &version,
        keeps_position_on_filter_change: client.is_server_compatible(2, 10, 0),
    };
    let update = consumer_config::plan_update(spec, &existing, server)
        .map_err(|refused| SetupError::Config(consumer_config::refusal_message(spec, &refused)))?;
    if update.changes.is_empty() {
        return Ok(existing);
    }
    let updated = stream.create_consumer(update.config).await.map_err(cannot_send)?;
    for change in &update.changes {
        tracing::info!(
            stream = %spec.stream, consumer = %spec.consumer, field = change.field,
            old = %change.existing, new = %change.declared, "consumer setting updated"
        );
    }
    Ok(updated.cached_info().config.clone())
}

/// Servers ignore fields they do not know (2.9 drops newer ones), so what was
/// sent is compared with what the server reports.
fn check_applied(spec: &ConsumerSpec, wanted: &consumer::Config, applied: &consumer::Config) -> Result<(), SetupError> {
    let mut differences = Vec::new();
    if applied.filter_subject != wanted.filter_subject {
        differences.push(format!("subject {:?} (server has {:?})", wanted.filter_subject, applied.filter_subject));
    }
    if applied.ack_wait != wanted.ack_wait {
        differences.push(format!("ack_wait {:?} (server has {:?})", wanted.ack_wait, applied.ack_wait));
    }
    if spec.max_deliver.is_some() && applied.max_deliver != wanted.max_deliver {
        differences.push(format!("max_deliver {} (server has {})", wanted.max_deliver, applied.max_deliver));
    }
    if spec.max_ack_pending.is_some() && applied.max_ack_pending != wanted.max_ack_pending {
        differences
            .push(format!("max_ack_pending {} (server has {})", wanted.max_ack_pending, applied.max_ack_pending));
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(SetupError::Config(format!(
        "consumer {}/{}: the server did not apply {}; an existing consumer may not allow this change \
         (delete it with `nats consumer rm {} {}`) or the server is too old for the setting",
        spec.stream,
        spec.consumer,
        differences.join(", "),
        spec.stream,
        spec.consumer
    )))
}
