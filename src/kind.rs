//! Subject -> kind mapping: the `kind` template of `bus.subscribe`, with the
//! `{{subject}}` and `{{wildcard(N)}}` placeholders of NATS subject mapping.

use std::fmt;

use async_nats::Subject;

/// A parsed kind template, checked against the subscription's subject pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindTemplate {
    source: String,
    parts: Vec<Part>,
    /// Token position of each wildcard in the pattern, and whether it is `>`.
    wildcards: Vec<(usize, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Subject,
    Wildcard(usize),
}

impl KindTemplate {
    pub const DEFAULT: &'static str = "{{subject}}";

    /// Parses `template` for subscriptions on `pattern`.
    pub fn parse(template: &str, pattern: &str) -> Result<Self, String> {
        let wildcards: Vec<(usize, bool)> = pattern
            .split('.')
            .enumerate()
            .filter(|(_, token)| *token == "*" || *token == ">")
            .map(|(position, token)| (position, token == ">"))
            .collect();
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let end =
                rest[start..].find("}}").ok_or_else(|| format!("kind template {template:?}: unclosed '{{{{'"))? + start;
            let placeholder = rest[start + 2..end].trim();
            parts.push(parse_placeholder(placeholder, template, wildcards.len())?);
            rest = &rest[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("kind template is empty".to_string());
        }
        Ok(KindTemplate { source: template.to_string(), parts, wildcards })
    }

    /// The wildcards the template names, in its order (1-based).
    pub fn wildcard_references(&self) -> Vec<usize> {
        self.parts.iter().filter_map(|part| if let Part::Wildcard(n) = part { Some(*n) } else { None }).collect()
    }

    /// Whether the template contains `{{subject}}`.
    pub fn mentions_subject(&self) -> bool {
        self.parts.contains(&Part::Subject)
    }

    /// The template applied to a subject given as text.
    pub fn render_str(&self, subject: &str) -> String {
        self.render_text(subject)
    }

    /// The kind of a message that arrived on `subject`. The default template
    /// shares the subject's buffer instead of copying it.
    pub fn render(&self, subject: &Subject) -> Subject {
        if let [Part::Subject] = self.parts.as_slice() {
            return subject.clone();
        }
        Subject::from(self.render_text(subject))
    }

    fn render_text(&self, subject: &str) -> String {
        let mut kind = String::with_capacity(subject.len() + 8);
        for part in &self.parts {
            match part {
                Part::Literal(text) => kind.push_str(text),
                Part::Subject => kind.push_str(subject),
                Part::Wildcard(n) => kind.push_str(self.capture(subject, *n)),
            }
        }
        kind
    }

    fn capture<'s>(&self, subject: &'s str, n: usize) -> &'s str {
        let (position, is_tail) = self.wildcards[n - 1];
        let mut tokens = subject.splitn(position + 1, '.');
        let token = tokens.nth(position).unwrap_or("");
        if is_tail { token } else { token.split('.').next().unwrap_or("") }
    }
}

impl KindTemplate {
    /// The one kind this template gives for subjects matching `pattern`, if it
    /// cannot give any other.
    pub fn fixed_kind(&self, pattern: &str) -> Option<String> {
        let wildcard_free = !pattern.split('.').any(|t| t == "*" || t == ">");
        let mut kind = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => kind.push_str(text),
                Part::Subject if wildcard_free => kind.push_str(pattern),
                _ => return None,
            }
        }
        Some(kind)
    }

    /// Whether some subject matching `pattern` renders to `kind`.
    pub fn can_produce(&self, pattern: &str, kind: &str) -> bool {
        self.produces(&self.parts, pattern, kind)
    }

    fn produces(&self, parts: &[Part], pattern: &str, rest: &str) -> bool {
        let Some((first, others)) = parts.split_first() else { return rest.is_empty() };
        match first {
            Part::Literal(text) => rest.strip_prefix(text.as_str()).is_some_and(|r| self.produces(others, pattern, r)),
            Part::Subject => split_points(rest)
                .any(|i| subject_matches(pattern, &rest[..i]) && self.produces(others, pattern, &rest[i..])),
            Part::Wildcard(n) => {
                let (_, is_tail) = self.wildcards[n - 1];
                split_points(rest).any(|i| {
                    let captured = &rest[..i];
                    let tokens_ok = !captured.is_empty() && captured.split('.').all(|t| !t.is_empty());
                    let shape_ok = is_tail || !captured.contains('.');
                    tokens_ok && shape_ok && self.produces(others, pattern, &rest[i..])
                })
            }
        }
    }
}

