//! The handler-author loop: `agent-block test` against fakes of every bridge, the
//! shipped examples, `init`, and the editor definitions.

mod common;

use common::*;

/// The script most cases below test: every bridge in one handler.
const APP: &str = r#"
bus.subscribe("orders.new")
bus.on("orders.new", function(ev)
  local order = ev.payload
  if #order.items == 0 then error({ code = 422, message = "no items" }) end
  local stock = nats.request("stock.check", order)
  nats.publish("orders.accepted", order)
  local hook = http.post("https://hooks.test/orders", order)
  time.sleep("10m")
  return { region = env.get("REGION"), stock = stock.payload, hook = hook.json, status = hook.status, now = time.now() }
end)
"#;

#[test]
fn tests_pass_and_fail_with_file_line_expected_and_actual() {
    let scripts = Scripts::new();
    scripts.write("app.lua", APP);
    let test_file = scripts.write(
        "app_test.lua",
        r#"local w = test.worker("app.lua", { env = { REGION = "eu" }, now = 1000 })
test("rejects an order without items", function()
  test.eq(w:send("orders.new", { id = 1, items = {} }).code, 422)
end)
test("uses every fake", function()
  test.respond("stock.check", function(req) return { ok = req.payload.id == 2 } end)
  test.http("POST https://hooks.test/*", function(req) return { status = 201, body = { got = req.json.id } } end)
  local out = w:send("orders.new", { id = 2, items = { "a" } })
  test.eq(out.payload, { region = "eu", stock = { ok = true }, hook = { got = 2 }, status = 201, now = 1600 })
  test.eq(w:published("orders.accepted")[1].payload.id, 2)
end)
test("a missing responder is the production 503", function()
  local out = w:send("orders.new", { id = 3, items = { "a" } })
  test.eq(out.code, 503)
  test.matches(out.message, "no responders")
end)
test("a missing http route is a 502", function()
  test.respond("stock.check", {})
  test.eq(w:send("orders.new", { id = 4, items = { "a" } }).code, 502)
end)
test("this one fails", function()
  test.eq(w:send("orders.new", { id = 1, items = {} }).code, 400)
end)
test("so does this one", function()
  w:send("nowhere", {})
end)
"#,
    );
    let junit = scripts.path().join("results.xml");
    let (code, stdout, stderr) =
        run_command(&["test", scripts.path().to_str().unwrap(), "--junit", junit.to_str().unwrap()], None);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let file = test_file.display().to_string();
    assert!(stdout.contains(&format!("ok   {file}: uses every fake")), "{stdout}");
    assert!(stdout.contains(&format!("FAIL {file}: this one fails")), "{stdout}");
    assert!(
        stdout.contains(&format!("{file}:22: values differ\n       expected: 400\n       actual:   422")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("{file}:25: no bus.subscribe or bus.consume")), "{stdout}");
    assert!(stdout.trim_end().ends_with("4 passed, 2 failed"), "{stdout}");
    let xml = std::fs::read_to_string(&junit).expect("junit file written");
    assert!(xml.contains("tests=\"6\" failures=\"2\""), "{xml}");
    assert!(xml.contains("<failure message=\""), "{xml}");
}

#[test]
fn kv_fake_keeps_revisions_creates_and_conflicts() {
    let scripts = Scripts::new();
    scripts.write(
        "kv.lua",
        r#"
bus.subscribe("kv")
kv.bucket("b")
bus.on("kv", function(ev)
  local r1 = kv.put("b", "k", { n = 1 })
  local value, rev = kv.get("b", "k")
  assert(rev == r1 and value.n == 1, "get returns the table and its revision")
  assert(kv.create("b", "k", "x") == nil, "create on an existing key returns nil")
  local r2 = kv.update("b", "k", "two", r1)
  assert(r2 > r1, "revisions count up")
  local ok, err = pcall(kv.update, "b", "k", "three", r1)
  assert(not ok and err.code == 409, "a stale revision conflicts")
  kv.put("b", "other", "o")
  kv.delete("b", "other")
  assert(kv.get("b", "other") == nil, "deleted keys read as nil")
  assert(kv.create("b", "other", "again"), "create works after a delete")
  local ok2, missing = pcall(kv.get, "nope", "k")
  return { keys = kv.keys("b"), prefixed = kv.keys("b", "o"), missing = missing.message, ok2 = ok2 }
end)
"#,
    );
    scripts.write(
        "kv_test.lua",
        r#"local w = test.worker("kv.lua")
test("kv semantics", function()
  local out = w:send("kv", nil)
  test.eq(out.outcome, "ack", out.message)
  test.eq(out.payload.keys, { "k", "other" })
  test.eq(out.payload.prefixed, { "other" })
  test.eq(out.payload.ok2, false)
  test.matches(out.payload.missing, 'no bucket "nope"')
  test.eq(w:kv("b", "k"), "two")
end)
"#,
    );
    let (code, stdout, stderr) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}

#[test]
fn the_examples_pass_their_tests() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/examples");
    let (code, stdout, stderr) = run_command(&["test", examples], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn test_without_test_files_is_a_usage_error() {
    let scripts = Scripts::new();
    let (code, _, stderr) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("no *_test.lua files"), "{stderr}");
}

