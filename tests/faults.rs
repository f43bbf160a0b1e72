//! Faults that must stay local to one event: timeouts (even a loop that never
//! yields), runaway memory, and handlers that wait on each other.

mod common;

use common::*;

const APP: &str = r#"
local arrived = 0
bus.subscribe("work.*", { kind = "{{wildcard(1)}}" })
bus.subscribe("quick", { timeout = "200ms" })
bus.subscribe("marker", { timeout = "5s" })

bus.on("spin", function(ev) while true do end end)
bus.on("spin_pcall", function(ev)
  -- a handler that swallows errors still cannot outlive its deadline
  while true do pcall(function() while true do end end) end
end)
bus.on("spin_in_c", function(ev)
  -- a loop inside a callback of C code (table.sort), where a coroutine cannot yield
  local list = { 3, 1, 2 }
  table.sort(list, function(a, b)
    while true do pcall(function() while true do end end) end
  end)
end)
bus.on("nap", function(ev) time.sleep("10s") return "woke" end)
bus.on("quick", function(ev) time.sleep("5s") return "late" end)
bus.on("hog", function(ev)
  local t = {}
  for i = 1, 1e9 do t[i] = string.rep("x", 1024) .. i end
end)
bus.on("ok", function(ev) return "still serving" end)
bus.on("zombie", function(ev)
  time.sleep("500ms")
  nats.publish("trail.zombie", "the abandoned handler kept running")
end)
bus.on("marker", function(ev)
  time.sleep("1s")
  nats.publish("trail.marker", "")
  return "done"
end)
bus.on("huge", function(ev) return string.rep("x", 2 * 1024 * 1024) end)
bus.on("huge_publish", function(ev)
  local ok, err = pcall(nats.publish, "sink", string.rep("x", 2 * 1024 * 1024))
  return { ok = ok, err = tostring(err) }
end)
bus.on("barrier", function(ev)
  -- completes only if `n` handlers are in flight on this VM at once
  local n = ev.payload.n
  arrived = arrived + 1
  while arrived < n do time.sleep("5ms") end
  return "all arrived"
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_that_never_yields_times_out_and_the_vm_keeps_serving() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "300ms"]);
    let client = client(&server).await;
    for subject in ["work.spin", "work.spin_pcall", "work.spin_in_c"] {
        let (code, message) = error_of(&request(&client, subject, "").await).expect("timeout reply");
        assert_eq!((code, message.as_str()), (504, "handler timed out after 300ms"), "{subject}");
        assert_eq!(body(&request(&client, "work.ok", "").await), "still serving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yielding_handler_is_cancelled_at_its_deadline() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "300ms"]);
    let client = client(&server).await;
    assert_eq!(error_of(&request(&client, "work.nap", "").await).map(|e| e.0), Some(504));
    assert_eq!(body(&request(&client, "work.ok", "").await), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_timeout_overrides_the_default() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "1m"]);
    let client = client(&server).await;
    assert_eq!(
        error_of(&request(&client, "quick", "").await),
        Some((504, "handler timed out after 200ms".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_memory_limit_fails_that_handler_only() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--lua-memory-limit", "16MiB"]);
    let client = client(&server).await;
    let (code, message) = error_of(&request(&client, "work.hog", "").await).expect("error reply");
    assert_eq!(code, 500);
    assert!(message.contains("memory"), "{message}");
    assert_eq!(body(&request(&client, "work.ok", "").await), "still serving");
    assert!(error_of(&request(&client, "work.hog", "").await).is_some());
    assert_eq!(body(&request(&client, "work.ok", "").await), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_yield_run_concurrently_on_one_vm() {
    let (server, _scripts, _worker) =
        run_app(APP, &["--workers", "1", "--concurrency", "8", "--handler-timeout", "20s"]);
    let client = client(&server).await;
    let requests = (0..8).map(|_| {
        let client = client.clone();
        async move { request(&client, "work.barrier", r#"{"n": 8}"#).await }
    });
    for reply in futures::future::join_all(requests).await {
        assert_eq!(body(&reply), "all arrived", "{:?}", error_of(&reply));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_data_is_an_error_not_a_lost_request() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1"]);
    let client = client(&server).await;
    let (code, message) = error_of(&request(&client, "work.huge", "").await).expect("error reply");
    assert_eq!(code, 500);
    assert!(message.contains("reply not sent") && message.contains("exceeded"), "{message}");

    let published = json(&request(&client, "work.huge_publish", "").await);
    assert_eq!(published["ok"], false);
    assert!(published["err"].as_str().unwrap().contains("exceeded"), "{published}");
    assert_eq!(body(&request(&client, "work.ok", "").await), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_handler_never_resumes() {
    let (server, _scripts, _worker) = run_app(APP, &["--workers", "1", "--handler-timeout", "100ms"]);
    let client = client(&server).await;
    let mut trail = client.subscribe("trail.*").await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(error_of(&request(&client, "work.zombie", "").await).map(|e| e.0), Some(504));
    // `marker` publishes after the zombie would have, on the same connection, so
    // the first message on the trail shows whether the zombie ever ran on.
    assert_eq!(body(&request(&client, "marker", "").await), "done");
    let first = next(&mut trail).await;
    assert_eq!(first.subject.as_str(), "trail.marker", "{}", body(&first));
}

const FLOOD: &str = r#"
bus.subscribe("flood")
bus.subscribe("flood.events")
bus.on("flood", function(ev) time.sleep("20ms") return "done" end)
bus.on("flood.events", function(ev) time.sleep("20ms") end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_an_answer_for_every_request_and_a_count_of_drops() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("flood.lua", FLOOD);
    let worker = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "10", "--bus-capacity", "50"]);
    let client = client(&server).await;
    for _ in 0..2000 {
        client.publish("flood.events", "".into()).await.unwrap();
    }
    let total = 5000;
    let requests = (0..total).map(|_| {
        let client = client.clone();
        async move {
            let request = async_nats::Request::new().payload("".into()).timeout(Some(PATIENCE));
            client.send_request("flood", request).await.map(|reply| error_of(&reply).map(|(code, _)| code))
        }
    });
    let answers = futures::future::join_all(requests).await;
    let done = answers.iter().filter(|a| matches!(a, Ok(None))).count();
    let overloaded = answers.iter().filter(|a| matches!(a, Ok(Some(503)))).count();
    let failed: Vec<_> = answers.iter().filter(|a| !matches!(a, Ok(None) | Ok(Some(503)))).collect();
    assert!(failed.is_empty(), "every request is answered, done or 503: {:?}", &failed[..failed.len().min(5)]);
    assert_eq!(done + overloaded, total);
    assert!(overloaded > 0 && done >= 2 * 10, "done {done}, overloaded {overloaded}");
    assert!(
        worker.stderr.wait_for("intake full", PATIENCE),
        "overload is logged with its counts: {}",
        worker.stderr.text()
    );
    let lines = worker.stderr.text().lines().filter(|l| l.contains("intake full")).count();
    assert!(lines <= 4, "overload is logged at most once per interval, not per message ({lines} lines)");
    let mut worker = worker;
    worker.terminate();
    assert_eq!(worker.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
    let log = worker.stderr.text();
    let totals: serde_json::Value = log
        .lines()
        .filter(|l| l.contains("intake was full at times"))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .next()
        .unwrap_or_else(|| panic!("totals logged at shutdown: {log}"));
    assert_eq!(totals["rejected"], overloaded as u64, "every 503 is counted");
    assert!(totals["dropped"].as_u64().unwrap() > 0, "dropped messages are counted: {totals}");
}
