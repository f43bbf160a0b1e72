//! Log output: JSON for collectors, pretty for terminals; `RUST_LOG` filters.
//!
//! Whatever `RUST_LOG` says, the NATS client's wire-protocol records are never
//! written: they echo every operation sent, CONNECT with its credentials
//! included, and which fields a dependency hides in its `Debug` output is not
//! something the worker's secrecy should rest on.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Event spans are for tracing exporters; the log output leaves them out.
const SERVE_FILTER: &str = "info,async_nats=warn,agent_block::event=off";
/// One-shot commands (`check`, `request`, `replay`) print their result; logs only
/// for problems.
const TOOL_FILTER: &str = "warn,agent_block::event=off";

/// The client's wire-protocol module, whose debug and trace records print
/// protocol operations.
const PROTOCOL_TARGET: &str = "async_nats::connection";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

pub fn init(format: Option<LogFormat>, serving: bool) {
    init_with(format, if serving { SERVE_FILTER } else { TOOL_FILTER });
}

/// Like [`init`], with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with(format: Option<LogFormat>, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let terminal = std::io::stderr().is_terminal();
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let output = match format.unwrap_or(if terminal { LogFormat::Pretty } else { LogFormat::Json }) {
        LogFormat::Json => output.json().flatten_event(true).boxed(),
        LogFormat::Pretty => output.with_ansi(terminal).boxed(),
    };
    crate::panics::install_hook();
    let result = tracing_subscriber::registry().with(filter).with(filter_fn(may_be_logged)).with(output).try_init();
    // A second init (tests calling entry points twice) keeps the first subscriber.
    let _ = result;
}

/// False for records that may hold secrets, at any `RUST_LOG` level.
fn may_be_logged(meta: &tracing::Metadata<'_>) -> bool {
    let protocol = meta.target() == PROTOCOL_TARGET || meta.target().starts_with("async_nats::connection::");
    !(protocol && *meta.level() >= Level::DEBUG)
}
