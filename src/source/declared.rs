//! The sources a script declared, built: each kind of source is made here, so
//! the contract in [`super`] needs to know none of them.

use std::sync::Arc;

use super::{Source, SourceSpec, core, jetstream};

/// Builds the sources a script declared: subscriptions as they are, consumers
/// after making them ready on the server (`client` is the process's connection).
pub async fn build(
    specs: &[SourceSpec],
    client: &async_nats::Client,
    worker_name: &str,
) -> Result<Vec<Arc<dyn Source>>, jetstream::SetupError> {
    let mut sources: Vec<Arc<dyn Source>> = Vec::with_capacity(specs.len());
    for spec in specs {
        match spec {
            SourceSpec::Subscribe(spec) => sources.push(Arc::new(core::CoreSource::new(spec.clone(), worker_name))),
            SourceSpec::Consume(spec) if spec.keyed.is_some() => {
                sources.push(Arc::new(jetstream::KeyedSource::prepare(client, spec.clone()).await?))
            }
            SourceSpec::Consume(spec) => {
                sources.push(Arc::new(jetstream::JetStreamSource::prepare(client, spec.clone()).await?))
            }
        }
    }
    Ok(sources)
}
