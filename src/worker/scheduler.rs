//! The order in which one VM runs its handlers.
//!
//! Handlers whose wait is over run first, in the order they became ready. Then
//! comes the line: new events and preempted handlers, in the order they joined
//! it. A handler that runs for a whole time slice is suspended by the watchdog
//! (see [`watchdog::begin_turn`]); the runner then lets the runtime read its
//! timers and sockets, and puts the handler at the back of the line if anything
//! else is ready, or resumes it at once if nothing is. Its deadline keeps running
//! meanwhile.
//!
//! One runner task per VM polls the handler tasks. Between turns it hands the
//! thread back to the runtime, and after a turn that held the VM for a while it
//! does so twice (timers and sockets are read first, then the tasks they woke,
//! such as the connection's reader, run), so that waits which ended meanwhile
//! are seen before the next handler starts.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use crate::lua::context::TaskContext;
use crate::lua::watchdog;
use crate::telemetry::metrics::VmRecorder;

/// A handler's whole life on the VM: its call, then the settling of its outcome.
pub type HandlerTask = Pin<Box<dyn Future<Output = ()>>>;

/// Polls the runner makes before it hands the thread back to the runtime.
const TURN_BUDGET: usize = 64;
/// A poll this long held the VM: the runtime gets the thread before the next one.
const HELD: Duration = Duration::from_millis(1);

#[derive(Default)]
pub struct Scheduler {
    tasks: RefCell<Tasks>,
    wakes: Arc<Wakes>,
    /// Handlers whose wait is over.
    ready: RefCell<VecDeque<Turn>>,
    /// New events and preempted handlers.
    line: RefCell<VecDeque<Turn>>,
    /// The task being polled.
    running: Cell<Option<usize>>,
    /// When the runner last started a poll; `None` while it is idle. A handler
    /// seen ready now may have become ready any time since.
    last_poll: Cell<Option<Instant>>,
    closed: Cell<bool>,
    drained: RefCell<Vec<Woken>>,
}

/// What the runner tells its loop after a turn.
enum Step {
    /// Hand the thread to the runtime once.
    Yield,
    /// A poll held the VM: hand the thread over twice.
    Held,
    /// This task was suspended at the end of its slice.
    Preempted(usize),
}

#[derive(Clone, Copy)]
struct Turn {
    id: usize,
    /// Since when it could have run.
    since: Instant,
    /// Whether its wait counts in `agent_block_vm_wait_seconds` (not when it
    /// is resumed right after its slice, nothing else being ready).
    counted: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    /// Pending on something other than the VM.
    Waiting,
    Ready,
    InLine,
    /// Being polled, or suspended and not yet placed.
    Running,
}

struct Task {
    future: Option<HandlerTask>,
    waker: Waker,
    flag: Arc<TaskWaker>,
    context: Option<Rc<TaskContext>>,
    place: Place,
    /// Woken while not waiting (being polled, ready or in line).
    notified: bool,
    /// Its last poll ended in a suspension at the end of its slice. Resuming it
    /// continues its Lua code, which may wait again without polling what woke
    /// it: a wake that came meanwhile then earns it another poll.
    resuming: bool,
}

/// Tasks by id; ids of finished tasks are reused.
#[derive(Default)]
struct Tasks {
    slots: Vec<Option<Task>>,
    free: Vec<usize>,
    next_generation: u64,
}

impl Tasks {
    fn get(&mut self, id: usize) -> Option<&mut Task> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    fn remove(&mut self, id: usize) -> Option<Task> {
        let task = self.slots.get_mut(id).and_then(Option::take)?;
        self.free.push(id);
        Some(task)
    }
}

/// A wake: the task's id and which task of that id it was for.
type Woken = (usize, u64);

/// Wakes of this VM's tasks, from any thread.
#[derive(Default)]
struct Wakes {
    woken: Mutex<Vec<Woken>>,
    runner: AtomicWaker,
}

struct TaskWaker {
    id: usize,
    generation: u64,
    /// Set while the task's wake is queued or it sits in the line, so it is
    /// queued once.
    queued: AtomicBool,
    wakes: Arc<Wakes>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.wakes.woken.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((self.id, self.generation));
            self.wakes.runner.wake();
        }
    }
}

impl Scheduler {
    /// Puts a new handler task at the back of the line.
    pub fn spawn(&self, future: HandlerTask) {
        let since = Instant::now();
        let mut tasks = self.tasks.borrow_mut();
        let id = tasks.free.pop().unwrap_or(tasks.slots.len());
        let generation = tasks.next_generation;
        tasks.next_generation += 1;
        let flag = Arc::new(TaskWaker { id, generation, queued: AtomicBool::new(true), wakes: self.wakes.clone() });
        let task = Task {
            future: Some(future),
            waker: Waker::from(flag.clone()),
            flag,
            context: None,
            place: Place::InLine,
            notified: false,
            resuming: false,
        };
        if id == tasks.slots.len() {
            tasks.slots.push(Some(task));
        } else {
            tasks.slots[id] = Some(task);
        }
        drop(tasks);
        self.line.borrow_mut().push_back(Turn { id, since, counted: true });
        self.wakes.runner.wake();
    }

