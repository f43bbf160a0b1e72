//! The bus: bounded queues from sources to the Lua VMs. Each VM has its own lane;
//! an event goes to the lane with the most room, so a VM busy with slow handlers
//! gets fewer new events. When every lane is full the source waits: backpressure,
//! never a drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::event::Event;

#[derive(Clone)]
pub struct Bus {
    lanes: Arc<[mpsc::Sender<Event>]>,
    next: Arc<AtomicUsize>,
}

impl Bus {
    /// A bus over one lane per VM.
    pub fn new(lanes: Vec<mpsc::Sender<Event>>) -> Self {
        assert!(!lanes.is_empty(), "a bus needs at least one VM lane");
        Bus { lanes: lanes.into(), next: Arc::new(AtomicUsize::new(0)) }
    }

    /// Queues `event` for a VM; gives it back when the VMs no longer take events
    /// (shutdown), so the caller can answer it.
    pub async fn send(&self, event: Event) -> Result<(), Event> {
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
        let event = match self.lanes[best].try_send(event) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => event,
            Err(mpsc::error::TrySendError::Closed(event)) => return Err(event),
        };
        self.lanes[best].send(event).await.map_err(|err| err.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Delivery;

    fn event(n: usize) -> Event {
        Event::new(n.to_string().into(), "s".into(), None, None, Default::default(), Delivery::Core)
    }

    #[tokio::test]
    async fn events_go_to_the_lane_with_most_room() {
        let (busy_tx, mut busy_rx) = mpsc::channel(4);
        let (idle_tx, mut idle_rx) = mpsc::channel(4);
        busy_tx.try_send(event(0)).unwrap();
        busy_tx.try_send(event(1)).unwrap();
        let bus = Bus::new(vec![busy_tx, idle_tx]);
        bus.send(event(2)).await.unwrap();
        assert_eq!(idle_rx.recv().await.unwrap().kind.as_str(), "2");
        assert_eq!(busy_rx.recv().await.unwrap().kind.as_str(), "0");
    }

    #[tokio::test]
    async fn a_closed_bus_gives_the_event_back() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let bus = Bus::new(vec![tx]);
        assert_eq!(bus.send(event(7)).await.unwrap_err().kind.as_str(), "7");
    }
}
