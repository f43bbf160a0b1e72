//! Resolved settings with every default in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::bridge::BridgeConfig;
use crate::cli::{ConnectionArgs, LuaArgs, WorkerArgs};

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_NAME: &str = "agent-block";
pub const DEFAULT_CONCURRENCY: usize = 256;
pub const DEFAULT_BUS_CAPACITY: usize = 1024;
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// `--time-slice` when not given: long enough that switching costs nothing
/// measurable, short enough that a handler ready beside CPU-bound ones waits a
/// few milliseconds.
pub const DEFAULT_TIME_SLICE: Duration = Duration::from_millis(10);

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

/// Whether the variable `name`, set to `value`, carries one of the worker's
/// secrets: scripts read it as nil and commands they run do not inherit it.
pub fn is_secret_variable(name: &str, value: &str) -> bool {
    secret_variables().iter().filter(|variable| variable.name == name).any(|variable| match variable.secret {
        Secret::Value => true,
        Secret::Url => url_carries_credentials(value),
    })
}

fn url_carries_credentials(urls: &str) -> bool {
    crate::nats_url::redact(urls) != urls || urls.to_ascii_lowercase().contains("password=")
}

/// How to connect to NATS. Its `Debug` form hides every secret.
#[derive(Clone)]
pub struct ConnectionConfig {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub nkey: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `None` keeps trying forever.
    pub connect_timeout: Option<Duration>,
    /// Client name announced to the server.
    pub client_name: String,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| "***");
        f.debug_struct("ConnectionConfig")
            .field("url", &crate::nats_url::redact(&self.url))
            .field("creds", &self.creds)
            .field("nkey", &hidden(&self.nkey))
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("connect_timeout", &self.connect_timeout)
            .field("client_name", &self.client_name)
            .finish()
    }
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

/// How each Lua VM is built.
#[derive(Debug, Clone, Default)]
pub struct LuaConfig {
    pub unsafe_lua: bool,
    pub memory_limit: Option<usize>,
    /// Runs after the Lua API is installed and before the script loads; `test`
    /// replaces bridges with fakes through it.
    pub prelude: Option<Prelude>,
}

/// `--lua-memory-limit` when not given: enough for any handler that processes
/// messages, small enough that one runaway handler cannot take the machine.
pub const DEFAULT_LUA_MEMORY_LIMIT: usize = 256 * 1024 * 1024;

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

/// Code run in every VM between the Lua API and the script (see [`LuaConfig::prelude`]).
#[derive(Clone)]
pub struct Prelude(pub std::sync::Arc<PreludeFn>);

pub type PreludeFn = dyn Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync;

impl std::fmt::Debug for Prelude {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prelude")
    }
}

/// Everything a serving worker needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub script: PathBuf,
    pub name: String,
    pub workers: usize,
    pub concurrency: usize,
    pub bus_capacity: usize,
    pub handler_timeout: Duration,
    /// `None` = handlers are never suspended for others.
    pub time_slice: Option<Duration>,
    pub grace: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub connection: ConnectionConfig,
    pub lua: LuaConfig,
    pub bridges: BridgeConfig,
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
