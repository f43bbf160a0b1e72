//! Start, shutdown and NATS faults: graceful SIGTERM, grace bound, cleanup code,
//! unreachable and restarting servers, and a pool of workers in one queue group.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

const APP: &str = r#"
bus.subscribe("slow")
bus.subscribe("stuck")
bus.subscribe("ping")
bus.subscribe("fanout", { queue = false })
bus.subscribe("gated")

bus.on("slow", function(ev)
  nats.publish("started", "")
  time.sleep("1s")
  return "finished"
end)
bus.on("stuck", function(ev)
  nats.publish("started", "")
  -- the VM's connection sends while the handler yields; a loop never does
  time.sleep(0)
  while true do end
end)
bus.on("ping", function(ev)
  nats.publish("handled", tostring(env.get("WORKER_TAG")), { headers = { ["Request"] = ev.data } })
  return "pong"
end)
bus.on("gated", function(ev)
  nats.publish("started", "")
  nats.request("gate", "", { timeout = "30s" })
  return "released"
end)
bus.on("fanout", function(ev)
  nats.publish("fanned", tostring(env.get("WORKER_TAG")), { headers = { ["Request"] = ev.data } })
end)

bus.serve()
log.info("cleanup ran")
"#;

/// Sends a request in the background; returns once its handler published `started`.
async fn request_in_flight(
    client: &async_nats::Client,
    subject: &'static str,
) -> tokio::task::JoinHandle<async_nats::Message> {
    let mut started = client.subscribe("started").await.unwrap();
    client.flush().await.unwrap();
    let pending = tokio::spawn({
        let client = client.clone();
        async move { request(&client, subject, "").await }
    });
    next(&mut started).await;
    pending
}

fn app() -> (Scripts, std::path::PathBuf) {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    (scripts, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_handler_in_flight_finish() {
    let server = server();
    let (_scripts, script) = app();
    let mut worker = Worker::run(&server, &script, &["--grace", "20s"]);
    let client = client(&server).await;
    let pending = request_in_flight(&client, "slow").await;
    worker.terminate();
    let reply = pending.await.unwrap();
    assert_eq!(body(&reply), "finished");
    let status = worker.wait_exit(PATIENCE).expect("worker exits");
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.stderr.text());
    assert!(worker.stderr.text().contains("cleanup ran"), "code after bus.serve() runs at shutdown");
}

#[test]
fn cleanup_code_that_runs_too_long_is_cut_off() {
    // A loop that computes, and one that waits.
    for cleanup in ["while true do end", "while true do time.sleep('50ms') end"] {
        let source = format!("bus.subscribe('ping')\nbus.serve()\nlog.info('cleanup started')\n{cleanup}\n");
        // With a long grace, only the cleanup limit (500 ms) ends the loop soon.
        let (_server, _scripts, mut worker) = run_app(&source, &["--workers", "1", "--grace", "60s"]);
        let signalled = Instant::now();
        worker.terminate();
        let status = worker.wait_exit(PATIENCE).expect("the worker exits");
        // 15 s leaves a loaded machine room yet is far below the 60 s grace.
        assert!(signalled.elapsed() < Duration::from_secs(15), "{cleanup}: took {:?}", signalled.elapsed());
        assert_eq!(status.code(), Some(0), "{cleanup}: {}", worker.stderr.text());
        let log = worker.stderr.text();
        assert!(log.contains("cleanup started"), "{cleanup}: the cleanup code ran: {log}");
        let cut = log.lines().find(|l| l.contains("script cleanup")).unwrap_or_else(|| panic!("{cleanup}: {log}"));
        let cut: serde_json::Value = serde_json::from_str(cut).expect("a JSON log line");
        assert_eq!(cut["level"], "WARN", "{cut}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_is_cancelled_when_grace_runs_out() {
    let server = server();
    let (_scripts, script) = app();
    let mut worker = Worker::run(&server, &script, &["--grace", "1s", "--handler-timeout", "10m"]);
    let client = client(&server).await;
    let pending = request_in_flight(&client, "stuck").await;
    let signalled = Instant::now();
    worker.terminate();
    let reply = pending.await.unwrap();
    assert_eq!(error_of(&reply).map(|e| e.0), Some(503), "a cancelled request is answered 503");
    let status = worker.wait_exit(PATIENCE).expect("worker exits");
    assert_eq!(status.code(), Some(0));
    // The bound under test is grace + 1 s; the slack covers a loaded CI machine.
    assert!(signalled.elapsed() < Duration::from_secs(6), "took {:?}", signalled.elapsed());
    assert!(signalled.elapsed() >= Duration::from_millis(900), "grace was honoured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_retried_until_it_appears() {
    let mut server = server();
    let url = server.url();
    server.stop();
    let (_scripts, script) = app();
    let worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url]);
    assert!(worker.stderr.wait_for("cannot connect to NATS; retrying", PATIENCE));
    assert!(worker.stderr.text().contains(&url), "the retry log names the URL");
    server.restart().unwrap();
    worker.expect_ready();
    let client = client(&server).await;
    assert_eq!(body(&request(&client, "ping", "").await), "pong");
}

#[test]
fn connect_timeout_ends_the_wait_with_exit_1() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let (_scripts, script) = app();
    let started = Instant::now();
    let mut worker =
        Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--connect-timeout", "500ms"]);
    let status = worker.wait_exit(PATIENCE).expect("worker gives up");
    assert_eq!(status.code(), Some(1));
    assert_gave_up_soon(started);
    assert!(worker.stderr.wait_for(&format!("cannot reach NATS at {url}"), PATIENCE), "{}", worker.stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_server_restart() {
    let mut server = server();
    let (_scripts, script) = app();
    let worker = Worker::run(&server, &script, &[]);
    server.restart().unwrap();
    assert!(worker.stderr.wait_for("NATS connection restored", PATIENCE), "{}", worker.stderr.text());
    let client = client(&server).await;
    // The worker resubscribes right after reconnecting; retry until it answers.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = client.request("ping", "".into()).await;
        if let Ok(reply) = reply {
            assert_eq!(body(&reply), "pong");
            break;
        }
        assert!(Instant::now() < deadline, "no reply after reconnect: {reply:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_answers_each_request_once() {
    let server = server();
    let (_scripts, script) = app();
    let url = server.url();
    let args = |tag: &'static str| {
        // Two VMs per process: `queue = false` must still reach each process once.
        Worker::spawn_with_env(
            &["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "2"],
            &[("WORKER_TAG", tag)],
        )
    };
    let (a, b) = (args("a"), args("b"));
    a.expect_ready();
    b.expect_ready();
    let client = client(&server).await;
    let mut handled = client.subscribe("handled").await.unwrap();
    let mut fanned = client.subscribe("fanned").await.unwrap();
    client.flush().await.unwrap();

    const REQUESTS: usize = 60;
    for n in 0..REQUESTS {
        assert_eq!(body(&request(&client, "ping", &n.to_string()).await), "pong");
    }
    let mut by = std::collections::HashMap::new();
    let mut requests = std::collections::HashSet::new();
    for _ in 0..REQUESTS {
        let message = next(&mut handled).await;
        assert!(requests.insert(request_of(&message)), "request {} handled twice", request_of(&message));
        *by.entry(body(&message)).or_insert(0) += 1;
    }
    assert_eq!(by.len(), 2, "both workers share the load: {by:?}");
    // A bounded look for a late second handling, then a marker through the same
    // path that must come next.
    client.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), handled.next()).await.is_err(),
        "no request is handled twice"
    );
    assert_eq!(body(&request(&client, "ping", "marker").await), "pong");
    assert_eq!(request_of(&next(&mut handled).await), "marker", "nothing came before the marker");

    client.publish("fanout", "1".into()).await.unwrap();
    let first = [next(&mut fanned).await, next(&mut fanned).await];
    let mut tags: Vec<String> = first.iter().map(body).collect();
    tags.sort();
    assert_eq!(tags, ["a", "b"], "queue = false delivers to every worker");
    client.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), fanned.next()).await.is_err(),
        "queue = false delivers to each process once, not once per VM"
    );
    // The next round's copies come next, with no third copy of the first before them.
    client.publish("fanout", "2".into()).await.unwrap();
    for _ in 0..2 {
        assert_eq!(request_of(&next(&mut fanned).await), "2", "a first-round copy came late");
    }
}

