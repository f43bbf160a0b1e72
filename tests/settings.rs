//! Configuration mistakes are reported before connecting (exit 2, naming the file
//! and the problem), an unreachable server is retried with advice, log formats,
//! and `dev` leaves no nats-server behind even when it is killed with SIGKILL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const APP: &str = "bus.subscribe('ping')\nbus.on('ping', function() return 'pong' end)\n";

/// A URL where nothing listens: without the checks the worker would retry it
/// forever, so an exit proves the check ran before connecting.
fn nowhere() -> String {
    format!("nats://127.0.0.1:{}", free_port())
}

/// Runs `agent-block run ARGS` against `nowhere()` and returns (exit code, stderr).
fn run_against_nowhere(script: &Path, args: &[&str]) -> (Option<i32>, String) {
    let url = nowhere();
    let mut all = vec!["run", script.to_str().unwrap(), "--nats-url", &url];
    all.extend_from_slice(args);
    let mut worker = Worker::spawn(&all);
    let status = worker.wait_exit(PATIENCE);
    (status.and_then(|s| s.code()), worker.stderr.text())
}

#[test]
fn every_file_the_settings_name_is_checked_before_connecting() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let junk = scripts.write("junk.pem", "this is not PEM");
    let junk = junk.to_str().unwrap();
    let missing = scripts.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--tls-ca", missing], "no such file"),
        (&["--tls-ca", junk], "no PEM certificate"),
        (&["--tls-cert", junk, "--tls-key", junk], "no PEM certificate"),
        (&["--tls-key", junk], "no PEM private key"),
        (&["--creds", missing], "no such file"),
        (&["--creds", junk], "credentials file"),
        (&["--nkey", "SUAnotaseed"], "--nkey is not an NKey seed"),
    ];
    for (args, problem) in cases {
        let (code, stderr) = run_against_nowhere(&script, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(problem), "{args:?}: expected {problem:?} in {stderr}");
        assert!(!stderr.contains("retrying"), "{args:?} was retried: {stderr}");
        if let Some(file) = args.get(1).filter(|a| a.starts_with('/')) {
            assert!(stderr.contains(file), "{args:?}: the message names the file: {stderr}");
        }
        assert!(!stderr.contains("this is not PEM") && !stderr.contains("SUAnotaseed"), "{stderr}");
    }
}

#[test]
fn a_missing_or_broken_script_is_reported_without_a_server() {
    let scripts = Scripts::new();
    let (code, stderr) = run_against_nowhere(&scripts.path().join("absent.lua"), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("absent.lua") && stderr.contains("no such file"), "{stderr}");
    let broken = scripts.write("broken.lua", "bus.on('a', function()\n");
    let (code, stderr) = run_against_nowhere(&broken, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("broken.lua:2:"), "{stderr}");
    // dev checks before it starts a server.
    let (code, stdout, stderr) = run_command(&["dev", scripts.path().join("absent.lua").to_str().unwrap()], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(!stdout.contains("nats-server running"), "{stdout}");
}

#[test]
fn the_request_command_checks_its_files_too() {
    let (code, _, stderr) =
        run_command(&["request", "x", "--nats-url", &nowhere(), "--creds", "/nonexistent.creds"], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent.creds: no such file"), "{stderr}");
}

#[test]
fn an_unreachable_server_is_retried_with_advice() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = nowhere();
    let worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url]);
    assert!(worker.stderr.wait_for("cannot connect to NATS; retrying", PATIENCE), "{}", worker.stderr.text());
    let log = worker.stderr.text();
    assert!(log.contains("start it") && log.contains("--nats-url") && log.contains("agent-block dev"), "{log}");
}

#[test]
fn connect_timeout_is_bounded_and_names_the_url() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = nowhere();
    let started = Instant::now();
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--connect-timeout", "1s"]);
    let status = worker.wait_exit(PATIENCE).expect("the worker gives up");
    assert_eq!(status.code(), Some(1));
    assert_gave_up_soon(started);
    assert!(
        worker.stderr.text().contains(&format!("cannot reach NATS at {url} within 1s")),
        "{}",
        worker.stderr.text()
    );
}

