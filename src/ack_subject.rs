//! Where a JetStream message sits, read from its ack subject (ADR-15):
//! `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`,
//! or, from servers that add them, `$JS.ACK.<domain>.<account hash>.` before the
//! stream and more tokens after `pending`. Read here rather than through
//! async-nats's `Message::info`, which splits by characters and converts the
//! timestamp into a calendar date and back, at every message.

/// The numbers of an ack subject; the names are the consumer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSubject<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    pub delivered: u64,
    pub stream_sequence: u64,
    pub published_unix_nanos: u64,
    pub pending: u64,
}

const PREFIX: &str = "$JS.ACK.";

/// Parses `reply`; `None` when it is not an ack subject.
pub fn parse(reply: &str) -> Option<AckSubject<'_>> {
    let rest = reply.strip_prefix(PREFIX)?;
    // Where the first nine dots are; the dots are ASCII, so every token
    // between them is a `str` of its own.
    let bytes = rest.as_bytes();
    let mut dots = [0usize; 9];
    let mut count = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte == b'.' {
            if count < dots.len() {
                dots[count] = at;
            }
            count += 1;
        }
    }
    let token = |index: usize| {
        let start = if index == 0 { 0 } else { dots[index - 1] + 1 };
        let end = if index < count.min(dots.len()) { dots[index] } else { bytes.len() };
        &rest[start..end]
    };
    // 7 tokens (6 dots) after the prefix in the original form, 9 or more with
    // domain and account hash.
    let first = match count + 1 {
        7 => 0,
        tokens if tokens >= 9 => 2,
        _ => return None,
    };
    Some(AckSubject {
        stream: token(first),
        consumer: token(first + 1),
        delivered: number(token(first + 2))?,
        stream_sequence: number(token(first + 3))?,
        published_unix_nanos: number(token(first + 5))?,
        pending: number(token(first + 6))?,
    })
}

fn number(token: &str) -> Option<u64> {
    if token.is_empty() || token.len() > 20 {
        return None;
    }
    let mut value = 0u64;
    for &byte in token.as_bytes() {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_forms_of_the_ack_subject() {
        let v1 = parse("$JS.ACK.ORDERS.work.2.1042.1040.1700000000123456789.7").expect("v1");
        assert_eq!(
            v1,
            AckSubject {
                stream: "ORDERS",
                consumer: "work",
                delivered: 2,
                stream_sequence: 1042,
                published_unix_nanos: 1_700_000_000_123_456_789,
                pending: 7,
            }
        );
        let v2 = parse("$JS.ACK.hub.ACCHASH.ORDERS.work.2.1042.1040.1700000000123456789.7.rnd").expect("v2");
        assert_eq!(v2, v1);
        let v2_without_token = parse("$JS.ACK._.ACCHASH.ORDERS.work.2.1042.1040.1700000000123456789.7").expect("v2");
        assert_eq!(v2_without_token, v1);
    }

    #[test]
    fn anything_else_is_not_an_ack_subject() {
        for reply in [
            "_INBOX.abc",
            "$JS.ACK.ORDERS.work.2.1042.1040.1700000000123456789",
            "$JS.ACK.ORDERS.work.x.1042.1040.1700000000123456789.7",
            "$JS.ACK.ORDERS.work.2.-1.1040.1700000000123456789.7",
            "$JS.ACK.ORDERS.work.2.99999999999999999999.1040.1.7",
            "$JS.ACK.ORDERS.work.2..1040.1.7",
            "$JS.ACK.A.B.ORDERS.work.2.1042.1040.1",
        ] {
            assert_eq!(parse(reply), None, "{reply}");
        }
        assert_eq!(number("18446744073709551615"), Some(u64::MAX));
    }
}
