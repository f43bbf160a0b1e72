//! The context of the Lua code running right now on this VM thread: its deadline,
//! its cancellation, and the event it serves (for logs and trace propagation).
//!
//! [`Scoped`] installs a context for the duration of each poll of a Lua call (and
//! while the call is dropped, which runs its pending `__close` handlers), arms the
//! [`watchdog`] with its deadline so a handler that never yields is interrupted,
//! and lets bridges know which event they act for, although many handler
//! coroutines interleave on one thread.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::event::EventId;
use crate::lua::watchdog;
use crate::telemetry::carrier;

/// Why the instruction hook stopped Lua code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupt {
    #[error("handler timed out")]
    Timeout,
    #[error("handler cancelled by shutdown")]
    Cancelled,
}

pub struct TaskContext {
    deadline: Cell<Option<Instant>>,
    cancel: Option<CancellationToken>,
    interrupted: Cell<Option<Interrupt>>,
    /// The Lua thread (coroutine) running this task's code, once it started.
    thread: Cell<*mut mlua::ffi::lua_State>,
    /// Whether the task's owner drops it as soon as it is interrupted and
    /// pending, so interrupted code may yield instead of raising.
    pub drop_when_interrupted: bool,
    /// Lua threads that already yielded for this task's interruption.
    yielded: RefCell<Vec<*mut mlua::ffi::lua_State>>,
    /// Whether the watchdog may suspend this task's code at the end of its time
    /// slice (handlers; see [`crate::worker::scheduler`]).
    pub preemptible: bool,
    /// Set when the watchdog suspended the task for its slice, until its next
    /// poll starts.
    preempted: Cell<bool>,
    pub kind: Option<async_nats::Subject>,
    pub id: Option<EventId>,
    /// The `traceparent` outgoing messages carry: the handler's span when spans
    /// are exported, else the incoming one unchanged.
    pub traceparent: Option<Rc<str>>,
    pub tracestate: Option<Rc<str>>,
    /// Whether `traceparent` names the handler's own span (spans are exported).
    pub own_span: bool,
}

impl TaskContext {
    pub fn new(deadline: Option<Instant>, cancel: Option<CancellationToken>) -> Self {
        TaskContext {
            deadline: Cell::new(deadline),
            cancel,
            interrupted: Cell::new(None),
            thread: Cell::new(std::ptr::null_mut()),
            drop_when_interrupted: false,
            yielded: RefCell::new(Vec::new()),
            preemptible: false,
            preempted: Cell::new(false),
            kind: None,
            id: None,
            traceparent: None,
            tracestate: None,
            own_span: false,
        }
    }

    /// The handler's span id, when spans are exported.
    pub fn span_id(&self) -> Option<&str> {
        self.traceparent.as_deref().filter(|_| self.own_span).and_then(crate::event::span_id_of)
    }

    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.deadline.set(deadline);
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get()
    }

    /// What stopped this task, if the hook or the caller did.
    pub fn interrupted(&self) -> Option<Interrupt> {
        self.interrupted.get()
    }

    pub fn mark(&self, interrupt: Interrupt) {
        self.interrupted.set(Some(interrupt));
    }

    /// Whether the task's code was suspended at the end of its time slice (it
    /// was computing, not waiting).
    pub fn preempted(&self) -> bool {
        self.preempted.get()
    }

    /// Records that the task's code was suspended at the end of its slice.
    pub fn mark_preempted(&self) {
        self.preempted.set(true);
    }

    /// [`TaskContext::preempted`], cleared.
    pub fn take_preempted(&self) -> bool {
        self.preempted.replace(false)
    }

    /// Whether the task's deadline passed by `now` or shutdown cancelled it.
    pub fn is_due(&self, now: Instant) -> bool {
        self.deadline.get().is_some_and(|d| now >= d) || self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// The context for closing this task's coroutine after it was dropped (timed
    /// out, cancelled, or its handler returned): the coroutine's pending
    /// `__close` handlers and the cancellation of its bridge calls run under a
    /// short limit of their own, not under the interruption that ended the task,
    /// which would cut the cancellation itself short.
    fn for_closing(&self) -> Rc<TaskContext> {
        Rc::new(TaskContext {
            deadline: Cell::new(Some(Instant::now() + CLOSE_LIMIT)),
            cancel: None,
            interrupted: Cell::new(None),
            thread: Cell::new(self.thread.get()),
            drop_when_interrupted: false,
            yielded: RefCell::new(Vec::new()),
            preemptible: false,
            preempted: Cell::new(false),
            kind: self.kind.clone(),
            id: self.id.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            own_span: self.own_span,
        })
    }

    /// Called by the hook: an interruption raises an error, again at every check
    /// while the code still runs (see [`crate::lua_api::interrupt`]).
    fn check(&self) -> HookAction {
        if let Some(interrupt) = self.interrupted.get() {
            return HookAction::Raise(interrupt);
        }
        let interrupt = if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            Interrupt::Cancelled
        } else if self.deadline.get().is_some_and(|d| Instant::now() >= d) {
            Interrupt::Timeout
        } else {
            return HookAction::Continue;
        };
        self.mark(interrupt);
        HookAction::Raise(interrupt)
    }
}

