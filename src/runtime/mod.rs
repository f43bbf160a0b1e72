//! A serving worker from start to clean exit: probes, NATS connection, the VM pool,
//! sources placed on the VMs, and the shutdown sequence (stop taking messages, let in-flight handlers
//! finish within grace, cancel the rest, flush).

mod error;
mod pool;
pub mod reload;

pub use error::RunError;
pub use pool::pool_spec;

use reload::{Generation, Reloader};

use std::future::Future;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connect;
use crate::health::Health;
use crate::probes;
use crate::settings::WorkerConfig;
use crate::source;
use crate::telemetry::{discovery, metrics, trace};
use crate::worker::VmPool;

/// Serves `config.script` until `shutdown` resolves, reloading it (see
/// [`reload`]) each time `reloads` delivers.
pub async fn run_worker_with_reloads(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), RunError> {
    let started = Instant::now();
    let tracing_export = trace::init(&config.name).map_err(|err| RunError::Settings(err.to_string()))?;
    if tracing_export.is_some() {
        tracing::info!("exporting event spans over OTLP");
    }
    let health = Health::default();
    if let Some(addr) = config.metrics_addr {
        let bound = probes::serve(addr, health.clone()).await.map_err(|cause| RunError::Listen { addr, cause })?;
        tracing::info!(addr = %bound, "probes at /healthz and /readyz");
    }
    tokio::pin!(shutdown);
    // Connecting and opening databases may wait for unreachable servers: a signal still stops it.
    let (client, mut serving) = tokio::select! {
        serving = start_serving(&config, &health, started) => serving?,
        _ = &mut shutdown => return Ok(()),
    };
    let mut reloader = Reloader::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reloads.recv() => serving = reloader.reload(serving, &config, &client, &health).await,
        }
    }
    shut_down(&config, &health, &client, serving, reloader).await;
    if let Some(export) = tracing_export {
        export.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Connects, starts the VM pool, opens the script's sources and announces the
/// worker (service discovery, readiness).
async fn start_serving(
    config: &WorkerConfig,
    health: &Health,
    started: Instant,
) -> Result<(async_nats::Client, Generation), RunError> {
    let client = connect::connect(&config.connection).await?;
    health.add_client(client.clone());
    metrics::global().watch_client(client.clone());
    let (mut pool, report) = VmPool::start(pool_spec(config)).await?;
    for vm_client in pool.clients() {
        health.add_client(vm_client.clone());
        metrics::global().watch_client(vm_client.clone());
    }
    metrics::global().watch_intake(pool.stats().clone());
    if report.sources.is_empty() {
        tracing::warn!(
            "the script declares no sources; call bus.subscribe(subject) or bus.consume{{...}} at its top level"
        );
    }
    let sources = source::declared::build(&report.sources, &client, &config.name).await?;
    // In declaration order, the order of `Event::source_index`.
    let endpoints: Vec<_> = report.sources.iter().map(|spec| spec.endpoint(&config.name)).collect();
    discovery::set_endpoints(endpoints.clone());
    let stop = CancellationToken::new();
    pool.open_sources(&sources, &stop).await?;
    for source in &sources {
        tracing::info!(source = %source.describe(), placement = ?source.placement(), "source running");
    }
    let instance = discovery::Instance::new(&config.name, endpoints, instance_metadata(config));
    discovery::serve(client.clone(), instance, stop.clone()).await.map_err(RunError::Discovery)?;
    tokio::spawn(crate::memory::release_runtime_pages(stop.clone()));
    health.set_sources_running(true);
    tracing::info!(
        name = %config.name,
        workers = config.workers,
        kinds = ?report.kinds,
        ready_in_ms = started.elapsed().as_millis() as u64,
        "worker ready"
    );
    Ok((client, Generation { pool, stop }))
}

/// Stops taking messages, lets in-flight handlers finish within `--grace`,
/// cancels the rest, and flushes the last replies.
async fn shut_down(
    config: &WorkerConfig,
    health: &Health,
    client: &async_nats::Client,
    serving: Generation,
    reloader: Reloader,
) {
    let grace_deadline = Instant::now() + config.grace;
    health.set_shutting_down();
    tracing::info!(grace = %humantime::format_duration(config.grace), "shutting down: draining sources");
    serving.stop.cancel();
    let stats = serving.pool.stats().clone();
    serving.pool.shutdown(grace_deadline).await;
    reloader.finish(grace_deadline).await;
    let (rejected, dropped) = (stats.rejected.load(Ordering::Relaxed), stats.dropped.load(Ordering::Relaxed));
    if rejected + dropped > 0 {
        tracing::warn!(rejected, dropped, "intake was full at times: requests answered 503, messages dropped (totals)");
    }
    connect::flush_briefly(client).await;
}

/// What `nats micro info` shows about this worker besides its endpoints.
fn instance_metadata(config: &WorkerConfig) -> std::collections::HashMap<String, String> {
    let script = config.script.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    [("script".to_string(), script), ("workers".to_string(), config.workers.to_string())].into()
}