    /// Tells the scheduler the context of the task being polled, so it can see
    /// the task's deadline and whether the watchdog suspended it.
    pub fn attach(&self, context: &Rc<TaskContext>) {
        if let Some(id) = self.running.get()
            && let Some(task) = self.tasks.borrow_mut().get(id)
        {
            task.context = Some(context.clone());
        }
    }

    /// Drops every task left and stops the runner.
    pub fn close(&self) {
        self.closed.set(true);
        self.ready.borrow_mut().clear();
        self.line.borrow_mut().clear();
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        drop(tasks);
        self.wakes.runner.wake();
    }

    /// Runs the VM's handler tasks until [`Scheduler::close`].
    pub async fn run(&self, metrics: &VmRecorder) {
        while !self.closed.get() {
            match poll_fn(|cx| self.turn(cx, metrics)).await {
                Step::Yield => tokio::task::yield_now().await,
                Step::Held => {
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                }
                Step::Preempted(id) => {
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                    self.place_preempted(id, metrics);
                }
            }
        }
    }

    /// Runs ready tasks, then the line, until nothing is left (pending) or the
    /// runtime should get the thread.
    fn turn(&self, cx: &mut Context<'_>, metrics: &VmRecorder) -> Poll<Step> {
        self.wakes.runner.register(cx.waker());
        let mut now = Instant::now();
        let mut polls = 0;
        loop {
            if self.closed.get() {
                return Poll::Ready(Step::Yield);
            }
            self.drain(now);
            let Some(turn) = self.next() else {
                self.last_poll.set(None);
                return Poll::Pending;
            };
            if turn.counted {
                metrics.waited(now.saturating_duration_since(turn.since));
            }
            self.last_poll.set(Some(now));
            let preempted = self.poll_task(turn.id, now);
            let after = Instant::now();
            if preempted {
                return Poll::Ready(Step::Preempted(turn.id));
            }
            if after - now >= HELD {
                return Poll::Ready(Step::Held);
            }
            polls += 1;
            if polls >= TURN_BUDGET {
                return Poll::Ready(Step::Yield);
            }
            now = after;
        }
    }

    /// The next task to poll: a ready one, else the first in line.
    fn next(&self) -> Option<Turn> {
        let turn = self.ready.borrow_mut().pop_front().or_else(|| self.line.borrow_mut().pop_front())?;
        Some(turn)
    }

    /// Moves woken tasks to the ready queue. A task in line stays there unless
    /// its deadline passed or shutdown cancelled it: then it runs now, to end.
    fn drain(&self, now: Instant) {
        let mut drained = self.drained.borrow_mut();
        std::mem::swap(&mut *self.wakes.woken.lock().unwrap_or_else(|poisoned| poisoned.into_inner()), &mut drained);
        if drained.is_empty() {
            return;
        }
        let since = self.last_poll.get().unwrap_or(now).min(now);
        let mut tasks = self.tasks.borrow_mut();
        let mut ready = self.ready.borrow_mut();
        for (id, generation) in drained.drain(..) {
            let Some(task) = tasks.get(id).filter(|task| task.flag.generation == generation) else { continue };
            if task.place == Place::Waiting {
                task.place = Place::Ready;
                ready.push_back(Turn { id, since, counted: true });
                continue;
            }
            task.notified = true;
            if task.place != Place::InLine {
                continue;
            }
            if task.context.as_ref().is_some_and(|c| c.is_due(now)) {
                task.place = Place::Ready;
                let mut line = self.line.borrow_mut();
                let waited_since = line.iter().find(|turn| turn.id == id).map_or(since, |turn| turn.since);
                line.retain(|turn| turn.id != id);
                ready.push_back(Turn { id, since: waited_since, counted: true });
            } else {
                // Other wakes of a task in line (a keep-alive timer) wait for its
                // turn; its deadline can still end it in line.
                task.flag.queued.store(false, Ordering::Release);
            }
        }
    }

