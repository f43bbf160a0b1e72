//! Intake: how events enter a Lua VM. Each VM has handler slots (`--concurrency`)
//! and a bounded queue (`--bus-capacity`). A source running on the VM's thread
//! offers events to that VM's [`Intake`]; sources that run once per process offer
//! them to the [`SharedIntake`], which picks the VM queue with the most room.
//!
//! Core NATS cannot push back on a publisher, so a full intake refuses an event
//! at once ([`Sink::offer`]) and the source answers or counts it. JetStream
//! sources pull only what there is room for ([`Sink::room`]) and wait for room
//! instead ([`Sink::deliver`]).

// A refused event comes back in the `Err` variant so its source can answer it;
// boxing it would cost an allocation per event on the hot path.
#![allow(clippy::result_large_err)]

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, Waker};

use tokio::sync::mpsc;

use crate::event::Event;
pub use crate::telemetry::overload::IntakeStats;

/// How often a source feeding the shared intake looks again for room.
const SHARED_ROOM_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Where a source puts its events.
#[derive(Clone)]
pub enum Sink {
    /// The VM this source runs on.
    Local(Rc<Intake>),
    /// Any VM of the process.
    Shared(SharedIntake),
}

impl Sink {
    /// Takes `event` if a slot or queue place is free; gives it back otherwise
    /// (full, or closed by shutdown).
    pub fn offer(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        match self {
            Sink::Local(intake) => intake.offer(event),
            Sink::Shared(shared) => shared.offer(event),
        }
    }

    /// Waits for room and takes `event`; gives it back only when closed.
    pub async fn deliver(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        match self {
            Sink::Local(intake) => intake.deliver(event).await,
            Sink::Shared(shared) => shared.deliver(event).await,
        }
    }

    /// Events that can be taken now without queueing: free handler slots less
    /// events already waiting.
    pub fn room(&self) -> usize {
        match self {
            Sink::Local(intake) => intake.room(),
            Sink::Shared(shared) => shared.lanes.iter().map(|lane| lane.capacity()).sum(),
        }
    }

    /// Resolves when a handler slot frees up. The shared intake has no slots of
    /// its own to watch, so a source pulling for it looks again after
    /// [`SHARED_ROOM_RECHECK`] (resolving at once would make the pull loop spin).
    pub async fn room_changed(&self) {
        match self {
            Sink::Local(intake) => intake.slots.changed().await,
            Sink::Shared(_) => tokio::time::sleep(SHARED_ROOM_RECHECK).await,
        }
    }

    pub fn stats(&self) -> &IntakeStats {
        match self {
            Sink::Local(intake) => &intake.stats,
            Sink::Shared(shared) => &shared.stats,
        }
    }
}

/// Starts a handler for an event in a slot; the VM provides it.
pub type Starter = Box<dyn Fn(Box<Event>, Slot)>;

/// One VM's intake, used on that VM's thread only.
pub struct Intake {
    queue: mpsc::Sender<Box<Event>>,
    slots: Rc<Slots>,
    start: Starter,
    stats: Arc<IntakeStats>,
}

impl Intake {
    pub fn new(queue: mpsc::Sender<Box<Event>>, slots: Rc<Slots>, start: Starter, stats: Arc<IntakeStats>) -> Self {
        Intake { queue, slots, start, stats }
    }

    fn queue_is_empty(&self) -> bool {
        self.queue.capacity() == self.queue.max_capacity()
    }

    /// Starts the handler at once when a slot is free and nothing waits before it;
    /// else queues the event.
    fn offer(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        if self.queue_is_empty()
            && let Some(slot) = self.slots.try_acquire()
        {
            (self.start)(event, slot);
            return Ok(());
        }
        self.queue.try_send(event).map_err(|err| err.into_inner())
    }

    async fn deliver(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        match self.offer(event) {
            Ok(()) => Ok(()),
            Err(event) => self.queue.send(event).await.map_err(|err| err.0),
        }
    }

    fn room(&self) -> usize {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        self.slots.free().saturating_sub(queued)
    }
}

/// The intake of every VM of the process, for sources that run once per process.
#[derive(Clone)]
pub struct SharedIntake {
    lanes: Arc<[mpsc::Sender<Box<Event>>]>,
    next: Arc<AtomicUsize>,
    stats: Arc<IntakeStats>,
}

impl SharedIntake {
    pub fn new(lanes: Vec<mpsc::Sender<Box<Event>>>, stats: Arc<IntakeStats>) -> Self {
        assert!(!lanes.is_empty(), "an intake needs at least one VM");
        SharedIntake { lanes: lanes.into(), next: Arc::new(AtomicUsize::new(0)), stats }
    }

    /// The lane with the most room, starting the search at a rotating VM so ties
    /// spread evenly.
    fn roomiest(&self) -> &mpsc::Sender<Box<Event>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let mut best = start;
        let mut room = 0;
        for offset in 0..self.lanes.len() {
            let lane = (start + offset) % self.lanes.len();
            let capacity = self.lanes[lane].capacity();
            if capacity > room {
                best = lane;
                room = capacity;
            }
        }
        &self.lanes[best]
    }

    fn offer(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        self.roomiest().try_send(event).map_err(|err| err.into_inner())
    }

    async fn deliver(&self, event: Box<Event>) -> Result<(), Box<Event>> {
        let lane = self.roomiest();
        match lane.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => lane.send(event).await.map_err(|err| err.0),
            Err(mpsc::error::TrySendError::Closed(event)) => Err(event),
        }
    }
}

