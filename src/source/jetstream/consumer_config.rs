//! The durable consumer a `bus.consume` declaration asks for, and how an
//! existing consumer is brought to it.
//!
//! An update must never move the consumer's position: the messages it has not
//! delivered or that wait for an ack are work someone expects done. So an
//! update is planned from the consumer the server reports before anything is
//! sent: a change the server applies in place (ack wait, max deliver, max ack
//! pending, clearing a server-side backoff, and the filter subject on servers
//! that keep the position) goes ahead; a change that would skip or replay
//! messages, or that the server refuses, is refused with the way out. Settings
//! the declaration does not speak for keep the server's values.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, Config, DeliverPolicy, PriorityPolicy};

use crate::source_spec::ConsumerSpec;

const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// The consumer to create for `spec`: a durable pull consumer with explicit
/// acks that delivers every message of the stream (filtered by the subject).
///
/// The declared `backoff` is not sent: the worker applies it as the delay of
/// each nak, while a server-side backoff would replace `ack_wait` (the server
/// reads it back as `backoff[0]`) and apply to ack timeouts only. So what the
/// server reads back is what was sent, and comparisons need no translation.
pub fn declared(spec: &ConsumerSpec) -> Config {
    let config = Config {
        durable_name: Some(spec.consumer.clone()),
        filter_subject: spec.subject.clone().unwrap_or_default(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait.unwrap_or(DEFAULT_ACK_WAIT),
        max_deliver: spec.max_deliver.unwrap_or(-1),
        // 0 leaves it to the server (its default and the stream's limits).
        max_ack_pending: spec.max_ack_pending.unwrap_or(0),
        ..Default::default()
    };
    match spec.keyed {
        // One pinned client per partition consumer (see `keyed`).
        Some(_) => Config {
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![PIN_GROUP.to_string()],
            priority_timeout: PIN_TIMEOUT,
            ..config
        },
        None => config,
    }
}

/// The priority group a keyed consumer's workers pull in.
pub const PIN_GROUP: &str = "agent-block";
/// How long a partition stays pinned to a worker that stopped pulling; its pulls
/// expire every 2 s, so only a stalled or dead worker loses its pin this way.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What decides whether a change is safe on the server in use.
#[derive(Debug, Clone, Copy)]
pub struct Server<'a> {
    /// As the server reports it, for messages.
    pub version: &'a str,
    /// nats-server 2.10 and later keep a consumer's position when its filter
    /// subject changes; 2.9 moves it past every pending message.
    pub keeps_position_on_filter_change: bool,
}

/// One setting whose value differs between the server and the declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The field's name in the server's consumer configuration.
    pub field: &'static str,
    pub existing: String,
    pub declared: String,
}

/// A change that is not made, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub change: Change,
    pub reason: String,
}

/// The configuration to send and the changes it makes; no changes, no update.
#[derive(Debug)]
pub struct Update {
    pub config: Config,
    pub changes: Vec<Change>,
}

/// Plans the update of `existing` to `spec`: every change is safe, or the
/// refused ones are returned and nothing may be sent.
pub fn plan_update(spec: &ConsumerSpec, existing: &Config, server: Server<'_>) -> Result<Update, Vec<Refused>> {
    let declared = declared(spec);
    let mut config = existing.clone();
    config.deliver_subject = None;
    config.deliver_policy = declared.deliver_policy;
    config.ack_policy = declared.ack_policy;
    config.filter_subject = declared.filter_subject.clone();
    config.filter_subjects = Vec::new();
    config.ack_wait = declared.ack_wait;
    config.max_deliver = declared.max_deliver;
    config.backoff = Vec::new();
    // Left out, the server's value stays: its default depends on the server
    // and the stream's limits, so it cannot be compared.
    if spec.max_ack_pending.is_some() {
        config.max_ack_pending = declared.max_ack_pending;
    }

    let mut refused = Vec::new();
    let mut refuse = |change: Option<Change>, reason: &str| {
        refused.extend(change.map(|change| Refused { change, reason: reason.to_string() }));
    };
    refuse(
        change("deliver_subject", existing, &config, push_subject),
        "bus.consume pulls, and the server cannot turn a push consumer into a pull consumer",
    );
    refuse(
        change("ack_policy", existing, &config, |c| ack_policy(c.ack_policy).into()),
        "bus.consume acks each message, and the server cannot change a consumer's ack policy",
    );
    const START_FIXED: &str = "where a consumer starts is fixed when it is created, and bus.consume \
                               consumers deliver every message of the stream";
    refuse(change("deliver_policy", existing, &config, |c| deliver_policy(&c.deliver_policy).into()), START_FIXED);
    refuse(change("opt_start_seq", existing, &config, start_sequence), START_FIXED);
    refuse(change("opt_start_time", existing, &config, start_time), START_FIXED);
    let mut changes = Vec::new();
    let filter_change = change("filter_subject", existing, &config, filter);
    if server.keeps_position_on_filter_change {
        changes.extend(filter_change);
    } else {
        let reason = format!(
            "nats-server {} moves a consumer past every pending message when its filter subject changes; \
             2.10 and later keep the position",
            server.version
        );
        refuse(filter_change, &reason);
    }
    if !refused.is_empty() {
        return Err(refused);
    }
    changes.extend(change("ack_wait", existing, &config, |c| duration(c.ack_wait)));
    changes.extend(change("backoff", existing, &config, |c| backoff(&c.backoff)));
    changes.extend(change("max_deliver", existing, &config, |c| max_deliver(c.max_deliver)));
    changes.extend(change("max_ack_pending", existing, &config, |c| c.max_ack_pending.to_string()));
    Ok(Update { config, changes })
}

