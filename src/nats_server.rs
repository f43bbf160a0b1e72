//! A private `nats-server` child process (JetStream on, temporary store, its own
//! port), for `agent-block dev`, the tests and the benchmark. Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The server binary: `NATS_SERVER_BIN`, else `nats-server` from `PATH`.
pub fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// How long a starting server may take: generous, as a loaded 2-core machine can
/// take seconds to start a Go binary and its JetStream store.
const START_LIMIT: Duration = Duration::from_secs(20);

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Result<Self, String> {
        let store = tempfile::tempdir().map_err(|err| format!("cannot create a store directory: {err}"))?;
        let (child, port) = spawn(None, &store)?;
        Ok(NatsServer { child: Some(child), port, store })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let (child, _) = spawn(Some(self.port), &self.store)?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(port: Option<u16>, store: &tempfile::TempDir) -> Result<(Child, u16), String> {
    let binary = binary();
    let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".to_string());
    let mut child = Command::new(&binary)
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(store.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| {
            format!(
                "cannot start {}: {err}; install nats-server (apt-get install nats-server) or set NATS_SERVER_BIN",
                binary.display()
            )
        })?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        let mut ready_tx = Some(ready_tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port = rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
            }
            if line.contains("Server is ready")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(port);
            }
        }
    });
    match ready_rx.recv_timeout(START_LIMIT) {
        Ok(Some(port)) => Ok((child, port)),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{} did not become ready within {START_LIMIT:?}", binary.display()))
        }
    }
}
