//! Keyed consumers (`bus.consume{ key = ..., partitions = N }`): messages of one
//! key are handled one at a time and in stream order anywhere in the pool,
//! through `kill -9`, failing handlers and rolling restarts, while the live
//! workers share the partitions evenly. On a server without the primitives
//! (before 2.11) each test checks the refusal instead.
//!
//! Order is observed from the handlers themselves: each publishes `start` when
//! it begins a message and `done` before it returns, on the connection that
//! then acks (`--workers 1`), so a `done` always reaches the test before the
//! ack that lets the next message of its partition out.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use futures::StreamExt;

const PARTITIONS: u32 = 6;

/// The keyed consumer every worker of a test runs, as worker `name`; handlers
/// sleep a random time up to `max_ms` and fail while `ev.payload.fail` is
/// above the delivery count.
fn keyed_app(name: &str, max_ms: u32) -> String {
    format!(
        r#"
bus.consume({{ stream = "ORD", consumer = "ord", subject = "ord.*", kind = "order",
              key = "{{{{wildcard(1)}}}}", partitions = {PARTITIONS}, ack_wait = "2s",
              max_deliver = 10, backoff = {{ "50ms" }},
              create_stream = {{ subjects = {{ "ord.*" }} }} }})
bus.on("order", function(ev)
  local p = ev.payload
  local mark = {{ k = ev.meta.key, n = p.n, w = "{name}", partition = ev.meta.partition, subject = ev.subject }}
  mark.e = "start"
  nats.publish("marks", mark)
  time.sleep(math.random(0, {max_ms}) .. "ms")
  if (p.fail or 0) >= ev.meta.delivered then
    error("failing on purpose")
  end
  mark.e = "done"
  nats.publish("marks", mark)
  return true
end)
"#
    )
}

async fn supports_keyed(server: &NatsServer) -> bool {
    client(server).await.is_server_compatible(2, 11, 0)
}

struct Pool {
    scripts: Scripts,
    workers: BTreeMap<String, Worker>,
    url: String,
    max_ms: u32,
}

impl Pool {
    fn new(server: &NatsServer, max_ms: u32) -> Self {
        Pool { scripts: Scripts::new(), workers: BTreeMap::new(), url: server.url(), max_ms }
    }

    fn start(&mut self, name: &str) {
        let script = self.scripts.write(&format!("{name}.lua"), &keyed_app(name, self.max_ms));
        let worker = Worker::spawn(&[
            "run",
            script.to_str().unwrap(),
            "--nats-url",
            &self.url,
            "--name",
            "keyed",
            "--workers",
            "1",
        ]);
        worker.expect_ready();
        self.workers.insert(name.to_string(), worker);
    }

    fn stop(&mut self, name: &str) {
        let mut worker = self.workers.remove(name).expect("a running worker");
        worker.terminate();
        let status = worker.wait_exit(PATIENCE).expect("worker exits after SIGTERM");
        assert!(status.success(), "worker {name} exited with {status:?}:\n{}", worker.stderr.text());
    }

    fn kill(&mut self, name: &str) {
        let worker = self.workers.remove(name).expect("a running worker");
        let status = std::process::Command::new("kill").args(["-KILL", &worker.pid().to_string()]).status().unwrap();
        assert!(status.success());
        drop(worker);
    }
}

/// One handler mark: a message of key `k`, number `n`, begun or finished by worker `w`.
#[derive(Debug, Clone, serde::Deserialize)]
struct Mark {
    e: String,
    k: String,
    n: u32,
    w: String,
    partition: u32,
    subject: String,
}

/// Follows the marks and fails at the first message begun before every
/// earlier message of its key finished.
#[derive(Default)]
struct OrderCheck {
    done: HashMap<String, HashSet<u32>>,
    done_by: HashMap<String, usize>,
    partitions: HashMap<String, u32>,
    finished: usize,
}

impl OrderCheck {
    fn see(&mut self, mark: Mark) {
        assert_eq!(mark.subject, format!("ord.{}", mark.k), "ev.subject is the publisher's subject");
        let partition = *self.partitions.entry(mark.k.clone()).or_insert(mark.partition);
        assert_eq!(partition, mark.partition, "key {} moved partition", mark.k);
        let done = self.done.entry(mark.k.clone()).or_default();
        match mark.e.as_str() {
            "start" => {
                let missing: Vec<u32> = (0..mark.n).filter(|m| !done.contains(m)).collect();
                assert!(
                    missing.is_empty(),
                    "key {} message {} begun on {} before {:?} of its key finished",
                    mark.k,
                    mark.n,
                    mark.w,
                    missing
                );
            }
            _ => {
                if done.insert(mark.n) {
                    self.finished += 1;
                }
                *self.done_by.entry(mark.w).or_default() += 1;
            }
        }
    }

