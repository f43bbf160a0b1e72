//! One VM thread: loads the script, runs init until `bus.serve()`, opens the
//! sources the pool places here, then serves events from its intake until the
//! sources are drained and the queue closes, or shutdown cancels it; then lets
//! `bus.serve()` return so the script's cleanup code runs.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::prelude::{LuaGcGenParams as GcGenParams, LuaGcMode as GcMode};
use mlua::{Function, Lua};
use tokio::sync::{mpsc, oneshot};
use tokio::task::LocalSet;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridges;
use crate::connect;
use crate::event::Event;
use crate::intake::{Intake, IntakeStats, Sink, Slot, Slots};
use crate::lua::context::{Scoped, TaskContext};
use crate::lua::state::{Handlers, Phase, VmState};
use crate::lua::watchdog;
use crate::lua_api::{self, event::EventTables, json};
use crate::outcome::{Failure, Outcome};
use crate::settle;
use crate::source::{Link, Placement};
use crate::telemetry::metrics::VmRecorder;
use crate::transport::NatsTransport;
use crate::worker::dispatch;
use crate::worker::scheduler::Scheduler;
use crate::worker::{BridgeSpec, InitReport, PoolSpec, ScriptError, SourcePlan, StartError, sandbox};

/// Time the script's code after `bus.serve()` gets at shutdown.
const CLEANUP_LIMIT: Duration = Duration::from_millis(500);
/// How long past its deadline a stuck top level may take to be noticed.
const INIT_SLACK: Duration = Duration::from_millis(100);

pub(super) struct Setup {
    pub worker_id: usize,
    pub spec: PoolSpec,
    pub cancel: CancellationToken,
    /// This VM's own queue, for the sources it runs itself.
    pub lane: mpsc::Sender<Box<Event>>,
    pub stats: Arc<IntakeStats>,
    pub plan: oneshot::Receiver<SourcePlan>,
}

/// A loaded VM, shared by the handler tasks of its thread.
pub struct Vm {
    pub lua: Lua,
    pub state: Rc<VmState>,
    pub events: EventTables,
    /// Encodes handlers' results.
    pub encoding: json::Encoding,
    /// `runner(handler, extra)`: builds the event table and calls `pcall(handler, ev)`
    /// ([`crate::lua_api::interrupt::runner`]).
    pub runner: Function,
    pub handler_timeout: Duration,
    pub cancel: CancellationToken,
    /// This VM's share of the process's metrics.
    pub metrics: VmRecorder,
    /// Slots for handlers in flight (`--concurrency`).
    slots: Rc<Slots>,
    /// Settlements in flight after their handler ended (at most `--concurrency`).
    pub settling: Rc<Slots>,
    concurrency: usize,
    /// The order in which the handlers run.
    pub scheduler: Scheduler,
}

pub(super) fn run(
    setup: Setup,
    events: mpsc::Receiver<Box<Event>>,
    init: oneshot::Sender<Result<InitReport, StartError>>,
    done: oneshot::Sender<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(cause) => {
            let _ = init.send(Err(StartError::Thread { what: "a VM runtime", cause }));
            return;
        }
    };
    LocalSet::new().block_on(&runtime, lifecycle(setup, events, init));
    let _ = done.send(());
}

