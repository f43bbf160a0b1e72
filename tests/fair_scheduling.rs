//! Fair scheduling on one VM: CPU-bound handlers never starve or fail the
//! handlers beside them.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// One VM, `heavy` spins until its deadline, `quick` sleeps 50 ms and replies.
const MIX: &str = r#"
bus.subscribe("mix.heavy", { kind = "heavy", timeout = "300ms" })
bus.subscribe("mix.quick", { kind = "quick", timeout = "500ms" })
bus.on("heavy", function(ev) while true do end end)
bus.on("quick", function(ev)
  time.sleep("50ms")
  return "quick " .. ev.data
end)
"#;

#[tokio::test]
async fn quick_handlers_are_answered_beside_cpu_bound_ones() {
    let app = start_app(MIX, &[]).await;
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
            worst = worst.max(took);
        }
        for task in heavy {
            let reply = task.await.unwrap();
            let (code, message) = error_of(&reply).expect("heavy handlers time out");
            assert_eq!((code, message.as_str()), (504, "handler timed out after 300ms"));
        }
    }
    eprintln!("slowest quick reply: {worst:?}");
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
    let app = start_app(COMPETING, &[]).await;
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
}