fn split_points(text: &str) -> impl Iterator<Item = usize> + '_ {
    (0..=text.len()).filter(|&i| text.is_char_boundary(i))
}

fn parse_placeholder(placeholder: &str, template: &str, wildcard_count: usize) -> Result<Part, String> {
    if placeholder == "subject" {
        return Ok(Part::Subject);
    }
    let index = placeholder
        .strip_prefix("wildcard(")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| {
            format!("kind template {template:?}: unknown placeholder {{{{{placeholder}}}}}; use {{{{subject}}}} or {{{{wildcard(N)}}}}")
        })?;
    let n: usize = index
        .trim()
        .parse()
        .map_err(|_| format!("kind template {template:?}: wildcard index {index:?} is not a number"))?;
    if n == 0 || n > wildcard_count {
        return Err(format!(
            "kind template {template:?}: wildcard({n}) does not exist; the subject has {wildcard_count} wildcard(s), numbered from 1"
        ));
    }
    Ok(Part::Wildcard(n))
}

impl fmt::Display for KindTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(template: &str, pattern: &str, subject: &str) -> String {
        KindTemplate::parse(template, pattern).unwrap().render(&Subject::from(subject)).to_string()
    }

    #[test]
    fn default_template_is_the_subject() {
        assert_eq!(kind("{{subject}}", "orders.*", "orders.new"), "orders.new");
    }

    #[test]
    fn wildcards_capture_tokens_and_tail() {
        assert_eq!(kind("order.{{wildcard(1)}}", "orders.*", "orders.created"), "order.created");
        assert_eq!(kind("{{wildcard(2)}}-{{wildcard(1)}}", "a.*.b.*", "a.x.b.y"), "y-x");
        assert_eq!(kind("tail:{{wildcard(1)}}", "jobs.>", "jobs.email.send"), "tail:email.send");
        assert_eq!(kind("{{ wildcard(2) }}", "*.>", "x.y.z"), "y.z");
        assert_eq!(kind("fixed", "a.b", "a.b"), "fixed");
    }

    #[test]
    fn templates_know_which_kinds_they_can_give() {
        let t = |template: &str, pattern: &str| KindTemplate::parse(template, pattern).unwrap();
        assert!(t("{{subject}}", "orders.*").can_produce("orders.*", "orders.new"));
        assert!(!t("{{subject}}", "orders.*").can_produce("orders.*", "orders.new.eu"));
        assert!(t("order.{{wildcard(1)}}", "orders.*").can_produce("orders.*", "order.created"));
        assert!(!t("order.{{wildcard(1)}}", "orders.*").can_produce("orders.*", "orders.created"));
        assert!(t("{{wildcard(2)}}", "shop.*.>").can_produce("shop.*.>", "cart.add"));
        assert!(!t("{{wildcard(1)}}", "shop.*.>").can_produce("shop.*.>", "cart.add"));
        assert_eq!(t("{{subject}}", "a.b").fixed_kind("a.b").as_deref(), Some("a.b"));
        assert_eq!(t("x", "a.*").fixed_kind("a.*").as_deref(), Some("x"));
        assert_eq!(t("{{subject}}", "a.*").fixed_kind("a.*"), None);
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        assert!(KindTemplate::parse("{{wildcard(2)}}", "a.*").unwrap_err().contains("1 wildcard"));
        assert!(KindTemplate::parse("{{wildcard(0)}}", "a.*").is_err());
        assert!(KindTemplate::parse("{{nope}}", "a").unwrap_err().contains("unknown placeholder"));
        assert!(KindTemplate::parse("{{subject", "a").unwrap_err().contains("unclosed"));
        assert!(KindTemplate::parse("", "a").is_err());
    }
}

/// Whether `subject` matches the subscription `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for wanted in pattern.split('.') {
        match (wanted, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod matching_tests {
    use super::subject_matches;

    #[test]
    fn patterns_match_like_nats() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a"));
    }
}