/// The VM's life: start (connection, bridges, script, top level), serve, clean up.
async fn lifecycle(
    setup: Setup,
    events: mpsc::Receiver<Box<Event>>,
    init: oneshot::Sender<Result<InitReport, StartError>>,
) {
    let Setup { worker_id, mut spec, cancel, lane, stats, plan } = setup;
    let started = match start(worker_id, &mut spec, cancel, &lane).await {
        Ok(started) => started,
        Err(err) => {
            let _ = init.send(Err(err));
            return;
        }
    };
    let Started { vm, client, main_context, main } = started;
    let mut main = Some(main);
    let outcome = run_top_level(&vm, &main_context, &mut main).await;
    main_context.set_deadline(None);
    vm.state.phase.set(Phase::Serving);
    let report = outcome.map(|()| InitReport { client: client.clone(), ..vm.report() });
    let failed = report.is_err();
    if init.send(report.map_err(StartError::from)).is_err() || failed {
        return;
    }
    let runner = {
        let vm = vm.clone();
        tokio::task::spawn_local(async move { vm.scheduler.run(&vm.metrics).await })
    };
    let intake = Rc::new(Intake::new(lane, vm.slots.clone(), vm.starter(), stats));
    tokio::task::spawn_local(open_sources(plan, intake, client.clone(), vm.state.worker_id));
    let idle = {
        let vm = Rc::downgrade(&vm);
        move || vm.upgrade().is_none_or(|vm| vm.slots.free() >= vm.concurrency)
    };
    tokio::task::spawn_local(crate::memory::release_after_bursts(vm.lua.weak(), idle));

    vm.serve_queue(events).await;
    if let Some(client) = &client {
        connect::flush_briefly(client).await;
    }
    clean_up(&vm, &main_context, main).await;
    vm.scheduler.close();
    let _ = runner.await;
}

/// A VM whose script is loaded and whose top level runs as `main`.
struct Started {
    vm: Rc<Vm>,
    client: Option<async_nats::Client>,
    main_context: Rc<TaskContext>,
    main: tokio::task::JoinHandle<mlua::Result<()>>,
}

/// Connects the VM (when it serves), opens its bridges, loads the script and
/// starts its top level, within the handler timeout.
async fn start(
    worker_id: usize,
    spec: &mut PoolSpec,
    cancel: CancellationToken,
    lane: &mpsc::Sender<Box<Event>>,
) -> Result<Started, StartError> {
    let client = match &spec.connection {
        Some(connection) => {
            let client = connect::connect(connection).await?;
            spec.transport = Arc::new(NatsTransport(client.clone()));
            Some(client)
        }
        None => None,
    };
    let bridges = match &spec.bridges {
        BridgeSpec::Online(config) => {
            Bridges::open(config.clone(), spec.lua.unsafe_lua).await.map_err(StartError::Bridge)?
        }
        BridgeSpec::Offline => Bridges::offline(spec.lua.unsafe_lua),
        BridgeSpec::OfflineWithHttp(exchange) => Bridges::offline_with_http(spec.lua.unsafe_lua, exchange()),
    };
    let metrics = VmRecorder::new(lane.downgrade());
    let (vm, main_chunk) = Vm::load(worker_id, spec, cancel, metrics)?;
    vm.lua.set_app_data(Rc::new(bridges));
    let vm = Rc::new(vm);
    let main_context = Rc::new(TaskContext::new(Some(Instant::now() + vm.handler_timeout), None));
    let main = tokio::task::spawn_local(Scoped::new(main_context.clone(), main_chunk.call_async::<()>(())));
    Ok(Started { vm, client, main_context, main })
}

/// Waits until the top level calls `bus.serve()` or ends; an error, a panic or
/// running past the handler timeout fails the start. `main` is taken when the
/// top level ended.
async fn run_top_level(
    vm: &Vm,
    main_context: &TaskContext,
    main: &mut Option<tokio::task::JoinHandle<mlua::Result<()>>>,
) -> Result<(), ScriptError> {
    let (serving_tx, serving) = oneshot::channel();
    *vm.state.init_done.borrow_mut() = Some(serving_tx);
    let init_deadline = main_context.deadline().unwrap_or_else(Instant::now);
    let init_timeout = || {
        ScriptError(format!(
            "{}: the script's top level ran longer than the handler timeout ({})",
            vm.state.script.display(),
            humantime::format_duration(vm.handler_timeout)
        ))
    };
    tokio::select! {
        _ = serving => Ok(()),
        _ = tokio::time::sleep_until((init_deadline + INIT_SLACK).into()) => Err(init_timeout()),
        finished = main.as_mut().expect("main task is set") => {
            *main = None;
            match finished {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) if main_context.interrupted().is_some() => Err(init_timeout()),
                Ok(Err(err)) => Err(ScriptError(script_error_message(&err))),
                Err(_) => Err(ScriptError("the script's top level panicked".to_string())),
            }
        }
    }
}