    /// Polls task `id` once; true when the watchdog suspended it for its slice.
    fn poll_task(&self, id: usize, now: Instant) -> bool {
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(task) = tasks.get(id) else { return false };
            let Some(future) = task.future.take() else { return false };
            task.place = Place::Running;
            task.flag.queued.store(false, Ordering::Release);
            if !task.resuming {
                // This poll polls what the task waits for: earlier wakes are seen.
                task.notified = false;
            }
            (future, task.waker.clone())
        };
        self.running.set(Some(id));
        let watched = watchdog::begin_turn(now);
        let polled = future.as_mut().poll(&mut Context::from_waker(&waker));
        watchdog::end_turn(watched);
        self.running.set(None);
        let mut tasks = self.tasks.borrow_mut();
        if polled.is_ready() {
            let finished = tasks.remove(id);
            drop(tasks);
            drop(future);
            drop(finished);
            return false;
        }
        let Some(task) = tasks.get(id) else { return false };
        task.future = Some(future);
        // A task woken during its own poll has its wake queued: drained next.
        let preempted = task.context.as_ref().is_some_and(|c| c.preempted());
        let resumed = std::mem::replace(&mut task.resuming, preempted);
        if preempted {
            return true;
        }
        if resumed && std::mem::take(&mut task.notified) {
            task.place = Place::Ready;
            drop(tasks);
            self.ready.borrow_mut().push_back(Turn { id, since: now, counted: false });
        } else {
            task.place = Place::Waiting;
        }
        false
    }

    /// Puts a task suspended at the end of its slice behind whatever else is
    /// ready now, or resumes it at once when nothing is.
    fn place_preempted(&self, id: usize, metrics: &VmRecorder) {
        let now = Instant::now();
        self.drain(now);
        // Events still in the VM's queue joined the line meanwhile if a handler
        // slot was free for them.
        let others = !self.ready.borrow().is_empty() || !self.line.borrow().is_empty();
        let mut tasks = self.tasks.borrow_mut();
        let Some(task) = tasks.get(id) else { return };
        if others {
            metrics.preempted();
            task.place = Place::InLine;
            // Its wakes come through again: its deadline can end it in line.
            task.flag.queued.store(false, Ordering::Release);
            self.line.borrow_mut().push_back(Turn { id, since: now, counted: true });
        } else {
            task.place = Place::Ready;
            self.ready.borrow_mut().push_front(Turn { id, since: now, counted: false });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::sync::oneshot;

    /// Runs `scheduler` on a local task until `log` holds `count` entries.
    async fn run_until(scheduler: &Rc<Scheduler>, log: &Rc<RefCell<Vec<&'static str>>>, count: usize) {
        let (queue, _receiver) = tokio::sync::mpsc::channel(1);
        let runner = {
            let scheduler = scheduler.clone();
            tokio::task::spawn_local(async move { scheduler.run(&VmRecorder::new(queue.downgrade())).await })
        };
        while log.borrow().len() < count {
            tokio::task::yield_now().await;
        }
        scheduler.close();
        runner.await.expect("the runner ends when closed");
    }

    #[tokio::test]
    async fn a_handler_whose_wait_is_over_runs_before_the_next_new_one() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let scheduler = Rc::new(Scheduler::default());
                let log = Rc::new(RefCell::new(Vec::new()));
                let (wake, woken) = oneshot::channel::<()>();
                let entry = |log: &Rc<RefCell<Vec<&'static str>>>, name| {
                    let log = log.clone();
                    move || log.borrow_mut().push(name)
                };
                let (waited, second, third) = (entry(&log, "waited"), entry(&log, "second"), entry(&log, "third"));
                scheduler.spawn(Box::pin(async move {
                    let _ = woken.await;
                    waited();
                }));
                scheduler.spawn(Box::pin(async move {
                    let _ = wake.send(());
                    second();
                }));
                scheduler.spawn(Box::pin(async move { third() }));
                run_until(&scheduler, &log, 3).await;
                assert_eq!(*log.borrow(), ["second", "waited", "third"]);
            })
            .await;
    }

    /// A task suspended at the end of its slice, whose wait ended while it was
    /// suspended, and whose resumption then waits again without looking at what
    /// woke it (as Lua code resumed inside a bridge call's wrapper does): it must
    /// be polled once more, or it would wait forever.
    #[tokio::test]
    async fn a_wake_while_suspended_earns_another_poll() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let scheduler = Rc::new(Scheduler::default());
                let log = Rc::new(RefCell::new(Vec::new()));
                let context = Rc::new(TaskContext::new(None, None));
                let task = {
                    let (scheduler, log, context) = (scheduler.clone(), log.clone(), context.clone());
                    let mut polls = 0;
                    std::future::poll_fn(move |cx| {
                        polls += 1;
                        match polls {
                            1 => {
                                scheduler.attach(&context);
                                // Its wait ends while the runner decides where it goes.
                                let waker = cx.waker().clone();
                                tokio::task::spawn_local(async move { waker.wake() });
                                context.mark_preempted();
                                cx.waker().wake_by_ref();
                                Poll::Pending
                            }
                            2 => {
                                context.take_preempted();
                                Poll::Pending
                            }
                            _ => {
                                log.borrow_mut().push("done");
                                Poll::Ready(())
                            }
                        }
                    })
                };
                scheduler.spawn(Box::pin(task));
                tokio::time::timeout(Duration::from_secs(5), run_until(&scheduler, &log, 1))
                    .await
                    .expect("the task is polled again");
            })
            .await;
    }
}
