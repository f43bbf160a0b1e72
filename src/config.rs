//! From the command line's arguments to the [`crate::settings`]: defaults
//! applied, values checked; and which environment variables carry secrets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::bridge::{DEFAULT_DATABASE, DEFAULT_HTTP_MAX_BODY, http_client, sql};
use crate::cli::{BridgeArgs, ConnectionArgs, LuaArgs, WorkerArgs};
use crate::settings::{
    BridgeConfig, ConnectionConfig, DEFAULT_BUS_CAPACITY, DEFAULT_CONCURRENCY, DEFAULT_GRACE, DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_LUA_MEMORY_LIMIT, DEFAULT_NAME, DEFAULT_NATS_URL, DEFAULT_TIME_SLICE, LuaConfig, WorkerConfig,
};

pub use crate::secrets::{Secret, SecretVariable};

/// Every variable of a setting marked secret where it is defined: the flags of
/// [`crate::cli`] (their `AGENT_BLOCK_*` variables and aliases) and the OTLP
/// variables of [`crate::telemetry::trace`].
pub fn secret_variables() -> &'static [SecretVariable] {
    static VARIABLES: std::sync::OnceLock<Vec<SecretVariable>> = std::sync::OnceLock::new();
    VARIABLES.get_or_init(|| {
        let flags = crate::cli::secret_settings().into_iter().flat_map(|setting| {
            let secret = if setting.url { Secret::Url } else { Secret::Value };
            setting.variables.into_iter().map(move |name| SecretVariable { name, secret })
        });
        let otlp = crate::telemetry::trace::SECRET_VARIABLES.iter().map(|(name, url)| SecretVariable {
            name: name.to_string(),
            secret: if *url { Secret::Url } else { Secret::Value },
        });
        flags.chain(otlp).collect()
    })
}

/// Declares [`secret_variables`] to the sandbox ([`crate::secrets`]).
pub fn declare_secrets() {
    crate::secrets::declare(secret_variables());
}

impl ConnectionConfig {
    pub fn from_args(args: &ConnectionArgs, client_name: &str) -> Self {
        let alias =
            |id: &str| crate::cli::env_alias(id).and_then(|name| std::env::var(name).ok()).filter(|v| !v.is_empty());
        ConnectionConfig {
            url: args.nats_url.clone().or_else(|| alias("nats_url")).unwrap_or_else(|| DEFAULT_NATS_URL.to_string()),
            creds: args.creds.clone().or_else(|| alias("creds").map(PathBuf::from)),
            nkey: args.nkey.clone(),
            user: args.user.clone(),
            password: args.password.clone(),
            token: args.token.clone(),
            tls_ca: args.tls_ca.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            connect_timeout: args.connect_timeout.filter(|t| !t.is_zero()),
            client_name: client_name.to_string(),
        }
    }
}

impl From<&LuaArgs> for LuaConfig {
    fn from(args: &LuaArgs) -> Self {
        let memory_limit = match args.lua_memory_limit {
            None => Some(DEFAULT_LUA_MEMORY_LIMIT),
            Some(0) => None,
            Some(limit) => Some(limit),
        };
        LuaConfig { unsafe_lua: args.unsafe_lua, memory_limit, prelude: None }
    }
}

