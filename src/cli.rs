//! The command line. Every flag also reads `AGENT_BLOCK_<FLAG>` from the environment;
//! `NATS_URL` and `NATS_CREDS` work too. [`crate::config`] turns these into settings.
//!
//! A setting that can carry a secret is marked where it is defined here:
//! `hide_env_values = true` (the whole value is secret: a password, token, key or
//! the path of one), plus `value_hint = ValueHint::Url` when it is a URL, secret
//! only when it carries credentials. [`secret_settings`] reads the marks, and the
//! worker hides those variables from scripts and from the commands they run.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueHint};

use crate::duration::{parse_duration, parse_size};
pub use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "agent-block", version, about = "Lua-first worker runtime for NATS")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format; `pretty` suits a terminal, `json` a log collector.
    #[arg(long, global = true, env = "AGENT_BLOCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
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
    #[arg(long, env = "AGENT_BLOCK_NATS_URL", hide_env_values = true, value_hint = ValueHint::Url)]
    pub nats_url: Option<String>,
    /// Credentials file (JWT + NKey seed) [env: NATS_CREDS]
    #[arg(long, env = "AGENT_BLOCK_CREDS", hide_env_values = true)]
    pub creds: Option<PathBuf>,
    /// NKey seed
    #[arg(long, env = "AGENT_BLOCK_NKEY", hide_env_values = true)]
    pub nkey: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_USER", hide_env_values = true)]
    pub user: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    #[arg(long, env = "AGENT_BLOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server
    #[arg(long, env = "AGENT_BLOCK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS
    #[arg(long, env = "AGENT_BLOCK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS
    #[arg(long, env = "AGENT_BLOCK_TLS_KEY", hide_env_values = true)]
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
    #[arg(long, env = "AGENT_BLOCK_SQL_URL", hide_env_values = true, value_hint = ValueHint::Url)]
    pub sql_url: Option<String>,
    /// A named database `NAME=URL` reached as `sql.db(NAME)`; repeat for more
    #[arg(long = "sql", value_name = "NAME=URL", hide_env_values = true, value_hint = ValueHint::Url)]
    pub sql: Vec<String>,
}

/// Variables that set a flag besides its `AGENT_BLOCK_*` one: (flag id, variable).
pub const ENV_ALIASES: &[(&str, &str)] = &[("nats_url", "NATS_URL"), ("creds", "NATS_CREDS")];

/// The alias variable of the flag `id`, if it has one.
pub fn env_alias(id: &str) -> Option<&'static str> {
    ENV_ALIASES.iter().find(|(flag, _)| *flag == id).map(|(_, variable)| *variable)
}

/// A flag marked as carrying a secret, with the variables that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSetting {
    /// The flag's id (its field name).
    pub id: String,
    /// Whether its value is secret only when it is a URL with credentials.
    pub url: bool,
    /// `AGENT_BLOCK_*` variable and alias, where the flag has them.
    pub variables: Vec<String>,
}

/// Every flag of every command marked as carrying a secret (see the module docs).
pub fn secret_settings() -> Vec<SecretSetting> {
    let mut found: Vec<SecretSetting> = Vec::new();
    let mut pending = vec![Cli::command()];
    while let Some(command) = pending.pop() {
        for arg in command.get_arguments().filter(|arg| arg.is_hide_env_values_set()) {
            let id = arg.get_id().as_str();
            if found.iter().any(|setting| setting.id == id) {
                continue;
            }
            let variables = arg
                .get_env()
                .map(|name| name.to_string_lossy().into_owned())
                .into_iter()
                .chain(env_alias(id).map(str::to_string))
                .collect();
            found.push(SecretSetting { id: id.to_string(), url: arg.get_value_hint() == ValueHint::Url, variables });
        }
        pending.extend(command.get_subcommands().cloned());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag added later whose name says it holds a secret must carry the mark.
    #[test]
    fn every_flag_named_like_a_secret_is_marked() {
        let marked: Vec<String> = secret_settings().into_iter().map(|setting| setting.id).collect();
        let mut pending = vec![Cli::command()];
        while let Some(command) = pending.pop() {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                let secret_like = ["password", "token", "nkey", "creds", "key", "secret", "user", "url", "sql"]
                    .iter()
                    .any(|word| id.contains(word));
                assert!(!secret_like || marked.iter().any(|m| m == id), "--{id} looks secret but is not marked");
            }
            pending.extend(command.get_subcommands().cloned());
        }
    }

    #[test]
    fn urls_are_secret_only_with_credentials_and_aliases_are_included() {
        let settings = secret_settings();
        let nats_url = settings.iter().find(|s| s.id == "nats_url").expect("nats_url is marked");
        assert!(nats_url.url);
        assert_eq!(nats_url.variables, ["AGENT_BLOCK_NATS_URL", "NATS_URL"]);
        let password = settings.iter().find(|s| s.id == "password").expect("password is marked");
        assert!(!password.url);
    }
}
