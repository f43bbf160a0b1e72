//! What a script declares at its top level: `bus.subscribe` and `bus.consume`.

use std::time::Duration;

use crate::kind::KindTemplate;
use crate::partitioning::Partitioning;
use crate::telemetry::discovery::Endpoint;

/// One declared source.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Subscribe(SubscriptionSpec),
    Consume(ConsumerSpec),
}

impl SourceSpec {
    /// This source as a NATS micro endpoint: a subscription by its subject and
    /// queue group, a consumer by its durable name.
    pub fn endpoint(&self, worker_name: &str) -> Endpoint {
        match self {
            SourceSpec::Subscribe(spec) => Endpoint {
                name: spec.subject.clone(),
                subject: spec.subject.clone(),
                queue_group: spec.queue_group(worker_name).unwrap_or_default().into(),
            },
            SourceSpec::Consume(spec) => Endpoint {
                name: spec.consumer.clone(),
                subject: spec.subject.clone().unwrap_or_else(|| format!("{}.>", spec.stream)),
                queue_group: spec.consumer.as_str().into(),
            },
        }
    }

    /// One line for `check` and the logs.
    pub fn describe(&self, worker_name: &str) -> String {
        match self {
            SourceSpec::Subscribe(spec) => spec.describe(worker_name),
            SourceSpec::Consume(spec) => spec.describe(),
        }
    }

    /// The subject pattern and kind template, for mapping subjects to kinds.
    pub fn subject_and_kind(&self) -> (&str, &KindTemplate) {
        match self {
            SourceSpec::Subscribe(spec) => (&spec.subject, &spec.kind),
            SourceSpec::Consume(spec) => (spec.subject.as_deref().unwrap_or(">"), &spec.kind),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        match self {
            SourceSpec::Subscribe(spec) => spec.timeout,
            SourceSpec::Consume(spec) => spec.timeout,
        }
    }
}

/// A core NATS subscription declared by `bus.subscribe`.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub subject: String,
    pub kind: KindTemplate,
    pub queue: Queue,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// The worker's `--name`.
    Default,
    Named(String),
    /// `queue = false`: every worker gets every message.
    None,
}

impl SubscriptionSpec {
    pub fn queue_group(&self, worker_name: &str) -> Option<String> {
        match &self.queue {
            Queue::Default => Some(worker_name.to_string()),
            Queue::Named(name) => Some(name.clone()),
            Queue::None => None,
        }
    }

    pub fn describe(&self, worker_name: &str) -> String {
        let queue = self.queue_group(worker_name).map(|q| format!(" queue={q}")).unwrap_or_default();
        let timeout = self.timeout.map(|t| format!(" timeout={}", humantime::format_duration(t))).unwrap_or_default();
        format!("subscribe {} kind={}{queue}{timeout}", self.subject, self.kind)
    }
}

/// A JetStream durable pull consumer declared by `bus.consume`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    pub stream: String,
    pub consumer: String,
    /// Filter subject; `None` takes every subject of the stream.
    pub subject: Option<String>,
    pub kind: KindTemplate,
    pub ack_wait: Option<Duration>,
    /// Deliveries before the message is dead-lettered and terminated.
    pub max_deliver: Option<i64>,
    /// Nak delays by delivery: the n-th failed delivery waits `backoff[n-1]`, the
    /// last value repeating.
    pub backoff: Vec<Duration>,
    pub max_ack_pending: Option<i64>,
    pub dead_letter: Option<String>,
    pub timeout: Option<Duration>,
    /// Subjects of the stream to create when it does not exist.
    pub create_stream: Option<Vec<String>>,
    /// `key` and `partitions`: messages of one key one at a time, in order.
    pub keyed: Option<Box<Partitioning>>,
}

impl ConsumerSpec {
    /// A consumer of `subject` (every subject of `stream` when `None`) with
    /// every option left to its default.
    pub fn new(stream: &str, consumer: &str, subject: Option<String>, kind: KindTemplate) -> Self {
        ConsumerSpec {
            stream: stream.into(),
            consumer: consumer.into(),
            subject,
            kind,
            ack_wait: None,
            max_deliver: None,
            backoff: vec![],
            max_ack_pending: None,
            dead_letter: None,
            timeout: None,
            create_stream: None,
            keyed: None,
        }
    }

    /// A consumer of every subject of `stream`, kind `x`, nothing else set.
    #[cfg(test)]
    pub fn for_tests(stream: &str, consumer: &str) -> Self {
        Self::new(stream, consumer, None, KindTemplate::parse("x", ">").expect("a valid template"))
    }

    /// The durable consumer of partition `partition` of this keyed consumer:
    /// filtered on the partition's token, one message in flight.
    pub fn partition(&self, keyed: &Partitioning, partition: u32) -> Self {
        ConsumerSpec {
            consumer: Partitioning::consumer_name(&self.consumer, partition),
            subject: Some(keyed.filter_subject(partition)),
            max_ack_pending: Some(1),
            create_stream: None,
            ..self.clone()
        }
    }

    pub fn describe(&self) -> String {
        let mut line = format!("consume {}/{}", self.stream, self.consumer);
        if let Some(subject) = &self.subject {
            line.push_str(&format!(" subject={subject}"));
        }
        line.push_str(&format!(" kind={}", self.kind));
        if let Some(max) = self.max_deliver {
            line.push_str(&format!(" max_deliver={max}"));
        }
        if let Some(keyed) = &self.keyed {
            line.push_str(&format!(
                " key={} partitions={} (consumers {})",
                keyed.key,
                keyed.partitions,
                keyed.consumers(&self.consumer)
            ));
        }
        if let Some(dead_letter) = &self.dead_letter {
            line.push_str(&format!(" dead_letter={dead_letter}"));
        }
        line
    }

    /// The nak delay after the `delivered`-th delivery failed.
    pub fn backoff_after(&self, delivered: u64) -> Option<Duration> {
        let index = usize::try_from(delivered.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff.get(index).or(self.backoff.last()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_repeats_its_last_value() {
        let spec = ConsumerSpec {
            stream: "S".into(),
            consumer: "C".into(),
            subject: None,
            kind: KindTemplate::parse(KindTemplate::DEFAULT, ">").unwrap(),
            ack_wait: None,
            max_deliver: None,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(5)],
            max_ack_pending: None,
            dead_letter: None,
            timeout: None,
            create_stream: None,
            keyed: None,
        };
        assert_eq!(spec.backoff_after(1), Some(Duration::from_secs(1)));
        assert_eq!(spec.backoff_after(2), Some(Duration::from_secs(5)));
        assert_eq!(spec.backoff_after(9), Some(Duration::from_secs(5)));
        assert_eq!(ConsumerSpec { backoff: vec![], ..spec }.backoff_after(1), None);
    }
}
