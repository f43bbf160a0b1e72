//! Child processes of a benchmark: killed when dropped, their output followed
//! line by line.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child process killed when dropped, so no path out of the run (error, panic)
/// leaves a responder behind.
pub struct ChildGuard {
    pub child: Child,
    /// The plain echo exits when its stdin closes: holding the write end keeps it
    /// alive, and it dies with this process even if this process is killed.
    pub _stdin: Option<ChildStdin>,
    pub lines: Lines,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines a child writes to one of its pipes, read by a thread that keeps
/// draining after we stop listening, so a chatty child never blocks on a full pipe.
pub struct Lines {
    receiver: mpsc::Receiver<(Instant, String)>,
    /// The last lines seen, to explain a child that died before it was ready.
    recent: VecDeque<String>,
}

impl Lines {
    pub fn follow(pipe: impl Read + Send + 'static) -> Self {
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, keep reading (and dropping) until the child ends.
                let _ = sender.send((Instant::now(), line));
            }
        });
        Lines { receiver, recent: VecDeque::new() }
    }

    /// Waits for a line `matches` accepts; returns when it was read and the line.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<(Instant, String), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok((at, line)) if matches(&line) => return Ok((at, line)),
                Ok((_, line)) => {
                    if self.recent.len() == 20 {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("{what} not ready after {limit:?}; last output:\n{}", self.tail()));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("{what} exited before it was ready; last output:\n{}", self.tail()));
                }
            }
        }
    }

    pub fn tail(&self) -> String {
        self.recent.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// The message of one JSON log line (`--log-format json` flattens it to the top level).
pub fn log_message(line: &str) -> Option<String> {
    let record: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = record.get("message").or_else(|| record.get("fields")?.get("message"))?;
    message.as_str().map(str::to_string)
}
