//! Running one event through its Lua handler: the one place where an event's span
//! starts and ends and its metrics are recorded. Looks up the handler, builds the
//! event table, calls the handler under its deadline with shutdown cancellation,
//! and turns what happened into an [`Outcome`] that [`crate::settle`] settles.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use mlua::{Table, Value};
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::intake::Slot;
use crate::lua::context::{self, Interrupt, Scoped, TaskContext};
use crate::lua_api::bus::Directive;
use crate::lua_api::event::{PayloadError, PendingEvent};
use crate::outcome::{Failure, FailureCause, Outcome};
use crate::settle;
use crate::telemetry::discovery;
use crate::telemetry::trace::{self, EventSpan};
use crate::worker::Vm;

/// Runs `event` on `vm` in the handler `slot` and settles its outcome, inside
/// the event's span. The settling runs with the handler's context current, so
/// replies and dead letters carry the handler's span as their parent. The slot
/// is freed once the handler is done, before the settling (a confirmed
/// JetStream ack takes a round trip), so the VM takes new work meanwhile; a
/// separate budget bounds the settlements in flight.
pub async fn process(vm: &Rc<Vm>, event: Box<Event>, slot: Slot) {
    let mut span = trace::start(&event, || consumer_group(&event));
    let context = Rc::new(task_context(vm, &event, span.as_ref()));
    vm.scheduler.attach(&context);
    vm.metrics.started();
    let started = Instant::now();
    let outcome = {
        let mut run = pin!(run(vm, &event, started, &context, span.as_ref()));
        // Only a handler that waits needs its delivery kept alive (in-progress
        // acks); most finish in their first poll, without a timer.
        let mut keep_alive = None;
        let mut waited = false;
        poll_fn(|cx| {
            if let Poll::Ready(outcome) = run.as_mut().poll(cx) {
                return Poll::Ready(outcome);
            }
            if !waited {
                waited = true;
                keep_alive = event.delivery.as_ref().and_then(|d| d.while_running());
            }
            if let Some(alive) = keep_alive.as_mut()
                && alive.as_mut().poll(cx).is_ready()
            {
                keep_alive = None;
            }
            Poll::Pending
        })
        .await
    };
    vm.metrics.finished(&event, &outcome, started.elapsed());
    let settling = vm.settling.acquire().await;
    drop(slot);
    match span.as_mut() {
        Some(span) => {
            span.record(&outcome);
            context::with_current(context, settle::settle(event, outcome)).await;
        }
        None => settle::settle(event, outcome).await,
    }
    drop(settling);
    if let Some(span) = span {
        span.end();
    }
}

/// The queue group or durable consumer that received `event`.
fn consumer_group(event: &Event) -> Option<Arc<str>> {
    match &event.stream {
        Some(stream) => Some(stream.consumer.clone()),
        None => event.source_index.and_then(discovery::group_of),
    }
}

/// The handler's context; [`run`] arms its deadline.
fn task_context(vm: &Vm, event: &Event, span: Option<&EventSpan>) -> TaskContext {
    let mut context = TaskContext::new(None, Some(vm.cancel.clone()));
    context.drop_when_interrupted = true;
    context.preemptible = true;
    context.kind = Some(event.kind.clone());
    context.id = Some(event.id.clone());
    match span {
        Some(span) => {
            context.traceparent = Some(span.traceparent.clone());
            context.tracestate = span.tracestate.clone();
            context.own_span = true;
        }
        None => context.traceparent = event.traceparent().map(Rc::from),
    }
    context
}