/// Child process ids of `pid` (Linux /proc).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Whether `pid` runs (a zombie waiting for its reaper counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[cfg(target_os = "linux")]
#[test]
fn dev_killed_with_sigkill_takes_its_server_down_and_its_store_is_cleaned_later() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let mut dev = Worker::spawn(&["dev", script.to_str().unwrap(), "--workers", "1"]);
    assert!(dev.stdout.wait_for("nats-server running at ", PATIENCE), "{}", dev.stderr.text());
    dev.expect_ready();
    let servers = children(dev.pid());
    assert_eq!(servers.len(), 1, "dev has one child, its nats-server");
    let server_pid = servers[0];
    let store_prefix = format!("agent-block-nats-{}-", dev.pid());

    let status = std::process::Command::new("kill").args(["-KILL", &dev.pid().to_string()]).status().unwrap();
    assert!(status.success());
    dev.wait_exit(PATIENCE).expect("dev dies");
    let deadline = Instant::now() + PATIENCE;
    while running(server_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!running(server_pid), "the nats-server child outlived dev");

    // The next server started anywhere removes the dead process's store.
    let _next = server();
    let stale: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&store_prefix))
        .collect();
    assert!(stale.is_empty(), "stale store left: {:?}", stale.iter().map(|e| e.path()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_cluster_list_reaches_a_live_server() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let urls = format!("{}, {}", nowhere(), server.url());
    let _worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &urls, "--workers", "1"]);
    _worker.expect_ready();
    assert_eq!(body(&request(&client(&server).await, "ping", "").await), "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_block_variables_override_nats_url() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let nowhere = nowhere();
    let worker = Worker::spawn_with_env(
        &["run", script.to_str().unwrap(), "--workers", "1"],
        &[("NATS_URL", &nowhere), ("AGENT_BLOCK_NATS_URL", &url)],
    );
    worker.expect_ready();
    assert_eq!(body(&request(&client(&server).await, "ping", "").await), "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_the_log() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts
        .write("app.lua", "bus.subscribe('ping')\nbus.on('ping', function() log.warn('handled') return 'pong' end)\n");
    let url = server.url();
    let worker =
        Worker::spawn_with_env(&["run", script.to_str().unwrap(), "--nats-url", &url], &[("RUST_LOG", "warn")]);
    // No "worker ready" at warn level: a reply shows it serves.
    let client = client(&server).await;
    let deadline = Instant::now() + PATIENCE;
    let reply = loop {
        let request = async_nats::Request::new().timeout(Some(Duration::from_secs(1)));
        match client.send_request("ping", request).await {
            Ok(reply) => break reply,
            // "no responders" until the worker subscribes: poll, gently.
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => panic!("the worker never answered: {err}\n{}", worker.stderr.text()),
        }
    };
    assert_eq!(body(&reply), "pong");
    assert!(worker.stderr.wait_for("handled", PATIENCE), "{}", worker.stderr.text());
    let log = worker.stderr.text();
    assert!(!log.contains("worker ready") && !log.contains("\"INFO\""), "info records pass RUST_LOG=warn:\n{log}");
}

/// Runs the ping script with `format` (none: the default), answers one ping that
/// logs, stops the worker and returns its log.
async fn log_of_a_run(format: Option<&str>) -> String {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts
        .write("app.lua", "bus.subscribe('ping')\nbus.on('ping', function() log.warn('handled') return 'pong' end)\n");
    let url = server.url();
    let args = ["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1"];
    let mut worker = Worker::spawn_with_log_format(&args, &[], format);
    worker.expect_ready();
    assert_eq!(body(&request(&client(&server).await, "ping", "").await), "pong");
    assert!(worker.stderr.wait_for("handled", PATIENCE), "{}", worker.stderr.text());
    worker.terminate();
    assert_eq!(worker.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0), "{}", worker.stderr.text());
    worker.stderr.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_the_default_off_a_terminal() {
    for format in [Some("json"), None] {
        let log = log_of_a_run(format).await;
        let records: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{format:?}: {err} in {line:?}")))
            .collect();
        for record in &records {
            assert!(record["timestamp"].as_str().is_some_and(|t| t.contains('T')), "{format:?}: {record}");
            let level = record["level"].as_str().unwrap_or("");
            assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level), "{format:?}: {record}");
            assert!(record["message"].is_string() && record["target"].is_string(), "{format:?}: {record}");
        }
        let ready = records.iter().find(|r| r["message"] == "worker ready").expect("a ready record");
        assert_eq!(ready["level"], "INFO");
        let handled = records.iter().find(|r| r["message"] == "handled").expect("the handler's record");
        assert_eq!((handled["level"].as_str(), handled["kind"].as_str()), (Some("WARN"), Some("ping")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_logs_are_plain_text_lines() {
    let log = log_of_a_run(Some("pretty")).await;
    for line in log.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_err(), "a JSON line: {line}");
        assert!(!line.contains('\x1b'), "colour codes on a pipe: {line:?}");
    }
    let ready = log.lines().find(|l| l.contains("worker ready")).unwrap_or_else(|| panic!("{log}"));
    assert!(ready.contains(" INFO ") && ready.starts_with(|c: char| c.is_ascii_digit()), "{ready}");
    let handled = log.lines().find(|l| l.contains("handled")).unwrap_or_else(|| panic!("{log}"));
    assert!(handled.contains(" WARN ") && handled.contains("ping"), "{handled}");
}

/// On a terminal (a pseudo-terminal from util-linux `script`), without
/// `--log-format`, the log is pretty and coloured.
#[test]
fn pretty_logs_are_the_default_on_a_terminal() {
    use std::os::unix::process::CommandExt;
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let worker = format!("{BIN} run {} --nats-url {} --workers 1", script.display(), server.url());
    let mut command = std::process::Command::new("script");
    command.args(["--quiet", "--flush", "--command", &worker, "/dev/null"]);
    hermetic(&mut command);
    let mut terminal = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("util-linux script runs the worker on a pseudo-terminal");
    let output = Output::default();
    output.collect(terminal.stdout.take().unwrap());
    let ready = output.wait_for("worker ready", PATIENCE);
    // The group holds `script` and the worker under it.
    unsafe { libc::kill(-(terminal.id() as i32), libc::SIGKILL) };
    let _ = terminal.wait();
    let log = output.text();
    assert!(ready, "{log}");
    let line = log.lines().find(|l| l.contains("worker ready")).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(line.trim()).is_err(), "pretty, not JSON: {line}");
    assert!(line.contains('\x1b') && line.contains("INFO"), "coloured on a terminal: {line:?}");
}

