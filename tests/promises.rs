//! README promises that had no test of their own: explicit outcomes on core
//! requests, the fallback handler, timeouts that `xpcall` and `coroutine.resume`
//! cannot swallow, a bounded top level, queue groups by name, `--concurrency` as
//! an upper bound, `--bus-capacity` as a bound with 503 beyond it, a VM that
//! serves while a handler waits in `nats.request`, and `replay --events FILE`.

mod common;

use std::time::Duration;

use common::*;

const APP: &str = r#"
bus.subscribe("outcome.*")
bus.subscribe("loop.*")
bus.subscribe("gate.hold")
bus.subscribe("copy")

bus.on("outcome.term", function(ev) return bus.term("not wanted") end)
bus.on("outcome.nak", function(ev) return bus.nak({ delay = "1s" }) end)
bus.on_any(function(ev) return "fallback for " .. ev.kind end)

bus.on("loop.xpcall", function(ev)
  xpcall(function() while true do end end, function() return "caught" end)
  return "swallowed"
end)
bus.on("loop.resume", function(ev)
  local co = coroutine.create(function() while true do end end)
  coroutine.resume(co)
  return "swallowed"
end)
bus.on("gate.hold", function(ev)
  nats.publish("started", ev.data)
  nats.request("gate.open", "", { timeout = "30s" })
  return "released"
end)
bus.on("copy", function(ev)
  nats.publish("copied", env.get("WORKER_TAG") or "?", { headers = { ["Copy-Of"] = ev.data } })
end)
"#;

