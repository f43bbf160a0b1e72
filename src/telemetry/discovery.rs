//! NATS service discovery: the worker answers `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` (plain, `.<name>` and `.<name>.<id>`) in the NATS micro v1 format,
//! so `nats micro ls|info|stats` list it. One instance per process; one endpoint
//! per declared source (subscription or consumer), with statistics summed over
//! the process's VMs. The replies are built from async-nats's own `service`
//! types, so the wire format is the one the NATS tools read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::service::{self, endpoint, error};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics;

const PING: &str = "io.nats.micro.v1.ping_response";
const INFO: &str = "io.nats.micro.v1.info_response";
const STATS: &str = "io.nats.micro.v1.stats_response";

/// One declared source as a NATS micro endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub subject: String,
    /// The queue group of a subscription, the durable name of a consumer; empty
    /// for a subscription without a group.
    pub queue_group: Arc<str>,
}

static ENDPOINTS: RwLock<Vec<Endpoint>> = RwLock::new(Vec::new());

/// Publishes the endpoint table for [`group_of`].
pub fn set_endpoints(endpoints: Vec<Endpoint>) {
    *ENDPOINTS.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = endpoints;
}

static PARTITIONS: RwLock<Vec<(String, String)>> = RwLock::new(Vec::new());

/// Lists the partitions this worker serves for the keyed consumer endpoint
/// `endpoint`, in its `$SRV.INFO` metadata (`"partitions": "0,3"`).
pub fn set_partitions(endpoint: &str, partitions: &[u32]) {
    let list = partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut all = PARTITIONS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    all.retain(|(name, _)| name != endpoint);
    all.push((endpoint.to_string(), list));
}

fn partitions_of(endpoint: &str) -> HashMap<String, String> {
    let all = PARTITIONS.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    all.iter().filter(|(name, _)| name == endpoint).map(|(_, list)| ("partitions".to_string(), list.clone())).collect()
}

/// The queue group of the source at `index`, for span attributes.
pub fn group_of(index: u32) -> Option<Arc<str>> {
    let endpoints = ENDPOINTS.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    endpoints.get(index as usize).map(|e| e.queue_group.clone()).filter(|group| !group.is_empty())
}

/// The discovery identity of this process.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    pub metadata: HashMap<String, String>,
    pub endpoints: Vec<Endpoint>,
    pub started: async_nats::datetime::DateTime,
}

impl Instance {
    pub fn new(name: &str, endpoints: Vec<Endpoint>, metadata: HashMap<String, String>) -> Self {
        Instance {
            name: name.to_string(),
            id: nuid::next().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            description: "agent-block Lua worker".to_string(),
            metadata,
            endpoints,
            started: async_nats::datetime::now(),
        }
    }

    fn ping(&self) -> service::PingResponse {
        service::PingResponse {
            kind: PING.to_string(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
        }
    }

    fn info(&self) -> service::Info {
        service::Info {
            kind: INFO.to_string(),
            name: self.name.clone(),
            id: self.id.clone(),
            description: self.description.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| endpoint::Info {
                    name: e.name.clone(),
                    subject: e.subject.clone(),
                    queue_group: e.queue_group.to_string(),
                    metadata: partitions_of(&e.name),
                })
                .collect(),
        }
    }

    fn stats(&self) -> service::Stats {
        let totals = metrics::global().endpoint_totals(self.endpoints.len());
        let endpoints = self
            .endpoints
            .iter()
            .zip(totals)
            .map(|(e, total)| endpoint::Stats {
                name: e.name.clone(),
                subject: e.subject.clone(),
                requests: total.requests as usize,
                errors: total.errors as usize,
                processing_time: total.processing_time,
                average_processing_time: average(total.processing_time, total.requests),
                last_error: total.last_error.map(|(code, status)| error::Error { code: code as usize, status }),
                data: None,
                queue_group: e.queue_group.to_string(),
            })
            .collect();
        service::Stats {
            kind: STATS.to_string(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            started: self.started,
            endpoints,
        }
    }

    /// The subjects this instance answers on.
    fn subjects(&self) -> Vec<String> {
        ["PING", "INFO", "STATS"]
            .iter()
            .flat_map(|verb| {
                [
                    format!("$SRV.{verb}"),
                    format!("$SRV.{verb}.{}", self.name),
                    format!("$SRV.{verb}.{}.{}", self.name, self.id),
                ]
            })
            .collect()
    }

    /// The reply to a request on `subject`.
    fn answer(&self, subject: &str) -> Option<Vec<u8>> {
        let verb = subject.strip_prefix("$SRV.")?.split('.').next()?;
        let body = match verb {
            "PING" => serde_json::to_vec(&self.ping()),
            "INFO" => serde_json::to_vec(&self.info()),
            "STATS" => serde_json::to_vec(&self.stats()),
            _ => return None,
        };
        body.ok()
    }
}

fn average(total: Duration, count: u64) -> Duration {
    if count == 0 { Duration::ZERO } else { Duration::from_nanos((total.as_nanos() / count as u128) as u64) }
}

/// Subscribes to the discovery subjects on `client` and answers them until
/// `stop` fires; returns once the server confirmed the subscriptions.
pub async fn serve(
    client: async_nats::Client,
    instance: Instance,
    stop: CancellationToken,
) -> Result<(), async_nats::Error> {
    let mut subscribers = Vec::new();
    for subject in instance.subjects() {
        subscribers.push(client.subscribe(subject).await?);
    }
    client.flush().await?;
    let instance = Arc::new(instance);
    tokio::spawn(async move {
        let mut requests = futures::stream::select_all(subscribers);
        loop {
            let request = tokio::select! {
                _ = stop.cancelled() => break,
                request = requests.next() => request,
            };
            let Some(request) = request else { break };
            let (Some(reply), Some(body)) = (request.reply, instance.answer(&request.subject)) else { continue };
            if let Err(err) = client.publish(reply, body.into()).await {
                tracing::debug!(error = %err, "discovery reply not sent");
            }
        }
        for mut subscriber in requests.into_iter() {
            let _ = subscriber.unsubscribe().await;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_each_verb_in_the_micro_format() {
        let endpoint = Endpoint { name: "orders".into(), subject: "orders.>".into(), queue_group: "pool".into() };
        let instance = Instance::new("pool", vec![endpoint], HashMap::new());
        assert_eq!(instance.subjects().len(), 9);
        let ping: service::PingResponse = serde_json::from_slice(&instance.answer("$SRV.PING").unwrap()).unwrap();
        assert_eq!((ping.kind.as_str(), ping.name.as_str()), (PING, "pool"));
        let info: service::Info = serde_json::from_slice(&instance.answer("$SRV.INFO.pool").unwrap()).unwrap();
        assert_eq!(info.endpoints[0].queue_group, "pool");
        let stats: serde_json::Value =
            serde_json::from_slice(&instance.answer(&format!("$SRV.STATS.pool.{}", instance.id)).unwrap()).unwrap();
        assert_eq!(stats["type"], STATS);
        assert_eq!(stats["endpoints"][0]["subject"], "orders.>");
        assert!(instance.answer("$SRV.SCHEMA").is_none());
    }
}
