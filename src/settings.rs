//! The settings every layer reads, with every default in one place. They are
//! plain data: [`crate::config`] builds them from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::bridge::BridgeConfig;

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