/// How long closing a dropped task's coroutine may run Lua code.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

thread_local! {
    static CURRENT: RefCell<Option<Rc<TaskContext>>> = const { RefCell::new(None) };
}

/// The context of the Lua code running now, if any.
pub fn current() -> Option<Rc<TaskContext>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Runs `inner`, which runs no Lua, with `context` current, so the messages it
/// sends carry the handler's trace context. Unlike [`Scoped`] it arms no
/// deadline and needs no closing context: settling an event does neither.
pub async fn with_current<F: Future>(context: Rc<TaskContext>, inner: F) -> F::Output {
    struct Previous(Option<Rc<TaskContext>>);
    impl Drop for Previous {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let mut inner = std::pin::pin!(inner);
    std::future::poll_fn(|cx| {
        let _previous = Previous(CURRENT.with(|c| c.replace(Some(context.clone()))));
        inner.as_mut().poll(cx)
    })
    .await
}

/// Sets `traceparent` (and `tracestate`) to the running handler's span, replacing
/// any spelling of them already there (a dead letter copies the incoming headers,
/// whose traceparent names the caller's span). Does nothing outside a traced
/// handler.
pub fn continue_trace(headers: &mut Option<async_nats::HeaderMap>) {
    let Some(current) = current() else { return };
    let Some(traceparent) = current.traceparent.as_deref().filter(|_| current.own_span) else {
        return;
    };
    let headers = headers.get_or_insert_with(async_nats::HeaderMap::new);
    carrier::set_trace_headers(headers, traceparent, current.tracestate.as_deref());
}

/// Records `state` as the Lua thread of the current task, so the watchdog can
/// interrupt it while it runs (see [`crate::lua_api::interrupt`]).
pub fn enter_thread(state: *mut mlua::ffi::lua_State) {
    CURRENT.with(|c| {
        if let Some(context) = c.borrow().as_ref()
            && context.thread.get() != state
        {
            context.thread.set(state);
            watchdog::enter(state);
        }
    });
}

/// How long before its task's deadline a bridge call gives up.
const BRIDGE_MARGIN: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs a bridge call of the current task so that it ends by itself a moment
/// before the task's deadline, or when shutdown cancels the task: its
/// connection, transaction or child process is released right then, whatever
/// happens to the handler's coroutine afterwards.
pub async fn within_task<F: Future>(call: F) -> Result<F::Output, Interrupt> {
    let Some(context) = current() else { return Ok(call.await) };
    let deadline = context.deadline().map(|d| d.checked_sub(BRIDGE_MARGIN).unwrap_or(d));
    let cancel = context.cancel.clone();
    let expired = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    let cancelled = async {
        match &cancel {
            Some(cancel) => cancel.cancelled().await,
            None => std::future::pending().await,
        }
    };
    // The call first: a wait that ended by the time the task is polled counts,
    // however late a busy VM polls it.
    tokio::select! {
        biased;
        output = call => Ok(output),
        _ = expired => Err(Interrupt::Timeout),
        _ = cancelled => Err(Interrupt::Cancelled),
    }
}

/// What the instruction hook should do with the running Lua code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    Continue,
    Raise(Interrupt),
}