/// The error for refused changes: the consumer, each field with both values
/// and why, and the two ways out.
pub fn refusal_message(spec: &ConsumerSpec, refused: &[Refused]) -> String {
    let mut problems: Vec<String> = Vec::new();
    for (i, r) in refused.iter().enumerate() {
        let mut problem = format!(
            "{} is {} on the server, {} in the declaration",
            r.change.field, r.change.existing, r.change.declared
        );
        // Fields refused for one reason share it.
        if refused.get(i + 1).is_none_or(|next| next.reason != r.reason) {
            problem.push_str(&format!(" ({})", r.reason));
        }
        problems.push(problem);
    }
    format!(
        "consumer {:?} of stream {:?} was left unchanged, as updating it to the bus.consume declaration would \
         skip or replay messages: {}. Either change the declaration to match the consumer (for a setting \
         bus.consume cannot declare, name another consumer), or delete the consumer knowingly, giving up its \
         position and its unacknowledged messages: `nats consumer rm {} {}` (the worker then creates it \
         afresh, delivering every message still in the stream)",
        spec.consumer,
        spec.stream,
        problems.join("; "),
        spec.stream,
        spec.consumer
    )
}

fn change(field: &'static str, existing: &Config, wanted: &Config, show: impl Fn(&Config) -> String) -> Option<Change> {
    let (existing, declared) = (show(existing), show(wanted));
    (existing != declared).then_some(Change { field, existing, declared })
}

fn push_subject(config: &Config) -> String {
    config.deliver_subject.clone().unwrap_or_else(|| "(none: a pull consumer)".into())
}

fn ack_policy(policy: AckPolicy) -> &'static str {
    match policy {
        AckPolicy::Explicit => "explicit",
        AckPolicy::None => "none",
        AckPolicy::All => "all",
        AckPolicy::FlowControl => "flow_control",
    }
}

fn deliver_policy(policy: &DeliverPolicy) -> &'static str {
    match policy {
        DeliverPolicy::All => "all",
        DeliverPolicy::Last => "last",
        DeliverPolicy::New => "new",
        DeliverPolicy::ByStartSequence { .. } => "by_start_sequence",
        DeliverPolicy::ByStartTime { .. } => "by_start_time",
        DeliverPolicy::LastPerSubject => "last_per_subject",
    }
}

fn start_sequence(config: &Config) -> String {
    match config.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => start_sequence.to_string(),
        _ => "(none)".into(),
    }
}

fn start_time(config: &Config) -> String {
    match config.deliver_policy {
        DeliverPolicy::ByStartTime { start_time } => start_time.to_string(),
        _ => "(none)".into(),
    }
}

fn filter(config: &Config) -> String {
    if !config.filter_subjects.is_empty() {
        config.filter_subjects.join(", ")
    } else if config.filter_subject.is_empty() {
        "(none: every subject)".into()
    } else {
        config.filter_subject.clone()
    }
}

fn duration(value: Duration) -> String {
    humantime::format_duration(value).to_string()
}

fn backoff(values: &[Duration]) -> String {
    if values.is_empty() {
        return "(none)".into();
    }
    let values: Vec<String> = values.iter().map(|value| duration(*value)).collect();
    format!("[{}]", values.join(", "))
}

