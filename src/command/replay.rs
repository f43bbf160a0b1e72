//! `agent-block replay SCRIPT --events FILE|-`: run handlers over recorded events
//! without NATS; print one JSON line per outcome and per `nats.publish`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncBufRead, BufReader};
use tokio_util::sync::CancellationToken;

use crate::cli::LuaArgs;
use crate::settings::{DEFAULT_HANDLER_TIMEOUT, DEFAULT_TIME_SLICE, LuaConfig};
use crate::source::Source;
use crate::source::replay::{ReplayOutput, ReplaySource, ReplayTransport};
use crate::worker::{BridgeSpec, PoolSpec, VmPool};

pub async fn execute(script: PathBuf, events: PathBuf, handler_timeout: Option<Duration>, lua: &LuaArgs) -> ExitCode {
    let input: Box<dyn AsyncBufRead + Send + Unpin> = if events.as_os_str() == "-" {
        Box::new(BufReader::new(tokio::io::stdin()))
    } else {
        match tokio::fs::File::open(&events).await {
            Ok(file) => Box::new(BufReader::new(file)),
            Err(err) => {
                eprintln!("error: cannot open events file {}: {err}", events.display());
                return ExitCode::from(2);
            }
        }
    };
    let output = ReplayOutput::new(Box::new(std::io::stdout()));
    let spec = PoolSpec {
        script,
        workers: 1,
        concurrency: 1,
        bus_capacity: 1,
        handler_timeout: handler_timeout.unwrap_or(DEFAULT_HANDLER_TIMEOUT),
        time_slice: Some(DEFAULT_TIME_SLICE),
        lua: LuaConfig::from(lua),
        transport: Arc::new(ReplayTransport(output.clone())),
        connection: None,
        bridges: BridgeSpec::Offline,
    };
    let (mut pool, report) = match VmPool::start(spec).await {
        Ok(started) => started,
        Err(err) => {
            eprintln!("error: {}", crate::report::chain(&err));
            return ExitCode::from(2);
        }
    };
    let replay = Arc::new(ReplaySource::new(input, report.sources, output));
    let bad_lines = replay.bad_lines();
    let sources: Vec<Arc<dyn Source>> = vec![replay];
    if let Err(err) = pool.open_sources(&sources, &CancellationToken::new()).await {
        eprintln!("error: {}", crate::report::chain(&err));
        return ExitCode::from(1);
    }
    drop(sources);
    // The replay source ends with its input; the pool then finishes every event.
    pool.shutdown(tokio::time::Instant::now() + Duration::from_secs(3600)).await;
    if bad_lines.load(Ordering::SeqCst) {
        eprintln!("error: some input lines are not events (see the \"error\" lines)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
