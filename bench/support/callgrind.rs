//! valgrind's callgrind for benchmarks that count instructions instead of timing.

use std::path::Path;
use std::process::{Command, Stdio};

/// Installs valgrind with apt-get when it is missing.
pub fn ensure_valgrind() -> Result<(), String> {
    let works = || Command::new("valgrind").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !works() {
        println!("valgrind not found; installing it with apt-get");
        let _ = Command::new("apt-get").args(["install", "-y", "valgrind"]).stdout(Stdio::null()).status();
    }
    if works() {
        Ok(())
    } else {
        Err("valgrind is missing and apt-get could not install it; install valgrind".to_string())
    }
}

/// The instruction total of a callgrind profile (its `summary:` or `totals:` line).
pub fn total(profile: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(profile).map_err(|err| format!("cannot read {}: {err}", profile.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary:").or_else(|| line.strip_prefix("totals:")))
        .and_then(|count| count.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no instruction count in {}", profile.display()))
}