    fn all_done(&self, keys: usize, per_key: u32) -> bool {
        self.finished == keys * per_key as usize
    }
}

async fn publish_keys(js: &jetstream::Context, keys: usize, per_key: u32, fail: Option<(usize, u32, u32)>) {
    let mut acks = Vec::new();
    for n in 0..per_key {
        for k in 0..keys {
            let fails = match fail {
                Some((key, number, times)) if key == k && number == n => times,
                _ => 0,
            };
            let body = serde_json::json!({ "n": n, "fail": fails }).to_string();
            acks.push(js.publish(format!("ord.key{k}"), body.into()).await.expect("publish"));
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }
}

/// Reads marks until every message finished, calling `during` with the count
/// of finished messages after each one.
async fn follow(
    marks: &mut async_nats::Subscriber,
    check: &mut OrderCheck,
    keys: usize,
    per_key: u32,
    mut during: impl FnMut(usize),
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check.all_done(keys, per_key) {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, marks.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} messages finished", check.finished, keys * per_key as usize))
            .expect("subscription open");
        check.see(serde_json::from_slice(&message.payload).expect("a mark"));
        during(check.finished);
    }
}

/// The stream exists before the workers start, so the test can publish at once.
async fn started_pool(
    server: &NatsServer,
    names: &[&str],
    max_ms: u32,
) -> (Pool, jetstream::Context, async_nats::Subscriber) {
    let client = client(server).await;
    let marks = client.subscribe("marks").await.unwrap();
    client.flush().await.unwrap();
    let mut pool = Pool::new(server, max_ms);
    for name in names {
        pool.start(name);
    }
    (pool, jetstream::new(client), marks)
}

/// Three workers sharing the 6 partitions evenly, and 40 keys x 30 messages
/// published to them; handlers sleep up to `max_ms`.
async fn three_workers_with_work(
    server: &NatsServer,
    max_ms: u32,
) -> (Pool, jetstream::Context, async_nats::Subscriber) {
    let (pool, js, marks) = started_pool(server, &["w1", "w2", "w3"], max_ms).await;
    assert_shares_become(&js.client(), &[2, 2, 2], PATIENCE).await;
    publish_keys(&js, 40, 30, None).await;
    (pool, js, marks)
}

/// The partitions each worker lists in `$SRV.INFO`, sorted.
async fn shares(client: &async_nats::Client) -> Vec<Vec<u32>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client.publish_with_reply("$SRV.INFO.keyed", inbox, "".into()).await.unwrap();
    client.flush().await.unwrap();
    let mut shares = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_millis(500), replies.next()).await {
        // No worker answering yet (after a server restart) is a status, not a reply.
        let Ok(info) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else { continue };
        let list = info["endpoints"][0]["metadata"]["partitions"].as_str().unwrap_or("").to_string();
        let mut owned: Vec<u32> = list.split(',').filter(|p| !p.is_empty()).map(|p| p.parse().unwrap()).collect();
        owned.sort();
        shares.push(owned);
    }
    shares.sort();
    shares
}

/// Waits until the workers' shares are `sizes` (sorted) and cover every partition once.
async fn assert_shares_become(client: &async_nats::Client, sizes: &[usize], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let shares = shares(client).await;
        let mut got: Vec<usize> = shares.iter().map(Vec::len).collect();
        got.sort();
        let mut all: Vec<u32> = shares.concat();
        all.sort();
        if got == sizes && all == (0..PARTITIONS).collect::<Vec<_>>() {
            return;
        }
        assert!(Instant::now() < deadline, "shares did not become {sizes:?} within {within:?}: {shares:?}");
    }
}

async fn refused_on_old_server(server: &NatsServer) {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &keyed_app("w", 0));
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &server.url()]);
    let status = worker.wait_exit(PATIENCE).expect("the worker exits");
    let log = worker.stderr.text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("needs nats-server 2.11 or newer"), "{log}");
    assert!(log.contains(&client(server).await.server_info().version), "{log}");
}

#[tokio::test]
async fn keys_are_handled_in_order_across_three_workers() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (pool, _js, mut marks) = three_workers_with_work(&server, 5).await;
    let mut check = OrderCheck::default();
    follow(&mut marks, &mut check, 40, 30, |_| {}).await;
    for name in pool.workers.keys() {
        assert!(check.done_by.get(name).copied().unwrap_or(0) > 0, "{name} handled nothing: {:?}", check.done_by);
    }
}

