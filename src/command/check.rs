//! `agent-block check SCRIPT`: load the script as a worker would, print what it
//! declares, exit 2 with `file:line` on any error (including a call to a function
//! the Lua API does not have); warn about kinds no source produces and sources
//! whose kinds have no handler.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::LuaArgs;
use crate::settings::{DEFAULT_BUS_CAPACITY, DEFAULT_HANDLER_TIMEOUT, DEFAULT_NAME, DEFAULT_TIME_SLICE, LuaConfig};
use std::sync::Arc;

use crate::transport::Offline;
use crate::worker::{BridgeSpec, PoolSpec, VmPool};

pub async fn execute(script: PathBuf, lua: &LuaArgs) -> ExitCode {
    let spec = PoolSpec {
        script: script.clone(),
        workers: 1,
        concurrency: 1,
        bus_capacity: DEFAULT_BUS_CAPACITY,
        handler_timeout: DEFAULT_HANDLER_TIMEOUT,
        time_slice: Some(DEFAULT_TIME_SLICE),
        lua: LuaConfig::from(lua),
        transport: Arc::new(Offline),
        connection: None,
        bridges: BridgeSpec::Offline,
    };
    let (pool, report) = match VmPool::start(spec).await {
        Ok(started) => started,
        Err(err) => {
            eprintln!("error: {}", crate::report::chain(&err));
            return ExitCode::from(2);
        }
    };
    println!("script: {}", script.display());
    println!("sources:");
    for source in &report.sources {
        println!("  {}", source.describe(DEFAULT_NAME));
    }
    println!("handlers:");
    for kind in &report.kinds {
        println!("  {kind}");
    }
    if report.has_on_any {
        println!("  (on_any fallback)");
    }
    pool.shutdown(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    for warning in super::lint::kind_warnings(&report, DEFAULT_NAME) {
        eprintln!("warning: {warning}");
    }
    let errors = super::lint::unknown_calls(&script, &super::lint::api_names());
    for error in &errors {
        eprintln!("error: {error}");
    }
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) }
}
