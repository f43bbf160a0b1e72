//! CPU benchmark: a CPU-bound Lua handler under agent-block against plain Lua 5.4.
//!
//! `cargo bench --bench cpu` runs the loop of `bench/cpu.lua` (`BENCH_ITERATIONS`
//! iterations, default 50 million) through `agent-block replay` with
//! `--handler-timeout` armed, and through the reference interpreter `lua5.4`
//! (installed with apt-get when missing), alternately `BENCH_ROUNDS` times (default
//! 3), and prints the best CPU time of each and the speed ratio. Target: agent-block
//! at >= 0.9x the speed of plain Lua.
//!
//! Both time only the loop (`os.clock` inside the script), so process start-up does
//! not count. Times of the two builds of Lua swing against each other on a shared
//! machine, so it then counts, with valgrind's callgrind (installed when missing),
//! the instructions each whole process runs for `BENCH_COUNT_ITERATIONS`
//! iterations (default 5 million; agent-block's start-up included): the figure the
//! verdict is taken on. Without `--bench` it makes a quick smoke pass whose figures
//! mean nothing.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

#[path = "support/callgrind.rs"]
mod callgrind;
use callgrind::ensure_valgrind;

const TARGET_RATIO: f64 = 0.9;
/// The handler's deadline: armed, as in production, and far from reached.
const HANDLER_TIMEOUT: &str = "10m";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cpu benchmark: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    // cargo passes `--bench` to a harness-less bench under `cargo bench` only.
    let full = std::env::args().any(|arg| arg == "--bench");
    let iterations = setting("BENCH_ITERATIONS", if full { 50_000_000 } else { 100_000 })?;
    let rounds = setting("BENCH_ROUNDS", if full { 3 } else { 1 })?;
    if !full {
        println!("smoke pass (no --bench): the figures below mean nothing; run `cargo bench --bench cpu`");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/cpu.lua");
    let lua = plain_lua()?;
    let (mut agent_best, mut plain_best) = (f64::MAX, f64::MAX);
    for round in 1..=rounds {
        let agent = agent_block(&script, iterations)?;
        let plain = plain(&lua, &script, iterations)?;
        println!("round {round}: agent-block {agent:.3} s, lua5.4 {plain:.3} s");
        agent_best = agent_best.min(agent);
        plain_best = plain_best.min(plain);
    }
    let ratio = plain_best / agent_best;
    println!();
    println!("{iterations} iterations, best of {rounds} (CPU seconds of the loop):");
    println!("  agent-block replay (deadline armed) {agent_best:.3} s");
    println!("  lua5.4                              {plain_best:.3} s");
    println!("  speed, agent-block / plain Lua      {ratio:.2}x");
    let counted = setting("BENCH_COUNT_ITERATIONS", if full { 5_000_000 } else { 100_000 })?;
    ensure_valgrind()?;
    let dir = tempfile::tempdir().map_err(|err| format!("cannot create a temporary folder: {err}"))?;
    let events = events_file(dir.path(), counted)?;
    let agent = instructions(
        Command::new(env!("CARGO_BIN_EXE_agent-block"))
            .arg("replay")
            .arg(&script)
            .arg("--events")
            .arg(&events)
            .args(["--handler-timeout", HANDLER_TIMEOUT]),
        dir.path(),
    )?;
    let plain = instructions(Command::new(&lua).arg(&script).arg(counted.to_string()), dir.path())?;
    let ratio = plain as f64 / agent as f64;
    println!();
    println!("{counted} iterations, instructions of the whole process (callgrind):");
    println!("  agent-block replay (deadline armed) {:.1}M", agent as f64 / 1e6);
    println!("  lua5.4                              {:.1}M", plain as f64 / 1e6);
    let verdict = if ratio >= TARGET_RATIO { "PASS" } else { "FAIL" };
    println!("  speed by instructions, agent-block / plain Lua {ratio:.2}x (target >= {TARGET_RATIO}x) {verdict}");
    Ok(())
}

/// The instructions `command` runs from start to exit, counted by callgrind.
fn instructions(command: &mut Command, dir: &Path) -> Result<u64, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out_file = dir.join("callgrind.out");
    let mut counted = Command::new("valgrind");
    counted
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(command.get_program())
        .args(command.get_args())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = counted.status().map_err(|err| format!("cannot run valgrind: {err}"))?;
    if !status.success() {
        return Err(format!("{program} under callgrind failed: {status}"));
    }
    callgrind::total(&out_file)
}

fn setting(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(text) => text.parse().map_err(|_| format!("{name}={text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The `lua5.4` interpreter, installed with apt-get when it is missing.
fn plain_lua() -> Result<String, String> {
    let works = || Command::new("lua5.4").arg("-v").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !works() {
        println!("lua5.4 not found; installing it with apt-get");
        let _ = Command::new("apt-get").args(["install", "-y", "lua5.4"]).stdout(Stdio::null()).status();
    }
    if works() {
        Ok("lua5.4".to_string())
    } else {
        Err("the lua5.4 interpreter is missing and apt-get could not install it; install lua5.4".to_string())
    }
}

/// The loop's CPU seconds as a handler under `agent-block replay`.
fn agent_block(script: &Path, iterations: u64) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|err| format!("cannot create a temporary folder: {err}"))?;
    let events = events_file(dir.path(), iterations)?;
    let output = Command::new(env!("CARGO_BIN_EXE_agent-block"))
        .arg("replay")
        .arg(script)
        .arg("--events")
        .arg(&events)
        .args(["--handler-timeout", HANDLER_TIMEOUT])
        .env_remove("RUST_LOG")
        .output()
        .map_err(|err| format!("cannot run agent-block: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.contains("\"outcome\"")).ok_or_else(|| {
        format!("agent-block replay printed no outcome; stderr:\n{}", String::from_utf8_lossy(&output.stderr))
    })?;
    let outcome: serde_json::Value =
        serde_json::from_str(line).map_err(|err| format!("bad outcome line ({err}): {line}"))?;
    outcome["payload"]["seconds"].as_f64().ok_or_else(|| format!("the handler did not succeed: {line}"))
}

/// One event asking the handler for `iterations` iterations.
fn events_file(dir: &Path, iterations: u64) -> Result<std::path::PathBuf, String> {
    let events = dir.join("events.jsonl");
    std::fs::write(&events, format!("{{\"subject\":\"cpu\",\"payload\":{{\"n\":{iterations}}}}}\n"))
        .map_err(|err| format!("cannot write {}: {err}", events.display()))?;
    Ok(events)
}

/// The loop's CPU seconds under the reference interpreter.
fn plain(lua: &str, script: &Path, iterations: u64) -> Result<f64, String> {
    let output = Command::new(lua)
        .arg(script)
        .arg(iterations.to_string())
        .output()
        .map_err(|err| format!("cannot run {lua}: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{lua} printed {stdout:?}; stderr: {}", String::from_utf8_lossy(&output.stderr)))
}
