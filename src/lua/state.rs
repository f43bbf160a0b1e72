//! Per-VM state the Lua API reads and writes: registered handlers, declared
//! sources, the script's serve phase, and where messages go.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::source_spec::SourceSpec;
use crate::transport::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The script's top level is running.
    Init,
    /// Init ended (`bus.serve()` or the top level returned); handlers run.
    Serving,
}

/// Handlers by kind. Looked up once per event, so hashed with foldhash (seeded
/// per process, several times cheaper than the standard SipHash on short keys).
#[derive(Default)]
pub struct Handlers {
    by_kind: foldhash::HashMap<String, Function>,
    any: Option<Function>,
}

impl Handlers {
    /// Registers `handler` for `kind`; returns whether it replaced one.
    pub fn insert(&mut self, kind: String, handler: Function) -> bool {
        self.by_kind.insert(kind, handler).is_some()
    }

    /// Sets the fallback; returns whether it replaced one.
    pub fn set_any(&mut self, handler: Function) -> bool {
        self.any.replace(handler).is_some()
    }

    /// The handler for `kind`, else the `on_any` fallback.
    pub fn lookup(&self, kind: &str) -> Option<Function> {
        self.by_kind.get(kind).or(self.any.as_ref()).cloned()
    }

    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.by_kind.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    pub fn has_any(&self) -> bool {
        self.any.is_some()
    }
}

pub struct VmState {
    pub worker_id: usize,
    pub workers: usize,
    pub script: PathBuf,
    pub script_dir: PathBuf,
    pub transport: Arc<dyn Transport>,
    pub handlers: RefCell<Handlers>,
    /// Declared by `bus.subscribe` and `bus.consume`.
    pub sources: RefCell<Vec<SourceSpec>>,
    pub phase: Cell<Phase>,
    /// Fired when init ends at `bus.serve()`.
    pub init_done: RefCell<Option<oneshot::Sender<()>>>,
    /// Cancelled when shutdown lets `bus.serve()` return.
    pub release: CancellationToken,
}

impl VmState {
    /// The state of the VM `lua` belongs to.
    pub fn of(lua: &Lua) -> Rc<VmState> {
        lua.app_data_ref::<Rc<VmState>>()
            .map(|state| state.clone())
            .expect("every VM gets its state before any Lua code runs")
    }

    /// Logs only from the first VM, so each warning appears once per process.
    pub fn is_first(&self) -> bool {
        self.worker_id == 0
    }
}