impl WorkerConfig {
    /// Applies defaults and checks values; errors are meant for the user.
    pub fn from_args(script: PathBuf, args: &WorkerArgs) -> Result<Self, String> {
        let name = args.name.clone().unwrap_or_else(|| DEFAULT_NAME.to_string());
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '.' || c == '*' || c == '>') {
            return Err(format!("invalid --name {name:?}: use letters, digits, '-' or '_'"));
        }
        let workers = args.workers.unwrap_or_else(default_workers);
        let concurrency = args.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        let bus_capacity = args.bus_capacity.unwrap_or(DEFAULT_BUS_CAPACITY);
        for (flag, value) in [("--workers", workers), ("--concurrency", concurrency), ("--bus-capacity", bus_capacity)]
        {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        let metrics_addr = match &args.metrics_addr {
            None => None,
            Some(text) if text.is_empty() => None,
            Some(text) => Some(text.parse().map_err(|err| {
                format!("invalid --metrics-addr {text:?}: {err} (expected HOST:PORT, e.g. 0.0.0.0:9090)")
            })?),
        };
        let connection = ConnectionConfig::from_args(&args.connection, &name);
        let mut bridges = BridgeConfig::from_args(&args.bridges)?;
        bridges.connect_timeout = connection.connect_timeout;
        Ok(WorkerConfig {
            connection,
            script,
            name,
            workers,
            concurrency,
            bus_capacity,
            handler_timeout: args.handler_timeout.unwrap_or(DEFAULT_HANDLER_TIMEOUT),
            time_slice: Some(args.time_slice.unwrap_or(DEFAULT_TIME_SLICE)).filter(|slice| !slice.is_zero()),
            grace: args.grace.or(args.task_grace_ms.map(Duration::from_millis)).unwrap_or(DEFAULT_GRACE),
            metrics_addr,
            lua: LuaConfig::from(&args.lua),
            bridges,
        })
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The bridges' settings.
impl BridgeConfig {
    /// Checks the settings; errors are meant for the user.
    pub fn from_args(args: &BridgeArgs) -> Result<Self, String> {
        let mut databases = BTreeMap::new();
        if let Some(url) = args.sql_url.as_deref().filter(|u| !u.is_empty()) {
            databases.insert(DEFAULT_DATABASE.to_string(), sql::DatabaseUrl::parse(url, "--sql-url")?);
        }
        for entry in &args.sql {
            let Some((name, url)) = entry.split_once('=') else {
                return Err(format!("invalid --sql {entry:?}: expected NAME=URL, e.g. reports=postgres://host/db"));
            };
            let name = name.trim();
            if name.is_empty() || databases.contains_key(name) {
                return Err(format!("invalid --sql {entry:?}: the name is empty or given twice"));
            }
            databases.insert(name.to_string(), sql::DatabaseUrl::parse(url, &format!("--sql {name}"))?);
        }
        if let Some(path) = &args.http_ca {
            http_client::read_ca(path)?;
        }
        let http_allow: Vec<String> =
            args.http_allow.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
        for entry in &http_allow {
            http_client::check_allow_entry(entry)
                .map_err(|why| format!("invalid --http-allow {entry:?}: {why}; expected host or host:port"))?;
        }
        Ok(BridgeConfig {
            http_allow,
            http_max_body: args.http_max_body.unwrap_or(DEFAULT_HTTP_MAX_BODY),
            http_ca: args.http_ca.clone(),
            databases,
            connect_timeout: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::DEFAULT_HTTP_MAX_BODY;
    use crate::lua_api::env::visible_to_scripts;

    #[test]
    fn credentials_are_hidden_from_scripts_and_other_variables_are_not() {
        declare_secrets();
        assert!(!visible_to_scripts("AGENT_BLOCK_PASSWORD", "x"));
        assert!(!visible_to_scripts("NATS_CREDS", "/run/secrets/user.creds"));
        assert!(!visible_to_scripts("NATS_URL", "nats://u:p@nats:4222"));
        assert!(!visible_to_scripts("AGENT_BLOCK_NATS_URL", "nats://token@nats:4222"));
        assert!(visible_to_scripts("NATS_URL", "nats://nats:4222"));
        assert!(visible_to_scripts("AGENT_BLOCK_TLS_CA", "/etc/ca.pem"));
        assert!(visible_to_scripts("HOME", "/root"));
        assert!(!visible_to_scripts("AGENT_BLOCK_SQL_URL", "postgres://u:pgpass@h/db"));
        assert!(!visible_to_scripts("AGENT_BLOCK_SQL_URL", "postgres://h/db?user=u&password=pgpass"));
        assert!(visible_to_scripts("AGENT_BLOCK_SQL_URL", "sqlite://app.db"));
        assert!(!visible_to_scripts("OTEL_EXPORTER_OTLP_HEADERS", "api-key=k"));
        assert!(!visible_to_scripts("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer t"));
    }

    fn args(sql_url: Option<&str>, sql: &[&str]) -> BridgeArgs {
        BridgeArgs {
            sql_url: sql_url.map(str::to_string),
            sql: sql.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn databases_from_flags() {
        let config = BridgeConfig::from_args(&args(Some("sqlite://a.db"), &["reports=postgres://u:pw@h/db"])).unwrap();
        assert_eq!(config.databases.keys().collect::<Vec<_>>(), ["default", "reports"]);
        assert_eq!(config.databases["reports"].shown(), "postgres://u:***@h/db");
        assert_eq!(config.http_max_body, DEFAULT_HTTP_MAX_BODY);
    }

    #[test]
    fn bad_database_flags_are_refused_without_showing_passwords() {
        let err = BridgeConfig::from_args(&args(Some("mysql://u:pw@h/db"), &[])).unwrap_err();
        assert!(err.contains("--sql-url") && !err.contains("pw"), "{err}");
        let err = BridgeConfig::from_args(&args(None, &["no-equals-sign"])).unwrap_err();
        assert!(err.contains("NAME=URL"), "{err}");
        let err = BridgeConfig::from_args(&args(None, &["a=sqlite://x.db", "a=sqlite://y.db"])).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}