fn max_deliver(value: i64) -> String {
    if value < 1 { "unlimited".into() } else { value.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Server<'static> = Server { version: "2.9.10", keeps_position_on_filter_change: false };
    const NEW: Server<'static> = Server { version: "2.15.1", keeps_position_on_filter_change: true };

    fn spec() -> ConsumerSpec {
        ConsumerSpec::for_tests("UPD", "upd")
    }

    /// A consumer as the server reports it, defaults filled in.
    fn reported(json: serde_json::Value) -> Config {
        let mut config = serde_json::json!({
            "durable_name": "upd", "deliver_policy": "all", "ack_policy": "explicit",
            "ack_wait": 30_000_000_000u64, "max_deliver": -1, "replay_policy": "instant",
            "max_waiting": 512, "max_ack_pending": 1000, "num_replicas": 0,
        });
        for (key, value) in json.as_object().unwrap() {
            config[key] = value.clone();
        }
        serde_json::from_value(config).unwrap()
    }

    fn fields(refused: &[Refused]) -> Vec<&str> {
        refused.iter().map(|r| r.change.field).collect()
    }

    fn fields_of(update: &Update) -> Vec<&str> {
        update.changes.iter().map(|c| c.field).collect()
    }

    #[test]
    fn a_consumer_as_declared_needs_no_update() {
        let spec = ConsumerSpec {
            subject: Some("upd.>".into()),
            ack_wait: Some(Duration::from_secs(2)),
            max_deliver: Some(3),
            backoff: vec![Duration::from_millis(100)],
            max_ack_pending: Some(50),
            ..spec()
        };
        let existing = reported(serde_json::json!({
            "filter_subject": "upd.>", "ack_wait": 2_000_000_000u64, "max_deliver": 3, "max_ack_pending": 50,
        }));
        for server in [OLD, NEW] {
            assert_eq!(plan_update(&spec, &existing, server).unwrap().changes, vec![]);
        }
    }

    #[test]
    fn settings_left_out_keep_the_server_values() {
        let existing = reported(serde_json::json!({ "max_ack_pending": 20, "description": "made elsewhere" }));
        let update = plan_update(&spec(), &existing, OLD).unwrap();
        assert_eq!(update.changes, vec![]);
        assert_eq!(update.config.max_ack_pending, 20);
        assert_eq!(update.config.description.as_deref(), Some("made elsewhere"));
    }

    #[test]
    fn a_new_filter_is_refused_where_the_server_would_move_the_position() {
        let spec = ConsumerSpec { subject: Some("upd.>".into()), ..spec() };
        let refused = plan_update(&spec, &reported(serde_json::json!({})), OLD).unwrap_err();
        assert_eq!(
            refused[0].change,
            Change { field: "filter_subject", existing: "(none: every subject)".into(), declared: "upd.>".into() }
        );
        assert!(refused[0].reason.contains("2.9.10"), "{}", refused[0].reason);
        let update = plan_update(&spec, &reported(serde_json::json!({})), NEW).unwrap();
        assert_eq!(fields_of(&update), ["filter_subject"]);
        assert_eq!(update.config.filter_subject, "upd.>");
    }

    #[test]
    fn where_the_consumer_starts_is_never_changed() {
        let by_sequence = reported(serde_json::json!({ "deliver_policy": "by_start_sequence", "opt_start_seq": 5 }));
        let by_time = reported(serde_json::json!({
            "deliver_policy": "by_start_time", "opt_start_time": "2026-01-01T00:00:00Z",
        }));
        for server in [OLD, NEW] {
            let refused = plan_update(&spec(), &reported(serde_json::json!({ "deliver_policy": "new" })), server);
            assert_eq!(fields(&refused.unwrap_err()), ["deliver_policy"]);
            let refused = plan_update(&spec(), &by_sequence, server).unwrap_err();
            assert_eq!(fields(&refused), ["deliver_policy", "opt_start_seq"]);
            assert_eq!(refused[1].change.existing, "5");
            let refused = plan_update(&spec(), &by_time, server).unwrap_err();
            assert_eq!(fields(&refused), ["deliver_policy", "opt_start_time"]);
        }
    }

    #[test]
    fn a_push_consumer_or_another_ack_policy_is_refused() {
        let push = reported(serde_json::json!({ "deliver_subject": "inbox.upd", "ack_policy": "none" }));
        assert_eq!(fields(&plan_update(&spec(), &push, NEW).unwrap_err()), ["deliver_subject", "ack_policy"]);
    }

    #[test]
    fn a_server_side_backoff_is_cleared_once() {
        // Created elsewhere with ack_wait 2s and backoff [100ms, 100ms]: the
        // server reports ack_wait 100ms.
        let spec = ConsumerSpec {
            ack_wait: Some(Duration::from_secs(2)),
            max_deliver: Some(3),
            backoff: vec![Duration::from_millis(100)],
            ..spec()
        };
        let existing = reported(serde_json::json!({
            "ack_wait": 100_000_000u64, "backoff": [100_000_000u64, 100_000_000u64], "max_deliver": 3,
        }));
        let update = plan_update(&spec, &existing, OLD).unwrap();
        assert_eq!(
            update.changes,
            vec![
                Change { field: "ack_wait", existing: "100ms".into(), declared: "2s".into() },
                Change { field: "backoff", existing: "[100ms, 100ms]".into(), declared: "(none)".into() },
            ]
        );
        assert_eq!(plan_update(&spec, &update.config, OLD).unwrap().changes, vec![], "as read back");
    }

    #[test]
    fn the_refusal_names_the_consumer_the_values_and_the_ways_out() {
        let spec = ConsumerSpec { subject: Some("upd.>".into()), ..spec() };
        let refused = plan_update(&spec, &reported(serde_json::json!({})), OLD).unwrap_err();
        let message = refusal_message(&spec, &refused);
        for needle in
            ["\"upd\"", "\"UPD\"", "filter_subject", "(none: every subject)", "upd.>", "nats consumer rm UPD upd"]
        {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        let by_sequence = reported(serde_json::json!({ "deliver_policy": "by_start_sequence", "opt_start_seq": 5 }));
        let message = refusal_message(&spec, &plan_update(&spec, &by_sequence, NEW).unwrap_err());
        assert_eq!(message.matches("fixed when it is created").count(), 1, "one reason, said once: {message}");
    }
}
