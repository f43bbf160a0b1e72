//! Where a keyed consumer's message belongs, offline. In production the stream's
//! subject transform (`{{partition(N,i,...)}}`) decides the partition and the
//! worker only reads it back from the stored subject; without a server the test
//! runner computes it the way nats-server does, so `ev.meta.partition` is the
//! number a real stream would give.

use crate::event::KeyedMeta;
use crate::partitioning::Partitioning;

/// The key and partition of a message on `subject`, read by a keyed consumer
/// whose filter subject is `pattern`.
pub fn keyed_meta(keyed: &Partitioning, pattern: &str, subject: &str) -> KeyedMeta {
    let tokens = wildcard_tokens(pattern, subject, &keyed.key.wildcard_references());
    KeyedMeta { partition: partition(&tokens, keyed.partitions), key: keyed.key.render_str(subject) }
}

/// nats-server's `partition()` transform: FNV-1a (32 bit) over the named
/// wildcard tokens concatenated without a separator, modulo `partitions`.
pub fn partition(tokens: &[&str], partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in tokens.iter().flat_map(|token| token.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// The tokens of `subject` at the `*` wildcards of `pattern` that `wildcards`
/// (1-based) names, in that order. A keyed consumer's pattern has only `*`
/// wildcards, each standing for exactly one token.
fn wildcard_tokens<'s>(pattern: &str, subject: &'s str, wildcards: &[usize]) -> Vec<&'s str> {
    let positions: Vec<usize> =
        pattern.split('.').enumerate().filter(|(_, token)| *token == "*").map(|(position, _)| position).collect();
    let tokens: Vec<&str> = subject.split('.').collect();
    wildcards
        .iter()
        .filter_map(|n| positions.get(n.checked_sub(1)?))
        .map(|position| tokens.get(*position).copied().unwrap_or(""))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, partitions: u32, pattern: &str, subject: &str) -> (u32, String) {
        let keyed = Partitioning::parse(key, partitions, pattern).unwrap();
        let KeyedMeta { partition, key } = keyed_meta(&keyed, pattern, subject);
        (partition, key)
    }

    /// Observed on nats-server 2.15.1: a stream of `ord.*` with the transform
    /// `{{partition(6,1)}}.ord.{{wildcard(1)}}` stored `ord.a` .. `ord.h` as
    /// `4.ord.a 1.ord.b 2.ord.c 1.ord.d 2.ord.e 5.ord.f 0.ord.g 1.ord.h`.
    #[test]
    fn one_wildcard_partitions_as_the_server_does() {
        let observed = [("a", 4), ("b", 1), ("c", 2), ("d", 1), ("e", 2), ("f", 5), ("g", 0), ("h", 1)];
        for (token, expected) in observed {
            assert_eq!(meta("{{wildcard(1)}}", 6, "ord.*", &format!("ord.{token}")), (expected, token.to_string()));
        }
    }

    /// Observed on nats-server 2.15.1 with `t.*.x.*` and the transform
    /// `{{partition(24,2,1)}}.t.{{wildcard(1)}}.x.{{wildcard(2)}}`: the tokens are
    /// hashed in the key's order with no separator, so `t.ab.x.c` ("cab") and
    /// `t.42.x.eu` ("eu42") share partition 9, while `t.c.x.ab` ("abc") does not.
    #[test]
    fn several_wildcards_hash_in_the_keys_order_without_a_separator() {
        let observed = [
            ("t.ab.x.c", 9, "c-ab"),
            ("t.a.x.bc", 17, "bc-a"),
            ("t.c.x.ab", 11, "ab-c"),
            ("t.eu.x.42", 21, "42-eu"),
            ("t.42.x.eu", 9, "eu-42"),
            ("t.order-17.x.z", 22, "z-order-17"),
        ];
        for (subject, expected, key) in observed {
            assert_eq!(meta("{{wildcard(2)}}-{{wildcard(1)}}", 24, "t.*.x.*", subject), (expected, key.to_string()));
        }
    }

    #[test]
    fn one_partition_takes_every_key() {
        assert_eq!(partition(&["anything"], 1), 0);
        assert_eq!(partition(&[], 6), 0x811c_9dc5 % 6);
    }
}
