//! A private `nats-server` child process (JetStream on, temporary store, its own
//! port), for `agent-block dev`, the tests and the benchmark. Killed on drop.
//!
//! The store is a temporary folder named after the starting process
//! (`agent-block-nats-PID-*`): a process killed with SIGKILL cannot remove it, so
//! every start removes the stores of processes that no longer exist.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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

/// Prefix of store folders in the temporary directory; the owner's pid follows.
const STORE_PREFIX: &str = "agent-block-nats-";

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Port to listen on; `None` lets the server pick a free one.
    pub port: Option<u16>,
    /// Text of a configuration file (authorization, TLS, operator mode...),
    /// given to the server with `-c`. The command line still sets the address,
    /// port and store.
    pub config: Option<String>,
    /// Linux: the server gets SIGKILL when the thread that started it ends, so a
    /// parent killed with SIGKILL leaves no orphan. Start it from a thread that
    /// lives as long as the server should (the main thread for `dev`).
    pub die_with_parent: bool,
}

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    options: ServerOptions,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Result<Self, String> {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(options: ServerOptions) -> Result<Self, String> {
        remove_stale_stores();
        let store = tempfile::Builder::new()
            .prefix(&format!("{STORE_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|err| format!("cannot create a store directory: {err}"))?;
        if let Some(config) = &options.config {
            std::fs::write(config_path(store.path()), config)
                .map_err(|err| format!("cannot write the server configuration: {err}"))?;
        }
        let (child, port) = spawn(options.port, &options, store.path())?;
        Ok(NatsServer { child: Some(child), port, options, store })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The folder holding the JetStream store (and the configuration file).
    pub fn store(&self) -> &Path {
        self.store.path()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store and
    /// configuration.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let (child, _) = spawn(Some(self.port), &self.options, self.store.path())?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_path(store: &Path) -> PathBuf {
    store.join("server.conf")
}

fn spawn(port: Option<u16>, options: &ServerOptions, store: &Path) -> Result<(Child, u16), String> {
    let binary = binary();
    let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".to_string());
    let mut command = Command::new(&binary);
    if options.config.is_some() {
        command.arg("-c").arg(config_path(store));
    }
    command
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(store.join("jetstream"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if options.die_with_parent {
        die_with_parent(&mut command);
    }
    let mut child = command.spawn().map_err(|err| {
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
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port = rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
            }
            if ready_tx.is_some() {
                log.push_str(&line);
                log.push('\n');
            }
            if line.contains("Server is ready")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(port.ok_or_else(|| log.clone()));
            }
        }
        if let Some(tx) = ready_tx {
            let _ = tx.send(Err(log));
        }
    });
    match ready_rx.recv_timeout(START_LIMIT) {
        Ok(Ok(port)) => Ok((child, port)),
        outcome => {
            let _ = child.kill();
            let _ = child.wait();
            let log = match outcome {
                Ok(Err(log)) => format!(":\n{}", log.trim_end()),
                _ => format!(" within {START_LIMIT:?}"),
            };
            Err(format!("{} did not become ready{log}", binary.display()))
        }
    }
}

#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe and the closure allocates
    // nothing; it runs in the child between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the parent exited while the server started"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Removes store folders whose owning process is gone (killed before it could
/// clean up). Folders of live processes, and anything not ours, stay.
fn remove_stale_stores() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix(STORE_PREFIX)) else { continue };
        let Some(pid) = owner.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if !process_exists(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks whether the process exists; nothing is sent.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
