//! Scripts that try to hang a VM: every one must be answered within its deadline
//! (or soon after), leave the VM serving, and never spin unnoticed.
//!
//! Bounds here are generous on purpose (a loaded 2-core machine): they tell a
//! deadline that holds (a few seconds) from one that does not (tens of seconds or
//! never).

mod common;

use std::time::{Duration, Instant};

use common::*;

const APP: &str = r#"
bus.subscribe("hang.*", { kind = "{{wildcard(1)}}" })

local function spin() while true do end end

bus.on("ok", function(ev) return "still serving" end)
bus.on("gc_spin", function(ev)
  setmetatable({}, { __gc = spin })
  collectgarbage()
  return "finalizer returned"
end)
local planted_ran = false
bus.on("gc_plant", function(ev)
  -- a finalizer that runs during some later handler's allocations
  setmetatable({}, { __gc = function() planted_ran = true; spin() end })
  return "planted"
end)
bus.on("gc_ran", function(ev) return tostring(planted_ran) end)
bus.on("alloc", function(ev)
  local t = {}
  for i = 1, 200000 do t[i] = { i } end
  return "allocated"
end)
bus.on("close_spin", function(ev)
  local guard <close> = setmetatable({}, { __close = spin })
  spin()
end)
bus.on("pcall_recursion", function(ev)
  local function f() pcall(f) f() end
  f()
end)
bus.on("pcall_recursion_in_coroutine", function(ev)
  local co = coroutine.wrap(function()
    local function f() pcall(f) f() end
    f()
  end)
  while true do pcall(co) end
end)
bus.on("string_bomb", function(ev)
  local kept = {}
  for i = 1, 40 do kept[i] = string.rep("x", 64 * 1024 * 1024) end
  return #kept
end)
bus.on("gc_stop", function(ev) return tostring(collectgarbage("stop")) end)
bus.on("gc_generational", function(ev) return tostring(collectgarbage("generational")) end)
bus.on("gc_count", function(ev) return type(collectgarbage("count")) end)
bus.on("coroutine_spin", function(ev)
  local co = coroutine.create(spin)
  coroutine.resume(co)
end)
bus.on("wrap_spin", function(ev) coroutine.wrap(spin)() end)
bus.on("wrap_error", function(ev)
  local ok, err = pcall(coroutine.wrap(function() error("inner") end))
  return { ok = ok, err = err }
end)
bus.on("wrap_yield", function(ev)
  local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
  return gen() + gen() + gen()
end)
bus.on("gsub_spin", function(ev) string.gsub("abc", "%w", function() spin() end) end)
bus.on("index_spin", function(ev)
  local t = setmetatable({}, { __index = function() spin() end })
  return t.anything
end)
bus.on("close_coroutine_spin", function(ev)
  local co = coroutine.create(function()
    local guard <close> = setmetatable({}, { __close = spin })
    coroutine.yield()
  end)
  coroutine.resume(co)
  coroutine.close(co)
end)
bus.on("stuck_in_c", function(ev)
  -- backtracking inside the pattern matcher: no Lua instruction runs for ages
  return string.find(string.rep("a", 60), string.rep("a*", 60) .. "b")
end)
"#;

