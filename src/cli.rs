//! The command line. Every flag also reads `AGENT_BLOCK_<FLAG>` from the environment;
//! `NATS_URL` and `NATS_CREDS` work too. [`crate::config`] turns these into settings.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration::{parse_duration, parse_size};

#[derive(Debug, Parser)]
#[command(name = "agent-block", version, about = "Lua-first worker runtime for NATS")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format; `pretty` suits a terminal, `json` a log collector.
    #[arg(long, global = true, env = "AGENT_BLOCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve SCRIPT until SIGTERM/SIGINT.
    Run {
        /// Lua script, loaded in every VM
        script: PathBuf,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Load SCRIPT and print its subscriptions and handler kinds; exit 2 on any error.
    Check {
        /// Lua script to load
        script: PathBuf,
        #[command(flatten)]
        lua: LuaArgs,
    },
    /// `run` against a private nats-server (JetStream on, temporary store, free port).
    Dev {
        /// Lua script, loaded in every VM
        script: PathBuf,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Send one request and print the reply: a tiny client for trying a worker.
    Request {
        /// Subject to send the request to
        subject: String,
        /// Request body; `-` reads it from standard input.
        data: Option<String>,
        /// A header `NAME:VALUE`; repeat for more.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// How long to wait for the reply.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Run SCRIPT over events from a file (one JSON object per line) without NATS.
    Replay {
        /// Lua script to load
        script: PathBuf,
        /// File of JSON lines `{subject, data|payload, headers}`; `-` reads standard input.
        #[arg(long)]
        events: PathBuf,
        #[arg(long, env = "AGENT_BLOCK_HANDLER_TIMEOUT", value_parser = parse_duration)]
        handler_timeout: Option<Duration>,
        #[command(flatten)]
        lua: LuaArgs,
    },
    /// Scaffold a worker in DIR: app.lua, app_test.lua, .luarc.json and the Lua API types.
    Init {
        /// Folder to create or fill
        dir: PathBuf,
    },
    /// Run `*_test.lua` files offline against fakes of every bridge; exit 1 on a failure.
    Test {
        /// Test files, or folders searched for `*_test.lua` [default: .]
        paths: Vec<PathBuf>,
        /// Also write the results as JUnit XML to this file
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
}

/// How to reach NATS.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// NATS server URL(s), comma-separated for a cluster [env: NATS_URL]
    /// [default: nats://127.0.0.1:4222]
    #[arg(long, env = "AGENT_BLOCK_NATS_URL")]
    pub nats_url: Option<String>,
    /// Credentials file (JWT + NKey seed) [env: NATS_CREDS]
    #[arg(long, env = "AGENT_BLOCK_CREDS")]
    pub creds: Option<PathBuf>,
    /// NKey seed
    #[arg(long, env = "AGENT_BLOCK_NKEY")]
    pub nkey: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_USER")]
    pub user: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_PASSWORD")]
    pub password: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_TOKEN")]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server
    #[arg(long, env = "AGENT_BLOCK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS
    #[arg(long, env = "AGENT_BLOCK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS
    #[arg(long, env = "AGENT_BLOCK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Give up connecting at start after this long (exit 1); 0 keeps trying
    #[arg(long, env = "AGENT_BLOCK_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// Lua VM settings shared by every command that loads a script.
#[derive(Debug, Clone, Default, Args)]
pub struct LuaArgs {
    /// Lift the sandbox: allow os.execute, io, debug, package.loadlib, binary chunks
    #[arg(long, env = "AGENT_BLOCK_UNSAFE_LUA")]
    pub unsafe_lua: bool,
    /// Memory cap per Lua VM, e.g. 67108864 or 64MiB; exceeding it fails that handler; 0 = none [default: 256MiB]
    #[arg(long, env = "AGENT_BLOCK_LUA_MEMORY_LIMIT", value_parser = parse_size)]
    pub lua_memory_limit: Option<usize>,
}

/// Settings of a serving worker.
#[derive(Debug, Clone, Default, Args)]
pub struct WorkerArgs {
    /// Worker name: default queue group and service name [default: agent-block]
    #[arg(long, env = "AGENT_BLOCK_NAME")]
    pub name: Option<String>,
    /// Lua VMs (threads) [default: number of CPUs]
    #[arg(long, env = "AGENT_BLOCK_WORKERS")]
    pub workers: Option<usize>,
    /// In-flight handlers per VM [default: 256]
    #[arg(long, env = "AGENT_BLOCK_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Events queued per VM before sources wait [default: 1024]
    #[arg(long, env = "AGENT_BLOCK_BUS_CAPACITY")]
    pub bus_capacity: Option<usize>,
    /// Handler deadline [default: 30s]
    #[arg(long, env = "AGENT_BLOCK_HANDLER_TIMEOUT", value_parser = parse_duration)]
    pub handler_timeout: Option<Duration>,
    /// Longest a handler runs on while other handlers of its VM are ready; 0 = off [default: 10ms]
    #[arg(long, env = "AGENT_BLOCK_TIME_SLICE", value_parser = parse_duration)]
    pub time_slice: Option<Duration>,
    /// Shutdown grace window for in-flight handlers [default: 10s]
    #[arg(long, env = "AGENT_BLOCK_GRACE", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// `--grace` in milliseconds, as older deployments set it
    #[arg(long, hide = true, env = "AGENT_BLOCK_TASK_GRACE_MS")]
    pub task_grace_ms: Option<u64>,
    /// Address of the HTTP listener for /healthz and /readyz, e.g. 0.0.0.0:9090
    #[arg(long, env = "AGENT_BLOCK_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(flatten)]
    pub lua: LuaArgs,
    #[command(flatten)]
    pub bridges: BridgeArgs,
}

/// Settings of the HTTP and SQL bridges.
#[derive(Debug, Clone, Default, Args)]
pub struct BridgeArgs {
    /// Hosts `http.request` may reach, `host[:port]` comma-separated [default: any]
    #[arg(long, env = "AGENT_BLOCK_HTTP_ALLOW", value_delimiter = ',')]
    pub http_allow: Vec<String>,
    /// Largest HTTP response body a handler may receive, e.g. 10MiB [default: 10MiB]
    #[arg(long, env = "AGENT_BLOCK_HTTP_MAX_BODY", value_parser = parse_size)]
    pub http_max_body: Option<usize>,
    /// CA certificate(s) (PEM) trusted for HTTPS besides the system's roots
    #[arg(long, env = "AGENT_BLOCK_HTTP_CA")]
    pub http_ca: Option<PathBuf>,
    /// Default database for `sql.*`: postgres://... or sqlite://path
    #[arg(long, env = "AGENT_BLOCK_SQL_URL")]
    pub sql_url: Option<String>,
    /// A named database `NAME=URL` reached as `sql.db(NAME)`; repeat for more
    #[arg(long = "sql", value_name = "NAME=URL")]
    pub sql: Vec<String>,
}
