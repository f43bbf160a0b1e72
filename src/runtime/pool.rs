//! The VM pool a serving worker runs, from its settings.

use std::sync::Arc;

use crate::settings::WorkerConfig;
use crate::transport::Offline;
use crate::worker::{BridgeSpec, PoolSpec};

/// The VM pool a serving worker runs: each VM with its own NATS connection.
pub fn pool_spec(config: &WorkerConfig) -> PoolSpec {
    PoolSpec {
        script: config.script.clone(),
        workers: config.workers,
        concurrency: config.concurrency,
        bus_capacity: config.bus_capacity,
        handler_timeout: config.handler_timeout,
        time_slice: config.time_slice,
        lua: config.lua.clone(),
        transport: Arc::new(Offline),
        connection: Some(config.connection.clone()),
        bridges: BridgeSpec::Online(config.bridges.clone()),
    }
}
