//! The Lua VM pool: `--workers` OS threads, each with one Lua VM that loaded the
//! script and runs up to `--concurrency` handler coroutines at once.
//!
//! Invariants: a VM is touched only by its own thread; no lock is held across an
//! `.await`; every handler call runs under a deadline and a cancel-on-drop guard
//! (dropping the call future abandons its coroutine); shutdown waits for in-flight
//! handlers at most until the grace deadline, then cancels them.

pub mod context;
pub mod sandbox;
pub mod state;
mod thread;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::LuaConfig;
use crate::source::core::SubscriptionSpec;
use crate::transport::Transport;

pub use thread::Vm;

/// How to build the pool.
#[derive(Clone)]
pub struct PoolSpec {
    pub script: PathBuf,
    pub workers: usize,
    pub concurrency: usize,
    pub bus_capacity: usize,
    pub handler_timeout: Duration,
    pub lua: LuaConfig,
    pub transport: Transport,
}

/// What the script declared, read from the first VM after init.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    pub subscriptions: Vec<SubscriptionSpec>,
    pub kinds: Vec<String>,
    pub has_on_any: bool,
}

/// The script failed to load or its top level raised; the message names file:line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ScriptError(pub String);

pub struct VmPool {
    cancel: CancellationToken,
    finished: Vec<oneshot::Receiver<()>>,
}

/// Time the pool may take past the grace deadline to answer cancelled events and
/// run the scripts' cleanup code.
const AFTER_GRACE: Duration = Duration::from_millis(800);

impl VmPool {
    /// Starts the VMs and waits until every one finished init.
    pub async fn start(spec: PoolSpec) -> Result<(VmPool, Bus, InitReport), ScriptError> {
        let cancel = CancellationToken::new();
        let mut lanes = Vec::with_capacity(spec.workers);
        let mut inits = Vec::with_capacity(spec.workers);
        let mut finished = Vec::with_capacity(spec.workers);
        for worker_id in 0..spec.workers {
            let (lane, events) = mpsc::channel(spec.bus_capacity);
            let (init_tx, init_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let setup = thread::Setup { worker_id, spec: spec.clone(), cancel: cancel.clone() };
            std::thread::Builder::new()
                .name(format!("lua-vm-{worker_id}"))
                .spawn(move || thread::run(setup, events, init_tx, done_tx))
                .map_err(|err| ScriptError(format!("cannot start a Lua VM thread: {err}")))?;
            lanes.push(lane);
            inits.push(init_rx);
            finished.push(done_rx);
        }
        let mut first_report = None;
        for init in inits {
            let report = init.await.map_err(|_| ScriptError("a Lua VM thread stopped during init".to_string()))??;
            first_report.get_or_insert(report);
        }
        let report = first_report.expect("the pool has at least one VM");
        Ok((VmPool { cancel, finished }, Bus::new(lanes), report))
    }

    /// Waits for the VMs to finish their queues once every bus handle is dropped;
    /// at `grace_deadline` cancels what still runs (requests get 503).
    pub async fn shutdown(self, grace_deadline: Instant) {
        let all_finished = futures::future::join_all(self.finished);
        tokio::pin!(all_finished);
        tokio::select! {
            _ = &mut all_finished => return,
            _ = tokio::time::sleep_until(grace_deadline) => {}
        }
        tracing::warn!("grace period over; cancelling the handlers still running");
        self.cancel.cancel();
        if tokio::time::timeout(AFTER_GRACE, all_finished).await.is_err() {
            tracing::error!("a Lua VM did not stop after cancellation; exiting anyway");
        }
    }
}
