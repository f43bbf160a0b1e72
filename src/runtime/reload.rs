//! Hot reload (`run` on SIGHUP, `dev` on a file change) without losing or
//! double-answering a message.
//!
//! A reload loads the script into a fresh VM pool and opens its sources while
//! the old pool keeps serving. Once the new sources are confirmed by the server,
//! the old pool's sources are drained and its in-flight handlers finish (within
//! `--grace`) on the old VMs, settling their own messages. During the overlap:
//! - queue-group subscriptions of both pools are in the same group, so NATS gives
//!   each message to exactly one of them;
//! - JetStream consumers are shared the same way: a message is pulled by one pool
//!   and acked by the VM that ran it;
//! - subscriptions with `queue = false` would get every message twice, so the new
//!   pool subscribes to them only after the old pool has stopped: a message
//!   published on such a subject during the hand-over is delivered to neither
//!   (they are at-most-once anyway; use a queue group or JetStream for work that
//!   must not be lost).
//!
//! A script that fails to load (or whose consumers cannot be set up) leaves the
//! old pool serving; the error is logged with `file:line`.

use std::sync::Arc;

use futures::future::LocalBoxFuture;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::RunError;
use super::pool::pool_spec;
use crate::health::Health;
use crate::settings::WorkerConfig;
use crate::source::{self, Forwarding, Link, OpenError, Placement, Source};
use crate::worker::{InitReport, VmPool};

/// The pool serving now, and the token that stops its sources.
pub struct Generation {
    pub pool: VmPool,
    pub stop: CancellationToken,
}

/// Starts new generations and retires old ones.
pub struct Reloader {
    retiring: Vec<JoinHandle<()>>,
    reloads: u64,
}

impl Default for Reloader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reloader {
    pub fn new() -> Self {
        Reloader { retiring: Vec::new(), reloads: 0 }
    }

    /// Replaces `current` with a pool running the script as it is now on disk;
    /// on failure logs why and returns `current` unchanged.
    pub async fn reload(
        &mut self,
        current: Generation,
        config: &WorkerConfig,
        client: &async_nats::Client,
        health: &Health,
    ) -> Generation {
        tracing::info!(script = %config.script.display(), "reloading the script");
        let handoff = CancellationToken::new();
        let (next, report) = match start(config, client, &handoff).await {
            Ok(started) => started,
            Err(err) => {
                tracing::error!(error = %err.report(), "reload failed; the running script keeps serving");
                return current;
            }
        };
        let mut clients = vec![client.clone()];
        clients.extend(next.pool.clients().iter().cloned());
        health.set_clients(clients);
        self.reloads += 1;
        current.stop.cancel();
        let grace = config.grace;
        self.retiring.retain(|task| !task.is_finished());
        self.retiring.push(tokio::spawn(async move {
            current.pool.shutdown(Instant::now() + grace).await;
            handoff.cancel();
        }));
        tracing::info!(reloads = self.reloads, kinds = ?report.kinds, "script reloaded");
        next
    }

    /// Waits (until `deadline`, then a moment more for cancelled handlers) for
    /// retired pools to finish.
    pub async fn finish(self, deadline: Instant) {
        let all = futures::future::join_all(self.retiring);
        let _ = tokio::time::timeout_at(deadline + std::time::Duration::from_secs(1), all).await;
    }
}

/// Loads the script into a new pool and opens its sources, holding back the
/// subscriptions without a queue group until `handoff` fires.
async fn start(
    config: &WorkerConfig,
    client: &async_nats::Client,
    handoff: &CancellationToken,
) -> Result<(Generation, InitReport), RunError> {
    let (mut pool, report) = VmPool::start(pool_spec(config)).await?;
    let stop = CancellationToken::new();
    let sources = match source::declared::build(&report.sources, client, &config.name).await {
        Ok(sources) => sources,
        Err(err) => {
            pool.shutdown(Instant::now()).await;
            return Err(err.into());
        }
    };
    let sources: Vec<Arc<dyn Source>> = sources
        .into_iter()
        .map(|source| match source.placement() {
            Placement::Once => Arc::new(AfterHandoff { inner: source, handoff: handoff.clone() }) as Arc<dyn Source>,
            Placement::EveryVm => source,
        })
        .collect();
    if let Err(err) = pool.open_sources(&sources, &stop).await {
        stop.cancel();
        pool.shutdown(Instant::now()).await;
        return Err(err.into());
    }
    Ok((Generation { pool, stop }, report))
}

/// A source opened only once `handoff` fires (the old pool has stopped).
struct AfterHandoff {
    inner: Arc<dyn Source>,
    handoff: CancellationToken,
}

impl Source for AfterHandoff {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn placement(&self) -> Placement {
        self.inner.placement()
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        Box::pin(async move {
            Ok(Box::pin(async move {
                tokio::select! {
                    _ = self.handoff.cancelled() => {}
                    _ = link.stop.cancelled() => return,
                }
                match self.inner.clone().open(link).await {
                    Ok(forward) => forward.await,
                    Err(message) => {
                        tracing::error!(source = %self.inner.describe(), error = %message, "source not opened after reload")
                    }
                }
            }) as Forwarding)
        })
    }
}