/// Requests `subject`, expecting an error reply with `code` within `within`.
async fn expect_error(client: &async_nats::Client, subject: &str, code: u16, within: Duration) -> String {
    let started = Instant::now();
    let reply = request(client, subject, "").await;
    let elapsed = started.elapsed();
    let (got, message) = error_of(&reply).unwrap_or_else(|| panic!("{subject}: no error, got {:?}", body(&reply)));
    assert_eq!(got, code, "{subject}: {message}");
    assert!(elapsed < within, "{subject} answered after {elapsed:?}");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_finalizer_is_interrupted() {
    let (server, _scripts, mut worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "1s"]);
    let client = client(&server).await;
    expect_error(&client, "hang.gc_spin", 504, Duration::from_secs(10)).await;
    assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");

    // Planted in one handler, run by the collector during another's allocations.
    assert_eq!(body(&request(&client, "hang.gc_plant", "").await), "planted");
    assert_eq!(body(&request(&client, "hang.gc_ran", "").await), "false");
    // Allocate until the collector runs the finalizer: the handler it spins in
    // is the one interrupted.
    let mut interrupted = 0;
    for _ in 0..20 {
        let reply = request(&client, "hang.alloc", "").await;
        if let Some((code, message)) = error_of(&reply) {
            assert_eq!(code, 504, "{message}");
            interrupted += 1;
            break;
        }
    }
    assert_eq!(interrupted, 1, "the planted finalizer never spun in a handler");
    assert_eq!(body(&request(&client, "hang.gc_ran", "").await), "true", "the planted finalizer ran");
    assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");

    worker.terminate();
    assert!(worker.wait_exit(PATIENCE).is_some_and(|s| s.success()), "{}", worker.stderr.text());
    assert!(!worker.stderr.text().contains("did not stop"), "{}", worker.stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_close_handler_is_interrupted() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "500ms"]);
    let client = client(&server).await;
    expect_error(&client, "hang.close_spin", 504, Duration::from_secs(10)).await;
    expect_error(&client, "hang.close_coroutine_spin", 504, Duration::from_secs(10)).await;
    assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursion_through_pcall_unwinds_in_time() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "2s"]);
    let client = client(&server).await;
    // Unwinding one pcall at a time took 29 s and more: each recovery costs time
    // that grows with the stack.
    for subject in ["hang.pcall_recursion", "hang.pcall_recursion_in_coroutine"] {
        expect_error(&client, subject, 504, Duration::from_secs(10)).await;
        assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_fails_under_the_default_memory_limit() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "10s"]);
    let client = client(&server).await;
    let message = expect_error(&client, "hang.string_bomb", 500, Duration::from_secs(10)).await;
    assert!(message.contains("memory"), "{message}");
    assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectgarbage_cannot_change_the_collector() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1"]);
    let client = client(&server).await;
    for subject in ["hang.gc_stop", "hang.gc_generational"] {
        let message = expect_error(&client, subject, 500, PATIENCE).await;
        assert!(message.contains("collectgarbage"), "{message}");
    }
    assert_eq!(body(&request(&client, "hang.gc_count", "").await), "number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_in_coroutines_callbacks_and_metamethods_time_out() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "300ms"]);
    let client = client(&server).await;
    for subject in ["hang.coroutine_spin", "hang.wrap_spin", "hang.gsub_spin", "hang.index_spin"] {
        let message = expect_error(&client, subject, 504, Duration::from_secs(10)).await;
        assert_eq!(message, "handler timed out after 300ms", "{subject}");
        assert_eq!(body(&request(&client, "hang.ok", "").await), "still serving");
    }
    // coroutine.wrap keeps its meaning: errors carry their position, yields pass through.
    let wrapped = json(&request(&client, "hang.wrap_error", "").await);
    assert_eq!(wrapped["ok"], false);
    assert!(wrapped["err"].as_str().unwrap().ends_with("inner"), "{wrapped}");
    assert_eq!(body(&request(&client, "hang.wrap_yield", "").await), "6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_stuck_past_its_deadline_fails_the_liveness_probe() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let script = script.to_str().unwrap();
    let (worker, addr) = with_probes(|addr| {
        Worker::spawn(&[
            "run",
            script,
            "--nats-url",
            &url,
            "--metrics-addr",
            addr,
            "--workers",
            "1",
            "--handler-timeout",
            "1s",
        ])
    });
    worker.expect_ready();
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    let client = client(&server).await;
    // Never answered: the VM is stuck inside C code that no hook can interrupt.
    client.publish("hang.stuck_in_c", "".into()).await.unwrap();
    client.flush().await.unwrap();
    assert!(worker.stderr.wait_for("Lua VM is stuck", PATIENCE), "{}", worker.stderr.text());
    let log = worker.stderr.text();
    let line = log.lines().find(|l| l.contains("Lua VM is stuck")).unwrap();
    assert!(line.contains("ERROR") && line.contains("stuck_in_c"), "{line}");
    let (status, reason) = http_get(&addr, "/healthz").unwrap();
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("stuck"), "{reason}");
}
