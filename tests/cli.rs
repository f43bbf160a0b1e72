//! The command line: check, replay, request, dev, exit codes, the script model
//! across VMs, and the sandbox.

mod common;

use std::collections::BTreeSet;

use common::*;

#[test]
fn check_lists_subscriptions_and_handler_kinds() {
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
        bus.subscribe("orders.*", { kind = "order.{{wildcard(1)}}", queue = "billing", timeout = "2s" })
        bus.subscribe("audit", { queue = false })
        bus.on("order.created", function(ev) end)
        bus.on_any(function(ev) end)
        bus.serve()
        "#,
    );
    let (code, stdout, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("orders.* kind=order.{{wildcard(1)}} queue=billing timeout=2s"), "{stdout}");
    assert!(stdout.contains("audit kind={{subject}}\n"), "{stdout}");
    assert!(stdout.contains("handlers:\n  order.created\n  (on_any fallback)"), "{stdout}");
}

#[test]
fn check_reports_script_errors_with_file_and_line() {
    let scripts = Scripts::new();
    let cases = [
        ("syntax.lua", "bus.on('a', function(ev)\n  return 1 +\nend)\n", "syntax.lua:3:"),
        ("runtime.lua", "local x = 1\nlocal y = nil\nprint(y.z)\n", "runtime.lua:3:"),
        ("template.lua", "\nbus.subscribe('a.*', { kind = '{{wildcard(2)}}' })\n", "template.lua:2:"),
        ("badon.lua", "bus.on(42)\n", "badon.lua:1: bus.on expects"),
        ("require.lua", "require('missing_module')\n", "module 'missing_module' not found"),
    ];
    for (name, source, expected) in cases {
        let script = scripts.write(name, source);
        let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: expected {expected:?} in {stderr:?}");
    }
    let (code, _, stderr) = run_command(&["check", "/nonexistent/app.lua"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read /nonexistent/app.lua"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) = run_command(&["run"], None);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run_command(&["run", "app.lua", "--grace", "soon"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid duration \"soon\""), "{stderr}");
    let (code, _, stderr) = run_command(&["run", "app.lua", "--workers", "0"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("--workers must be at least 1"), "{stderr}");
    let (code, _, stderr) = run_command(&["run", "app.lua", "--nats-url", "nats://[bad"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid NATS URL"), "{stderr}");
}

const REPLAY_APP: &str = r#"
bus.subscribe("orders.*", { kind = "order.{{wildcard(1)}}" })
bus.on("order.created", function(ev)
  nats.publish("billing.charge", { order = ev.payload.id })
  return { ok = ev.payload.id }
end)
bus.on("order.raw", function(ev) return ev.data .. "!" end)
bus.on("order.fail", function(ev) error({ code = 409, message = "duplicate" }) end)
bus.on("order.later", function(ev) return bus.nak({ delay = "5s" }) end)
bus.on("order.serve", function(ev) bus.serve() end)
bus.on("order.sub", function(ev) bus.subscribe("x") end)
"#;

#[test]
fn replay_prints_outcomes_and_publishes_in_order() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", REPLAY_APP);
    let events = [
        r#"{"subject":"orders.created","payload":{"id":7},"headers":{"Nats-Msg-Id":"m1"}}"#,
        r#"{"subject":"orders.raw","data":"hi"}"#,
        "not json",
        r#"{"subject":"orders.fail"}"#,
        r#"{"subject":"orders.unknown"}"#,
        r#"{"subject":"orders.later"}"#,
        r#"{"subject":"orders.created","data":"{broken"}"#,
        r#"{"subject":"orders.serve"}"#,
        r#"{"subject":"orders.sub"}"#,
    ]
    .join("\n");
    let (code, stdout, stderr) = run_command(&["replay", script.to_str().unwrap(), "--events", "-"], Some(&events));
    assert_eq!(code, 1, "a line that is not an event fails the replay, after the others ran: {stderr}");
    assert!(stderr.contains("not events"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary: Vec<String> = lines
        .iter()
        .map(|l| match l["type"].as_str().unwrap() {
            "publish" => format!("publish {} {}", l["subject"], l["data"]),
            "outcome" => format!("{} {} {} {}", l["line"], l["kind"], l["outcome"], l["code"]),
            _ => format!("error {}", l["line"]),
        })
        .collect();
    assert_eq!(
        summary,
        [
            r#"publish "billing.charge" "{\"order\":7}""#,
            r#"1 "order.created" "ack" null"#,
            r#"2 "order.raw" "ack" null"#,
            "error 3",
            r#"4 "order.fail" "error" 409"#,
            r#"5 "order.unknown" "error" 404"#,
            r#"6 "order.later" "nak" null"#,
            r#"7 "order.created" "error" 400"#,
            r#"8 "order.serve" "error" 500"#,
            r#"9 "order.sub" "error" 500"#,
        ]
    );
    assert_eq!(lines[1]["id"], "m1");
    assert_eq!(lines[1]["payload"], serde_json::json!({"ok": 7}));
    assert_eq!(lines[2]["data"], "hi!");
    assert_eq!(lines[6]["delay"], "5s");
    assert!(lines[8]["message"].as_str().unwrap().contains("only once"));
    assert!(lines[9]["message"].as_str().unwrap().contains("top level"));
}

#[test]
fn the_sandbox_closes_the_host_unless_unsafe() {
    let scripts = Scripts::new();
    let script = scripts.write(
        "probe.lua",
        r#"
        bus.on("probe", function(ev)
          local binary_ok = load(string.dump(function() return 1 end))
          return {
            execute = os.execute ~= nil, io = io ~= nil, debug = debug ~= nil,
            loadlib = package.loadlib ~= nil, dofile = dofile ~= nil, exit = os.exit ~= nil,
            binary = binary_ok ~= nil, text = load("return 2")() == 2, clock = os.time() > 0,
          }
        end)
        "#,
    );
    let event = r#"{"subject":"probe"}"#;
    let probe = |extra: &[&str]| {
        let mut args = vec!["replay", script.to_str().unwrap(), "--events", "-"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run_command(&args, Some(event));
        assert_eq!(code, 0, "{stderr}");
        let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        line["payload"].clone()
    };
    assert_eq!(
        probe(&[]),
        serde_json::json!({"execute": false, "io": false, "debug": false, "loadlib": false,
            "dofile": false, "exit": false, "binary": false, "text": true, "clock": true})
    );
    assert_eq!(
        probe(&["--unsafe-lua"]),
        serde_json::json!({"execute": true, "io": true, "debug": true, "loadlib": true,
            "dofile": true, "exit": true, "binary": true, "text": true, "clock": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vm_loads_the_script_and_one_time_work_can_pick_vm_0() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
        local me = bus.worker_id()
        if me == 0 then log.info("one-time setup") end
        bus.subscribe("who")
        bus.on("who", function(ev) return { id = me, of = bus.workers() } end)
        "#,
    );
    let worker = Worker::run(&server, &script, &["--workers", "2"]);
    let client = client(&server).await;
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let reply = json(&request(&client, "who", "").await);
        assert_eq!(reply["of"], 2);
        seen.insert(reply["id"].as_u64().unwrap());
    }
    assert_eq!(seen, BTreeSet::from([0, 1]), "requests reach both VMs");
    assert_eq!(worker.stderr.text().matches("one-time setup").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_command_prints_replies_and_errors() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
        bus.subscribe("echo")
        bus.subscribe("hdr")
        bus.on("echo", function(ev) return ev.payload end)
        bus.on("hdr", function(ev) return ev.headers["X-Name"] end)
        "#,
    );
    let _worker = Worker::run(&server, &script, &[]);
    let url = server.url();
    let (code, stdout, _) = run_command(&["request", "echo", r#"{"a": 1}"#, "--nats-url", &url], None);
    assert_eq!((code, stdout.as_str()), (0, "{\"a\":1}\n"));
    let (code, stdout, _) = run_command(&["request", "hdr", "--header", "X-Name: ada", "--nats-url", &url], None);
    assert_eq!((code, stdout.as_str()), (0, "ada\n"));
    let (code, stdout, _) = run_command(&["request", "echo", "-", "--nats-url", &url], Some("[1,2]"));
    assert_eq!((code, stdout.as_str()), (0, "[1,2]\n"));
    let (code, _, stderr) = run_command(&["request", "echo", "nope", "--nats-url", &url], None);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error 400: payload is not valid JSON"), "{stderr}");
    let (code, _, stderr) = run_command(&["request", "nobody", "--nats-url", &url], None);
    assert_eq!(code, 1);
    assert!(stderr.contains("no responders"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_worker_against_a_private_server() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/examples/echo.lua");
    let mut dev = Worker::spawn(&["dev", example]);
    assert!(dev.stdout.wait_for("nats-server running at ", PATIENCE), "{}", dev.stderr.text());
    dev.expect_ready();
    let url =
        dev.stdout.text().lines().find_map(|l| l.strip_prefix("nats-server running at ")).unwrap().trim().to_string();
    let client = async_nats::connect(&url).await.unwrap();
    assert_eq!(json(&request(&client, "echo", r#"{"hello":"world"}"#).await), serde_json::json!({"hello":"world"}));
    drop(client);
    dev.terminate();
    assert_eq!(dev.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
    assert!(async_nats::connect(&url).await.is_err(), "the private server stops with dev");
}

#[test]
fn run_exits_2_on_a_script_error() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("broken.lua", "bus.subscribe('a')\nbus.on('a', function(ev)\n");
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &server.url()]);
    let status = worker.wait_exit(PATIENCE).expect("worker stops");
    assert_eq!(status.code(), Some(2));
    assert!(worker.stderr.wait_for("broken.lua:3:", PATIENCE), "{}", worker.stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_command_gives_up_at_its_timeout() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('slow')\nbus.on('slow', function() time.sleep('20s') end)\n");
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let started = std::time::Instant::now();
    let (code, _, stderr) = run_command(&["request", "slow", "--timeout", "300ms", "--nats-url", &server.url()], None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("timed out after 300ms"), "{stderr}");
    // The handler sleeps 20 s; ending well before it shows --timeout was used.
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn print_is_an_info_line_and_a_replaced_handler_is_logged() {
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
        bus.on("probe", function(ev) return "first" end)
        bus.on("probe", function(ev) print("printed", 42) return "second" end)
        "#,
    );
    let args = ["replay", script.to_str().unwrap(), "--events", "-", "--log-format", "json"];
    let (code, stdout, stderr) = run_command_with_env(&args, &[("RUST_LOG", "info")], Some(r#"{"subject":"probe"}"#));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r#""data":"second""#), "the last registration wins: {stdout}");
    let lines: Vec<serde_json::Value> = stderr.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let replaced = lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.contains("replacing the handler")));
    let replaced = replaced.unwrap_or_else(|| panic!("re-registering a kind is logged: {stderr}"));
    assert_eq!(replaced["kind"], "probe");
    let printed = lines.iter().find(|l| l["message"] == "printed\t42").unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(printed["level"], "INFO");
    assert_eq!(printed["kind"], "probe");
}

/// The README's flag table: every `AGENT_BLOCK_*` variable it lists sets that
/// flag, and each default it states is the one the settings apply.
#[test]
fn the_readme_flag_table_matches_the_flags() {
    use clap::CommandFactory;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let cli = agent_block::cli::Cli::command();
    let run = cli.find_subcommand("run").expect("run");
    let mut rows = 0;
    for row in readme.lines().filter(|line| line.starts_with("| `--")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (flags, variables) = (cells[1], cells[2]);
        let flags: Vec<&str> = flags.split(", ").map(|f| f.split(' ').next().unwrap().trim_matches('`')).collect();
        let variables: Vec<&str> =
            variables.split(", ").map(|v| v.split(' ').next().unwrap().trim_matches('`')).collect();
        for (index, flag) in flags.iter().enumerate() {
            let long = flag.trim_start_matches("--");
            let arg = run
                .get_arguments()
                .chain(cli.get_arguments())
                .find(|arg| arg.get_long() == Some(long))
                .unwrap_or_else(|| panic!("README lists {flag}, which `run` does not take"));
            let env = arg.get_env().map(|e| e.to_str().unwrap().to_string());
            // "AGENT_BLOCK_NKEY, ..." lists the first flag's variable and elides the others.
            let listed = match variables.get(index) {
                Some(&"...") | None if index > 0 => format!("AGENT_BLOCK_{}", long.to_uppercase().replace('-', "_")),
                Some(variable) if !variable.is_empty() => variable.to_string(),
                _ => {
                    assert_eq!(env, None, "{flag} reads a variable the README does not list");
                    continue;
                }
            };
            assert_eq!(env.as_deref(), Some(listed.as_str()), "{flag}: README lists {listed}");
        }
        // Further variables of a one-flag row: an alias, or a hidden flag's variable.
        if flags.len() == 1 {
            let id = flags[0].trim_start_matches("--").replace('-', "_");
            for variable in variables.iter().skip(1) {
                let hidden = run.get_arguments().any(|arg| arg.get_env().is_some_and(|e| e == *variable));
                let alias = agent_block::cli::env_alias(&id) == Some(*variable);
                assert!(hidden || alias, "README lists {variable} for {}, which does not read it", flags[0]);
            }
        }
        rows += 1;
    }
    assert!(rows >= 20, "the flag table was found ({rows} rows)");

    use agent_block::settings as c;
    let defaults = [
        ("--nats-url", c::DEFAULT_NATS_URL.to_string()),
        ("--name", c::DEFAULT_NAME.to_string()),
        ("--concurrency", c::DEFAULT_CONCURRENCY.to_string()),
        ("--bus-capacity", c::DEFAULT_BUS_CAPACITY.to_string()),
        ("--handler-timeout", format!("{}s", c::DEFAULT_HANDLER_TIMEOUT.as_secs())),
        ("--grace", format!("{}s", c::DEFAULT_GRACE.as_secs())),
        ("--http-max-body", format!("{}MiB", agent_block::bridge::DEFAULT_HTTP_MAX_BODY >> 20)),
        ("--lua-memory-limit", format!("{}MiB", c::DEFAULT_LUA_MEMORY_LIMIT >> 20)),
    ];
    for (flag, default) in defaults {
        let row = readme.lines().find(|line| line.starts_with(&format!("| `{flag}`"))).expect(flag);
        let cell = row.split('|').nth(3).unwrap().trim().trim_matches('`');
        assert_eq!(cell, default, "README's default of {flag}");
    }
}

#[test]
fn dev_and_check_print_no_secret() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/examples/echo.lua");
    let secrets = [("AGENT_BLOCK_PASSWORD", "dev-pa55-91e"), ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=dev-k3y-5c")];
    let mut env = secrets.to_vec();
    env.push(("AGENT_BLOCK_USER", "alice"));
    env.push(("RUST_LOG", "trace"));
    // The private server has no authorization: it takes the credentials and ignores them.
    let mut dev = Worker::spawn_with_env(&["dev", example, "--workers", "1"], &env);
    dev.expect_ready();
    dev.terminate();
    assert_eq!(dev.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0), "{}", dev.stderr.text());
    let (code, stdout, stderr) = run_command_with_env(&["check", example], &env, None);
    assert_eq!(code, 0, "{stderr}");
    let output = format!("{}{}{stdout}{stderr}", dev.stdout.text(), dev.stderr.text());
    assert!(output.contains("TRACE") || output.contains("DEBUG"), "a trace log, else the search proves little");
    for (name, secret) in secrets {
        assert!(!output.contains(secret), "{name}'s value was printed:\n{output}");
    }
}
