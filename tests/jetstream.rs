//! JetStream consumers: at-least-once processing through `bus.consume`, outcomes
//! (ack, nak with backoff, dead letters), in-progress acks, pulls bounded by free
//! handler slots, and the faults a pool must survive.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use common::*;

const APP: &str = r#"
bus.consume({
  stream = "ORDERS", consumer = "work", subject = "orders.>",
  kind = "order.{{wildcard(1)}}",
  ack_wait = "2s", max_deliver = 3, backoff = { "100ms" },
  dead_letter = "dead.orders",
  create_stream = { subjects = { "orders.>" } },
})

bus.on("order.new", function(ev)
  nats.publish("seen", ev.id)
  return true
end)
bus.on("order.flaky", function(ev)
  nats.publish("attempt", tostring(ev.meta.delivered))
  error({ code = 500, message = "flaky failure" })
end)
bus.on("order.json", function(ev)
  return ev.payload.id
end)
bus.on("order.meta", function(ev)
  local m = ev.meta
  nats.publish("meta", {
    id = ev.id, kind = ev.kind, subject = ev.subject, reply = ev.reply,
    stream = m.stream, consumer = m.consumer, delivered = m.delivered,
    stream_seq = m.stream_seq, pending = m.pending, timestamp = m.timestamp,
  })
  return true
end)
bus.on("order.slow", function(ev)
  time.sleep("5s")
  nats.publish("seen", ev.id)
  return true
end)
bus.on("order.held", function(ev)
  -- The server's own count of unacknowledged messages, read at this delivery.
  local info = nats.request("$JS.API.CONSUMER.INFO.ORDERS.work", "")
  nats.publish("held", tostring(info.payload.num_ack_pending))
  time.sleep("2s")
  nats.publish("seen", ev.id)
  return true
end)
bus.on("order.later", function(ev)
  if ev.meta.delivered == 1 then return bus.nak({ delay = "300ms" }) end
  nats.publish("seen", ev.id .. "@" .. ev.meta.delivered)
  return true
end)
bus.on("order.stop", function(ev) return bus.term("not wanted") end)
"#;

fn app() -> (Scripts, std::path::PathBuf) {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    (scripts, script)
}

async fn publish(js: &jetstream::Context, subject: &str, body: &str) {
    js.publish(subject.to_string(), body.to_string().into()).await.expect("publish").await.expect("stored");
}

async fn consumer(js: &jetstream::Context) -> PullConsumer {
    consumer_of(js, "ORDERS").await
}

async fn consumer_of(js: &jetstream::Context, stream: &str) -> PullConsumer {
    js.get_stream(stream).await.expect("stream").get_consumer("work").await.expect("consumer")
}

/// A client of `server` with its JetStream context, subscribed to `subject`.
async fn watching(
    server: &NatsServer,
    subject: &str,
) -> (async_nats::Client, jetstream::Context, async_nats::Subscriber) {
    let client = client(server).await;
    let js = jetstream::new(client.clone());
    let subscriber = client.subscribe(subject.to_string()).await.expect("subscribe");
    client.flush().await.expect("flush");
    (client, js, subscriber)
}

/// Collects message bodies of `subject` until `done` says enough.
async fn collect(sub: &mut async_nats::Subscriber, mut done: impl FnMut(&HashSet<String>) -> bool) -> HashSet<String> {
    let mut seen = HashSet::new();
    while !done(&seen) {
        seen.insert(body(&next(sub).await));
    }
    seen
}

/// Waits until the consumer has nothing pending or unacknowledged.
async fn drained(js: &jetstream::Context) -> async_nats::jetstream::consumer::Info {
    drained_on(js, "ORDERS").await
}

