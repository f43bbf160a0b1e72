//! A private PostgreSQL cluster per test: `initdb` in a temporary folder, then
//! `postgres` on a port the caller hands out (retried on another when it is
//! taken), trust authentication for user `postgres`. Run as
//! the `postgres` system user when the tests run as root (PostgreSQL refuses
//! root). Stopped (immediate shutdown) and removed on drop. The binaries come
//! from `PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A loaded 2-core machine can take seconds to initialise and start a cluster.
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct Postgres {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts a cluster on a port from `ports` (the test helper's `free_port`).
    pub fn start(ports: impl Fn() -> u16) -> Self {
        Self::start_with(ports, None)
    }

    /// A cluster whose user `postgres` must give `password` (SCRAM), or trusted
    /// without one.
    pub fn start_with(ports: impl Fn() -> u16, password: Option<&str>) -> Self {
        let bin = binaries();
        let dir = tempfile::tempdir().expect("create a cluster folder");
        let data = dir.path().join("data");
        let owner = unprivileged_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("hand the cluster folder to postgres");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.args(["-U", "postgres", "-E", "UTF8", "--no-sync"]);
        match password {
            None => initdb.arg("--auth=trust"),
            Some(password) => {
                let file = dir.path().join("password");
                std::fs::write(&file, password).expect("write the password file");
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&file, Some(uid), Some(gid)).expect("hand the password file over");
                }
                initdb.arg("--auth=scram-sha-256").arg(format!("--pwfile={}", file.display()))
            }
        };
        initdb.arg("-D").arg(&data).stdout(Stdio::null()).stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let output = initdb.output().unwrap_or_else(|err| panic!("cannot run initdb from {}: {err}", bin.display()));
        assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));

        let mut last_error = String::new();
        // A port of the test process's range may still be taken by a program
        // outside the convention: postgres then exits, and another port is tried.
        for _ in 0..5 {
            let port = ports();
            match start_postgres(&bin, &data, dir.path(), port, owner) {
                Ok(child) => return Postgres { child, port, _dir: dir },
                Err(err) => last_error = err,
            }
        }
        panic!("cannot start a private postgres: {last_error}")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, backends included.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let _ = self.child.wait();
    }
}

/// Starts `postgres` on `port` and waits until it accepts connections; its
/// stderr when it exits first (a port already taken).
fn start_postgres(
    bin: &Path,
    data: &Path,
    socket_dir: &Path,
    port: u16,
    owner: Option<(u32, u32)>,
) -> Result<Child, String> {
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(socket_dir)
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_owner(&mut postgres, owner);
    let mut child = postgres.spawn().expect("start postgres");
    let stderr = child.stderr.take().expect("piped stderr");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ready to accept connections")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(Ok(()));
            }
            if ready_tx.is_some() {
                seen.push_str(&line);
                seen.push('\n');
            }
        }
        if let Some(tx) = ready_tx {
            let _ = tx.send(Err(seen));
        }
    });
    match ready_rx.recv_timeout(START_LIMIT) {
        Ok(Ok(())) => Ok(child),
        Ok(Err(stderr)) => {
            let _ = child.wait();
            Err(format!("postgres on port {port} exited: {stderr}"))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("postgres did not become ready within {START_LIMIT:?}");
        }
    }
}

fn binaries() -> PathBuf {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return PathBuf::from(bin);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|bin| bin.join("postgres").is_file());
    versions.sort_by_key(|bin| {
        bin.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().expect("PostgreSQL server binaries: install the postgresql package or set PG_BIN")
}

/// The `postgres` user's ids when running as root, which PostgreSQL refuses.
fn unprivileged_owner() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).expect("a postgres user to run the cluster as");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().expect("uid"), fields[3].parse().expect("gid")))
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid).env("HOME", "/tmp");
    }
}
