//! In-flight handler slots of one VM. The VM is single-threaded, so a counter and
//! a few wakers do what a tokio semaphore does, without its lock.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

pub struct Permits {
    available: Cell<usize>,
    /// Tasks waiting for a slot: the lane's receive loop and the VM's own sources.
    waiters: RefCell<Vec<Waker>>,
}

/// A taken slot; dropping it frees the slot.
pub struct Permit(Rc<Permits>);

impl Permits {
    pub fn new(count: usize) -> Rc<Self> {
        Rc::new(Permits { available: Cell::new(count), waiters: RefCell::new(Vec::new()) })
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Rc<Self>) -> Permit {
        poll_fn(|cx| {
            let available = self.available.get();
            if available > 0 {
                self.available.set(available - 1);
                Poll::Ready(Permit(self.clone()))
            } else {
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
}

impl Permits {
    fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.available.set(self.0.available.get() + 1);
        // Few tasks ever wait (one per source); each re-checks when woken.
        let waiters = std::mem::take(&mut *self.0.waiters.borrow_mut());
        for waiter in waiters {
            waiter.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_taken_and_given_back() {
        let permits = Permits::new(2);
        let first = permits.acquire().await;
        let second = permits.acquire().await;
        let mut third = Box::pin(permits.acquire());
        assert!(futures::poll!(third.as_mut()).is_pending());
        drop(first);
        let _third = third.await;
        drop(second);
        let mut all = Box::pin(permits.all_free(2));
        assert!(futures::poll!(all.as_mut()).is_pending());
        drop(_third);
        all.await;
    }
}