/// Calls the handler for `event` under a deadline counted from `started`, and
/// classifies the result.
async fn run(vm: &Vm, event: &Event, started: Instant, context: &Rc<TaskContext>, span: Option<&EventSpan>) -> Outcome {
    let Some(handler) = vm.state.handlers.borrow().lookup(&event.kind) else {
        return Outcome::Error(Failure::no_handler(&event.kind));
    };
    let pending = PendingEvent::new(event, span.map(|span| &*span.traceparent));
    let extra = match vm.events.extra(&vm.lua, &pending) {
        Ok(extra) => extra,
        Err(err) => return internal(format!("cannot build the event table: {err}")),
    };
    let limit = event.timeout.unwrap_or(vm.handler_timeout);
    let deadline = started + limit;
    context.set_deadline(Some(deadline));
    let mut call = pin!(Scoped::new(context.clone(), vm.runner.call_async::<(bool, Value)>((handler, extra))));
    // The coroutine builds the event table in its first resume, so the event is
    // armed for exactly that poll.
    let mut first_poll = true;
    let call = poll_fn(|cx| {
        let _armed = std::mem::take(&mut first_poll).then(|| vm.events.arm(&pending));
        call.as_mut().poll(cx)
    });
    let call = pin!(call);
    let Some(ended) = unless_cancelled(&vm.cancel, until_deadline(call, context, deadline)).await else {
        return Outcome::Error(Failure::cancelled());
    };
    match (context.interrupted(), ended) {
        (_, Ended::Late) | (Some(Interrupt::Timeout), _) => Outcome::Error(Failure::timeout(limit)),
        (Some(Interrupt::Cancelled), _) => Outcome::Error(Failure::cancelled()),
        (None, Ended::Interrupted) => internal("the handler stopped without an interruption".to_string()),
        (None, Ended::Returned(Ok((true, value)))) => outcome_of(vm, value),
        (None, Ended::Returned(Ok((false, error)))) => Outcome::Error(failure_of(error)),
        (None, Ended::Returned(Err(error))) => Outcome::Error(failure_of_error(&error)),
    }
}

