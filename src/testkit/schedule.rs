//! The order in which `w:consume_all` delivers its messages: what a consumer
//! would do with them on the virtual clock, without the handlers. Every message
//! is due at the start; a nak'ed one is due again after its delay. Messages in
//! one lane (a keyed consumer's partition, whose durable consumer has one
//! message in flight) are delivered one at a time: a message waits until every
//! earlier one of its lane is finished for good.

use std::time::Duration;

/// The simulated consumer's view of a list of messages, each in an optional lane.
pub struct Schedule<L> {
    entries: Vec<Entry<L>>,
}

struct Entry<L> {
    lane: Option<L>,
    delivered: u64,
    due: Duration,
    finished: bool,
}

impl<L: PartialEq> Schedule<L> {
    /// Every message due at `start` (on the virtual clock).
    pub fn new(lanes: Vec<Option<L>>, start: Duration) -> Self {
        let entries = lanes.into_iter().map(|lane| Entry { lane, delivered: 0, due: start, finished: false }).collect();
        Schedule { entries }
    }

    /// The message to deliver next and when it is due: the earliest due among
    /// those no earlier message of their lane holds back. At the same time a
    /// first delivery goes before a redelivery (all messages are there from the
    /// start, a redelivery only after a nak), then list order.
    pub fn next(&self) -> Option<(usize, Duration)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(index, entry)| !entry.finished && !self.held_back(*index))
            .min_by_key(|(index, entry)| (entry.due, entry.delivered > 0, *index))
            .map(|(index, entry)| (index, entry.due))
    }

    /// Records a delivery of message `index`; its delivery count.
    pub fn deliver(&mut self, index: usize) -> u64 {
        self.entries[index].delivered += 1;
        self.entries[index].delivered
    }

    /// Message `index` was nak'ed: due again at `due`.
    pub fn redeliver_at(&mut self, index: usize, due: Duration) {
        self.entries[index].due = due;
    }

    /// Message `index` will not be delivered again; its lane moves on.
    pub fn finish(&mut self, index: usize) {
        self.entries[index].finished = true;
    }

    fn held_back(&self, index: usize) -> bool {
        let Some(lane) = &self.entries[index].lane else { return false };
        self.entries[..index].iter().any(|earlier| !earlier.finished && earlier.lane.as_ref() == Some(lane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Duration = Duration::from_secs(100);

    /// Runs `schedule`, failing each message's first `failures[i]` deliveries
    /// with a nak of `delay`; the deliveries as (index, delivered, time).
    fn run(lanes: Vec<Option<&str>>, failures: &[u64], delay: Duration) -> Vec<(usize, u64, u64)> {
        let mut schedule = Schedule::new(lanes, START);
        let mut now = START;
        let mut deliveries = Vec::new();
        while let Some((index, due)) = schedule.next() {
            now = now.max(due);
            let delivered = schedule.deliver(index);
            deliveries.push((index, delivered, (now - START).as_secs()));
            if delivered <= failures[index] {
                schedule.redeliver_at(index, now + delay);
            } else {
                schedule.finish(index);
            }
        }
        deliveries
    }

    #[test]
    fn a_lane_waits_for_its_failing_message_while_others_go_ahead() {
        let deliveries = run(vec![Some("a"), Some("a"), Some("b")], &[1, 0, 0], Duration::from_secs(5));
        assert_eq!(deliveries, vec![(0, 1, 0), (2, 1, 0), (0, 2, 5), (1, 1, 5)]);
    }

    #[test]
    fn without_lanes_later_messages_overtake_a_retry() {
        let deliveries = run(vec![None, None, None], &[1, 0, 0], Duration::from_secs(5));
        assert_eq!(deliveries, vec![(0, 1, 0), (1, 1, 0), (2, 1, 0), (0, 2, 5)]);
    }

    #[test]
    fn first_deliveries_go_before_an_immediate_redelivery_and_ties_keep_list_order() {
        let deliveries = run(vec![None, None, None], &[1, 1, 0], Duration::ZERO);
        assert_eq!(deliveries, vec![(0, 1, 0), (1, 1, 0), (2, 1, 0), (0, 2, 0), (1, 2, 0)]);
    }

    #[test]
    fn the_earliest_redelivery_comes_first() {
        let mut schedule = Schedule::<&str>::new(vec![None, None], START);
        schedule.deliver(0);
        schedule.redeliver_at(0, START + Duration::from_secs(10));
        schedule.deliver(1);
        schedule.redeliver_at(1, START + Duration::from_secs(3));
        assert_eq!(schedule.next(), Some((1, START + Duration::from_secs(3))));
        schedule.finish(1);
        schedule.finish(0);
        assert_eq!(schedule.next(), None);
    }
}