#[test]
fn sigint_shuts_down_like_sigterm() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &format!("{APP}bus.serve()\nlog.info('cleanup ran')\n"));
    let mut worker = Worker::run(&server, &script, &["--workers", "1"]);
    let status = std::process::Command::new("kill").args(["-INT", &worker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(worker.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0), "{}", worker.stderr.text());
    let log = worker.stderr.text();
    assert!(log.contains("SIGINT received") && log.contains("cleanup ran"), "{log}");
}

#[test]
fn credentials_in_the_url_and_in_flags_are_refused_without_showing_either() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = format!("nats://alice:url-pw-81@127.0.0.1:{}", free_port());
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--token", "flag-tok-82"]);
    let status = worker.wait_exit(PATIENCE).expect("refused at once");
    assert_eq!(status.code(), Some(2));
    let log = worker.stderr.text();
    assert!(log.contains("give them in one place"), "{log}");
    assert!(!log.contains("url-pw-81") && !log.contains("flag-tok-82"), "{log}");
}

#[test]
fn a_bad_setting_exits_2_naming_its_flag_before_connecting() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let cases: &[(&[&str], &str)] = &[
        (&["--concurrency", "0"], "--concurrency"),
        (&["--concurrency", "many"], "--concurrency"),
        (&["--bus-capacity", "0"], "--bus-capacity"),
        (&["--bus-capacity=-1"], "--bus-capacity"),
        (&["--workers", "0"], "--workers"),
        (&["--metrics-addr", "nowhere"], "--metrics-addr"),
        (&["--log-format", "xml"], "--log-format"),
        (&["--http-allow", "http://api.example.com/v1"], "--http-allow"),
        (&["--http-allow", "api.example.com:https"], "--http-allow"),
        (&["--name", "orders.eu"], "--name"),
        (&["--name", ""], "--name"),
    ];
    for (args, flag) in cases {
        // Without the check the worker would give up on the server after 1 s: exit 1.
        let all = [*args, &["--connect-timeout", "1s"][..]].concat();
        let (code, stderr) = run_against_nowhere(&script, &all);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: the message names {flag}: {stderr}");
    }
}

