//! Log output: JSON for collectors, pretty for terminals; `RUST_LOG` filters.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Event spans are for tracing exporters; the log output leaves them out.
const SERVE_FILTER: &str = "info,async_nats=warn,agent_block::event=off";
/// One-shot commands (`check`, `request`, `replay`) print their result; logs only
/// for problems.
const TOOL_FILTER: &str = "warn,agent_block::event=off";

pub fn init(format: Option<LogFormat>, serving: bool) {
    init_with(format, if serving { SERVE_FILTER } else { TOOL_FILTER });
}

/// Like [`init`], with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with(format: Option<LogFormat>, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format.unwrap_or(if terminal { LogFormat::Pretty } else { LogFormat::Json }) {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.with_ansi(terminal).try_init(),
    };
    // A second init (tests calling entry points twice) keeps the first subscriber.
    let _ = result;
}