#[tokio::test]
async fn a_worker_killed_mid_stream_breaks_no_key_order() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (mut pool, js, mut marks) = three_workers_with_work(&server, 20).await;
    let mut check = OrderCheck::default();
    let mut killed = false;
    follow(&mut marks, &mut check, 40, 30, |finished| {
        if !killed && finished >= 400 {
            killed = true;
            pool.kill("w2");
        }
    })
    .await;
    assert!(killed);
    // The survivors took the dead worker's partitions.
    assert_shares_become(&js.client(), &[3, 3], Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_rolling_restart_breaks_no_key_order() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (mut pool, _js, mut marks) = three_workers_with_work(&server, 30).await;
    let mut check = OrderCheck::default();
    // Restart one worker each time another tenth of the messages finished.
    let mut restarted = 0;
    follow(&mut marks, &mut check, 40, 30, |finished| {
        if restarted < 3 && finished >= 120 * (restarted + 1) {
            let name = ["w1", "w2", "w3"][restarted];
            pool.stop(name);
            pool.start(name);
            restarted += 1;
        }
    })
    .await;
    assert_eq!(restarted, 3, "the messages finished before the rollout did");
}

#[tokio::test]
async fn a_failing_handler_holds_its_key_back() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (_pool, js, mut marks) = started_pool(&server, &["w1", "w2"], 0).await;
    // key0's first message fails its first two deliveries.
    publish_keys(&js, 4, 5, Some((0, 0, 2))).await;
    let mut check = OrderCheck::default();
    let mut first_of_key0 = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !check.all_done(4, 5) {
        let message = tokio::time::timeout(deadline - Instant::now(), marks.next()).await.expect("marks").unwrap();
        let mark: Mark = serde_json::from_slice(&message.payload).unwrap();
        if mark.k == "key0" && mark.e == "start" {
            first_of_key0.push(mark.n);
        }
        check.see(mark);
    }
    // Three starts of message 0 (two failures), then the rest in order.
    assert_eq!(first_of_key0, vec![0, 0, 0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn shares_move_when_a_worker_joins_and_when_one_leaves() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (mut pool, js, mut marks) = started_pool(&server, &["w1", "w2"], 0).await;
    assert_shares_become(&js.client(), &[3, 3], PATIENCE).await;
    // Every partition serves a message, so each is pinned to its owner.
    let mut round = 0;
    handled_soon(&js, &mut marks, &mut round).await;
    pool.start("w3");
    // Within the 5 s the contract names, plus the INFO round itself.
    assert_shares_become(&js.client(), &[2, 2, 2], Duration::from_secs(6)).await;
    handled_soon(&js, &mut marks, &mut round).await;
    pool.stop("w1");
    assert_shares_become(&js.client(), &[3, 3], Duration::from_secs(6)).await;
    handled_soon(&js, &mut marks, &mut round).await;
}

/// Publishes one message for each of 24 keys (numbered by `round`) and waits
/// until all are handled. Without unpinning, a partition that changed hands
/// would wait for the server's 10 s pin timeout; the round takes well under a
/// second, and 8 s leaves room for a loaded machine.
async fn handled_soon(js: &jetstream::Context, marks: &mut async_nats::Subscriber, round: &mut u32) {
    let started = Instant::now();
    for k in 0..24 {
        let body = serde_json::json!({ "n": 0, "round": *round }).to_string();
        js.publish(format!("ord.r{}k{k}", *round), body.into()).await.unwrap().await.unwrap();
    }
    let mut check = OrderCheck::default();
    follow(marks, &mut check, 24, 1, |_| {}).await;
    assert!(started.elapsed() < Duration::from_secs(8), "round {round} took {:?}", started.elapsed());
    *round += 1;
}

#[tokio::test]
async fn a_stream_without_the_partition_transform_is_refused_with_the_configuration_to_add() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let js = jetstream::new(client(&server).await);
    js.create_stream(jetstream::stream::Config {
        name: "ORD".into(),
        subjects: vec!["ord.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &keyed_app("w", 0));
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &server.url()]);
    let status = worker.wait_exit(PATIENCE).expect("the worker exits");
    let log = worker.stderr.text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(
            r#"\"subject_transform\": {\"dest\":\"{{partition(6,1)}}.ord.{{wildcard(1)}}\",\"src\":\"ord.*\"}"#
        ),
        "{log}"
    );
    assert!(!log.contains("worker ready"), "{log}");
}

#[test]
fn check_lists_the_partitions() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &keyed_app("w", 0));
    let (code, stdout, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("key={{wildcard(1)}} partitions=6 (consumers ord-0..ord-5)"), "{stdout}");
}

