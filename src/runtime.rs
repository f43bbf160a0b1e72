//! A serving worker from start to clean exit: probes, NATS connection, the VM pool,
//! sources, and the shutdown sequence (stop taking messages, let in-flight handlers
//! finish within grace, cancel the rest, flush).

use std::future::Future;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::connect::{self, ConnectError};
use crate::health::Health;
use crate::http;
use crate::source::Source;
use crate::source::core::CoreSource;
use crate::source::core::Queue;
use crate::transport::Transport;
use crate::vm::{PoolSpec, ScriptError, StartError, VmPool};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Settings(String),
    #[error("script error: {0}")]
    Script(#[from] ScriptError),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Runtime(String),
}

impl From<StartError> for RunError {
    fn from(err: StartError) -> Self {
        match err {
            StartError::Script(err) => RunError::Script(err),
            StartError::Connect(err) => RunError::Connect(err),
            StartError::Runtime(message) | StartError::Bridge(message) => RunError::Runtime(message),
        }
    }
}

impl RunError {
    /// 2 for usage, settings and script errors; 1 for failures at run time.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Settings(_) | RunError::Script(_) | RunError::Connect(ConnectError::Settings(_)) => 2,
            RunError::Connect(ConnectError::TimedOut { .. }) | RunError::Runtime(_) => 1,
        }
    }
}

/// Serves `config.script` until `shutdown` resolves.
pub async fn run_worker(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let started = Instant::now();
    let health = Health::default();
    if let Some(addr) = config.metrics_addr {
        let bound = http::serve(addr, health.clone())
            .await
            .map_err(|err| RunError::Runtime(format!("cannot listen on {addr} (--metrics-addr): {err}")))?;
        tracing::info!(addr = %bound, "probes at /healthz and /readyz");
    }
    tokio::pin!(shutdown);
    let client = tokio::select! {
        client = connect::connect(&config.connection) => client?,
        _ = &mut shutdown => return Ok(()),
    };
    health.add_client(client.clone());

    // Opening databases may wait for an unreachable server: a signal still stops it.
    let starting = VmPool::start(PoolSpec {
        script: config.script.clone(),
        workers: config.workers,
        concurrency: config.concurrency,
        bus_capacity: config.bus_capacity,
        handler_timeout: config.handler_timeout,
        lua: config.lua.clone(),
        transport: Transport::Nats(client.clone()),
        connection: Some(config.connection.clone()),
        bridges: Some(config.bridges.clone()),
    });
    let (mut pool, bus, report) = tokio::select! {
        started = starting => started?,
        _ = &mut shutdown => return Ok(()),
    };
    for vm_client in pool.clients() {
        health.add_client(vm_client.clone());
    }
    if report.subscriptions.is_empty() {
        tracing::warn!("the script subscribes to nothing; call bus.subscribe(subject) at its top level");
    }
    // Queue-group subscriptions are made by every VM on its own connection: NATS
    // spreads their messages over all VMs and each is handled where it arrives.
    // The others must reach the process once, so they feed the shared bus.
    let (per_vm, shared): (Vec<_>, Vec<_>) =
        report.subscriptions.iter().cloned().partition(|spec| spec.queue != Queue::None);
    let stop = CancellationToken::new();
    pool.start_local_sources(&per_vm, &config.name, &stop).await.map_err(RunError::Runtime)?;
    for spec in &per_vm {
        tracing::info!(source = %spec.describe(&config.name), vms = config.workers, "subscribed on every VM");
    }
    let sources = CoreSource::subscribe_all(&client, &shared, &config.name).await.map_err(RunError::Runtime)?;

    let mut running = JoinSet::new();
    for source in sources.into_iter().map(|s| Box::new(s) as Box<dyn Source>) {
        tracing::info!(source = %source.describe(), "subscribed");
        running.spawn(source.run(bus.clone(), stop.clone()));
    }
    drop(bus);
    health.set_sources_running(true);
    tracing::info!(
        name = %config.name,
        workers = config.workers,
        kinds = ?report.kinds,
        ready_in_ms = started.elapsed().as_millis() as u64,
        "worker ready"
    );

    shutdown.await;
    let grace_deadline = Instant::now() + config.grace;
    health.set_shutting_down();
    tracing::info!(grace = %humantime::format_duration(config.grace), "shutting down: draining subscriptions");
    stop.cancel();
    let drained = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout_at(grace_deadline, drained).await.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
    pool.shutdown(grace_deadline).await;
    connect::flush_briefly(&client).await;
    tracing::info!("stopped");
    Ok(())
}
