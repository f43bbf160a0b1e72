//! Request/reply through Lua handlers: replies, error codes, the event table, kinds.

mod common;

use common::*;

const APP: &str = r#"
local helpers = require("helpers")
local validate = require("validate")
local calls = 0

bus.subscribe("echo")
bus.subscribe("shape.*", { kind = "shape.{{wildcard(1)}}" })
bus.subscribe("jobs.>", { kind = "job:{{wildcard(1)}}" })
bus.subscribe("events")

bus.on("echo", function(ev) return ev.payload end)
bus.on("shape.text", function(ev) return "plain " .. ev.data end)
bus.on("shape.nil", function(ev) end)
bus.on("shape.table", function(ev) return { list = { 1, 2 }, empty = json.decode("[]") } end)
bus.on("shape.headers", function(ev)
  return bus.reply({ ok = true }, { headers = { ["X-Result"] = "done", ["X-Multi"] = { "a", "b" } } })
end)
bus.on("shape.count", function(ev)
  calls = calls + 1
  return { calls = calls, doubled = helpers.double(calls) }
end)
bus.on("shape.fail", function(ev) error("it broke") end)
bus.on("shape.fail0", function(ev) error("no position", 0) end)
bus.on("shape.coded", function(ev) error({ code = 422, message = "bad order" }) end)
bus.on("shape.nilindex", function(ev) local t = nil; return t.x end)
bus.on("shape.raw", function(ev) return #ev.data end)
bus.on("shape.validate", function(ev) return validate.fields(ev.payload, { id = "string" }) end)
bus.on("shape.caught", function(ev)
  local ok, err = pcall(function() return ev.payload end)
  return { ok = ok, err = tostring(err) }
end)
bus.on("shape.ev", function(ev)
  return {
    kind = ev.kind, id = ev.id, subject = ev.subject, has_reply = ev.reply ~= nil,
    headers = ev.headers, meta_subject = ev.meta.subject, delivered = ev.meta.delivered,
    trace_id = ev.meta.trace_id, timestamp = ev.meta.timestamp,
  }
end)
bus.on("shape.replaced", function(ev) return "first" end)
bus.on("shape.replaced", function(ev) return "second" end)
bus.on("job:email.send", function(ev) return ev.kind end)
bus.on("events", function(ev) nats.publish("events.seen", ev.data) end)

bus.serve()
"#;

const HELPERS: &str = r#"
local M = {}
function M.double(n) return n * 2 end
return M
"#;

fn start() -> (NatsServer, Scripts, Worker) {
    let server = server();
    let scripts = Scripts::new();
    scripts.write("helpers.lua", HELPERS);
    let script = scripts.write("app.lua", APP);
    let worker = Worker::run(&server, &script, &["--workers", "1"]);
    (server, scripts, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_follow_the_return_value() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;

    let echoed = request(&client, "echo", r#"{"name":"ada","n":[1,2]}"#).await;
    assert_eq!(json(&echoed), serde_json::json!({"name":"ada","n":[1,2]}));

    assert_eq!(body(&request(&client, "shape.text", "abc").await), "plain abc");

    let empty = request(&client, "shape.nil", "").await;
    assert!(empty.payload.is_empty() && error_of(&empty).is_none());

    let table = request(&client, "shape.table", "").await;
    assert_eq!(json(&table), serde_json::json!({"list":[1,2],"empty":[]}));

    let with_headers = request(&client, "shape.headers", "").await;
    assert_eq!(json(&with_headers), serde_json::json!({"ok": true}));
    let headers = with_headers.headers.expect("reply headers");
    assert_eq!(headers.get("X-Result").unwrap().as_str(), "done");
    let multi: Vec<&str> = headers.get_all("X-Multi").map(|v| v.as_str()).collect();
    assert_eq!(multi, ["a", "b"]);

    assert_eq!(body(&request(&client, "shape.replaced", "").await), "second", "last registration wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_state_lives_in_closures_and_modules() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    for expected in 1..=3 {
        let reply = json(&request(&client, "shape.count", "").await);
        assert_eq!(reply, serde_json::json!({"calls": expected, "doubled": expected * 2}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_become_service_error_replies() {
    let (server, _scripts, worker) = start();
    let client = client(&server).await;

    let (code, message) = error_of(&request(&client, "shape.fail", "").await).expect("error reply");
    assert_eq!(code, 500);
    assert!(message.ends_with("it broke") && message.contains("app.lua:"), "{message}");

    assert_eq!(error_of(&request(&client, "shape.fail0", "").await), Some((500, "no position".into())));
    assert_eq!(error_of(&request(&client, "shape.coded", "").await), Some((422, "bad order".into())));

    let (code, message) = error_of(&request(&client, "shape.nilindex", "").await).unwrap();
    assert_eq!(code, 500);
    assert!(message.contains("attempt to index a nil value"), "{message}");

    let (code, message) = error_of(&request(&client, "shape.unknown", "").await).unwrap();
    assert_eq!((code, message.as_str()), (404, "no handler for kind \"shape.unknown\""));

    assert!(worker.stderr.wait_for("bad order", PATIENCE), "failures are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_logged_with_kind_id_and_code() {
    let (server, _scripts, worker) = start();
    let client = client(&server).await;
    let cases =
        [("shape.fail", Some("fail-1"), 500), ("shape.coded", Some("coded-7"), 422), ("shape.nilindex", None, 500)];
    for (subject, id, code) in cases {
        let headers = id.map(|id| headers(&[("Nats-Msg-Id", id)]));
        let reply = request_with(&client, subject, headers, "").await;
        assert_eq!(error_of(&reply).map(|e| e.0), Some(code), "{subject}");
    }
    // The replies may overtake their log lines through the pipe.
    let all_logged = |log: &str| log.matches("event failed").count() >= cases.len();
    assert!(worker.stderr.wait_until(all_logged, PATIENCE), "{}", worker.stderr.text());
    let records: Vec<serde_json::Value> = worker
        .stderr
        .text()
        .lines()
        .filter(|line| line.contains("event failed"))
        .map(|line| serde_json::from_str(line).expect("a JSON log line"))
        .collect();
    for (subject, id, code) in cases {
        let record = records
            .iter()
            .find(|r| r["kind"] == subject)
            .unwrap_or_else(|| panic!("no failure record for {subject}: {records:?}"));
        assert_eq!(record["code"], code, "{record}");
        assert_eq!(record["level"], "WARN", "{record}");
        match id {
            Some(id) => assert_eq!(record["id"], id, "{record}"),
            None => assert!(record["id"].as_str().is_some_and(|id| !id.is_empty()), "{record}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_that_are_not_json_fail_only_where_read() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;

    let (code, message) = error_of(&request(&client, "echo", "{not json").await).unwrap();
    assert_eq!(code, 400);
    assert!(message.starts_with("payload is not valid JSON"), "{message}");

    assert_eq!(body(&request(&client, "shape.raw", "{not json").await), "9", "ev.data works on any bytes");

    let caught = json(&request(&client, "shape.caught", "<xml/>").await);
    assert_eq!(caught["ok"], false);
    assert!(caught["err"].as_str().unwrap().contains("not valid JSON"));

    let empty = request(&client, "echo", "").await;
    assert!(empty.payload.is_empty() && error_of(&empty).is_none(), "an empty body is a nil payload");

    let (code, message) = error_of(&request(&client, "shape.validate", r#"{"id": 7}"#).await).unwrap();
    assert_eq!((code, message.as_str()), (400, "field \"id\": expected string, got number"));
    assert_eq!(json(&request(&client, "shape.validate", r#"{"id":"a"}"#).await), serde_json::json!({"id":"a"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_table_describes_the_message() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    let headers = headers(&[
        ("Nats-Msg-Id", "msg-42"),
        ("X-Tag", "one"),
        ("X-Tag", "two"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ]);
    let sent = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let reply = json(&request_with(&client, "shape.ev", Some(headers), "").await);
    assert_eq!(reply["kind"], "shape.ev");
    assert_eq!(reply["id"], "msg-42");
    assert_eq!(reply["subject"], "shape.ev");
    assert_eq!(reply["has_reply"], true);
    assert_eq!(reply["headers"]["X-Tag"], serde_json::json!(["one", "two"]));
    assert_eq!(reply["meta_subject"], "shape.ev");
    assert_eq!(reply["delivered"], 1);
    assert_eq!(reply["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // Seconds since the epoch at receipt; the window only rules out another
    // unit or clock, not a slow machine.
    let timestamp = reply["timestamp"].as_f64().expect("a numeric timestamp");
    assert!((timestamp - sent).abs() < 60.0, "timestamp {timestamp}, sent at {sent}");

    let generated = json(&request(&client, "shape.ev", "").await);
    let other = json(&request(&client, "shape.ev", "").await);
    assert!(generated["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_ne!(generated["id"], other["id"], "generated ids are unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinds_come_from_the_subscription_template() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    assert_eq!(body(&request(&client, "jobs.email.send", "").await), "job:email.send");
    let (code, _) = error_of(&request(&client, "jobs.sms", "").await).unwrap();
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_reply_subject_run_their_handler() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    let mut seen = client.subscribe("events.seen").await.unwrap();
    client.flush().await.unwrap();
    client.publish("events", "fire and forget".into()).await.unwrap();
    let message = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut seen)).await.unwrap().unwrap();
    assert_eq!(body(&message), "fire and forget");
}
