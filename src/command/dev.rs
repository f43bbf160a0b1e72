//! `agent-block dev SCRIPT`: `run` against a private nats-server child, stopped on
//! exit, reloading the script when a Lua file in its folder changes.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::WorkerArgs;
use crate::nats_server::NatsServer;

pub async fn execute(script: PathBuf, worker: WorkerArgs) -> ExitCode {
    let server = match tokio::task::spawn_blocking(NatsServer::start).await {
        Ok(Ok(server)) => server,
        Ok(Err(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
        Err(err) => {
            eprintln!("error: cannot start nats-server: {err}");
            return ExitCode::from(1);
        }
    };
    println!("nats-server running at {}", server.url());
    println!("try: agent-block request <subject> '<json>' --nats-url {}", server.url());
    let code = super::run(script, &worker, Some(server.url()), true).await;
    drop(server);
    code
}
