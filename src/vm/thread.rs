//! One VM thread: loads the script, runs init until `bus.serve()`, then serves
//! events from its bus lane until the lane closes or shutdown cancels it, then lets
//! `bus.serve()` return so the script's cleanup code runs.

use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::prelude::{LuaGcGenParams as GcGenParams, LuaGcMode as GcMode};
use mlua::{Function, HookTriggers, Lua, VmState as HookState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::LocalSet;
use tokio_util::sync::CancellationToken;

use crate::ack;
use crate::bridge::Bridges;
use crate::connect;
use crate::dispatch;
use crate::event::Event;
use crate::lua_api::{self, event::EventTables};
use crate::outcome::{Failure, Outcome};
use crate::source::core::CoreSource;
use crate::transport::Transport;
use crate::vm::context::{self, HookAction, Scoped, TaskContext};
use crate::vm::permits::Permits;
use crate::vm::state::{Handlers, Phase, VmState};
use crate::vm::{InitReport, PoolSpec, ScriptError, SourcePlan, StartError, sandbox};

/// Instructions between deadline checks: small enough to stop a loop within
/// microseconds, large enough to cost nothing measurable.
const HOOK_INTERVAL: u32 = 4096;
/// Time the script's code after `bus.serve()` gets at shutdown.
const CLEANUP_LIMIT: Duration = Duration::from_millis(500);
/// How long past its deadline a stuck top level may take to be noticed.
const INIT_SLACK: Duration = Duration::from_millis(100);
/// Events taken from the lane per wakeup.
const BATCH: usize = 64;

pub(super) struct Setup {
    pub worker_id: usize,
    pub spec: PoolSpec,
    pub cancel: CancellationToken,
    /// This VM's own lane, for the sources it runs itself.
    pub lane: mpsc::Sender<Event>,
    pub plan: oneshot::Receiver<SourcePlan>,
}

/// A loaded VM, shared by the handler tasks of its thread.
pub struct Vm {
    pub lua: Lua,
    pub state: Rc<VmState>,
    pub events: EventTables,
    /// `pcall(handler, ev)`: errors come back as values, so tables keep their fields.
    pub runner: Function,
    pub handler_timeout: Duration,
    pub cancel: CancellationToken,
    /// Slots for handlers in flight (`--concurrency`).
    permits: Rc<Permits>,
    concurrency: usize,
}

pub(super) fn run(
    setup: Setup,
    events: mpsc::Receiver<Event>,
    init: oneshot::Sender<Result<InitReport, StartError>>,
    done: oneshot::Sender<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = init.send(Err(StartError::Runtime(format!("cannot start a VM runtime: {err}"))));
            return;
        }
    };
    LocalSet::new().block_on(&runtime, lifecycle(setup, events, init));
    let _ = done.send(());
}

async fn lifecycle(setup: Setup, events: mpsc::Receiver<Event>, init: oneshot::Sender<Result<InitReport, StartError>>) {
    let Setup { worker_id, mut spec, cancel, lane, plan } = setup;
    let client = match &spec.connection {
        Some(connection) => match connect::connect(connection).await {
            Ok(client) => {
                spec.transport = Transport::Nats(client.clone());
                Some(client)
            }
            Err(err) => {
                let _ = init.send(Err(err.into()));
                return;
            }
        },
        None => None,
    };
    let bridges = match spec.bridges.clone() {
        Some(config) => match Bridges::open(config, spec.lua.unsafe_lua).await {
            Ok(bridges) => bridges,
            Err(message) => {
                let _ = init.send(Err(StartError::Bridge(message)));
                return;
            }
        },
        None => Bridges::offline(spec.lua.unsafe_lua),
    };
    let (vm, main_chunk) = match Vm::load(worker_id, &spec, cancel) {
        Ok(loaded) => loaded,
        Err(err) => {
            let _ = init.send(Err(err.into()));
            return;
        }
    };
    vm.lua.set_app_data(Rc::new(bridges));
    let vm = Rc::new(vm);
    let (serving_tx, serving) = oneshot::channel();
    *vm.state.init_done.borrow_mut() = Some(serving_tx);
    let init_deadline = Instant::now() + vm.handler_timeout;
    let main_context = Rc::new(TaskContext::new(Some(init_deadline), None));
    let mut main = Some(tokio::task::spawn_local(Scoped::new(main_context.clone(), main_chunk.call_async::<()>(()))));
    let init_timeout = || {
        ScriptError(format!(
            "{}: the script's top level ran longer than the handler timeout ({})",
            vm.state.script.display(),
            humantime::format_duration(vm.handler_timeout)
        ))
    };
    let outcome = tokio::select! {
        _ = serving => Ok(()),
        _ = tokio::time::sleep_until((init_deadline + INIT_SLACK).into()) => Err(init_timeout()),
        finished = main.as_mut().expect("main task is set") => {
            main = None;
            match finished {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) if main_context.interrupted().is_some() => Err(init_timeout()),
                Ok(Err(err)) => Err(ScriptError(script_error_message(&err))),
                Err(_) => Err(ScriptError("the script's top level panicked".to_string())),
            }
        }
    };
    main_context.set_deadline(None);
    vm.state.phase.set(Phase::Serving);
    let report = outcome.map(|()| InitReport { client: client.clone(), ..vm.report() });
    let failed = report.is_err();
    if init.send(report.map_err(StartError::from)).is_err() || failed {
        return;
    }
    tokio::task::spawn_local(run_local_sources(plan, lane, client.clone(), vm.clone()));

    vm.serve_events(events).await;
    if let Some(client) = &client {
        connect::flush_briefly(client).await;
    }

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

