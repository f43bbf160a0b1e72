//! `agent-block test [PATH...] [--junit FILE]`: finds `*_test.lua` files, runs
//! them one after another, prints a line per test and `N passed, N failed`; exit
//! 1 when a test failed, 2 when there is nothing to run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::testkit::report::{self, FileReport};

const SUFFIX: &str = "_test.lua";

pub async fn execute(paths: Vec<PathBuf>, junit: Option<PathBuf>) -> ExitCode {
    let paths = if paths.is_empty() { vec![PathBuf::from(".")] } else { paths };
    let mut files = Vec::new();
    for path in &paths {
        if let Err(message) = collect(path, &mut files) {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    }
    if files.is_empty() {
        let searched: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        eprintln!("error: no *{SUFFIX} files under {}", searched.join(", "));
        return ExitCode::from(2);
    }
    // Test VMs are not `Send`: they run on a thread of their own, one file at a time.
    let ran = tokio::task::spawn_blocking(move || run_all(files)).await;
    let reports = match ran {
        Ok(Ok(reports)) => reports,
        Ok(Err(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
        Err(err) => {
            eprintln!("error: the test runner stopped: {err}");
            return ExitCode::from(1);
        }
    };
    println!("\n{}", report::summary(&reports));
    if let Some(junit) = junit
        && let Err(err) = std::fs::write(&junit, report::junit(&reports))
    {
        eprintln!("error: cannot write {}: {err}", junit.display());
        return ExitCode::from(1);
    }
    let failed: usize = reports.iter().map(FileReport::failed).sum();
    if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn run_all(files: Vec<PathBuf>) -> Result<Vec<FileReport>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the test runtime: {err}"))?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&runtime, async {
        let mut reports = Vec::with_capacity(files.len());
        for file in files {
            let display = file.strip_prefix(".").unwrap_or(&file).display().to_string();
            let progress = |result: &report::TestResult| println!("{}", report::result_lines(&display, result));
            let report = crate::testkit::run_file(&file, &display, &progress).await;
            if let Some(failure) = &report.load_error {
                println!("{}", report::load_error_lines(&display, failure));
            }
            reports.push(report);
        }
        reports
    }))
}

/// Adds `path` if it is a file, else every `*_test.lua` below it (sorted; hidden
/// folders and `target` skipped).
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    if metadata.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for child in children {
        let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if child.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&child, files)?;
            }
        } else if name.ends_with(SUFFIX) {
            files.push(child);
        }
    }
    Ok(())
}
