//! The bridges handlers use: nats.publish/request, json, time, env, log.

mod common;

use common::*;

const APP: &str = r#"
bus.subscribe("pub")
bus.subscribe("ask")
bus.subscribe("ask.nobody")
bus.subscribe("ask.slow")
bus.subscribe("ask.failing")
bus.subscribe("misc")
bus.subscribe("ask.default")
bus.subscribe("logs")

bus.on("pub", function(ev)
  nats.publish("out.table", { n = 1 }, { headers = { ["X-From"] = "lua" } })
  nats.publish("out.text", "raw bytes")
  return "published"
end)
bus.on("ask", function(ev)
  local reply = nats.request("backend", { q = ev.payload.q }, { timeout = "5s", headers = { ["X-Ask"] = "1" } })
  return { answer = reply.payload.a, raw = reply.data, header = reply.headers["X-Backend"] }
end)
bus.on("ask.nobody", function(ev) return nats.request("nobody.home", "") end)
bus.on("ask.slow", function(ev) return nats.request("backend.silent", "", { timeout = "100ms" }) end)
bus.on("ask.failing", function(ev)
  local ok, err = pcall(nats.request, "backend.failing", "")
  return { ok = ok, code = err.code, message = err.message }
end)
bus.on("ask.default", function(ev)
  local started = time.now()
  local ok, err = pcall(nats.request, "backend.silent", "")
  return { ok = ok, code = err.code, elapsed = time.now() - started }
end)
bus.on("misc", function(ev)
  local decoded = json.decode('{"a":[1,2,{"b":null}]}')
  local before = time.now()
  time.sleep(0.01)
  return {
    encoded = json.encode({ x = 1 }),
    null_is_null = decoded.a[3].b == json.null,
    slept = time.now() - before >= 0.009,
    home = env.get("AGENT_BLOCK_TEST_VALUE"),
    missing = env.get("AGENT_BLOCK_TEST_MISSING") == nil,
  }
end)
bus.on("logs", function(ev)
  log.warn("charged card", { amount = 12 })
  return "logged"
end)
"#;

fn start() -> (NatsServer, Scripts, Worker) {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let worker = Worker::spawn_with_env(
        &["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1"],
        &[("AGENT_BLOCK_TEST_VALUE", "from-env")],
    );
    worker.expect_ready();
    (server, scripts, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_tables_as_json_and_strings_as_bytes_with_the_trace() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    let mut table = client.subscribe("out.table").await.unwrap();
    let mut text = client.subscribe("out.text").await.unwrap();
    client.flush().await.unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = headers(&[("traceparent", traceparent)]);
    assert_eq!(body(&request_with(&client, "pub", Some(headers), "").await), "published");

    let message = next(&mut table).await;
    assert_eq!(json(&message), serde_json::json!({"n": 1}));
    let headers = message.headers.expect("headers");
    assert_eq!(headers.get("X-From").unwrap().as_str(), "lua");
    assert_eq!(headers.get("traceparent").unwrap().as_str(), traceparent, "publishes carry the trace");
    assert_eq!(body(&next(&mut text).await), "raw bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_yields_and_returns_data_payload_and_headers() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    let mut backend = client.subscribe("backend").await.unwrap();
    let mut failing = client.subscribe("backend.failing").await.unwrap();
    let _silent = client.subscribe("backend.silent").await.unwrap();
    client.flush().await.unwrap();
    let responder = tokio::spawn({
        let client = client.clone();
        async move {
            let message = next(&mut backend).await;
            assert_eq!(message.headers.as_ref().unwrap().get("X-Ask").unwrap().as_str(), "1");
            let question: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let reply_headers = headers(&[("X-Backend", "yes")]);
            let answer = serde_json::json!({"a": format!("re: {}", question["q"].as_str().unwrap())});
            client
                .publish_with_headers(message.reply.unwrap(), reply_headers, answer.to_string().into())
                .await
                .unwrap();
            let message = next(&mut failing).await;
            let error = headers(&[("Nats-Service-Error", "backend down"), ("Nats-Service-Error-Code", "502")]);
            client.publish_with_headers(message.reply.unwrap(), error, "".into()).await.unwrap();
        }
    });

    let reply = json(&request(&client, "ask", r#"{"q":"why"}"#).await);
    assert_eq!(reply["answer"], "re: why");
    assert_eq!(reply["raw"], r#"{"a":"re: why"}"#);
    assert_eq!(reply["header"], "yes");

    let failed = json(&request(&client, "ask.failing", "").await);
    assert_eq!(failed, serde_json::json!({"ok": false, "code": 502, "message": "backend down"}));
    responder.await.unwrap();

    let (code, message) = error_of(&request(&client, "ask.nobody", "").await).unwrap();
    assert_eq!(code, 503);
    assert!(message.contains("no responders"), "{message}");
    let (code, message) = error_of(&request(&client, "ask.slow", "").await).unwrap();
    assert_eq!(code, 504);
    assert!(message.contains("timed out after 100ms"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_time_and_env_helpers_work() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    let reply = json(&request(&client, "misc", "").await);
    assert_eq!(
        reply,
        serde_json::json!({
            "encoded": "{\"x\":1}", "null_is_null": true, "slept": true, "home": "from-env", "missing": true
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_the_event_and_fields() {
    let (server, _scripts, worker) = start();
    let client = client(&server).await;
    let headers = headers(&[
        ("Nats-Msg-Id", "log-1"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]);
    assert_eq!(body(&request_with(&client, "logs", Some(headers), "").await), "logged");
    assert!(worker.stderr.wait_for("charged card", PATIENCE));
    let line = worker.stderr.text().lines().find(|l| l.contains("charged card")).unwrap().to_string();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["level"], "WARN");
    assert_eq!(entry["kind"], "logs");
    assert_eq!(entry["id"], "log-1");
    assert_eq!(entry["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(entry["fields"], r#"{"amount":12}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_timeout_gives_up_after_5_s() {
    let (server, _scripts, _worker) = start();
    let client = client(&server).await;
    // A responder that never answers, so the request waits rather than failing at once.
    let _silent = client.subscribe("backend.silent").await.unwrap();
    client.flush().await.unwrap();
    let result = json(&request(&client, "ask.default", "").await);
    assert_eq!((result["ok"].as_bool(), result["code"].as_u64()), (Some(false), Some(504)), "{result}");
    let elapsed = result["elapsed"].as_f64().unwrap();
    // 5 s, not the 30 s handler deadline; the upper bound is generous for a loaded machine.
    assert!((4.9..10.0).contains(&elapsed), "gave up after {elapsed} s");
}
