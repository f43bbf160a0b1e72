//! Keyed consumers (`bus.consume{ key = ..., partitions = N }`): how the key
//! space maps onto partitions with the server's own `partition()` subject
//! transform, and the names and subjects each partition gets.
//!
//! A stream of subject `ord.*` with key `{{wildcard(1)}}` and 6 partitions
//! stores each message under `{{partition(6,1)}}.ord.{{wildcard(1)}}`: the
//! partition number as a first token, the publisher's subject after it. Each
//! partition has its own durable consumer (`ord-0` .. `ord-5`) filtered on its
//! token, so one partition's messages are one consumer's, in stream order.

use std::fmt;

use crate::kind::KindTemplate;

/// The most partitions one keyed consumer may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// `key` and `partitions` of a keyed consumer, checked against its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioning {
    /// The key as the script wrote it, also rendered into `ev.meta.key`.
    pub key: KindTemplate,
    pub partitions: u32,
    /// The consumer's subject, whose wildcards the key names.
    subject: String,
    /// The 1-based wildcards the key is made of, in the key's order.
    wildcards: Vec<usize>,
}

impl Partitioning {
    /// Checks `key` against `subject`: every wildcard of the subject must be
    /// `*` (the transform cannot carry a `>`), and the key must name at least one.
    pub fn parse(key: &str, partitions: u32, subject: &str) -> Result<Self, String> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(format!("partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"));
        }
        if subject.split('.').any(|token| token == ">") {
            return Err(format!(
                "a keyed consumer's subject cannot end in '>' ({subject:?}): the server's partition \
                 transform maps single-token wildcards only; use '*' for each token"
            ));
        }
        let template = KindTemplate::parse(key, subject).map_err(|err| err.replace("kind template", "key"))?;
        let wildcards = template.wildcard_references();
        if template.mentions_subject() || wildcards.is_empty() {
            return Err(format!(
                "key {key:?} must be made of the subject's wildcards, e.g. \"{{{{wildcard(1)}}}}\", so the \
                 server can partition by it"
            ));
        }
        Ok(Partitioning { key: template, partitions, subject: subject.to_string(), wildcards })
    }

    /// The stream's subject transform: the partition as a first token, then
    /// the publisher's subject.
    pub fn transform(&self) -> Transform {
        let indexes: Vec<String> = self.wildcards.iter().map(ToString::to_string).collect();
        let mut destination = format!("{{{{partition({},{})}}}}", self.partitions, indexes.join(","));
        let mut wildcard = 0;
        for token in self.subject.split('.') {
            destination.push('.');
            if token == "*" {
                wildcard += 1;
                destination.push_str(&format!("{{{{wildcard({wildcard})}}}}"));
            } else {
                destination.push_str(token);
            }
        }
        Transform { source: self.subject.clone(), destination }
    }

    /// The durable consumer of partition `partition`.
    pub fn consumer_name(consumer: &str, partition: u32) -> String {
        format!("{consumer}-{partition}")
    }

    /// The filter subject of partition `partition`'s consumer.
    pub fn filter_subject(&self, partition: u32) -> String {
        format!("{partition}.{}", self.subject)
    }

    /// Consumers of all partitions, for `check` and the logs.
    pub fn consumers(&self, consumer: &str) -> String {
        match self.partitions {
            1 => Self::consumer_name(consumer, 0),
            n => format!("{}..{}", Self::consumer_name(consumer, 0), Self::consumer_name(consumer, n - 1)),
        }
    }
}

/// The subject a message was published on, from the one the stream stored it
/// under (the partition token removed).
pub fn published_subject(stored: &str) -> &str {
    stored.split_once('.').map_or(stored, |(_, rest)| rest)
}

/// A stream's subject transform, as its configuration spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub source: String,
    pub destination: String,
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::json!({ "src": self.source, "dest": self.destination });
        write!(f, "\"subject_transform\": {json}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transform_prefixes_the_partition_and_keeps_the_subject() {
        let keyed = Partitioning::parse("{{wildcard(1)}}", 6, "ord.*").unwrap();
        assert_eq!(
            keyed.transform(),
            Transform { source: "ord.*".into(), destination: "{{partition(6,1)}}.ord.{{wildcard(1)}}".into() }
        );
        let keyed = Partitioning::parse("{{wildcard(2)}}-{{wildcard(1)}}", 24, "t.*.x.*").unwrap();
        assert_eq!(keyed.transform().destination, "{{partition(24,2,1)}}.t.{{wildcard(1)}}.x.{{wildcard(2)}}");
        assert_eq!(keyed.filter_subject(7), "7.t.*.x.*");
        assert_eq!(keyed.consumers("c"), "c-0..c-23");
        assert_eq!(Partitioning::parse("{{wildcard(1)}}", 1, "a.*").unwrap().consumers("c"), "c-0");
    }

    #[test]
    fn the_transform_is_shown_as_json() {
        let keyed = Partitioning::parse("{{wildcard(1)}}", 6, "ord.*").unwrap();
        assert_eq!(
            keyed.transform().to_string(),
            r#""subject_transform": {"dest":"{{partition(6,1)}}.ord.{{wildcard(1)}}","src":"ord.*"}"#
        );
    }

    #[test]
    fn stored_subjects_lose_their_partition_token() {
        assert_eq!(published_subject("3.ord.abc"), "ord.abc");
        assert_eq!(published_subject("plain"), "plain");
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        for (key, partitions, subject, expected) in [
            ("{{wildcard(1)}}", 0, "a.*", "between 1 and 1024"),
            ("{{wildcard(1)}}", 1025, "a.*", "between 1 and 1024"),
            ("{{wildcard(1)}}", 2, "a.>", "cannot end in '>'"),
            ("{{wildcard(2)}}", 2, "a.*", "wildcard"),
            ("{{subject}}", 2, "a.*", "must be made of the subject's wildcards"),
            ("fixed", 2, "a.*", "must be made of the subject's wildcards"),
            ("{{wildcard(1)", 2, "a.*", "key"),
        ] {
            let err = Partitioning::parse(key, partitions, subject).unwrap_err();
            assert!(err.contains(expected), "{key} {partitions} {subject}: {err}");
        }
    }
}
