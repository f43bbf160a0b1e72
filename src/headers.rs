//! Header names and values built from data a handler, a file or a command line
//! gave, checked before they reach the NATS client (which panics on a bad one).
//!
//! A value may hold any text but line breaks would end the header block, so every
//! control character but tab becomes a space; a name must be printable ASCII
//! without `:`, and a bad one is an error that names it, since no replacement
//! would be the name the author meant.

use std::borrow::Cow;

use async_nats::{HeaderMap, HeaderName, HeaderValue};

/// `text` as a header value, control characters (but tab) replaced by spaces.
pub fn value(text: &str) -> HeaderValue {
    let clean: Cow<str> = if text.chars().any(is_replaced) {
        Cow::Owned(text.chars().map(|c| if is_replaced(c) { ' ' } else { c }).collect())
    } else {
        Cow::Borrowed(text)
    };
    HeaderValue::from(clean.as_ref())
}

fn is_replaced(c: char) -> bool {
    c.is_control() && c != '\t'
}

/// `text` as a header name, or an error naming it.
pub fn name(text: &str) -> Result<HeaderName, String> {
    if text.is_empty() {
        return Err("a header name cannot be empty".to_string());
    }
    text.parse::<HeaderName>()
        .map_err(|_| format!("header name {text:?} is not valid: use printable ASCII without spaces or ':'"))
}

/// Appends `name: value` to `headers`, checked as above.
pub fn append(headers: &mut HeaderMap, name_text: &str, value_text: &str) -> Result<(), String> {
    headers.append(name(name_text)?, value(value_text));
    Ok(())
}

/// Sets `name: value` in `headers`, checked as above.
pub fn insert(headers: &mut HeaderMap, name_text: &str, value_text: &str) -> Result<(), String> {
    headers.insert(name(name_text)?, value(value_text));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_values_become_spaces() {
        assert_eq!(value("bad a\rb\nc\0d\x7fe\tf").as_str(), "bad a b c d e\tf");
        assert_eq!(value("plain é").as_str(), "plain é");
    }

    #[test]
    fn bad_names_are_errors_that_name_them() {
        for bad in ["", "Bad Name", "a:b", "é", "x\r"] {
            let err = name(bad).unwrap_err();
            assert!(err.contains("header name"), "{err}");
        }
        assert_eq!(name("X-Good").unwrap().to_string(), "X-Good");
    }
}
