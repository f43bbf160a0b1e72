//! What an outcome does to a JetStream delivery: one pure decision, and one
//! dead-letter message, used by the JetStream source and by `agent-block test`,
//! so a handler tested offline is settled as production settles it.

use std::time::Duration;

use async_nats::HeaderMap;

use crate::event::Event;
use crate::lua::context;
use crate::outcome::{FailureCause, Outcome};
use crate::source_spec::ConsumerSpec;

/// What settling a delivery does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Ack,
    /// Redelivered after the delay (at once when `None`).
    Nak(Option<Duration>),
    /// Never redelivered.
    Term,
    /// Published to the consumer's `dead_letter` subject (when it has one), then
    /// terminated; the message is the error's text.
    DeadLetter(String),
}

/// The action for `outcome` on delivery number `delivered` of a consumer
/// declared as `spec`: an error naks with the consumer's backoff, except that a
/// payload redelivery cannot fix, or the last allowed delivery, is dead-lettered;
/// a cancelled or overloaded handler is nak'ed for redelivery at once.
pub fn action(spec: &ConsumerSpec, delivered: u64, outcome: &Outcome) -> Action {
    match outcome {
        Outcome::Ack { .. } => Action::Ack,
        Outcome::Nak { delay } => Action::Nak(*delay),
        Outcome::Term { .. } => Action::Term,
        Outcome::Error(failure) => {
            let last_delivery = spec.max_deliver.is_some_and(|max| delivered >= max as u64);
            match failure.cause {
                FailureCause::Cancelled | FailureCause::Overloaded => Action::Nak(None),
                FailureCause::BadPayload => Action::DeadLetter(failure.message.clone()),
                _ if last_delivery => Action::DeadLetter(failure.message.clone()),
                _ => Action::Nak(spec.backoff_after(delivered)),
            }
        }
    }
}

/// The dead letter's headers: the original ones, the running handler's trace,
/// and what failed where (`Agent-Block-Error`, `-Kind`, `-Delivered`, `-Stream`,
/// `-Stream-Seq`).
pub fn dead_letter_headers(spec: &ConsumerSpec, event: &Event, delivered: u64, error: &str) -> HeaderMap {
    let mut headers = event.headers.clone();
    context::continue_trace(&mut headers);
    let mut headers = headers.unwrap_or_default();
    // A traceback keeps its first line; other control characters become spaces.
    headers.insert("Agent-Block-Error", crate::headers::value(error.lines().next().unwrap_or("")));
    headers.insert("Agent-Block-Kind", event.kind.as_str());
    headers.insert("Agent-Block-Delivered", delivered.to_string().as_str());
    headers.insert("Agent-Block-Stream", spec.stream.as_str());
    let sequence = event.stream.as_ref().map(|stream| stream.stream_sequence).unwrap_or(0);
    headers.insert("Agent-Block-Stream-Seq", sequence.to_string().as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Failure;

    fn spec(max_deliver: Option<i64>, backoff: &[u64]) -> ConsumerSpec {
        let mut spec = ConsumerSpec::for_tests("S", "c");
        spec.max_deliver = max_deliver;
        spec.backoff = backoff.iter().map(|ms| Duration::from_millis(*ms)).collect();
        spec
    }

    fn failed(cause: FailureCause) -> Outcome {
        Outcome::Error(Failure::new(cause, 500, "broke\nat line 2".to_string()))
    }

    #[test]
    fn errors_nak_with_backoff_until_the_last_delivery() {
        let spec = spec(Some(3), &[100, 200]);
        assert_eq!(action(&spec, 1, &failed(FailureCause::Handler)), Action::Nak(Some(Duration::from_millis(100))));
        assert_eq!(action(&spec, 2, &failed(FailureCause::Handler)), Action::Nak(Some(Duration::from_millis(200))));
        assert_eq!(action(&spec, 3, &failed(FailureCause::Handler)), Action::DeadLetter("broke\nat line 2".into()));
    }

    #[test]
    fn bad_payloads_are_dead_lettered_at_once_and_cancellations_naked_at_once() {
        let spec = spec(Some(5), &[100]);
        assert!(matches!(action(&spec, 1, &failed(FailureCause::BadPayload)), Action::DeadLetter(_)));
        assert_eq!(action(&spec, 1, &failed(FailureCause::Cancelled)), Action::Nak(None));
        assert_eq!(action(&spec, 5, &failed(FailureCause::Overloaded)), Action::Nak(None));
        assert_eq!(action(&spec, 9, &Outcome::empty_ack()), Action::Ack);
    }

    #[test]
    fn dead_letter_headers_say_what_failed_where() {
        let mut event = Event::new("k".into(), "orders.1".into(), None, None, bytes::Bytes::new());
        event.kind = "order".into();
        let headers = dead_letter_headers(&spec(None, &[]), &event, 4, "bad \r value\nsecond line");
        let get = |name: &str| headers.get(name).map(|value| value.as_str().to_string());
        assert_eq!(get("Agent-Block-Error").as_deref(), Some("bad   value"));
        assert_eq!(get("Agent-Block-Kind").as_deref(), Some("order"));
        assert_eq!(get("Agent-Block-Delivered").as_deref(), Some("4"));
        assert_eq!(get("Agent-Block-Stream").as_deref(), Some("S"));
    }
}
