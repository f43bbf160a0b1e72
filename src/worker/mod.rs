//! The Lua VM pool: `--workers` OS threads, each with one Lua VM that loaded the
//! script and runs up to `--concurrency` handler coroutines at once, in the order
//! its [`scheduler`] picks (handlers whose wait is over first; none computes for
//! longer than a time slice while others are ready).
//!
//! Invariants: a VM is touched only by its own thread; no lock is held across an
//! `.await`; every handler call runs under a deadline and a cancel-on-drop guard
//! (dropping the call future abandons its coroutine); shutdown waits for in-flight
//! handlers at most until the grace deadline, then cancels them.

mod dispatch;
pub mod sandbox;
pub mod scheduler;
mod thread;

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridge::http_exchange::HttpExchange;
use crate::connect::ConnectError;
use crate::intake::{IntakeStats, SharedIntake};
use crate::settings::{BridgeConfig, ConnectionConfig, LuaConfig};
use crate::source::{OpenError, Source, SourceSpec};
use crate::transport::Transport;

pub use thread::{Vm, script_error_message};

/// How to build the pool.
#[derive(Clone)]
pub struct PoolSpec {
    pub script: PathBuf,
    pub workers: usize,
    pub concurrency: usize,
    pub bus_capacity: usize,
    pub handler_timeout: Duration,
    /// How long a handler runs before the VM checks whether others are ready
    /// (see [`scheduler`]); `None` = never.
    pub time_slice: Option<Duration>,
    pub lua: LuaConfig,
    /// Where VMs publish when they have no connection of their own.
    pub transport: Arc<dyn Transport>,
    /// Set for serving workers: each VM opens its own NATS connection, so its
    /// subscriptions, handlers and replies stay on its thread.
    pub connection: Option<ConnectionConfig>,
    pub bridges: BridgeSpec,
}

/// What the VMs' bridges reach.
#[derive(Clone)]
pub enum BridgeSpec {
    /// The outside world, with these settings (`run`, `dev`).
    Online(BridgeConfig),
    /// Nothing: bridges raise an error naming themselves (`check`, `replay`).
    Offline,
    /// Nothing but HTTP, whose requests each VM hands to the exchange this makes
    /// (`agent-block test`: the test's routes).
    OfflineWithHttp(Arc<dyn Fn() -> Rc<dyn HttpExchange> + Send + Sync>),
}

/// What the script declared, read from the first VM after init.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    pub sources: Vec<SourceSpec>,
    pub kinds: Vec<String>,
    pub has_on_any: bool,
    /// The VM's own NATS connection, if it has one.
    pub client: Option<async_nats::Client>,
}

/// Why the pool did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The operating system refused a thread or its runtime.
    #[error("cannot start {what}")]
    Thread {
        what: &'static str,
        #[source]
        cause: std::io::Error,
    },
    #[error("a Lua VM thread stopped during init")]
    VmStopped,
    /// A database could not be opened.
    #[error("{0}")]
    Bridge(String),
}

/// The sources a VM opens on its thread: those placed on every VM, and on the
/// first VM also those that run once per process.
pub struct SourcePlan {
    pub sources: Vec<Arc<dyn Source>>,
    pub shared: SharedIntake,
    pub stop: CancellationToken,
    pub opened: oneshot::Sender<Result<(), OpenError>>,
}

/// The script failed to load or its top level raised; the message names file:line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ScriptError(pub String);

pub struct VmPool {
    cancel: CancellationToken,
    finished: Vec<oneshot::Receiver<()>>,
    plans: Vec<oneshot::Sender<SourcePlan>>,
    clients: Vec<async_nats::Client>,
    shared: SharedIntake,
    stats: Arc<IntakeStats>,
}

/// Time the pool may take past the grace deadline to answer cancelled events and
/// run the scripts' cleanup code.
const AFTER_GRACE: Duration = Duration::from_millis(800);

impl VmPool {
    /// Starts the VMs and waits until every one finished init.
    pub async fn start(spec: PoolSpec) -> Result<(VmPool, InitReport), StartError> {
        let cancel = CancellationToken::new();
        let stats = Arc::new(IntakeStats::default());
        let mut lanes = Vec::with_capacity(spec.workers);
        let mut inits = Vec::with_capacity(spec.workers);
        let mut finished = Vec::with_capacity(spec.workers);
        let mut plans = Vec::with_capacity(spec.workers);
        for worker_id in 0..spec.workers {
            let (lane, events) = mpsc::channel(spec.bus_capacity);
            let (init_tx, init_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let (plan_tx, plan_rx) = oneshot::channel();
            let setup = thread::Setup {
                worker_id,
                spec: spec.clone(),
                cancel: cancel.clone(),
                lane: lane.clone(),
                stats: stats.clone(),
                plan: plan_rx,
            };
            std::thread::Builder::new()
                .name(format!("lua-vm-{worker_id}"))
                .spawn(move || thread::run(setup, events, init_tx, done_tx))
                .map_err(|cause| StartError::Thread { what: "a Lua VM thread", cause })?;
            lanes.push(lane);
            inits.push(init_rx);
            finished.push(done_rx);
            plans.push(plan_tx);
        }
        let mut first_report: Option<InitReport> = None;
        let mut clients = Vec::new();
        for init in inits {
            let report = init.await.map_err(|_| StartError::VmStopped)??;
            clients.extend(report.client.clone());
            first_report.get_or_insert(report);
        }
        let report = first_report.expect("the pool has at least one VM");
        let shared = SharedIntake::new(lanes, stats.clone());
        Ok((VmPool { cancel, finished, plans, clients, shared, stats }, report))
    }

    /// The VMs' own NATS connections.
    pub fn clients(&self) -> &[async_nats::Client] {
        &self.clients
    }

    /// Events the intake refused, over all VMs.
    pub fn stats(&self) -> &Arc<IntakeStats> {
        &self.stats
    }

    /// Opens `sources` where their placement says; returns once every VM has
    /// opened its share and the server confirmed them.
    pub async fn open_sources(
        &mut self,
        sources: &[Arc<dyn Source>],
        stop: &CancellationToken,
    ) -> Result<(), OpenError> {
        let mut confirmations = Vec::new();
        for plan in self.plans.drain(..) {
            let (opened, confirmed) = oneshot::channel();
            let plan_sent = plan.send(SourcePlan {
                sources: sources.to_vec(),
                shared: self.shared.clone(),
                stop: stop.clone(),
                opened,
            });
            if plan_sent.is_err() {
                return Err(OpenError::VmStopped);
            }
            confirmations.push(confirmed);
        }
        for confirmed in confirmations {
            confirmed.await.map_err(|_| OpenError::VmStopped)??;
        }
        Ok(())
    }

    /// Waits for the VMs to finish their queues once their sources are drained;
    /// at `grace_deadline` cancels what still runs (requests get 503, JetStream
    /// messages are nak'ed).
    pub async fn shutdown(self, grace_deadline: Instant) {
        drop(self.plans);
        drop(self.shared);
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