#[test]
fn bad_keyed_declarations_are_script_errors() {
    for (options, expected) in [
        (r#"subject = "o.*", partitions = 4"#, "partitions needs a key"),
        (r#"subject = "o.>", key = "{{wildcard(1)}}""#, "cannot end in '>'"),
        (r#"subject = "o.*", key = "{{wildcard(1)}}", partitions = 0"#, "between 1 and 1024"),
        (r#"subject = "o.*", key = "{{wildcard(1)}}", max_ack_pending = 5"#, "remove max_ack_pending"),
        (r#"subject = "o.*", key = "{{subject}}""#, "must be made of the subject's wildcards"),
        (r#"key = "{{wildcard(1)}}""#, "needs a subject"),
    ] {
        let scripts = Scripts::new();
        let source =
            format!("bus.consume({{ stream = \"S\", consumer = \"c\", {options} }})\nbus.on(\"x\", function() end)\n");
        let script = scripts.write("app.lua", &source);
        let (code, stdout, stderr) = run_command(&["check", script.to_str().unwrap()], None);
        assert_ne!(code, 0, "{options}: {stdout}");
        assert!(stderr.contains(expected), "{options}: {stderr}");
    }
}

#[tokio::test]
async fn metrics_count_messages_by_partition_and_the_partitions_served() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let client = client(&server).await;
    let mut marks = client.subscribe("marks").await.unwrap();
    client.flush().await.unwrap();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &keyed_app("w1", 0));
    let url = server.url();
    let (worker, addr) = with_probes(|addr| {
        Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--metrics-addr", addr])
    });
    worker.expect_ready();
    let js = jetstream::new(client.clone());
    publish_keys(&js, 12, 2, None).await;
    let mut check = OrderCheck::default();
    follow(&mut marks, &mut check, 12, 2, |_| {}).await;
    let (status, text) = http_get(&addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    assert!(text.contains(r#"agent_block_jetstream_partitions_owned{stream="ORD",consumer="ord"} 6"#), "{text}");
    let by_partition: u64 = text
        .lines()
        .filter(|line| line.starts_with(r#"agent_block_jetstream_messages_total{stream="ORD",consumer="ord-"#))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(by_partition, 24, "{text}");
}

#[tokio::test]
async fn shares_and_order_come_back_after_a_server_restart() {
    let mut server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (_pool, js, _) = started_pool(&server, &["w1", "w2"], 0).await;
    assert_shares_become(&js.client(), &[3, 3], PATIENCE).await;
    server.restart().expect("restart the server");
    // The membership bucket lived in memory: the workers create it again and
    // find each other; the stream and its consumers were on disk.
    let client = client(&server).await;
    let mut marks = client.subscribe("marks").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(bucket) = js.get_key_value("agent-block-members").await
            && let Ok(keys) = bucket.keys().await
            && keys.count().await == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "the workers did not announce themselves again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_shares_become(&client, &[3, 3], PATIENCE).await;
    publish_keys(&js, 12, 5, None).await;
    let mut check = OrderCheck::default();
    follow(&mut marks, &mut check, 12, 5, |_| {}).await;
}

/// User + system CPU time of process `pid`, from `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn an_idle_keyed_worker_does_not_spin() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (pool, js, mut marks) = started_pool(&server, &["w1"], 0).await;
    // Open pulls on every partition, then nothing to do.
    publish_keys(&js, 12, 1, None).await;
    let mut check = OrderCheck::default();
    follow(&mut marks, &mut check, 12, 1, |_| {}).await;
    let pid = pool.workers["w1"].pid();
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A pull loop that spins burns the whole 2 s of a core; at rest a worker
    // uses a few milliseconds. 0.5 s leaves room for a loaded machine.
    let used = cpu_time(pid) - before;
    assert!(used < Duration::from_millis(500), "an idle worker used {used:?} of CPU in 2 s");
}

#[tokio::test]
async fn a_message_failing_for_good_is_given_up_at_max_deliver_and_its_key_moves_on() {
    let server = server();
    if !supports_keyed(&server).await {
        return refused_on_old_server(&server).await;
    }
    let (_pool, js, mut marks) = started_pool(&server, &["w1"], 0).await;
    // key0's first message fails every delivery (max_deliver = 10, backoff 50 ms).
    publish_keys(&js, 1, 5, Some((0, 0, 99))).await;
    let mut starts = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while starts.len() < 14 {
        let message = tokio::time::timeout(deadline - Instant::now(), marks.next()).await.expect("marks").unwrap();
        let mark: Mark = serde_json::from_slice(&message.payload).unwrap();
        if mark.e == "start" {
            starts.push(mark.n);
        } else {
            assert_ne!(mark.n, 0, "the failing message finished");
        }
    }
    // Ten deliveries of message 0, then the rest of its key, in order.
    assert_eq!(starts, [vec![0; 10], vec![1, 2, 3, 4]].concat());
}