#[test]
fn a_test_file_whose_script_does_not_load_fails_with_the_scripts_line() {
    let scripts = Scripts::new();
    scripts.write("broken.lua", "bus.subscribe('x')\nlocal y = nil\nprint(y.z)\n");
    scripts.write("broken_test.lua", "local w = test.worker('broken.lua')\ntest('never runs', function() end)\n");
    let (code, stdout, _) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(stdout.contains("the file did not run"), "{stdout}");
    assert!(stdout.contains("broken.lua:3:"), "{stdout}");
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");
}

#[test]
fn check_warns_about_unreachable_kinds_and_fails_on_unknown_functions() {
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"bus.subscribe("a.b")
bus.subscribe("jobs.*", { kind = "job.{{wildcard(1)}}" })
bus.on("never", function(ev) end)
bus.on("job.run", function(ev)
  -- nats.nothing in a comment is fine, and so is "bus.nothing" in a string
  nats.publsh("x", {})
end)
"#,
    );
    let (code, stdout, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("warning: handler for kind \"never\": no subscription or consumer produces"), "{stderr}");
    assert!(stderr.contains("warning: subscribe a.b kind={{subject}}"), "{stderr}");
    assert!(stderr.contains("its kind \"a.b\" has no handler and there is no bus.on_any"), "{stderr}");
    assert!(!stderr.contains("jobs.*"), "the jobs.* subscription has a handler: {stderr}");
    let file = script.display();
    assert!(
        stderr.contains(&format!("error: {file}:6: unknown function nats.publsh (nats has: publish, request)")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");

    let clean =
        scripts.write("clean.lua", "bus.subscribe('a')\nbus.on('a', function(ev) nats.publish('b', ev.data) end)\n");
    let (code, _, stderr) = run_command(&["check", clean.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn init_scaffolds_a_worker_whose_tests_pass() {
    let scripts = Scripts::new();
    let dir = scripts.path().join("svc");
    let (code, stdout, stderr) = run_command(&["init", dir.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for file in ["app.lua", "app_test.lua", ".luarc.json", "types/agent-block.lua", "types/test.lua"] {
        assert!(dir.join(file).is_file(), "{file} missing: {stdout}");
    }
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/types/agent-block.lua")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("types/agent-block.lua")).unwrap(), shipped);
    let (code, stdout, stderr) = run_command(&["test", dir.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
    // A second init keeps the author's files.
    std::fs::write(dir.join("app.lua"), "-- mine\n").unwrap();
    let (code, stdout, _) = run_command(&["init", dir.to_str().unwrap()], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("kept"), "{stdout}");
    assert_eq!(std::fs::read_to_string(dir.join("app.lua")).unwrap(), "-- mine\n");
}

/// `agent-block test` settles a JetStream message by the source's own policy:
/// backoff naks, then the dead letter with the production headers (a stray
/// carriage return in the error included).
#[test]
fn consume_under_test_settles_as_the_jetstream_source_does() {
    let scripts = Scripts::new();
    scripts.write(
        "jobs.lua",
        r#"
bus.consume({ stream = "JOBS", consumer = "work", subject = "jobs.>", kind = "job",
              max_deliver = 3, backoff = { "1s", "5s" }, dead_letter = "jobs.dead" })
bus.on("job", function(ev) error("bad " .. ev.data, 0) end)
"#,
    );
    scripts.write(
        "jobs_test.lua",
        r#"local w = test.worker("jobs.lua")
test("retries with backoff, then dead-letters", function()
  local out = w:consume("jobs.x", "a\rb")
  test.eq(out.deliveries, 3)
  test.eq(out.history[1].outcome, "nak")
  test.eq(out.history[1].delay, 1)
  test.eq(out.history[2].delay, 5)
  test.eq(out.outcome, "term")
  test.eq(out.dead_letter.subject, "jobs.dead")
  test.eq(out.dead_letter.headers["Agent-Block-Error"], "bad a b")
  test.eq(out.dead_letter.headers["Agent-Block-Delivered"], "3")
  test.eq(out.dead_letter.headers["Agent-Block-Stream"], "JOBS")
end)
"#,
    );
    let (code, stdout, stderr) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}

/// A KV conflict and a stored value read back, in one handler.
const KV_APP: &str = r#"
bus.subscribe("conflict")
kv.bucket("b")
bus.on("conflict", function(ev)
  local rev = kv.put("b", "k", ' {"spaced":true}')
  local ok, err = pcall(kv.update, "b", "k", "x", rev + 10)
  return { ok = ok, err = tostring(err), code = err.code, value_type = type(kv.get("b", "k")) }
end)
"#;

/// What [`KV_APP`] answers, offline and on a real worker alike.
const KV_ANSWER: &str =
    r#"{ ok = false, err = "kv.update b/k: revision 11 is no longer the latest", code = 409, value_type = "table" }"#;

#[test]
fn a_kv_conflict_reads_the_same_offline_as_on_a_worker() {
    let scripts = Scripts::new();
    scripts.write("app.lua", KV_APP);
    scripts.write(
        "app_test.lua",
        &format!("local w = test.worker(\"app.lua\")\ntest(\"conflict\", function()\n  test.eq(w:send(\"conflict\").payload, {KV_ANSWER})\nend)\n"),
    );
    let (code, stdout, stderr) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

#[tokio::test]
async fn a_kv_conflict_on_a_worker() {
    let app = start_app(KV_APP, &[]).await;
    let reply = request(&app.client, "conflict", "").await;
    let expected = serde_json::json!({
        "ok": false, "err": "kv.update b/k: revision 11 is no longer the latest", "code": 409, "value_type": "table"
    });
    assert_eq!(json(&reply), expected, "the same as {KV_ANSWER}");
}

/// An order consumer whose first delivery of a `fail` message raises; `{key}`
/// is replaced by the keyed options, or by nothing for a plain consumer.
const ORDERING_APP: &str = r#"
bus.consume({ stream = "ORD", consumer = "ord", subject = "ord.*", kind = "order", {key}
              max_deliver = 3, backoff = { "5s" } })
bus.on("order", function(ev)
  if ev.payload.fail and ev.meta.delivered == 1 then error("not yet") end
  return { key = ev.meta.key, partition = ev.meta.partition, consumer = ev.meta.consumer }
end)
"#;

/// Prints each delivery of `w:consume_all` as "a1#1 nak" (message, delivery,
/// outcome); the list is a1 (failing once), a2, b1.
const ORDERING_TEST_HEAD: &str = r##"local w = test.worker("app.lua")
local function trace(history)
  local lines = {}
  for _, out in ipairs(history) do
    lines[#lines + 1] = ({ "a1", "a2", "b1" })[out.index] .. "#" .. out.delivered .. " " .. out.outcome
  end
  return lines
end
local messages = {
  { "ord.a", { fail = true } },
  { "ord.a", {} },
  { "ord.b", {} },
}
"##;

/// Runs `agent-block test` on [`ORDERING_APP`] with `key` and a test file of
/// [`ORDERING_TEST_HEAD`] followed by `tests`; asserts they all pass.
fn run_ordering_tests(key: &str, tests: &str) {
    let scripts = Scripts::new();
    scripts.write("app.lua", &ORDERING_APP.replace("{key}", key));
    scripts.write("app_test.lua", &format!("{ORDERING_TEST_HEAD}{tests}"));
    let (code, stdout, stderr) = run_command(&["test", scripts.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

/// With a key, the second message of key "a" waits until the first succeeded
/// on its retry, while key "b" (another partition) goes ahead; the handler sees
/// the key, the partition nats-server would give and the partition's consumer.
#[test]
fn consume_all_holds_a_key_back_behind_its_failing_message() {
    run_ordering_tests(
        r#"key = "{{wildcard(1)}}", partitions = 6,"#,
        r#"test("keyed", function()
  local started = w:now()
  local history = w:consume_all(messages)
  test.eq(trace(history), { "a1#1 nak", "b1#1 ack", "a1#2 ack", "a2#1 ack" })
  test.eq(w:now() - started, 5)
  test.eq(history[1].subject, "ord.a")
  test.eq(history[3].payload, { key = "a", partition = 4, consumer = "ord-4" })
  test.eq(history[2].payload, { key = "b", partition = 1, consumer = "ord-1" })
end)
"#,
    );
}

/// Without a key nothing waits: the second message of "a" is handled before
/// the first one's retry.
#[test]
fn consume_all_without_a_key_lets_later_messages_overtake_a_retry() {
    run_ordering_tests(
        "",
        r#"test("unkeyed", function()
  local history = w:consume_all(messages)
  test.eq(trace(history), { "a1#1 nak", "a2#1 ack", "b1#1 ack", "a1#2 ack" })
  test.eq(history[2].payload, { consumer = "ord" })
end)
"#,
    );
}

/// Keys sharing a partition share its order, as the partition's consumer with
/// one message in flight does: with one partition, "b" waits behind "a" too.
#[test]
fn consume_all_holds_back_the_keys_sharing_a_partition() {
    run_ordering_tests(
        r#"key = "{{wildcard(1)}}","#,
        r#"test("one partition", function()
  test.eq(trace(w:consume_all(messages)), { "a1#1 nak", "a1#2 ack", "a2#1 ack", "b1#1 ack" })
end)
"#,
    );
}

/// Every subject must be a consumer's; a message that is not
/// `{ subject, ... }` is named by its position.
#[test]
fn consume_all_refuses_a_subject_no_consumer_reads() {
    run_ordering_tests(
        "",
        r#"test("not consumed", function()
  test.raises(function() w:consume_all({ { "ord.a", {} }, { "other.x", {} } }) end,
    'w:consume_all: subject "other.x" is not read by a bus.consume of .*app.lua')
  test.raises(function() w:consume_all({ { "ord.a", {} }, { subject = "ord.b" } }) end,
    "w:consume_all: message 2 is not { subject, data, opts%? }")
  test.eq(#w:consume_all({}), 0)
end)
"#,
    );
}