/// In-flight handler slots of one VM. The VM is single-threaded, so a counter and
/// a few wakers do what a tokio semaphore does, without its lock.
pub struct Slots {
    available: Cell<usize>,
    /// Slots the queue's receive loop holds while it waits for an event: taken,
    /// yet free to whoever asks how many events the VM can start now.
    standing_by: Cell<usize>,
    /// Tasks waiting for a slot or watching for freed ones: the queue's receive
    /// loop and the VM's JetStream sources.
    waiters: RefCell<Vec<Waker>>,
}

/// A taken slot; dropping it frees the slot.
pub struct Slot(Rc<Slots>);

impl Slot {
    /// Holds this slot for the next event to arrive, counted as free meanwhile.
    pub fn stand_by(self) -> Standby {
        self.0.standing_by.set(self.0.standing_by.get() + 1);
        Standby(Some(self))
    }
}

/// A slot held for the next event (see [`Slot::stand_by`]).
pub struct Standby(Option<Slot>);

impl Standby {
    /// The slot, no longer on standby.
    pub fn take(mut self) -> Slot {
        let slot = self.0.take().expect("a standby slot is taken once");
        slot.0.standing_by.set(slot.0.standing_by.get() - 1);
        slot
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.0.standing_by.set(slot.0.standing_by.get() - 1);
        }
    }
}

impl Slots {
    pub fn new(count: usize) -> Rc<Self> {
        Rc::new(Slots { available: Cell::new(count), standing_by: Cell::new(0), waiters: RefCell::new(Vec::new()) })
    }

    /// Slots free to start an event now, counting one held on standby.
    pub fn free(&self) -> usize {
        self.available.get() + self.standing_by.get()
    }

    pub fn try_acquire(self: &Rc<Self>) -> Option<Slot> {
        let available = self.available.get();
        if available == 0 {
            return None;
        }
        self.available.set(available - 1);
        Some(Slot(self.clone()))
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Rc<Self>) -> Slot {
        poll_fn(|cx| match self.try_acquire() {
            Some(slot) => Poll::Ready(slot),
            None => {
                self.wait(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until all `count` slots are free again.
    pub async fn all_free(self: &Rc<Self>, count: usize) {
        poll_fn(|cx| {
            if self.available.get() >= count {
                Poll::Ready(())
            } else {
                self.wait(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves the next time a slot is freed.
    pub async fn changed(&self) {
        let mut registered = false;
        poll_fn(|cx| {
            if registered {
                Poll::Ready(())
            } else {
                registered = true;
                self.wait(cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.available.set(self.0.available.get() + 1);
        // Few tasks ever wait (the queue loop and one per JetStream source); each
        // re-checks when woken.
        let waiters = std::mem::take(&mut *self.0.waiters.borrow_mut());
        for waiter in waiters {
            waiter.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Box<Event> {
        Box::new(Event::new(n.to_string().into(), "s".into(), None, None, Default::default()))
    }

    #[tokio::test]
    async fn slots_are_taken_and_given_back() {
        let slots = Slots::new(2);
        let first = slots.acquire().await;
        let second = slots.acquire().await;
        assert!(slots.try_acquire().is_none());
        let mut third = Box::pin(slots.acquire());
        assert!(futures::poll!(third.as_mut()).is_pending());
        drop(first);
        let third = third.await;
        drop(second);
        let mut all = Box::pin(slots.all_free(2));
        assert!(futures::poll!(all.as_mut()).is_pending());
        drop(third);
        all.await;
    }

    #[tokio::test]
    async fn a_local_intake_starts_queues_then_refuses() {
        let (queue, mut queued) = mpsc::channel(1);
        let slots = Slots::new(1);
        let started = Rc::new(RefCell::new(Vec::new()));
        let held = Rc::new(RefCell::new(Vec::new()));
        let start: Starter = {
            let (started, held) = (started.clone(), held.clone());
            Box::new(move |event: Box<Event>, slot| {
                started.borrow_mut().push(event.kind.to_string());
                held.borrow_mut().push(slot);
            })
        };
        let sink = Sink::Local(Rc::new(Intake::new(queue, slots.clone(), start, Default::default())));
        assert_eq!(sink.room(), 1);
        sink.offer(event(1)).unwrap();
        assert_eq!(*started.borrow(), ["1"]);
        assert_eq!(sink.room(), 0);
        sink.offer(event(2)).unwrap();
        assert_eq!(sink.offer(event(3)).unwrap_err().kind.as_str(), "3");
        assert_eq!(queued.recv().await.unwrap().kind.as_str(), "2");
        let mut freed = Box::pin(sink.room_changed());
        assert!(futures::poll!(freed.as_mut()).is_pending());
        held.borrow_mut().clear();
        freed.await;
        assert_eq!(sink.room(), 1);
    }

    #[tokio::test]
    async fn the_shared_intake_picks_the_lane_with_most_room() {
        let (busy_tx, mut busy_rx) = mpsc::channel(4);
        let (idle_tx, mut idle_rx) = mpsc::channel(4);
        busy_tx.try_send(event(0)).unwrap();
        busy_tx.try_send(event(1)).unwrap();
        let shared = SharedIntake::new(vec![busy_tx, idle_tx], Default::default());
        shared.offer(event(2)).unwrap();
        assert_eq!(idle_rx.recv().await.unwrap().kind.as_str(), "2");
        assert_eq!(busy_rx.recv().await.unwrap().kind.as_str(), "0");
    }

    #[tokio::test]
    async fn a_closed_intake_gives_the_event_back() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let shared = SharedIntake::new(vec![tx], Default::default());
        assert_eq!(shared.deliver(event(7)).await.unwrap_err().kind.as_str(), "7");
    }
}