/// The request a `handled` or `fanned` announcement is about.
fn request_of(message: &async_nats::Message) -> String {
    let headers = message.headers.as_ref().expect("Request header");
    headers.get("Request").map(|value| value.to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_liveness_and_readiness() {
    let mut server = server();
    let url = server.url();
    server.stop();
    let (_scripts, script) = app();
    let (mut worker, addr) = with_probes(|addr| {
        Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--metrics-addr", addr])
    });
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);
    let (status, reason) = http_get(&addr, "/readyz").unwrap();
    assert_eq!((status, reason.trim()), (503, "not ready: not connected to NATS yet"));

    server.restart().unwrap();
    worker.expect_ready();
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 200);

    server.stop();
    assert!(worker.stderr.wait_for("NATS disconnected", PATIENCE));
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 503, "not ready while disconnected");

    worker.terminate();
    assert_eq!(worker.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_draining() {
    let server = server();
    let (_scripts, script) = app();
    let url = server.url();
    let (mut worker, addr) = with_probes(|addr| {
        Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--metrics-addr", addr, "--grace", "30s"])
    });
    worker.expect_ready();
    let client = client(&server).await;
    let mut gate = client.subscribe("gate").await.unwrap();
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 200);

    let pending = request_in_flight(&client, "gated").await;
    let held = next(&mut gate).await;
    worker.terminate();
    // The handler is held at the gate, so the worker is draining until we let go.
    let deadline = Instant::now() + PATIENCE;
    while http_get(&addr, "/readyz").unwrap().0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never turned 503 during shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.publish(held.reply.unwrap(), "".into()).await.unwrap();
    assert_eq!(body(&pending.await.unwrap()), "released");
    assert_eq!(worker.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_the_environment() {
    let server = server();
    let (_scripts, script) = app();
    let url = server.url();
    let (worker, addr) = with_probes(|addr| {
        Worker::spawn_with_env(
            &["run", script.to_str().unwrap()],
            &[("NATS_URL", url.as_str()), ("AGENT_BLOCK_METRICS_ADDR", addr), ("AGENT_BLOCK_WORKERS", "3")],
        )
    });
    worker.expect_ready();
    assert!(worker.stderr.text().contains("\"workers\":3"), "{}", worker.stderr.text());
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 200);
    let client = client(&server).await;
    assert_eq!(body(&request(&client, "ping", "").await), "pong");
}