/// Lets `bus.serve()` return, so the script's code after it runs, within
/// [`CLEANUP_LIMIT`].
async fn clean_up(vm: &Vm, main_context: &TaskContext, main: Option<tokio::task::JoinHandle<mlua::Result<()>>>) {
    main_context.set_deadline(Some(Instant::now() + CLEANUP_LIMIT));
    vm.state.release.cancel();
    if let Some(main) = main {
        match tokio::time::timeout(CLEANUP_LIMIT, main).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %script_error_message(&err), "script cleanup failed"),
            Ok(Err(_)) => tracing::warn!("script cleanup panicked"),
            Err(_) => tracing::warn!("script cleanup did not finish within {CLEANUP_LIMIT:?}"),
        }
    }
}

/// Opens the sources the plan places on this VM and, once the server has
/// confirmed their subscriptions, forwards their events. Each source holds this
/// VM's intake, so the VM keeps serving until its sources are
/// drained. Without a plan (the pool did not ask) the intake is just dropped.
async fn open_sources(
    plan: oneshot::Receiver<SourcePlan>,
    intake: Rc<Intake>,
    client: Option<async_nats::Client>,
    worker_id: usize,
) {
    let Ok(plan) = plan.await else { return };
    let mut forwarding = Vec::new();
    for (index, source) in plan.sources.iter().enumerate() {
        let sink = match source.placement() {
            Placement::EveryVm => Sink::Local(intake.clone()),
            Placement::Once if worker_id == 0 => Sink::Shared(plan.shared.clone()),
            Placement::Once => continue,
        };
        let link = Link { client: client.clone(), sink, stop: plan.stop.clone(), index: index as u32 };
        match source.clone().open(link).await {
            Ok(forward) => forwarding.push(forward),
            Err(err) => {
                let _ = plan.opened.send(Err(err));
                return;
            }
        }
    }
    if let Some(client) = &client
        && let Err(err) = connect::round_trip(client).await
    {
        let _ = plan.opened.send(Err(err.into()));
        return;
    }
    let _ = plan.opened.send(Ok(()));
    for forward in forwarding {
        tokio::task::spawn_local(forward);
    }
}

impl Vm {
    fn load(
        worker_id: usize,
        spec: &PoolSpec,
        cancel: CancellationToken,
        metrics: VmRecorder,
    ) -> Result<(Vm, Function), ScriptError> {
        let script_dir = spec
            .script
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        let lua =
            sandbox::new_lua(&spec.lua, &script_dir, spec.concurrency).map_err(|err| ScriptError(err.to_string()))?;
        let state = Rc::new(VmState {
            worker_id,
            workers: spec.workers,
            script: spec.script.clone(),
            script_dir: script_dir.clone(),
            transport: spec.transport.clone(),
            handlers: Default::default(),
            sources: Default::default(),
            phase: std::cell::Cell::new(Phase::Init),
            init_done: Default::default(),
            release: CancellationToken::new(),
        });
        lua.set_app_data(state.clone());
        // Handlers allocate many short-lived tables; the generational collector
        // reclaims them for less work than the incremental one.
        lua.gc_set_mode(GcMode::Generational(GcGenParams::default()));
        let setup_lua = || -> mlua::Result<(EventTables, Function)> {
            lua_api::install(&lua)?;
            if let Some(prelude) = &spec.lua.prelude {
                (prelude.0)(&lua)?;
            }
            let events = EventTables::new(&lua)?;
            let runner = lua_api::interrupt::runner(&lua, events.builder())?;
            Ok((events, runner))
        };
        let (events, runner) = setup_lua().map_err(|err| ScriptError(format!("cannot set up the Lua API: {err}")))?;
        // Deadlines are enforced by the watchdog, which hooks Lua only once one passed.
        watchdog::register(&lua, cancel.clone(), spec.time_slice, crate::lua::hook::interrupt_hook)
            .map_err(|err| ScriptError(format!("cannot start the Lua watchdog: {err}")))?;
        let main_chunk = sandbox::load_file(&lua, &spec.script, !spec.lua.unsafe_lua)
            .and_then(|chunk| lua_api::interrupt::entered(&lua, chunk))
            .map_err(|err| ScriptError(script_error_message(&err)))?;
        let vm = Vm {
            encoding: json::Encoding::new(&lua),
            lua,
            state,
            events,
            runner,
            handler_timeout: spec.handler_timeout,
            cancel,
            metrics,
            slots: Slots::new(spec.concurrency),
            settling: Slots::new(spec.concurrency),
            concurrency: spec.concurrency,
            scheduler: Scheduler::default(),
        };
        Ok((vm, main_chunk))
    }

