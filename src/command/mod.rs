//! The subcommands. Each returns the process exit code: 0 success, 1 runtime
//! failure, 2 usage, settings or script error.

mod check;
mod dev;
mod init;
mod lint;
mod reload;
mod replay;
mod request;
mod test;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::runtime::{RunError, run_worker_with_reloads};
use crate::settings::WorkerConfig;

pub fn execute(cli: Cli) -> ExitCode {
    // TLS (HTTP bridge, OTLP export) uses rustls with the ring provider; clients
    // built without naming one take this process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::config::declare_secrets();
    let serving = matches!(cli.command, Command::Run { .. } | Command::Dev { .. });
    if matches!(cli.command, Command::Test { .. }) {
        // Failing handlers are what tests check; only problems of the runner itself are logged.
        crate::logging::init_with(cli.log_format, "error,agent_block::event=off");
    } else {
        crate::logging::init(cli.log_format, serving);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { script, worker } => run(script, &worker, None, false).await,
            Command::Dev { script, worker } => dev::execute(script, worker).await,
            Command::Check { script, lua } => check::execute(script, &lua).await,
            Command::Request { subject, data, headers, timeout, connection } => {
                request::execute(subject, data, headers, timeout, &connection).await
            }
            Command::Replay { script, events, handler_timeout, lua } => {
                replay::execute(script, events, handler_timeout, &lua).await
            }
            Command::Test { paths, junit } => test::execute(paths, junit).await,
            Command::Init { dir } => init::execute(dir),
        }
    })
}

/// Serves until SIGTERM/SIGINT, reloading on SIGHUP and, with `watch`, when a
/// Lua file next to the script changes.
async fn run(
    script: std::path::PathBuf,
    worker: &crate::cli::WorkerArgs,
    nats_url: Option<String>,
    watch: bool,
) -> ExitCode {
    let mut config = match WorkerConfig::from_args(script, worker) {
        Ok(config) => config,
        Err(message) => return fail(&RunError::Settings(message)),
    };
    if let Some(url) = nats_url {
        config.connection.url = url;
    }
    if let Err(message) = crate::preflight::check_worker(&config.script, &config.connection) {
        return fail(&RunError::Settings(message));
    }
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    reload::on_sighup(reload.clone());
    if watch {
        reload::on_change(&config.script, reload);
    }
    match run_worker_with_reloads(config, shutdown_signal(), reloads).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

fn fail(err: &RunError) -> ExitCode {
    let report = err.report();
    tracing::error!(error = %report, "agent-block stopped");
    eprintln!("error: {report}");
    ExitCode::from(err.exit_code())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