fn app() -> (Scripts, std::path::PathBuf) {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    (scripts, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_outcomes_and_the_fallback_answer_core_requests() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let client = client(&server).await;
    assert_eq!(error_of(&request(&client, "outcome.term", "").await), Some((500, "not wanted".to_string())));
    let (code, _) = error_of(&request(&client, "outcome.nak", "").await).expect("nak is an error reply");
    assert_eq!(code, 503);
    assert_eq!(body(&request(&client, "outcome.other", "").await), "fallback for outcome.other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xpcall_and_coroutine_resume_cannot_swallow_a_timeout() {
    let server = server();
    let (_scripts, script) = app();
    let _worker = Worker::run(&server, &script, &["--workers", "1", "--handler-timeout", "300ms"]);
    let client = client(&server).await;
    for subject in ["loop.xpcall", "loop.resume"] {
        let reply = request(&client, subject, "").await;
        assert_eq!(error_of(&reply).map(|e| e.0), Some(504), "{subject}: {}", body(&reply));
    }
}

#[test]
fn the_top_level_is_bounded_by_the_handler_timeout() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("stuck.lua", "bus.subscribe('x')\nwhile true do end\n");
    let url = server.url();
    let started = std::time::Instant::now();
    let (code, _, stderr) =
        run_command(&["run", script.to_str().unwrap(), "--nats-url", &url, "--handler-timeout", "300ms"], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("top level ran longer than the handler timeout"), "{stderr}");
    assert!(started.elapsed() < PATIENCE, "the worker gave up in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_an_upper_bound_per_vm() {
    let mut gated = Gated::start(&["--concurrency", "2"]).await;
    let pending: Vec<_> = ["a", "b", "c"].into_iter().map(|tag| gated.hold_as(tag)).collect();
    let mut first = vec![body(&next(&mut gated.started).await), body(&next(&mut gated.started).await)];
    first.sort();
    // The third waits for a slot: nothing may start while both hold theirs. A
    // bounded look for something that must not happen...
    let third = tokio::time::timeout(Duration::from_millis(700), next(&mut gated.started)).await;
    assert!(third.is_err(), "a third handler started with --concurrency 2");
    // ...then one slot is freed, and the next start is the waiting request's,
    // with nothing before it.
    let held = next(&mut gated.gate).await;
    gated.open(held).await;
    let waiting = ["a", "b", "c"].into_iter().find(|tag| !first.contains(&tag.to_string())).unwrap();
    assert_eq!(body(&next(&mut gated.started).await), waiting, "started before: {first:?}");
    for _ in 0..2 {
        let held = next(&mut gated.gate).await;
        gated.open(held).await;
    }
    for reply in pending {
        assert_eq!(body(&reply.await.unwrap()), "released");
    }
}

/// A worker running `APP` on one VM, with the test holding the gate that
/// `gate.hold` handlers wait at: `started` tells when one started, `gate` brings
/// the request it waits on.
struct Gated {
    running: Running,
    started: async_nats::Subscriber,
    gate: async_nats::Subscriber,
}

impl Gated {
    async fn start(args: &[&str]) -> Self {
        let running = start_app(APP, args).await;
        let started = running.client.subscribe("started").await.unwrap();
        let gate = running.client.subscribe("gate.open").await.unwrap();
        running.client.flush().await.unwrap();
        Gated { running, started, gate }
    }

    /// Requests `gate.hold` in the background.
    fn hold(&self) -> tokio::task::JoinHandle<async_nats::Message> {
        self.hold_as("")
    }

    /// Requests `gate.hold` in the background; its handler announces `tag` on `started`.
    fn hold_as(&self, tag: &str) -> tokio::task::JoinHandle<async_nats::Message> {
        let client = self.running.client.clone();
        let tag = tag.to_string();
        tokio::spawn(async move { request(&client, "gate.hold", &tag).await })
    }

    /// Lets the handler waiting on the gate request `held` go on.
    async fn open(&self, held: async_nats::Message) {
        self.running.client.publish(held.reply.expect("a request"), "".into()).await.unwrap();
    }
}

/// A `--concurrency 1` worker whose one handler slot is held at the gate and
/// whose queue took requests, sent one at a time, until one was refused.
struct FullIntake {
    gated: Gated,
    /// The gate request of the running handler.
    held: async_nats::Message,
    /// The running request, then the queued ones.
    waiting: Vec<tokio::task::JoinHandle<async_nats::Message>>,
    refused: async_nats::Message,
}

impl FullIntake {
    async fn new(capacity: usize) -> Self {
        let capacity_arg = capacity.to_string();
        let mut gated = Gated::start(&["--concurrency", "1", "--bus-capacity", &capacity_arg]).await;
        let mut waiting = vec![gated.hold()];
        next(&mut gated.started).await;
        let held = next(&mut gated.gate).await;
        for _ in 0..2 * capacity + 2 {
            let mut pending = gated.hold();
            // A refusal comes at once; 2 s only tells it from a queued request on
            // a loaded machine.
            match tokio::time::timeout(Duration::from_secs(2), &mut pending).await {
                Ok(refused) => {
                    let refused = refused.unwrap();
                    return FullIntake { gated, held, waiting, refused };
                }
                Err(_) => waiting.push(pending),
            }
        }
        panic!("no request was refused with --bus-capacity {capacity}");
    }

    fn queued(&self) -> usize {
        self.waiting.len() - 1
    }

    /// Opens the gate for the running handler and then for each queued one as
    /// it starts; returns their replies.
    async fn drain(mut self) -> Vec<async_nats::Message> {
        for left in (0..self.waiting.len()).rev() {
            self.gated.open(self.held.clone()).await;
            if left > 0 {
                next(&mut self.gated.started).await;
                self.held = next(&mut self.gated.gate).await;
            }
        }
        let mut replies = Vec::new();
        for reply in self.waiting {
            replies.push(reply.await.unwrap());
        }
        replies
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_intake_refuses_a_request_at_once_and_serves_the_queued_ones() {
    const CAPACITY: usize = 2;
    let full = FullIntake::new(CAPACITY).await;
    assert_eq!(error_of(&full.refused), Some((503, "worker overloaded; try again".to_string())));
    assert_eq!(full.queued(), CAPACITY, "README: each VM queues at most --bus-capacity more events");
    for reply in full.drain().await {
        assert_eq!(body(&reply), "released", "{:?}", error_of(&reply));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_waiting_in_nats_request_leaves_its_vm_serving() {
    let mut gated = Gated::start(&["--concurrency", "4"]).await;
    let waiting = gated.hold();
    next(&mut gated.started).await;
    let held = next(&mut gated.gate).await;

    // The one VM answers another request while the first handler waits.
    assert_eq!(body(&request(&gated.running.client, "outcome.other", "").await), "fallback for outcome.other");

    gated.open(held).await;
    assert_eq!(body(&waiting.await.unwrap()), "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_name_gets_its_own_copy_and_a_named_queue_is_shared() {
    let server = server();
    let (_scripts, script) = app();
    let url = server.url();
    let spawn = |name: &str| {
        let worker = Worker::spawn_with_env(
            &["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1", "--name", name],
            &[("WORKER_TAG", name)],
        );
        worker.expect_ready();
        worker
    };
    let (_a, _b) = (spawn("alpha"), spawn("beta"));
    let client = client(&server).await;
    let mut copied = client.subscribe("copied").await.unwrap();
    client.flush().await.unwrap();
    client.publish("copy", "".into()).await.unwrap();
    let mut tags = vec![body(&next(&mut copied).await), body(&next(&mut copied).await)];
    tags.sort();
    assert_eq!(tags, ["alpha", "beta"], "one copy per worker name");

    let shared = Scripts::new();
    let named = shared
        .write("named.lua", &APP.replace("bus.subscribe(\"copy\")", "bus.subscribe(\"copy\", { queue = \"x\" })"));
    let spawn_named = |name: &str| {
        let worker = Worker::spawn_with_env(
            &["run", named.to_str().unwrap(), "--nats-url", &url, "--workers", "1", "--name", name],
            &[("WORKER_TAG", name)],
        );
        worker.expect_ready();
        worker
    };
    drop((_a, _b));
    let (_c, _d) = (spawn_named("gamma"), spawn_named("delta"));
    for n in 0..10 {
        client.publish("copy", n.to_string().into()).await.unwrap();
    }
    // Ten messages in one shared group: ten copies, one of each, not twenty.
    let mut copies = Vec::new();
    for _ in 0..10 {
        copies.push(copy_of(&next(&mut copied).await));
    }
    copies.sort_by_key(|n| n.parse::<u32>().unwrap());
    assert_eq!(copies, (0..10).map(|n| n.to_string()).collect::<Vec<_>>(), "queue = \"x\" is shared");
    // A bounded look for a late second copy, then a marker through the same
    // path that must come next.
    let extra = tokio::time::timeout(Duration::from_millis(700), next(&mut copied)).await;
    assert!(extra.is_err(), "queue = \"x\" is shared across worker names");
    client.publish("copy", "marker".into()).await.unwrap();
    assert_eq!(copy_of(&next(&mut copied).await), "marker", "nothing came before the marker");
}

/// The message a `copied` announcement is a copy of.
fn copy_of(message: &async_nats::Message) -> String {
    let headers = message.headers.as_ref().expect("Copy-Of header");
    headers.get("Copy-Of").map(|value| value.to_string()).unwrap_or_default()
}

#[test]
fn replay_reads_events_from_a_file() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let events = scripts.write("events.jsonl", "{\"subject\":\"outcome.term\"}\n{\"subject\":\"outcome.other\"}\n");
    let (code, stdout, stderr) =
        run_command(&["replay", script.to_str().unwrap(), "--events", events.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["outcome"], "term");
    assert_eq!(lines[1]["data"], "fallback for outcome.other");
}