/// Runs `inner` until it ends (`Some`) or `cancel` fires (`None`), checking
/// the token first. Most handlers end in their first poll: only one that waits
/// registers with the token, which takes its lock twice.
async fn unless_cancelled<F: Future>(cancel: &CancellationToken, inner: F) -> Option<F::Output> {
    if cancel.is_cancelled() {
        return None;
    }
    let mut inner = pin!(inner);
    let mut cancelled = pin!(None::<tokio_util::sync::WaitForCancellationFuture<'_>>);
    poll_fn(|cx| {
        if let Some(cancelled) = cancelled.as_mut().as_pin_mut()
            && cancelled.poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        if let Poll::Ready(output) = inner.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if cancelled.is_none() {
            cancelled.set(Some(cancel.cancelled()));
            if cancelled.as_mut().as_pin_mut().is_some_and(|cancelled| cancelled.poll(cx).is_ready()) {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await
}

/// How a handler's call ended.
enum Ended<T> {
    Returned(T),
    /// Its code was interrupted (see [`TaskContext::interrupted`]).
    Interrupted,
    /// Its deadline passed.
    Late,
}

/// How long a handler polled after its deadline, because its VM was busy when
/// its wait ended, may run before its deadline ends it.
const LATE_TURN: Duration = Duration::from_millis(10);

/// Polls `call` until it returns, is interrupted or its deadline passes. The
/// deadline belongs to this handler alone: a handler polled late because others
/// held the VM is still resumed if it was waiting (its wait ended before it
/// could be polled) and ends only if it then waits again or computes for longer
/// than [`LATE_TURN`]; a handler suspended while computing ends at once.
async fn until_deadline<F: Future>(
    mut call: Pin<&mut F>,
    context: &TaskContext,
    deadline: Instant,
) -> Ended<F::Output> {
    // Made when the handler first waits: most end in their first poll.
    let mut timer = pin!(None::<tokio::time::Sleep>);
    poll_fn(|cx| {
        let now = Instant::now();
        let late = now >= deadline;
        if context.take_preempted() && late {
            return Poll::Ready(Ended::Late);
        }
        if late {
            context.set_deadline(Some(now + LATE_TURN));
        }
        let polled = call.as_mut().poll(cx);
        if late {
            context.set_deadline(Some(deadline));
        }
        match polled {
            Poll::Ready(output) => Poll::Ready(Ended::Returned(output)),
            // Interrupted code yields (see `context::yield_for_interrupt`): the
            // call ends right then and is dropped, which closes its coroutine.
            Poll::Pending if context.interrupted().is_some() => Poll::Ready(Ended::Interrupted),
            Poll::Pending if late => Poll::Ready(Ended::Late),
            Poll::Pending => {
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep_until(deadline.into())));
                }
                if let Some(timer) = timer.as_mut().as_pin_mut()
                    && timer.poll(cx).is_ready()
                {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    })
    .await
}

fn internal(message: String) -> Outcome {
    Outcome::Error(Failure::new(FailureCause::Internal, 500, message))
}

/// A handler's return value as an outcome: directives as they say, strings raw,
/// nil empty, anything else JSON.
fn outcome_of(vm: &Vm, value: Value) -> Outcome {
    match value {
        Value::Nil => Outcome::empty_ack(),
        Value::String(s) => Outcome::Ack { body: bytes::Bytes::copy_from_slice(&s.as_bytes()), headers: None },
        Value::UserData(ud) if ud.is::<Directive>() => match ud.take::<Directive>() {
            Ok(Directive::Reply { body, headers }) => Outcome::Ack { body, headers },
            Ok(Directive::Nak { delay }) => Outcome::Nak { delay },
            Ok(Directive::Term { reason }) => Outcome::Term { reason },
            Err(_) => internal("a bus.reply/nak/term value was returned twice".to_string()),
        },
        other => match vm.encoding.encode(&vm.lua, &other) {
            Ok(body) => Outcome::Ack { body: body.into(), headers: None },
            Err(err) => internal(format!("cannot encode the handler's {} result as JSON: {err}", other.type_name())),
        },
    }
}

/// What the handler raised: `error({code = 400, message = "..."})`, a string, or a
/// runtime error.
fn failure_of(error: Value) -> Failure {
    match error {
        Value::Error(err) => failure_of_error(&err),
        Value::Table(table) => failure_of_table(&table),
        Value::String(s) => Failure::new(FailureCause::Handler, 500, s.to_string_lossy()),
        other => Failure::new(FailureCause::Handler, 500, format!("handler raised a {} value", other.type_name())),
    }
}

fn failure_of_table(table: &Table) -> Failure {
    let code = match table.raw_get::<Value>("code") {
        Ok(Value::Integer(code)) => u16::try_from(code).ok(),
        Ok(Value::Number(code)) if code.fract() == 0.0 => u16::try_from(code as i64).ok(),
        _ => None,
    }
    .filter(|code| (100..=999).contains(code))
    .unwrap_or(500);
    let message = match table.raw_get::<Value>("message") {
        Ok(Value::String(s)) => s.to_string_lossy(),
        Ok(Value::Nil) | Err(_) => "handler error".to_string(),
        Ok(other) => other.to_string().unwrap_or_else(|_| "handler error".to_string()),
    };
    Failure::new(FailureCause::Handler, code, message)
}

fn failure_of_error(err: &mlua::Error) -> Failure {
    match err {
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => failure_of_error(cause),
        mlua::Error::ExternalError(external) => {
            if let Some(payload) = external.downcast_ref::<PayloadError>() {
                Failure::new(FailureCause::BadPayload, 400, payload.to_string())
            } else if let Some(Interrupt::Timeout) = external.downcast_ref::<Interrupt>() {
                Failure::timeout(Duration::ZERO)
            } else if let Some(Interrupt::Cancelled) = external.downcast_ref::<Interrupt>() {
                Failure::cancelled()
            } else {
                Failure::new(FailureCause::Handler, 500, external.to_string())
            }
        }
        mlua::Error::MemoryError(message) => {
            Failure::new(FailureCause::Handler, 500, format!("out of memory: {message}"))
        }
        mlua::Error::RuntimeError(message) => Failure::new(FailureCause::Handler, 500, message.clone()),
        other => Failure::new(FailureCause::Handler, 500, other.to_string()),
    }
}