/// Whether the interrupted Lua thread `state` should yield rather than raise: in
/// tasks whose owner drops them once interrupted (handlers), once per thread. A
/// yield suspends the code at once, however many `pcall`s it is nested in, and
/// dropping the task closes its coroutine in one pass; an error unwinds one
/// `pcall` at a time, each recovery costing time that grows with the stack.
pub fn yield_for_interrupt(state: *mut mlua::ffi::lua_State) -> bool {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(context) if context.drop_when_interrupted => {
            let mut yielded = context.yielded.borrow_mut();
            if yielded.contains(&state) {
                false
            } else {
                yielded.push(state);
                true
            }
        }
        _ => false,
    })
}

/// Called by the hook when the running turn's slice ended: true, and the task
/// marked preempted, when `state` is the coroutine of a handler that may be
/// suspended; the hook then yields it. Elsewhere (a coroutine the script
/// resumed, cleanup code) the code runs on until it is back in its handler.
pub fn preempt_current(state: *mut mlua::ffi::lua_State) -> bool {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(context) if context.preemptible && context.thread.get() == state => {
            context.mark_preempted();
            true
        }
        _ => false,
    })
}

/// Checks the running code's deadline and cancellation; the VM's instruction hook.
pub fn check_current() -> HookAction {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(context) => context.check(),
        None => HookAction::Continue,
    })
}

/// A future that runs with `context` as the current context while polled, and
/// while dropped before its Lua call returned, its deadline armed in the
/// watchdog.
pub struct Scoped<F> {
    context: Rc<TaskContext>,
    inner: ManuallyDrop<F>,
    /// The Lua call returned: its coroutine ended normally, with nothing left
    /// to close, so dropping it runs no Lua and needs no closing context.
    returned: bool,
}

impl<F: Future> Scoped<F> {
    pub fn new(context: Rc<TaskContext>, inner: F) -> Self {
        Scoped { context, inner: ManuallyDrop::new(inner), returned: false }
    }
}

impl<F> Scoped<F> {
    /// Makes `context` current and arms its deadline until the guard is dropped.
    fn enter(context: &Rc<TaskContext>) -> Restore {
        let previous = CURRENT.with(|c| c.replace(Some(context.clone())));
        let mark = watchdog::enter(context.thread.get());
        let kind = context.kind.as_ref().map(|k| k.as_str());
        let armed = watchdog::arm(context.deadline.get(), context.cancel.is_some(), kind);
        Restore { previous, mark, armed }
    }
}

impl<T, F: Future<Output = mlua::Result<T>>> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: never moved out of `self`; it is
        // dropped in place by `Drop`.
        let this = unsafe { self.get_unchecked_mut() };
        let _restore = Self::enter(&this.context);
        let polled = unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx);
        this.returned = matches!(polled, Poll::Ready(Ok(_)));
        polled
    }
}

impl<F> Drop for Scoped<F> {
    fn drop(&mut self) {
        if self.returned {
            // SAFETY: dropped exactly once, here, in place.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
            return;
        }
        // Dropping a Lua call that did not return closes its coroutine, which
        // runs pending `__close` handlers and drops the bridge calls it waits
        // in, under a limit.
        let closing = self.context.for_closing();
        let _restore = Self::enter(&closing);
        // SAFETY: dropped exactly once, here, in place.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
    }
}

struct Restore {
    previous: Option<Rc<TaskContext>>,
    mark: usize,
    armed: Option<watchdog::Armed>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        watchdog::disarm(self.armed.take());
        watchdog::leave(self.mark);
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}
