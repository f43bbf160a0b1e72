//! The `sh.exec` bridge: only with `--unsafe-lua`; output, exit code, stdin, env
//! and cwd; the output cap; the process group killed at its timeout and when
//! the handler's deadline cancels it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const APP: &str = r#"
bus.subscribe("exec")
bus.on("exec", function(ev)
  local p = ev.payload
  local r = sh.exec(p.command, p.opts)
  -- large output is only measured: a reply has to fit in a NATS message
  local stdout = #r.stdout < 4096 and r.stdout or nil
  local stderr = #r.stderr < 4096 and r.stderr or nil
  return { ok = r.ok, code = r.code, stdout = stdout, stderr = stderr,
           out_len = #r.stdout, err_len = #r.stderr, truncated = r.truncated, timed_out = r.timed_out }
end)
bus.subscribe("refused")
bus.on("refused", function(ev)
  local ok, err = pcall(sh.exec, "true")
  return { ok = ok, err = tostring(err) }
end)
"#;

type Setup = Running;

async fn start(args: &[&str]) -> Setup {
    start_app(APP, args).await
}

async fn exec(setup: &Setup, command: &str, opts: serde_json::Value) -> serde_json::Value {
    let payload = serde_json::json!({ "command": command, "opts": opts }).to_string();
    let reply = request(&setup.client, "exec", &payload).await;
    assert_eq!(error_of(&reply), None, "worker log:\n{}", setup.worker.stderr.text());
    json(&reply)
}

/// Whether process `pid` is gone (a zombie waiting for its reaper counts as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits for the pid file the command writes, then for that process to die.
fn assert_killed(pid_file: &Path) {
    let deadline = Instant::now() + PATIENCE;
    let pid: u32 = loop {
        if let Ok(text) = std::fs::read_to_string(pid_file)
            && let Ok(pid) = text.trim().parse()
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command never wrote its pid");
        std::thread::sleep(Duration::from_millis(20));
    };
    while !gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} outlived its call");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn exec_needs_unsafe_lua() {
    let setup = start(&[]).await;
    let reply = request(&setup.client, "refused", "").await;
    let reply = json(&reply);
    assert_eq!(reply["ok"], false);
    assert!(reply["err"].as_str().unwrap().contains("--unsafe-lua"), "{reply}");
}

#[tokio::test]
async fn output_code_stdin_env_and_cwd() {
    let setup = start(&["--unsafe-lua"]).await;
    let result = exec(&setup, "echo out; echo err >&2; exit 3", serde_json::json!({})).await;
    assert_eq!(result["ok"], false);
    assert_eq!(result["code"], 3);
    assert_eq!(result["stdout"], "out\n");
    assert_eq!(result["stderr"], "err\n");

    let dir = setup.scripts.path().to_str().unwrap();
    let opts = serde_json::json!({ "stdin": "from stdin", "env": { "GREETING": "hi" }, "cwd": dir });
    let result = exec(&setup, r#"cat; echo " $GREETING"; pwd"#, opts).await;
    assert_eq!(result["ok"], true, "{result}");
    let expected_dir = std::fs::canonicalize(dir).unwrap();
    assert_eq!(result["stdout"], format!("from stdin hi\n{}\n", expected_dir.display()));

    let result = exec(&setup, "head -c 3000000 /dev/zero", serde_json::json!({})).await;
    assert_eq!(result["truncated"], true);
    assert_eq!(result["out_len"], 1 << 20);
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let setup = start(&["--unsafe-lua"]).await;
    let pid_file = setup.scripts.path().join("child.pid");
    let command = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let started = Instant::now();
    let result = exec(&setup, &command, serde_json::json!({ "timeout": "300ms" })).await;
    assert_eq!(result["timed_out"], true, "{result}");
    assert_eq!(result["ok"], false);
    assert!(started.elapsed() < Duration::from_secs(20), "the timeout did not stop the call");
    assert_killed(&pid_file);
}

#[tokio::test]
async fn a_cancelled_handler_kills_its_child() {
    let setup = start(&["--unsafe-lua", "--handler-timeout", "500ms"]).await;
    let pid_file = setup.scripts.path().join("child.pid");
    let command = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let payload = serde_json::json!({ "command": command }).to_string();
    let reply = request(&setup.client, "exec", &payload).await;
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(504));
    assert_killed(&pid_file);
}

/// Shutdown past the grace window (given through the older millisecond
/// variable) cancels the handler, and the cancellation kills the command.
#[tokio::test]
async fn shutdown_kills_a_running_command() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let mut worker = Worker::spawn_with_env(
        &["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1", "--unsafe-lua"],
        &[("AGENT_BLOCK_TASK_GRACE_MS", "300")],
    );
    worker.expect_ready();
    let client = client(&server).await;
    let pid_file = scripts.path().join("child.pid");
    let command = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let payload = serde_json::json!({ "command": command }).to_string();
    let pending = tokio::spawn(async move { request(&client, "exec", &payload).await });
    let deadline = Instant::now() + PATIENCE;
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "the command did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    worker.terminate();
    let reply = pending.await.expect("request task");
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(503), "cancelled by shutdown");
    assert!(worker.wait_exit(PATIENCE).is_some(), "the worker did not exit");
    // A 10 s default grace would show here; 300 ms plus exit work stays far below.
    assert!(stopping.elapsed() < Duration::from_secs(8), "grace was not 300 ms: {:?}", stopping.elapsed());
    assert_killed(&pid_file);
}

#[tokio::test]
async fn the_command_does_not_inherit_the_workers_secrets() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let args = ["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1", "--unsafe-lua"];
    let env = [
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=collector-key"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer trace-token"),
        ("APP_SETTING", "visible"),
    ];
    let worker = Worker::spawn_with_env(&args, &env);
    worker.expect_ready();
    let setup = Running { client: client(&server).await, server, scripts, worker };
    let result = exec(&setup, "env | grep -E '^(OTEL_|APP_SETTING=)'", serde_json::json!({})).await;
    let stdout = result["stdout"].as_str().unwrap();
    assert!(stdout.contains("APP_SETTING=visible"), "{stdout}");
    for (name, _) in &env[..2] {
        assert!(!stdout.contains(name), "{name} reached the command:\n{stdout}");
    }
}

#[tokio::test]
async fn signals_the_stderr_cap_and_background_children() {
    let setup = start(&["--unsafe-lua"]).await;
    let killed = exec(&setup, "kill -9 $$", serde_json::json!({})).await;
    assert_eq!(killed["code"], 128 + 9, "128 + the signal: {killed}");
    assert_eq!(killed["ok"], false);

    let noisy = exec(&setup, "head -c 3000000 /dev/zero >&2", serde_json::json!({})).await;
    assert_eq!(noisy["err_len"], 1 << 20, "stderr keeps its first 1 MiB: {noisy}");
    assert_eq!(noisy["truncated"], true);

    // A child left running in the background dies when the call returns.
    let pid_file = setup.scripts.path().join("background.pid");
    let command = format!("sleep 60 >/dev/null 2>&1 & echo $! > {}", pid_file.display());
    let returned = exec(&setup, &command, serde_json::json!({})).await;
    assert_eq!(returned["ok"], true, "{returned}");
    assert_killed(&pid_file);
}