/// Subscribes as the plan says on this VM's own connection and starts handlers
/// for their messages right here. Each source holds a handle of the VM's lane, so
/// the VM keeps serving until its sources are drained. Without a plan (the pool
/// did not ask) the handle is just dropped.
async fn run_local_sources(
    plan: oneshot::Receiver<SourcePlan>,
    lane: mpsc::Sender<Event>,
    client: Option<async_nats::Client>,
    vm: Rc<Vm>,
) {
    let Ok(plan) = plan.await else { return };
    let Some(client) = client else {
        let _ = plan.subscribed.send(Ok(()));
        return;
    };
    let sources = match CoreSource::subscribe_all(&client, &plan.subscriptions, &plan.worker_name).await {
        Ok(sources) => sources,
        Err(message) => {
            let _ = plan.subscribed.send(Err(message));
            return;
        }
    };
    let _ = plan.subscribed.send(Ok(()));
    for source in sources {
        let (vm, keep_lane_open, stop) = (vm.clone(), lane.clone(), plan.stop.clone());
        tokio::task::spawn_local(async move {
            source.forward(stop, |event| vm.start(event)).await;
            drop(keep_lane_open);
        });
    }
}

impl Vm {
    fn load(worker_id: usize, spec: &PoolSpec, cancel: CancellationToken) -> Result<(Vm, Function), ScriptError> {
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
            subscriptions: Default::default(),
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
            let runner: Function = lua
                .load("local pcall = ...; return function(handler, ev) return pcall(handler, ev) end")
                .set_name("=handler")
                .call(lua_api::interrupt::raw_pcall(&lua)?)?;
            lua.set_global_hook(HookTriggers::new().every_nth_instruction(HOOK_INTERVAL), |_, _| {
                match context::check_current() {
                    HookAction::Continue => Ok(HookState::Continue),
                    HookAction::Raise(interrupt) => Err(mlua::Error::external(interrupt)),
                }
            })?;
            Ok((EventTables::new(&lua)?, runner))
        };
        let (events, runner) = setup_lua().map_err(|err| ScriptError(format!("cannot set up the Lua API: {err}")))?;
        let main_chunk = sandbox::load_file(&lua, &spec.script, !spec.lua.unsafe_lua)
            .map_err(|err| ScriptError(script_error_message(&err)))?;
        let vm = Vm {
            lua,
            state,
            events,
            runner,
            handler_timeout: spec.handler_timeout,
            cancel,
            permits: Permits::new(spec.concurrency),
            concurrency: spec.concurrency,
        };
        Ok((vm, main_chunk))
    }

    fn report(&self) -> InitReport {
        let handlers: std::cell::Ref<'_, Handlers> = self.state.handlers.borrow();
        InitReport {
            subscriptions: self.state.subscriptions.borrow().clone(),
            kinds: handlers.kinds(),
            has_on_any: handlers.has_any(),
            client: None,
        }
    }

    /// Runs handlers for the lane's events until it closes (then waits for the ones
    /// in flight) or shutdown cancels (then answers what is left with 503).
    async fn serve_events(self: &Rc<Self>, mut events: mpsc::Receiver<Event>) {
        let mut batch = Vec::with_capacity(BATCH);
        'receive: loop {
            let received = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break 'receive,
                received = events.recv_many(&mut batch, BATCH) => received,
            };
            if received == 0 {
                break;
            }
            let mut pending = batch.drain(..);
            while let Some(event) = pending.next() {
                if let Err(event) = self.start(event).await {
                    let rest: Vec<Event> = std::iter::once(event).chain(pending).collect();
                    self.answer_cancelled(rest).await;
                    break 'receive;
                }
            }
        }
        events.close();
        let mut rest = Vec::new();
        while let Ok(event) = events.try_recv() {
            rest.push(event);
        }
        self.answer_cancelled(rest).await;
        self.permits.all_free(self.concurrency).await;
    }

    /// Starts a handler task for `event` once a slot is free; gives the event back
    /// when shutdown cancelled the VM.
    pub async fn start(self: &Rc<Self>, event: Event) -> Result<(), Event> {
        let permit = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Err(event),
            permit = self.permits.acquire() => permit,
        };
        let vm = self.clone();
        // Boxed: tokio copies a task's whole future when its stage changes, and an
        // event's future is a few kilobytes.
        tokio::task::spawn_local(Box::pin(async move {
            dispatch::process(&vm, event).await;
            drop(permit);
        }));
        Ok(())
    }

    async fn answer_cancelled(&self, events: Vec<Event>) {
        for event in events {
            ack::settle(&self.state.transport, event, Outcome::Error(Failure::cancelled())).await;
        }
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
                .find(|line| !line.starts_with('[') && line.contains(": in "))
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
