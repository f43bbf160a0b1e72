//! Running a shell command for `sh.exec`: `/bin/sh -c COMMAND` in its own process
//! group, output captured up to a cap, the whole group killed at the timeout, when
//! the call is dropped (the handler's deadline or shutdown) and when it ends, so no
//! process it started outlives the call.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Bytes kept of each of stdout and stderr; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct ExecRequest {
    pub command: String,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    /// `None`: only the handler's deadline bounds the command.
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct ExecResult {
    /// The exit code, or 128 + the signal that killed the shell.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output went over [`OUTPUT_CAP`] and was cut.
    pub truncated: bool,
    pub timed_out: bool,
}

impl ExecResult {
    pub fn ok(&self) -> bool {
        self.code == 0 && !self.timed_out
    }
}

/// Kills a process group when dropped.
struct GroupGuard(i32);

impl GroupGuard {
    fn kill(&self) {
        // Group 0 would be our own: never signal it.
        if self.0 > 0 {
            // SAFETY: kill(2) with a negative pid signals the group; no memory involved.
            unsafe {
                libc::kill(-self.0, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn run(request: ExecRequest) -> std::io::Result<ExecResult> {
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&request.command)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(if request.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The worker's own secrets stay out of the child's environment.
    for (name, value) in std::env::vars_os() {
        let (Some(name), value) = (name.to_str(), value.to_string_lossy()) else { continue };
        if crate::secrets::is_secret_variable(name, &value) {
            command.env_remove(name);
        }
    }
    command.envs(request.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn()?;
    let group = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()).unwrap_or(0));
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let input = request.stdin;
    let work = async {
        let write = async {
            if let (Some(mut pipe), Some(input)) = (stdin, input) {
                // A command that does not read its input closes the pipe: not an error.
                let _ = pipe.write_all(&input).await;
            }
        };
        let ((), out, err, status) = tokio::join!(write, read_capped(stdout), read_capped(stderr), child.wait());
        Ok::<_, std::io::Error>((out?, err?, status?))
    };
    tokio::pin!(work);
    let mut timed_out = false;
    let finished = match request.timeout {
        None => work.await,
        Some(limit) => tokio::select! {
            finished = &mut work => finished,
            _ = tokio::time::sleep(limit) => {
                timed_out = true;
                group.kill();
                work.await
            }
        },
    };
    drop(group);
    let ((stdout, out_cut), (stderr, err_cut), status) = finished?;
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1);
    Ok(ExecResult { code, stdout, stderr, truncated: out_cut || err_cut, timed_out })
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_CAP`] bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> std::io::Result<(Vec<u8>, bool)> {
    let Some(mut pipe) = pipe else { return Ok((Vec::new(), false)) };
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let mut cut = false;
    loop {
        let read = pipe.read(&mut chunk).await?;
        if read == 0 {
            return Ok((kept, cut));
        }
        let room = OUTPUT_CAP - kept.len();
        if read > room {
            cut = true;
        }
        kept.extend_from_slice(&chunk[..read.min(room)]);
    }
}