    fn report(&self) -> InitReport {
        let handlers: std::cell::Ref<'_, Handlers> = self.state.handlers.borrow();
        InitReport {
            sources: self.state.sources.borrow().clone(),
            kinds: handlers.kinds(),
            has_on_any: handlers.has_any(),
            client: None,
        }
    }

    /// Runs handlers for the queued events until the queue closes (then waits
    /// for the ones in flight) or shutdown cancels (then answers what is left as
    /// cancelled).
    async fn serve_queue(self: &Rc<Self>, mut events: mpsc::Receiver<Box<Event>>) {
        'receive: loop {
            // A slot first, then an event: no event leaves the queue to wait for a
            // slot, so the queue alone holds what waits (at most `--bus-capacity`).
            let slot = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break 'receive,
                slot = self.slots.acquire() => slot,
            };
            let standby = slot.stand_by();
            let event = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break 'receive,
                event = events.recv() => event,
            };
            let Some(event) = event else { break };
            self.start(event, standby.take());
            while let Some(slot) = self.slots.try_acquire() {
                match events.try_recv() {
                    Ok(event) => self.start(event, slot),
                    Err(_) => break,
                }
            }
        }
        events.close();
        while let Ok(event) = events.try_recv() {
            settle::settle(event, Outcome::Error(Failure::cancelled())).await;
        }
        self.slots.all_free(self.concurrency).await;
        self.settling.all_free(self.concurrency).await;
    }

    /// Runs the handler for `event` in its own task, holding `slot` until the
    /// handler ends. The task joins the line (see [`crate::worker::scheduler`]).
    fn start(self: &Rc<Self>, event: Box<Event>, slot: Slot) {
        let vm = self.clone();
        // Without tokio's cooperative budget: the scheduler decides when the
        // runtime gets the thread, and one budget would be shared by all handlers.
        let task = tokio::task::coop::unconstrained(async move { dispatch::process(&vm, event, slot).await });
        self.scheduler.spawn(Box::pin(task));
    }

    fn starter(self: &Rc<Self>) -> crate::intake::Starter {
        let vm = self.clone();
        Box::new(move |event, slot| vm.start(event, slot))
    }
}

/// A script error as `file:line: message`, locating errors raised by Rust
/// callbacks through the traceback.
pub fn script_error_message(err: &mlua::Error) -> String {
    match err {
        mlua::Error::CallbackError { traceback, cause } => {
            let message = script_error_message(cause);
            let location = traceback
                .lines()
                .map(str::trim)
                .find(|line| !line.starts_with('[') && !line.starts_with("__mlua") && line.contains(": in "))
                .and_then(|line| line.split(": in ").next());
            match location {
                Some(location) if !message.starts_with(location) => format!("{location}: {message}"),
                _ => message,
            }
        }
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(message) => message.clone(),
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", script_error_message(cause)),
        other => other.to_string(),
    }
}
