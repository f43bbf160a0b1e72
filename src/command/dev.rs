//! `agent-block dev SCRIPT`: `run` against a private nats-server child, stopped on
//! exit, reloading the script when a Lua file in its folder changes.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::WorkerArgs;
use crate::nats_server::{NatsServer, ServerOptions};
use crate::settings::WorkerConfig;

pub async fn execute(script: PathBuf, worker: WorkerArgs) -> ExitCode {
    // Settings and files first: a typo should not cost a server start.
    let checked = WorkerConfig::from_args(script.clone(), &worker)
        .and_then(|config| crate::preflight::check_script(&config.script));
    if let Err(message) = checked {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    // Started on this (the main) thread, which lives as long as the process: the
    // server is tied to it, so even a SIGKILL of `dev` takes the server down.
    let options = ServerOptions { die_with_parent: true, ..ServerOptions::default() };
    let server = match NatsServer::start_with(options) {
        Ok(server) => server,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
    };
    println!("nats-server running at {}", server.url());
    println!("try: agent-block request <subject> '<json>' --nats-url {}", server.url());
    let code = super::run(script, &worker, Some(server.url()), true).await;
    drop(server);
    code
}
