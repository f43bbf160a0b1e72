//! `kv.*`: JetStream key-value buckets as the pool's shared state.

mod common;

use common::*;
use serde_json::json;

const APP: &str = r#"
bus.subscribe("kv.*")
local created = kv.bucket("state", { history = 5 })

bus.on("kv.created", function(ev) return { created = created } end)
bus.on("kv.put", function(ev) return { rev = kv.put("state", ev.payload.key, ev.payload.value) } end)
bus.on("kv.get", function(ev)
  local value, rev = kv.get("state", ev.payload.key)
  return { value = value, rev = rev, type = type(value) }
end)
bus.on("kv.create", function(ev) return { rev = kv.create("state", ev.payload.key, ev.payload.value) } end)
bus.on("kv.update", function(ev)
  return { rev = kv.update("state", ev.payload.key, ev.payload.value, ev.payload.rev) }
end)
bus.on("kv.delete", function(ev) kv.delete("state", ev.payload.key) return {} end)
bus.on("kv.keys", function(ev) return kv.keys("state", ev.payload.prefix) end)
bus.on("kv.missing", function(ev) return kv.get("nope", "k") end)
bus.on("kv.bucket", function(ev)
  return { created = kv.bucket(ev.payload.name, { history = ev.payload.history, ttl = ev.payload.ttl }) }
end)
bus.on("kv.count", function(ev)
  -- an optimistic counter: read, then compare-and-set, retrying on conflict
  while true do
    local value, rev = kv.get("state", "counter")
    local ok, err
    if rev == nil then
      ok = kv.create("state", "counter", "1")
      if ok then return "1" end
    else
      local next = tostring(tonumber(value) + 1)
      ok, err = pcall(kv.update, "state", "counter", next, rev)
      if ok then return next end
      if err.code ~= 409 then error(err) end
    end
  end
end)
"#;

async fn call(client: &async_nats::Client, subject: &str, body: serde_json::Value) -> serde_json::Value {
    let reply = request(client, subject, &body.to_string()).await;
    assert!(error_of(&reply).is_none(), "{subject}: {:?}", error_of(&reply));
    json(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_store_tables_and_strings_with_revisions() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let _worker = Worker::run(&server, &script, &["--workers", "2"]);
    let client = client(&server).await;

    let rev = call(&client, "kv.put", json!({ "key": "order.1", "value": { "total": 12 } })).await["rev"].clone();
    let got = call(&client, "kv.get", json!({ "key": "order.1" })).await;
    assert_eq!(got["value"], json!({ "total": 12 }));
    assert_eq!(got["type"], "table");
    assert_eq!(got["rev"], rev);
    call(&client, "kv.put", json!({ "key": "name", "value": "ada" })).await;
    let got = call(&client, "kv.get", json!({ "key": "name" })).await;
    assert_eq!((got["value"].as_str(), got["type"].as_str()), (Some("ada"), Some("string")));
    let missing = call(&client, "kv.get", json!({ "key": "absent" })).await;
    assert_eq!(missing["type"], "nil");

    let first = call(&client, "kv.create", json!({ "key": "once", "value": "a" })).await;
    assert!(first["rev"].is_u64(), "{first}");
    let second = call(&client, "kv.create", json!({ "key": "once", "value": "b" })).await;
    assert!(second["rev"].is_null(), "create on an existing key returns nil: {second}");

    let stale = first["rev"].as_u64().unwrap();
    call(&client, "kv.update", json!({ "key": "once", "value": "c", "rev": stale })).await;
    let conflict =
        request(&client, "kv.update", &json!({ "key": "once", "value": "d", "rev": stale }).to_string()).await;
    let (code, message) = error_of(&conflict).expect("a stale revision is a conflict");
    assert_eq!(code, 409, "{message}");

    call(&client, "kv.delete", json!({ "key": "name" })).await;
    assert_eq!(call(&client, "kv.get", json!({ "key": "name" })).await["type"], "nil");
    assert_eq!(call(&client, "kv.keys", json!({ "prefix": "o" })).await, json!(["once", "order.1"]));

    let missing = request(&client, "kv.missing", "{}").await;
    let (code, message) = error_of(&missing).expect("a missing bucket is an error");
    assert_eq!(code, 404);
    assert!(message.contains("bucket \"nope\" does not exist"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_shared_by_two_workers_counts_every_request() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let _first = Worker::run(&server, &script, &["--workers", "2"]);
    let _second = Worker::run(&server, &script, &["--workers", "2"]);
    let client = client(&server).await;
    let calls = (0..40).map(|_| {
        let client = client.clone();
        async move { body(&request(&client, "kv.count", "").await) }
    });
    let mut counts: Vec<u32> =
        futures::future::join_all(calls).await.iter().map(|b| b.parse().expect("a count")).collect();
    counts.sort();
    assert_eq!(counts, (1..=40).collect::<Vec<_>>(), "compare-and-set gave every request its own count");
    assert!(call(&client, "kv.created", json!({})).await["created"].is_boolean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_created_once_with_its_history_and_ttl() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let _worker = Worker::run(&server, &script, &["--workers", "2"]);
    let client = client(&server).await;
    let settings = json!({ "name": "sessions", "history": 3, "ttl": "1h" });
    assert_eq!(call(&client, "kv.bucket", settings.clone()).await["created"], true, "created when missing");
    assert_eq!(call(&client, "kv.bucket", settings).await["created"], false, "false when it exists");
    // The server's own record of the bucket: a stream keeping 3 values per key for an hour.
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("KV_sessions").await.expect("the bucket's stream");
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_messages_per_subject, 3, "history");
    assert_eq!(config.max_age, std::time::Duration::from_secs(3600), "ttl");
}
