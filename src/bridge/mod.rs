//! Bridges from handlers to the outside world: HTTP, SQL databases and processes.
//! [`BridgeConfig`] holds their settings; [`Bridges`] is what one VM owns of them
//! (its HTTP client, its database pools), kept as Lua app data on the VM's thread
//! because a connection's I/O runs on the runtime that opened it.
//!
//! Cancellation: every bridge call is a future inside the handler's future, which
//! the dispatcher drops at the deadline or at shutdown. Dropping it closes the HTTP
//! connection, closes a database connection that was mid-statement or inside a
//! transaction (the server rolls back), and kills a child's process group.

pub mod exec;
pub mod http_client;
pub mod http_exchange;
pub mod sql;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use http_exchange::{HttpExchange, Network};

pub const DEFAULT_HTTP_MAX_BODY: usize = 10 << 20;
/// The name `sql.query` and friends use; `sql.db(name)` reaches the others.
pub const DEFAULT_DATABASE: &str = "default";

/// Settings of the bridges. `None` in a pool spec means offline (`check`,
/// `replay`): bridges that need the outside world raise an error naming themselves.
#[derive(Debug, Clone, Default)]
pub struct BridgeConfig {
    /// `host` or `host:port` entries; empty allows any destination.
    pub http_allow: Vec<String>,
    pub http_max_body: usize,
    pub http_ca: Option<PathBuf>,
    /// Database name -> URL; the `--sql-url` one under [`DEFAULT_DATABASE`].
    pub databases: BTreeMap<String, sql::DatabaseUrl>,
    /// How long to keep trying to reach a database at start; `None` keeps trying.
    pub connect_timeout: Option<Duration>,
}

/// One VM's bridges. Lives in the VM's Lua app data.
pub struct Bridges {
    /// `None`: offline, see [`BridgeConfig`].
    config: Option<Rc<BridgeConfig>>,
    unsafe_lua: bool,
    http: OnceCell<Result<Rc<dyn HttpExchange>, String>>,
    /// The HTTP settings of an exchange given to offline bridges.
    offline_http: BridgeConfig,
    pools: sql::Pools,
}

impl Bridges {
    /// Bridges that refuse to reach the outside world.
    pub fn offline(unsafe_lua: bool) -> Self {
        Bridges {
            config: None,
            unsafe_lua,
            http: OnceCell::new(),
            offline_http: BridgeConfig { http_max_body: DEFAULT_HTTP_MAX_BODY, ..BridgeConfig::default() },
            pools: sql::Pools::default(),
        }
    }

    /// Offline bridges whose `http.request` goes to `exchange`, with the default
    /// HTTP settings (any host, `--http-max-body` 10MiB).
    pub fn offline_with_http(unsafe_lua: bool, exchange: Rc<dyn HttpExchange>) -> Self {
        let bridges = Self::offline(unsafe_lua);
        let _ = bridges.http.set(Ok(exchange));
        bridges
    }

    /// Opens this VM's database pools (waiting for unreachable databases as the
    /// settings say); the HTTP client is made on first use.
    pub async fn open(config: BridgeConfig, unsafe_lua: bool) -> Result<Self, String> {
        let pools = sql::Pools::open(&config.databases, config.connect_timeout).await?;
        let offline_http = BridgeConfig::default();
        Ok(Bridges { config: Some(Rc::new(config)), unsafe_lua, http: OnceCell::new(), offline_http, pools })
    }

    /// Whether `--unsafe-lua` lets handlers run commands.
    pub fn unsafe_lua(&self) -> bool {
        self.unsafe_lua
    }

    /// The settings, or an error naming `bridge` when offline.
    pub fn config(&self, bridge: &str) -> mlua::Result<&BridgeConfig> {
        self.config.as_deref().ok_or_else(|| {
            mlua::Error::runtime(format!(
                "{bridge} is not available here: `check` and `replay` do not reach the outside world"
            ))
        })
    }

    /// Where this VM's HTTP requests go (its client, made on first use) and
    /// the HTTP settings.
    pub fn http(&self, bridge: &str) -> mlua::Result<(Rc<dyn HttpExchange>, &BridgeConfig)> {
        let config = match (&self.config, self.http.get()) {
            (Some(config), _) => config,
            (None, Some(Ok(_))) => &self.offline_http,
            (None, _) => self.config(bridge)?,
        };
        let exchange = self
            .http
            .get_or_init(|| http_client::build(config).map(|client| Rc::new(Network(client)) as Rc<dyn HttpExchange>));
        match exchange {
            Ok(exchange) => Ok((exchange.clone(), config)),
            Err(message) => Err(mlua::Error::runtime(format!("{bridge}: {message}"))),
        }
    }

    pub fn pools(&self, bridge: &str) -> mlua::Result<&sql::Pools> {
        self.config(bridge)?;
        Ok(&self.pools)
    }
}

/// The bridges of the VM `lua` belongs to.
pub fn of(lua: &mlua::Lua) -> Rc<Bridges> {
    lua.app_data_ref::<Rc<Bridges>>().map(|b| b.clone()).unwrap_or_else(|| Rc::new(Bridges::offline(false)))
}

/// `url` with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => url.split_once('@').map(|(_, host)| format!("***@{host}")).unwrap_or_else(|| url.to_string()),
    }
}
