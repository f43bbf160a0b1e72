//! The context of the Lua code running right now on this VM thread: its deadline,
//! its cancellation, and the event it serves (for logs and trace propagation).
//!
//! [`Scoped`] installs a context for the duration of each poll of a Lua call, so the
//! instruction hook can stop a handler that never yields, and bridges know which
//! event they act for, although many handler coroutines interleave on one thread.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::event::EventId;

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
    pub kind: Option<async_nats::Subject>,
    pub id: Option<EventId>,
    /// The `traceparent` outgoing messages carry: the handler's span when spans
    /// are exported, else the incoming one unchanged.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The handler's span, when spans are exported.
    pub span_id: Option<String>,
}

impl TaskContext {
    pub fn new(deadline: Option<Instant>, cancel: Option<CancellationToken>) -> Self {
        TaskContext {
            deadline: Cell::new(deadline),
            cancel,
            interrupted: Cell::new(None),
            kind: None,
            id: None,
            traceparent: None,
            tracestate: None,
            span_id: None,
        }
    }

    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.deadline.set(deadline);
    }

    /// What stopped this task, if the hook or the caller did.
    pub fn interrupted(&self) -> Option<Interrupt> {
        self.interrupted.get()
    }

    pub fn mark(&self, interrupt: Interrupt) {
        self.interrupted.set(Some(interrupt));
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

thread_local! {
    static CURRENT: RefCell<Option<Rc<TaskContext>>> = const { RefCell::new(None) };
}

/// The context of the Lua code running now, if any.
pub fn current() -> Option<Rc<TaskContext>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// What the instruction hook should do with the running Lua code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    Continue,
    Raise(Interrupt),
}

/// Checks the running code's deadline and cancellation; the VM's instruction hook.
pub fn check_current() -> HookAction {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(context) => context.check(),
        None => HookAction::Continue,
    })
}

/// A future that runs with `context` as the current context while polled.
pub struct Scoped<F> {
    context: Rc<TaskContext>,
    inner: F,
}

impl<F: Future> Scoped<F> {
    pub fn new(context: Rc<TaskContext>, inner: F) -> Self {
        Scoped { context, inner }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: never moved out of `self`, and
        // `Scoped` has no Drop impl or Unpin impl that could move it.
        let this = unsafe { self.get_unchecked_mut() };
        let previous = CURRENT.with(|c| c.replace(Some(this.context.clone())));
        let _restore = Restore(previous);
        unsafe { Pin::new_unchecked(&mut this.inner) }.poll(cx)
    }
}

struct Restore(Option<Rc<TaskContext>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}
