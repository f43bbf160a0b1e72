//! An error and its causes on one line, as users read them in logs and on
//! stderr: `cannot create stream "ORDERS": insufficient resources`.

use std::error::Error;

/// `err`'s message followed by each cause's, separated by `": "`.
pub fn chain(err: &dyn Error) -> String {
    with_causes(err.to_string(), err.source())
}

/// `message` followed by `cause`'s message and each further cause's, except
/// those it already contains (some libraries repeat their cause in their own
/// message).
pub fn with_causes(mut message: String, mut cause: Option<&dyn Error>) -> String {
    while let Some(next) = cause {
        let text = next.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = next.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the consumer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_the_message() {
        let err = Outer(std::io::Error::other("connection reset"));
        assert_eq!(chain(&err), "cannot open the consumer: connection reset");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the consumer: {0}")]
    struct Repeating(#[source] std::io::Error);

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let err = Repeating(std::io::Error::other("connection reset"));
        assert_eq!(chain(&err), "cannot open the consumer: connection reset");
    }
}
