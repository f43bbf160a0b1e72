//! What asks a serving worker to reload its script: SIGHUP (`run`, `dev`) and,
//! for `dev`, a change to a Lua file in the script's folder (the script and the
//! modules it requires), noticed by polling modification times.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

/// How often `dev` looks at the files; a reload follows an edit within this.
const POLL: Duration = Duration::from_millis(300);

pub fn on_sighup(reload: mpsc::Sender<()>) {
    tokio::spawn(async move {
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGHUP; reload by restarting");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received");
            // A reload already asked for covers this one too.
            let _ = reload.try_send(());
        }
    });
}

pub fn on_change(script: &Path, reload: mpsc::Sender<()>) {
    let dir = script.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    tokio::spawn(async move {
        let mut last = snapshot(&dir);
        loop {
            tokio::time::sleep(POLL).await;
            let now = snapshot(&dir);
            if now != last {
                last = now;
                tracing::info!(folder = %dir.display(), "a Lua file changed");
                if reload.send(()).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Lua files below `dir` (two levels, for `require("lib.x")`) with their
/// modification times and sizes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut files = Vec::new();
    collect(dir, 2, &mut files);
    files.sort();
    files
}

fn collect(dir: &Path, depth: usize, files: &mut Vec<(PathBuf, Option<SystemTime>, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(metadata) = entry.metadata() else { continue };
        if metadata.is_dir() {
            if depth > 0 && !entry.file_name().to_string_lossy().starts_with('.') {
                collect(&path, depth - 1, files);
            }
        } else if path.extension().is_some_and(|e| e == "lua") {
            files.push((path, metadata.modified().ok(), metadata.len()));
        }
    }
}
