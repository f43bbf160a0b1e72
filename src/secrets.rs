//! Which environment variables carry the worker's secrets, so that scripts
//! (`env.get`, `os.getenv`) and the commands they run (`sh.exec`) never see
//! them. The list follows from the settings marked secret where they are
//! defined (the command line's flags, the OTLP variables): the command line
//! [`declare`]s it once at start, before any VM exists. Until then every
//! variable counts as secret, so a missing declaration hides too much, never
//! too little.

use std::sync::OnceLock;

/// What of a variable's value is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// The whole value: a password, token, key, header list or the path of a key file.
    Value,
    /// A URL, secret when it carries credentials (`user:password@`, `token@`, a
    /// `password=` parameter).
    Url,
}

/// An environment variable that can carry one of the worker's secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVariable {
    pub name: String,
    pub secret: Secret,
}

static DECLARED: OnceLock<&'static [SecretVariable]> = OnceLock::new();

/// Fixes the process's secret variables; later calls change nothing.
pub fn declare(variables: &'static [SecretVariable]) {
    DECLARED.get_or_init(|| variables);
}

/// Whether the variable `name`, set to `value`, carries one of the worker's
/// secrets: scripts read it as nil and commands they run do not inherit it.
pub fn is_secret_variable(name: &str, value: &str) -> bool {
    let Some(declared) = DECLARED.get() else { return true };
    declared.iter().filter(|variable| variable.name == name).any(|variable| match variable.secret {
        Secret::Value => true,
        Secret::Url => url_carries_credentials(value),
    })
}

fn url_carries_credentials(urls: &str) -> bool {
    crate::nats_url::redact(urls) != urls || urls.to_ascii_lowercase().contains("password=")
}