#[test]
fn a_script_that_cannot_be_read_exits_2_naming_it() {
    let scripts = Scripts::new();
    let folder = scripts.path().join("folder.lua");
    std::fs::create_dir(&folder).unwrap();
    let missing = scripts.path().join("missing.lua");
    let unreadable = vec![(folder, "is a directory"), (missing, "no such file")];
    for (script, why) in unreadable {
        let (code, stderr) = run_against_nowhere(&script, &["--connect-timeout", "1s"]);
        assert_eq!(code, Some(2), "{}: {stderr}", script.display());
        let name = script.file_name().unwrap().to_str().unwrap();
        assert!(stderr.contains(name) && stderr.contains(why), "{name}: {stderr}");
    }
    // A mode of 000 stops every user but root, so as root the worker runs as
    // `nobody` (util-linux `setpriv`).
    let locked = scripts.write("locked.lua", APP);
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let url = nowhere();
    let worker = [BIN, "run", locked.to_str().unwrap(), "--nats-url", &url, "--connect-timeout", "1s"];
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut command = std::process::Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).args(worker);
        command
    } else {
        let mut command = std::process::Command::new(BIN);
        command.args(&worker[1..]);
        command
    };
    hermetic(&mut command);
    let output = command.output().expect("run the worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("locked.lua") && stderr.contains("permission denied"), "{stderr}");
}

#[test]
fn defaults_without_flags_are_the_ones_the_readme_states() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let worker = Worker::run(&server, &script, &[]);
    let log = worker.stderr.text();
    let ready: serde_json::Value = log
        .lines()
        .find(|l| l.contains("worker ready"))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("ready line");
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(ready["name"], "agent-block", "--name defaults to agent-block");
    assert_eq!(ready["workers"], cpus, "--workers defaults to the number of CPUs");
    assert!(!log.contains("probes at"), "no HTTP listener without --metrics-addr: {log}");
}

/// `--handler-timeout` 30s and `--grace` 10s, observed on a worker started
/// without flags: a handler that never yields is ended after 30 s, and at SIGTERM
/// a handler still running is cancelled (503) 10 s later. The bounds leave room
/// for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_deadline_is_30s_and_the_default_grace_10s() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
bus.subscribe("spin")
bus.subscribe("nap")
bus.on("spin", function() while true do end end)
bus.on("nap", function()
  nats.publish("napping", "")
  time.sleep("10m")
  return "woke"
end)
"#,
    );
    let mut worker = Worker::run(&server, &script, &[]);
    let client = client(&server).await;
    let started = Instant::now();
    let spin = async_nats::Request::new().timeout(Some(Duration::from_secs(60)));
    let reply = client.send_request("spin", spin).await.expect("an answer within 60 s");
    let took = started.elapsed();
    assert_eq!(error_of(&reply), Some((504, "handler timed out after 30s".to_string())), "{:?}", reply.payload);
    assert!(took >= Duration::from_secs(30) && took < Duration::from_secs(45), "ended after {took:?}");

    let mut napping = client.subscribe("napping").await.unwrap();
    client.flush().await.unwrap();
    let nap = tokio::spawn({
        let client = client.clone();
        async move { request(&client, "nap", "").await }
    });
    next(&mut napping).await;
    let terminated = Instant::now();
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(60));
    let took = terminated.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", worker.stderr.text());
    assert!(took >= Duration::from_secs(10) && took < Duration::from_secs(25), "exited after {took:?}");
    let reply = nap.await.unwrap();
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(503), "{:?}", reply.payload);
}
