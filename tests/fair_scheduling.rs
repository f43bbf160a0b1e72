//! Fair scheduling on one VM: CPU-bound handlers never starve or fail the
//! handlers beside them.
//!
//! Time bounds here are generous on purpose (a loaded 2-core machine runs these
//! next to other tests): each one tells fair scheduling (tens of milliseconds)
//! from handlers waiting behind CPU-bound ones (hundreds or more).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

use common::*;

/// A free local address for `--metrics-addr`.
fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The value of the sample `name` (without labels) on the `/metrics` page.
async fn metric(addr: &str, name: &str) -> f64 {
    let addr = addr.to_string();
    let (status, page) =
        tokio::task::spawn_blocking(move || http_get(&addr, "/metrics")).await.unwrap().expect("scrape");
    assert_eq!(status, 200);
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

/// One VM, `heavy` spins until its deadline, `quick` sleeps 50 ms and replies.
const MIX: &str = r#"
bus.subscribe("mix.heavy", { kind = "heavy", timeout = "1s" })
bus.subscribe("mix.quick", { kind = "quick", timeout = "500ms" })
bus.on("heavy", function(ev) while true do end end)
bus.on("quick", function(ev)
  time.sleep("50ms")
  return "quick " .. ev.data
end)
"#;

#[tokio::test]
async fn quick_handlers_are_answered_beside_cpu_bound_ones() {
    let addr = metrics_addr();
    let app = start_app(MIX, &["--metrics-addr", &addr]).await;
    let mut worst = Duration::ZERO;
    for round in 0..6 {
        let mut quick = Vec::new();
        for i in 0..5 {
            let client = app.client.clone();
            quick.push(tokio::spawn(async move {
                let sent = Instant::now();
                let reply = request(&client, "mix.quick", &format!("{round}-{i}")).await;
                (reply, sent.elapsed())
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut heavy = Vec::new();
        for _ in 0..4 {
            let client = app.client.clone();
            heavy.push(tokio::spawn(async move { request(&client, "mix.heavy", "").await }));
        }
        for (i, task) in quick.into_iter().enumerate() {
            let (reply, took) = task.await.unwrap();
            assert_eq!(error_of(&reply), None, "round {round} quick {i}");
            assert_eq!(body(&reply), format!("quick {round}-{i}"));
            // Ready after 50 ms, then a few slices at most; behind the CPU-bound
            // handlers it would be 1 s or more. The bound leaves room for a
            // loaded 2-CPU machine, where a first round once took 272 ms.
            assert!(took < Duration::from_millis(600), "round {round} quick {i} took {took:?}");
            worst = worst.max(took);
        }
        for task in heavy {
            let reply = task.await.unwrap();
            let (code, message) = error_of(&reply).expect("heavy handlers time out");
            assert_eq!((code, message.as_str()), (504, "handler timed out after 1s"));
        }
    }
    eprintln!("slowest quick reply: {worst:?}");
    assert!(metric(&addr, "agent_block_vm_preemptions_total").await > 0.0);
    assert!(metric(&addr, "agent_block_vm_wait_seconds_count").await > 0.0);
}

#[tokio::test]
async fn events_that_arrive_while_a_lone_handler_computes_start_within_a_slice() {
    let app = start_app(MIX, &[]).await;
    let heavy = {
        let client = app.client.clone();
        tokio::spawn(async move { request(&client, "mix.heavy", "").await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut quick = Vec::new();
    for i in 0..3 {
        let client = app.client.clone();
        quick.push(tokio::spawn(async move {
            let sent = Instant::now();
            let reply = request(&client, "mix.quick", &i.to_string()).await;
            (reply, sent.elapsed())
        }));
    }
    for (i, task) in quick.into_iter().enumerate() {
        let (reply, took) = task.await.unwrap();
        assert_eq!(body(&reply), format!("quick {i}"));
        // Behind the CPU-bound handler they would start only at its deadline,
        // 970 ms after they were sent, and answer 50 ms later; the bound leaves
        // room for a loaded machine.
        assert!(took < Duration::from_millis(600), "quick {i} took {took:?}");
    }
    assert_eq!(error_of(&heavy.await.unwrap()).map(|e| e.0), Some(504));
}

/// `heavy` holds the VM well past the deadlines of the others: with time
/// slicing off, nothing suspends it.
const LATE: &str = r#"
bus.subscribe("late.heavy", { kind = "heavy", timeout = "400ms" })
bus.subscribe("late.waiter", { kind = "waiter", timeout = "150ms" })
bus.subscribe("late.computer", { kind = "computer", timeout = "150ms" })
bus.on("heavy", function(ev) while true do end end)
bus.on("waiter", function(ev)
  time.sleep("20ms")
  return "resumed " .. ev.data
end)
bus.on("computer", function(ev)
  time.sleep("20ms")
  while true do end
end)
"#;

/// Sends `subject` requests now and `heavy` 5 ms later; returns the replies to
/// the first ones and the heavy one.
async fn behind_heavy(app: &Running, subject: &str, count: usize) -> (Vec<async_nats::Message>, async_nats::Message) {
    let mut waiting = Vec::new();
    for i in 0..count {
        let client = app.client.clone();
        let subject = subject.to_string();
        waiting.push(tokio::spawn(async move { request(&client, &subject, &i.to_string()).await }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let heavy = request(&app.client, "late.heavy", "").await;
    let mut replies = Vec::new();
    for task in waiting {
        replies.push(task.await.unwrap());
    }
    (replies, heavy)
}

#[tokio::test]
async fn a_handler_whose_wait_ended_before_its_deadline_is_resumed_not_failed() {
    let app = start_app(LATE, &["--time-slice", "0"]).await;
    let (replies, heavy) = behind_heavy(&app, "late.waiter", 3).await;
    assert_eq!(error_of(&heavy), Some((504, "handler timed out after 400ms".to_string())));
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(error_of(reply), None, "waiter {i}");
        assert_eq!(body(reply), format!("resumed {i}"));
    }
}

#[tokio::test]
async fn a_handler_resumed_after_its_deadline_ends_when_it_computes() {
    let app = start_app(LATE, &["--time-slice", "0"]).await;
    let (replies, heavy) = behind_heavy(&app, "late.computer", 2).await;
    assert_eq!(error_of(&heavy), Some((504, "handler timed out after 400ms".to_string())));
    for reply in &replies {
        assert_eq!(error_of(reply), Some((504, "handler timed out after 150ms".to_string())));
    }
}

/// CPU-bound handlers that compete for one VM: `sum` computes its result in a
/// `pcall`, in a coroutine of its own and around a `table.sort` whose comparator
/// cannot yield; `spin` never ends.
const COMPETING: &str = r#"
bus.subscribe("compete.sum", { kind = "sum" })
bus.subscribe("compete.spin", { kind = "spin", timeout = "300ms" })
local function part(from, to)
  local s = 0
  for i = from, to do s = s + (i % 7) * 3 end
  return s
end
bus.on("sum", function(ev)
  local n = ev.payload.n
  local ok, a = pcall(part, 1, n // 2)
  assert(ok, a)
  local gen = coroutine.wrap(function() coroutine.yield(part(n // 2 + 1, n)) end)
  local b = gen()
  local t = {}
  for i = 1, 20000 do t[i] = (i * 7919) % 20011 end
  table.sort(t, function(x, y) return x < y end)
  return { sum = a + b, sorted = t[1] <= t[2] and t[19999] <= t[20000] }
end)
bus.on("spin", function(ev) while true do end end)
"#;

/// What `part(1, n)` computes.
fn expected_sum(n: u64) -> u64 {
    (1..=n).map(|i| (i % 7) * 3).sum()
}

#[tokio::test]
async fn handlers_preempted_many_times_return_their_results_and_end_at_their_deadlines() {
    let addr = metrics_addr();
    let app = start_app(COMPETING, &["--metrics-addr", &addr]).await;
    let n = 10_000_000u64;
    let started = Instant::now();
    let mut sums = Vec::new();
    for _ in 0..3 {
        let client = app.client.clone();
        sums.push(tokio::spawn(async move { request(&client, "compete.sum", &format!("{{\"n\":{n}}}")).await }));
    }
    let mut spins = Vec::new();
    for _ in 0..2 {
        let client = app.client.clone();
        spins.push(tokio::spawn(async move {
            let sent = Instant::now();
            let reply = request(&client, "compete.spin", "").await;
            (reply, sent.elapsed())
        }));
    }
    for task in spins {
        let (reply, took) = task.await.unwrap();
        assert_eq!(error_of(&reply), Some((504, "handler timed out after 300ms".to_string())));
        // Its deadline runs while others have the VM: were it charged only for
        // its own slices, five handlers sharing the VM would make it 1.5 s. The
        // bound leaves room for a loaded machine.
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1200), "spin took {took:?}");
    }
    for task in sums {
        let reply = task.await.unwrap();
        eprintln!("sum answered after {:?}", started.elapsed());
        assert_eq!(error_of(&reply), None);
        assert_eq!(json(&reply), serde_json::json!({ "sum": expected_sum(n), "sorted": true }));
    }
    // Each `sum` computes for a few hundred milliseconds beside the others.
    let preemptions = metric(&addr, "agent_block_vm_preemptions_total").await;
    assert!(preemptions >= 10.0, "{preemptions} preemptions");
}

#[tokio::test]
async fn a_lone_cpu_bound_handler_is_never_preempted() {
    let addr = metrics_addr();
    let app = start_app(COMPETING, &["--metrics-addr", &addr]).await;
    let n = 20_000_000u64;
    for _ in 0..2 {
        let reply = request(&app.client, "compete.sum", &format!("{{\"n\":{n}}}")).await;
        assert_eq!(json(&reply), serde_json::json!({ "sum": expected_sum(n), "sorted": true }));
    }
    assert_eq!(metric(&addr, "agent_block_vm_preemptions_total").await, 0.0);
}

/// The JetStream mix: most messages sleep 50 ms and report, a few loop until
/// their deadline, a few are not JSON.
const JETSTREAM_MIX: &str = r#"
bus.consume({ stream = "MIX", consumer = "mix", subject = "mix.>", kind = "{{wildcard(1)}}",
  max_deliver = 3, dead_letter = "dead.mix", create_stream = { subjects = { "mix.>" } } })
bus.on("sleep", function(ev)
  local n = ev.payload.n
  time.sleep("50ms")
  nats.publish("done", tostring(n))
end)
bus.on("loop", function(ev) while true do end end)
"#;

#[tokio::test]
async fn the_jetstream_mix_dead_letters_only_the_loops_and_the_bad_payloads() {
    let (server, _scripts, _worker) = run_app(JETSTREAM_MIX, &["--workers", "2", "--handler-timeout", "300ms"]);
    let client = client(&server).await;
    let mut done = client.subscribe("done").await.unwrap();
    let mut dead = client.subscribe("dead.mix").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    let (mut sleepers, mut doomed) = (BTreeSet::new(), BTreeSet::new());
    let mut acks = Vec::new();
    for n in 0..600u32 {
        let (subject, body) = match n {
            // 2% CPU loops, 1% payloads that are not JSON
            _ if n % 50 == 25 => ("mix.loop", format!("{{\"n\":{n}}}")),
            _ if n % 100 == 7 => ("mix.sleep", format!("not json {n}")),
            _ => ("mix.sleep", format!("{{\"n\":{n}}}")),
        };
        if subject == "mix.sleep" && body.starts_with('{') {
            sleepers.insert(n.to_string());
        } else {
            doomed.insert(body.clone());
        }
        acks.push(js.publish(subject, body.into()).await.expect("publish"));
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    let deadline = Instant::now() + PATIENCE;
    let (mut reported, mut dead_lettered) = (BTreeSet::new(), BTreeSet::new());
    // Every message ends reported or dead-lettered; which one is checked after.
    while reported.len() + dead_lettered.len() < sleepers.len() + doomed.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            Some(message) = done.next() => { reported.insert(body(&message)); }
            Some(message) = dead.next() => { dead_lettered.insert(body(&message)); }
            _ = tokio::time::sleep(left) => panic!(
                "{} of {} sleepers reported, {} of {} dead letters",
                reported.len(), sleepers.len(), dead_lettered.len(), doomed.len()
            ),
        }
    }
    let wrongly_dead: Vec<&String> = dead_lettered.difference(&doomed).collect();
    assert!(wrongly_dead.is_empty(), "dead-lettered handlers that only sleep: {wrongly_dead:?}");
    assert_eq!(reported, sleepers);
    assert_eq!(dead_lettered, doomed);
    // Nothing else is dead-lettered later.
    let late = tokio::time::timeout(Duration::from_millis(500), dead.next()).await;
    assert!(late.is_err(), "unexpected dead letter: {:?}", late.ok().flatten().map(|m| body(&m)));
}

#[tokio::test]
async fn agent_block_time_slice_0_turns_slicing_off() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", COMPETING);
    let (url, addr) = (server.url(), metrics_addr());
    let args = ["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1", "--metrics-addr", &addr];
    let worker = Worker::spawn_with_env(&args, &[("AGENT_BLOCK_TIME_SLICE", "0")]);
    worker.expect_ready();
    let client = client(&server).await;
    let n = 5_000_000u64;
    let sums: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { request(&client, "compete.sum", &format!("{{\"n\":{n}}}")).await })
        })
        .collect();
    for task in sums {
        assert_eq!(json(&task.await.unwrap()), serde_json::json!({ "sum": expected_sum(n), "sorted": true }));
    }
    assert_eq!(metric(&addr, "agent_block_vm_preemptions_total").await, 0.0);
}

#[test]
fn a_time_slice_that_is_not_a_duration_is_a_usage_error() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", MIX);
    let (code, _, stderr) = run_command(&["run", script.to_str().unwrap(), "--time-slice", "soon"], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--time-slice"), "{stderr}");
}