async fn drained_on(js: &jetstream::Context, stream: &str) -> async_nats::jetstream::consumer::Info {
    let mut consumer = consumer_of(js, stream).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let info = consumer.info().await.expect("consumer info").clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "consumer not drained: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_processed_and_acked() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "8"]);
    let (_client, js, mut seen) = watching(&server, "seen").await;
    for n in 0..200 {
        publish(&js, "orders.new", &format!("{{\"n\":{n}}}")).await;
    }
    let ids = collect(&mut seen, |s| s.len() == 200).await;
    assert!(ids.contains("ORDERS:1") && ids.contains("ORDERS:200"), "ids are STREAM:seq");
    let info = drained(&js).await;
    assert_eq!(info.num_redelivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_describes_the_stream_message() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let (_client, js, mut meta) = watching(&server, "meta").await;
    publish(&js, "orders.new", "{}").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-42");
    js.publish_with_headers("orders.meta", headers, "{}".into()).await.unwrap().await.unwrap();
    let meta = json(&next(&mut meta).await);
    assert_eq!(meta["id"], "order-42");
    assert_eq!(meta["kind"], "order.meta");
    assert_eq!(meta["subject"], "orders.meta");
    assert!(meta["reply"].is_null(), "{meta}");
    assert_eq!(meta["stream"], "ORDERS");
    assert_eq!(meta["consumer"], "work");
    assert_eq!(meta["delivered"], 1);
    assert_eq!(meta["stream_seq"], 2);
    assert!(meta["pending"].is_u64(), "{meta}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let timestamp = meta["timestamp"].as_f64().expect("timestamp");
    assert!((now - timestamp).abs() < 60.0, "timestamp {timestamp} is the publish time, now {now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_backoff_then_dead_lettered() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    let mut attempts = client.subscribe("attempt").await.unwrap();
    let mut dead = client.subscribe("dead.orders").await.unwrap();
    client.flush().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Order", "7");
    js.publish_with_headers("orders.flaky", headers, "payload-7".into()).await.unwrap().await.unwrap();
    for delivered in 1..=3 {
        assert_eq!(body(&next(&mut attempts).await), delivered.to_string());
    }
    let letter = next(&mut dead).await;
    assert_eq!(body(&letter), "payload-7", "the original payload");
    let headers = letter.headers.expect("dead letter headers");
    assert_eq!(headers.get("X-Order").unwrap().as_str(), "7", "the original headers");
    assert_eq!(headers.get("Agent-Block-Error").unwrap().as_str(), "flaky failure");
    assert_eq!(headers.get("Agent-Block-Kind").unwrap().as_str(), "order.flaky");
    assert_eq!(headers.get("Agent-Block-Delivered").unwrap().as_str(), "3");
    assert_eq!(headers.get("Agent-Block-Stream").unwrap().as_str(), "ORDERS");
    assert_eq!(headers.get("Agent-Block-Stream-Seq").unwrap().as_str(), "1");
    let info = drained(&js).await;
    assert_eq!(info.num_redelivered, 0, "terminated, not left for redelivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_json_is_dead_lettered_at_once() {
    let server = server();
    let (_scripts, script) = app();
    let worker = Worker::run(&server, &script, &["--workers", "1"]);
    let (_client, js, mut dead) = watching(&server, "dead.orders").await;
    publish(&js, "orders.json", "{not json").await;
    let letter = next(&mut dead).await;
    let headers = letter.headers.expect("dead letter headers");
    assert_eq!(headers.get("Agent-Block-Delivered").unwrap().as_str(), "1");
    assert!(headers.get("Agent-Block-Error").unwrap().as_str().contains("not valid JSON"));
    drained(&js).await;
    assert!(worker.stderr.text().contains("dead-lettered"), "{}", worker.stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nak_with_delay_redelivers_and_term_gives_up() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let (_client, js, mut seen) = watching(&server, "seen").await;
    publish(&js, "orders.stop", "").await;
    publish(&js, "orders.later", "").await;
    assert_eq!(body(&next(&mut seen).await), "ORDERS:2@2");
    let info = drained(&js).await;
    assert_eq!(info.ack_floor.stream_sequence, 2, "the terminated message counts as done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_ack_wait_is_not_redelivered() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let (_client, js, mut seen) = watching(&server, "seen").await;
    publish(&js, "orders.slow", "").await;
    assert_eq!(body(&next(&mut seen).await), "ORDERS:1");
    let info = drained(&js).await;
    assert_eq!(info.num_redelivered, 0, "in-progress acks kept the 5 s handler's message (ack_wait 2s)");
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_never_exceed_free_handler_slots() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "3"]);
    let (client, js, mut seen) = watching(&server, "seen").await;
    let mut held = client.subscribe("held").await.unwrap();
    client.flush().await.unwrap();
    for _ in 0..12 {
        publish(&js, "orders.held", "").await;
    }
    // 2 VMs x 3 slots: each handler reads the server's count of unacknowledged
    // messages when it is delivered, so a pull past the free slots shows up at
    // once. The first six hold their slots for 2 s: no ack is on its way, and
    // the server's count is exactly what the worker took.
    let mut counts = Vec::new();
    for _ in 0..6 {
        counts.push(body(&next(&mut held).await).parse::<u64>().unwrap());
    }
    assert!(counts.iter().all(|&count| count <= 6), "more held than the 6 slots: {counts:?}");
    assert_eq!(counts.iter().max(), Some(&6), "the slots are filled: {counts:?}");
    let info = consumer(&js).await.info().await.unwrap().clone();
    assert_eq!((info.num_ack_pending, info.num_pending), (6, 6), "six taken, six left on the server: {info:?}");
    collect(&mut seen, |s| s.len() == 12).await;
    let info = drained(&js).await;
    assert_eq!(info.num_redelivered, 0);
}

const MISSING_STREAM: &str = r#"
bus.consume({ stream = "NOPE", consumer = "c" })
bus.on_any(function(ev) return true end)
"#;

#[test]
fn a_missing_stream_is_a_startup_error_that_names_it() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", MISSING_STREAM);
    let url = server.url();
    let (code, _, stderr) = run_command(&["run", script.to_str().unwrap(), "--nats-url", &url], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("stream \"NOPE\" does not exist") && stderr.contains("create_stream"), "{stderr}");
}

#[test]
fn check_lists_consumers_beside_subscriptions() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &format!("bus.subscribe(\"ping\")\n{APP}"));
    let (code, stdout, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("subscribe ping"), "{stdout}");
    assert!(stdout.contains("consume ORDERS/work subject=orders.> kind=order.{{wildcard(1)}}"), "{stdout}");
}

#[test]
fn bad_consume_options_are_script_errors() {
    let scripts = Scripts::new();
    for (source, expected) in [
        ("bus.consume({ consumer = 'c' })", "`stream` (a name) is required"),
        ("bus.consume({ stream = 'S', consumer = 'c', max_deliver = 0 })", "max_deliver must be at least 1"),
        ("bus.consume({ stream = 'S', consumer = 'c', backoff = 5 })", "backoff must be a list"),
        ("bus.consume({ stream = 'S', consumer = 'c', ackwait = '1s' })", "unknown option \"ackwait\""),
    ] {
        let script = scripts.write("bad.lua", source);
        let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
        assert_eq!(code, 2, "{source}: {stderr}");
        assert!(stderr.contains(expected) && stderr.contains("bad.lua:1"), "{source}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_consumer_setting_updates_the_consumer() {
    let server = server();
    let (scripts, script) = app();
    {
        let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    }
    let changed = scripts.write("changed.lua", &APP.replace("ack_wait = \"2s\"", "ack_wait = \"7s\""));
    let _worker = Worker::run(&server, &changed, &["--workers", "1"]);
    let js = jetstream::new(client(&server).await);
    let mut consumer = consumer(&js).await;
    assert_eq!(consumer.info().await.unwrap().config.ack_wait, Duration::from_secs(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_messages_survive_a_server_restart() {
    let mut server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "4"]);
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    for n in 0..100 {
        publish(&js, "orders.new", &format!("{{\"n\":{n}}}")).await;
    }
    drained(&js).await;
    server.restart().expect("restart nats-server");
    let client = common::client(&server).await;
    let js = jetstream::new(client.clone());
    let mut seen = client.subscribe("seen").await.unwrap();
    client.flush().await.unwrap();
    for n in 100..200 {
        publish(&js, "orders.new", &format!("{{\"n\":{n}}}")).await;
    }
    let ids = collect(&mut seen, |s| (101..=200).all(|n| s.contains(&format!("ORDERS:{n}")))).await;
    assert!(ids.len() >= 100);
    drained(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_consumer() {
    let server = server();
    let (_scripts, script) = app();
    let first = Worker::run(&server, &script, &["--workers", "1", "--concurrency", "4"]);
    let second = Worker::run(&server, &script, &["--workers", "1", "--concurrency", "4"]);
    let (_client, js, mut seen) = watching(&server, "seen").await;
    for _ in 0..8 {
        publish(&js, "orders.slow", "").await;
    }
    // Each worker holds at most its 4 slots, so 8 messages in flight need both.
    let mut consumer = consumer(&js).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let info = consumer.info().await.unwrap();
        assert!(info.num_ack_pending <= 8);
        if info.num_ack_pending == 8 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "both workers never pulled: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    collect(&mut seen, |s| s.len() == 8).await;
    assert_eq!(drained(&js).await.num_redelivered, 0);
    drop((first, second));
}

const STEADY: &str = r#"
bus.consume({
  stream = "JOBS", consumer = "work", subject = "jobs.>", ack_wait = "ACK_WAIT",
  create_stream = { subjects = { "jobs.>" } },
})
bus.on("jobs.run", function(ev)
  time.sleep("SLEEP")
  nats.publish("done", ev.id)
  return true
end)
"#;

fn steady(scripts: &Scripts, ack_wait: &str, sleep: &str) -> std::path::PathBuf {
    scripts.write("steady.lua", &STEADY.replace("ACK_WAIT", ack_wait).replace("SLEEP", sleep))
}

async fn publish_jobs(js: &jetstream::Context, count: usize) {
    let acks = (0..count).map(|n| {
        let js = js.clone();
        async move { js.publish("jobs.run", n.to_string().into()).await.expect("publish").await.expect("stored") }
    });
    futures::future::join_all(acks).await;
}

fn all_jobs(count: usize) -> impl FnMut(&HashSet<String>) -> bool {
    move |seen| (1..=count).all(|n| seen.contains(&format!("JOBS:{n}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_no_message() {
    let server = server();
    let scripts = Scripts::new();
    let script = steady(&scripts, "2s", "10ms");
    let client = client(&server).await;
    let mut done = client.subscribe("done").await.unwrap();
    client.flush().await.unwrap();
    let first = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "8"]);
    let js = jetstream::new(client.clone());
    publish_jobs(&js, 2000).await;
    // Let it get going, then kill -9 it in the middle of the stream.
    let mut seen = collect(&mut done, |s| s.len() >= 200).await;
    drop(first);
    let _second = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "8"]);
    let mut want = all_jobs(2000);
    while !want(&seen) {
        seen.insert(body(&next(&mut done).await));
    }
    drained_on(&js, "JOBS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_hands_back_the_rest_at_once() {
    let server = server();
    let scripts = Scripts::new();
    // ack_wait far beyond the test's patience: a message left unacked by the
    // stopping worker would fail the test instead of coming back late.
    let script = steady(&scripts, "5m", "200ms");
    let client = client(&server).await;
    let mut done = client.subscribe("done").await.unwrap();
    client.flush().await.unwrap();
    let mut stopping = Worker::run(&server, &script, &["--workers", "1", "--concurrency", "4", "--grace", "20s"]);
    let js = jetstream::new(client.clone());
    publish_jobs(&js, 60).await;
    let mut seen = collect(&mut done, |s| s.len() >= 8).await;
    let _other = Worker::run(&server, &script, &["--workers", "1", "--concurrency", "4"]);
    stopping.terminate();
    let status = stopping.wait_exit(PATIENCE).expect("the worker exits within its grace");
    assert_eq!(status.code(), Some(0), "{}", stopping.stderr.text());
    let mut want = all_jobs(60);
    while !want(&seen) {
        seen.insert(body(&next(&mut done).await));
    }
    let info = drained_on(&js, "JOBS").await;
    assert_eq!(info.num_ack_pending, 0);
}

/// A consumer whose handlers are held at a gate (see [`gated_handler`]).
const GATED_CONSUMER: &str = r#"
bus.consume({
  stream = "JOBS", consumer = "work", subject = "jobs.>", ack_wait = "2s",
  create_stream = { subjects = { "jobs.>" } },
})
"#;

/// Waits until the consumer holds exactly `in_flight` unacknowledged messages.
async fn held(consumer: &mut PullConsumer, in_flight: usize) -> async_nats::jetstream::consumer::Info {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let info = consumer.info().await.expect("consumer info").clone();
        if info.num_ack_pending == in_flight {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {in_flight} in flight: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_stream_loses_no_message() {
    let mut server = server();
    let scripts = Scripts::new();
    let (gate, handled) = (scripts.path().join("gate"), scripts.path().join("handled"));
    let source = format!("{GATED_CONSUMER}{}", gated_handler(&gate, &handled));
    let script = scripts.write("gated.lua", &source);
    let args = ["--workers", "2", "--concurrency", "4", "--unsafe-lua"];
    let _worker = Worker::run(&server, &script, &args);
    let js = jetstream::new(client(&server).await);
    let total = 40;
    publish_jobs(&js, total).await;
    // 2 VMs x 4 slots, every handler held at the gate: 8 in flight, 32 waiting.
    let info = held(&mut consumer_of(&js, "JOBS").await, 8).await;
    assert_eq!(info.num_pending, 32, "{info:?}");
    assert!(handled_ids(&handled).is_empty(), "nothing finished before the kill");
    // kill -9 and a restart on the same port and store, with 8 messages unacked.
    server.restart().expect("restart nats-server");
    std::fs::write(&gate, "").unwrap();
    let js = jetstream::new(common::client(&server).await);
    let info = drained_on(&js, "JOBS").await;
    assert_eq!(info.ack_floor.stream_sequence, total as u64, "every message was acked after the restart: {info:?}");
    let ids = handled_ids(&handled);
    assert!(all_jobs(total)(&ids), "every message was handled after the restart: {ids:?}");
}

/// Failures of three kinds on one consumer whose `backoff` the worker applies:
/// a raised error, a handler past its deadline, and a kind without a handler.
const LIVE: &str = r#"
bus.consume({
  stream = "LIVE", consumer = "work", subject = "live.>", kind = "{{wildcard(1)}}",
  ack_wait = "10s", max_deliver = 3, backoff = { "400ms", "800ms" }, timeout = "300ms",
  dead_letter = "dead.live", create_stream = { subjects = { "live.>" } },
})
bus.on("fail", function(ev)
  nats.publish("attempt", ev.kind .. ":" .. ev.meta.delivered)
  error("failed on purpose")
end)
bus.on("slow", function(ev)
  nats.publish("attempt", ev.kind .. ":" .. ev.meta.delivered)
  time.sleep("5s")
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_deadlines_and_missing_handlers_are_nakd_with_the_backoff_live() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("live.lua", LIVE);
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let (client, js, mut attempts) = watching(&server, "attempt").await;
    let mut dead = client.subscribe("dead.live").await.unwrap();
    client.flush().await.unwrap();
    let published = Instant::now();
    for kind in ["fail", "slow", "none"] {
        publish(&js, &format!("live.{kind}"), kind).await;
    }
    // When each delivery reached its handler, by kind and the server's count.
    let mut seen: std::collections::HashMap<String, Instant> = Default::default();
    while seen.len() < 6 {
        seen.insert(body(&next(&mut attempts).await), Instant::now());
    }
    let mut letters: std::collections::HashMap<String, (Instant, async_nats::HeaderMap)> = Default::default();
    while letters.len() < 3 {
        let letter = next(&mut dead).await;
        letters.insert(body(&letter), (Instant::now(), letter.headers.expect("dead letter headers")));
    }
    // Server-side delays are at least the backoff (less a little clock slack)
    // and far below the 10 s `ack_wait` a missing nak would fall back to.
    let gap = |kind: &str, from: u32, to: u32| seen[&format!("{kind}:{to}")] - seen[&format!("{kind}:{from}")];
    for (kind, handler_time) in [("fail", Duration::ZERO), ("slow", Duration::from_millis(300))] {
        for (from, backoff) in [(1, 400), (2, 800)] {
            let waited = gap(kind, from, from + 1);
            let least = handler_time + Duration::from_millis(backoff - 50);
            assert!(waited >= least && waited < Duration::from_secs(5), "{kind}: {waited:?} after delivery {from}");
        }
    }
    for (kind, error) in [("fail", "failed on purpose"), ("slow", "timed out"), ("none", "no handler")] {
        let (at, headers) = &letters[kind];
        assert_eq!(headers.get("Agent-Block-Delivered").unwrap().as_str(), "3", "{kind}");
        let message = headers.get("Agent-Block-Error").unwrap().as_str();
        assert!(message.contains(error), "{kind}: {message}");
        // A kind with no handler waits out both delays too before its last delivery.
        assert!(*at - published >= Duration::from_millis(1150), "{kind} dead-lettered after {:?}", *at - published);
    }
    let info = drained_on(&js, "LIVE").await;
    assert_eq!(info.num_redelivered, 0, "every message was terminated: {info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ack_pending_caps_what_the_server_hands_out() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "capped.lua",
        r#"
bus.consume({ stream = "CAPPED", consumer = "work", subject = "capped.>", max_ack_pending = 2,
  create_stream = { subjects = { "capped.>" } } })
bus.on("capped.run", function(ev)
  local info = nats.request("$JS.API.CONSUMER.INFO.CAPPED.work", "")
  nats.publish("held", tostring(info.payload.num_ack_pending))
  time.sleep("300ms")
  return true
end)
"#,
    );
    // 2 VMs x 4 slots would take 8; the consumer's max_ack_pending allows 2.
    let _worker = Worker::run(&server, &script, &["--workers", "2", "--concurrency", "4"]);
    let (_client, js, mut held) = watching(&server, "held").await;
    for _ in 0..8 {
        publish(&js, "capped.run", "").await;
    }
    let mut counts = Vec::new();
    for _ in 0..8 {
        counts.push(body(&next(&mut held).await).parse::<u64>().unwrap());
    }
    assert!(counts.iter().all(|&count| count <= 2), "more than max_ack_pending held: {counts:?}");
    assert_eq!(counts.iter().max(), Some(&2), "{counts:?}");
    let info = drained_on(&js, "CAPPED").await;
    assert_eq!(info.config.max_ack_pending, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_server_will_not_change_is_a_startup_error() {
    let server = server();
    let js = jetstream::new(client(&server).await);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "PUSHED".into(),
            subjects: vec!["pushed.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // A push consumer of that name: `bus.consume` cannot turn it into a pull one.
    stream
        .create_consumer(jetstream::consumer::push::Config {
            durable_name: Some("work".into()),
            deliver_subject: "deliver.here".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        "bus.consume({ stream = 'PUSHED', consumer = 'work', subject = 'pushed.>' })\n\
         bus.on('pushed.x', function() return true end)\n",
    );
    let url = server.url();
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url]);
    let status = worker.wait_exit(PATIENCE).expect("the worker stops");
    let log = worker.stderr.text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("PUSHED") && log.contains("work"), "the error names the stream and consumer: {log}");
    let info = stream.get_consumer::<jetstream::consumer::push::Config>("work").await.unwrap().cached_info().clone();
    assert_eq!(info.config.deliver_subject.as_deref(), Some("deliver.here"), "the consumer is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_cut_at_the_end_of_grace_is_nakd_for_another_worker() {
    let server = server();
    let scripts = Scripts::new();
    // ack_wait far beyond the test's patience: only a nak brings the message back in time.
    let script = scripts.write(
        "grace.lua",
        r#"
bus.consume({ stream = "JOBS", consumer = "work", subject = "jobs.>", ack_wait = "5m",
  create_stream = { subjects = { "jobs.>" } } })
bus.on("jobs.run", function(ev)
  nats.publish("attempt", tostring(ev.meta.delivered))
  if ev.meta.delivered == 1 then time.sleep(60) end
  return true
end)
"#,
    );
    let (client, js, mut attempts) = watching(&server, "attempt").await;
    let mut stopping = Worker::run(&server, &script, &["--workers", "1", "--grace", "500ms"]);
    publish_jobs(&js, 1).await;
    assert_eq!(body(&next(&mut attempts).await), "1");
    let _other = Worker::run(&server, &script, &["--workers", "1"]);
    stopping.terminate();
    stopping.wait_exit(PATIENCE).expect("the worker exits after its grace");
    assert_eq!(body(&next(&mut attempts).await), "2", "redelivered at once to the other worker");
    let info = drained_on(&js, "JOBS").await;
    assert_eq!(info.ack_floor.stream_sequence, 1, "{info:?}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_server_refuses_leaves_the_message_nakd() {
    let server = server();
    let (client, js, mut attempts) = watching(&server, "attempt").await;
    // The stream that captures the dead letters is full and refuses new ones.
    let dead = js
        .create_stream(jetstream::stream::Config {
            name: "DEAD".into(),
            subjects: vec!["dead.full".into()],
            max_messages: 1,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    publish(&js, "dead.full", "occupant").await;
    let scripts = Scripts::new();
    let script = scripts.write(
        "dead.lua",
        r#"
bus.consume({ stream = "WORK", consumer = "work", subject = "work.>",
  dead_letter = "dead.full", create_stream = { subjects = { "work.>" } } })
bus.on("work.run", function(ev)
  nats.publish("attempt", tostring(ev.meta.delivered))
  return ev.payload
end)
"#,
    );
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    // Not JSON: dead-lettered on its first delivery; the refused publish naks it.
    publish(&js, "work.run", "not json").await;
    assert_eq!(body(&next(&mut attempts).await), "1");
    assert_eq!(body(&next(&mut attempts).await), "2", "the message came back: nak'ed, not terminated");
    // With room in the stream, the dead letter is stored and the message ends.
    dead.purge().await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stored = js.get_stream("DEAD").await.unwrap().info().await.unwrap().state.messages;
        if stored == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the dead letter never reached the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letter = js.get_stream("DEAD").await.unwrap().get_last_raw_message_by_subject("dead.full").await.unwrap();
    assert_eq!(letter.payload.as_ref(), b"not json");
    drained_on(&js, "WORK").await;
    drop(client);
}
