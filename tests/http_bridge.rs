//! The `http` bridge against a server the test starts: methods, bodies, headers
//! (repeated ones joined), `json` on a body that is not JSON, error statuses,
//! timeouts, the call ending before the handler's deadline, refused connections,
//! DNS failures, redirects, size cap, private CA, `--http-allow`, trace
//! propagation and concurrency on one VM.

mod common;
#[path = "common/http_server.rs"]
mod http_server;

use std::time::{Duration, Instant};

use common::*;
use http_server::{HttpServer, HttpsServer};

/// Each subject calls `http` as its payload says and returns what it got back.
const APP: &str = r#"
bus.subscribe("call")
bus.on("call", function(ev)
  local p = ev.payload
  local ok, response = pcall(http.request, p.url, p.opts)
  if not ok then return { failed = true, code = response.code, message = response.message } end
  local out = { status = response.status, body = response.body, header = response.headers["x-test"] }
  if p.json then out.json = response.json end
  return out
end)
bus.subscribe("get")
bus.on("get", function(ev) return http.get(ev.payload.url).body end)
bus.subscribe("post")
bus.on("post", function(ev) return http.post(ev.payload.url, { n = 1 }).json end)
bus.subscribe("hang")
bus.on("hang", function(ev) return http.get(ev.payload.url).body end)
bus.subscribe("details")
bus.on("details", function(ev)
  local response = http.get(ev.payload.url)
  local ok, err = pcall(function() return response.json end)
  return { multi = response.headers["x-multi"], json_ok = ok, json_error = tostring(err) }
end)
bus.subscribe("bounded")
bus.on("bounded", function(ev)
  local started = time.now()
  local ok, err = pcall(http.get, ev.payload.url)
  nats.publish("ended", { ok = ok, error = tostring(err), elapsed = time.now() - started })
  return "caught"
end)
"#;

type Setup = Running;

async fn start(args: &[&str]) -> Setup {
    start_app(APP, args).await
}

async fn call(setup: &Setup, subject: &str, payload: serde_json::Value) -> serde_json::Value {
    let reply = request(&setup.client, subject, &payload.to_string()).await;
    assert_eq!(error_of(&reply), None, "unexpected error reply; worker log:\n{}", setup.worker.stderr.text());
    json(&reply)
}

#[tokio::test]
async fn get_post_headers_and_error_status() {
    let web = HttpServer::start();
    let setup = start(&[]).await;

    let hello = call(&setup, "call", serde_json::json!({ "url": web.url("/hello") })).await;
    assert_eq!(hello["status"], 200);
    assert_eq!(hello["body"], "hello");
    assert_eq!(hello["header"], "yes");

    let opts = serde_json::json!({ "method": "put", "headers": { "X-Custom": "abc" }, "body": "raw text" });
    let put = call(&setup, "call", serde_json::json!({ "url": web.url("/echo"), "opts": opts, "json": true })).await;
    assert_eq!(put["json"]["method"], "PUT");
    assert_eq!(put["json"]["custom"], "abc");
    assert_eq!(put["json"]["body"], "raw text");

    let posted = call(&setup, "post", serde_json::json!({ "url": web.url("/echo") })).await;
    assert_eq!(posted["method"], "POST");
    assert_eq!(posted["content_type"], "application/json");
    assert_eq!(posted["body"], r#"{"n":1}"#);

    let got = request(&setup.client, "get", &serde_json::json!({ "url": web.url("/hello") }).to_string()).await;
    assert_eq!(body(&got), "hello");

    let missing = call(&setup, "call", serde_json::json!({ "url": web.url("/status/404") })).await;
    assert_eq!(missing["status"], 404, "an HTTP error status is a normal return");
    assert_eq!(missing["body"], "status 404");
}

#[tokio::test]
async fn transport_failures_raise_502_or_504_without_credentials() {
    let web = HttpServer::start();
    let setup = start(&["--http-max-body", "1MiB"]).await;

    let slow = web.url("/slow").replace("http://", "http://user:secret@");
    let timed_out = call(&setup, "call", serde_json::json!({ "url": slow, "opts": { "timeout": "200ms" } })).await;
    assert_eq!(timed_out["code"], 504, "{timed_out}");
    let message = timed_out["message"].as_str().unwrap();
    assert!(message.contains("/slow") && !message.contains("secret"), "{message}");

    let refused = format!("http://127.0.0.1:{}/", free_port());
    let refused = call(&setup, "call", serde_json::json!({ "url": refused })).await;
    assert_eq!(refused["code"], 502, "{refused}");

    let big = call(&setup, "call", serde_json::json!({ "url": web.url("/big") })).await;
    assert_eq!(big["code"], 502, "{big}");
    assert!(big["message"].as_str().unwrap().contains("--http-max-body"), "{big}");
}

#[tokio::test]
async fn deadline_cancels_the_request_and_closes_its_connection() {
    let web = HttpServer::start();
    // 2 s: time for the request to reach the server on a loaded machine.
    let setup = start(&["--handler-timeout", "2s"]).await;
    let client = setup.client.clone();
    let payload = serde_json::json!({ "url": web.url("/slow") }).to_string();
    let pending = tokio::spawn(async move { request(&client, "hang", &payload).await });
    let deadline = Instant::now() + PATIENCE;
    while web.slow_in_flight() == 0 {
        assert!(Instant::now() < deadline, "the slow request never reached the server");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reply = pending.await.unwrap();
    let (code, _) = error_of(&reply).expect("the handler times out");
    assert_eq!(code, 504);
    // The server sees the connection close and drops its handler; generous bound
    // for a loaded machine.
    let deadline = Instant::now() + PATIENCE;
    while web.slow_in_flight() > 0 {
        assert!(Instant::now() < deadline, "the bridge kept the slow request open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn allow_list_refuses_other_hosts() {
    let web = HttpServer::start();
    let setup = start(&["--http-allow", "api.example.com,localhost:1"]).await;
    let refused = call(&setup, "call", serde_json::json!({ "url": web.url("/hello") })).await;
    assert_eq!(refused["code"], 403, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("--http-allow"), "{refused}");

    let allowed = format!("127.0.0.1:{}", web.addr.port());
    let setup = start(&["--http-allow", &allowed]).await;
    let hello = call(&setup, "call", serde_json::json!({ "url": web.url("/hello") })).await;
    assert_eq!(hello["status"], 200);
}

#[tokio::test]
async fn private_ca_over_https() {
    let secure = HttpsServer::start();
    let url = format!("https://127.0.0.1:{}/", secure.addr.port());

    let setup = start(&[]).await;
    let untrusted = call(&setup, "call", serde_json::json!({ "url": url })).await;
    assert_eq!(untrusted["code"], 502, "an unknown CA is refused: {untrusted}");

    let scripts = Scripts::new();
    let ca = scripts.write("ca.pem", &secure.ca_pem);
    let setup = start(&["--http-ca", ca.to_str().unwrap()]).await;
    let trusted = call(&setup, "call", serde_json::json!({ "url": url })).await;
    assert_eq!(trusted["status"], 200, "{trusted}");
    assert_eq!(trusted["body"], "secure");
}

#[tokio::test]
async fn requests_carry_the_events_traceparent() {
    let web = HttpServer::start();
    let setup = start(&[]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let payload = serde_json::json!({ "url": web.url("/echo"), "json": true });
    let reply =
        request_with(&setup.client, "call", Some(headers(&[("traceparent", traceparent)])), &payload.to_string()).await;
    assert_eq!(json(&reply)["json"]["traceparent"], traceparent);
}

#[tokio::test]
async fn calls_yield_so_one_vm_runs_many_at_once() {
    let web = HttpServer::start();
    let setup = start(&["--concurrency", "64"]).await;
    let payload = serde_json::json!({ "url": web.url("/wait") }).to_string();
    let started = Instant::now();
    let calls = (0..50).map(|_| request(&setup.client, "get", &payload));
    let replies = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    assert!(replies.iter().all(|r| body(r) == "waited"));
    // 50 calls one after another take 10 s; concurrent ones about 200 ms. The
    // bound leaves a loaded machine plenty of room and still fails serial calls.
    assert!(elapsed < Duration::from_secs(5), "50 calls took {elapsed:?}");
}

#[test]
fn check_refuses_http_naming_the_bridge() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", r#"http.get("http://127.0.0.1:1/")"#);
    let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("http.request is not available"), "{stderr}");
}

#[tokio::test]
async fn the_webhook_example_posts_the_event() {
    let web = HttpServer::start();
    let server = server();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/examples/webhook.lua");
    let url = server.url();
    let worker = Worker::spawn_with_env(
        &["run", example, "--nats-url", &url, "--workers", "1"],
        &[("WEBHOOK_URL", &web.url("/echo"))],
    );
    worker.expect_ready();
    let client = client(&server).await;
    let reply = request(&client, "orders.created", r#"{"id":42}"#).await;
    assert_eq!(error_of(&reply), None, "{}", worker.stderr.text());
    assert_eq!(json(&reply), serde_json::json!({ "delivered": true, "status": 200 }));
    drop(worker);
    let failing = Worker::spawn_with_env(
        &["run", example, "--nats-url", &url, "--workers", "1", "--name", "failing"],
        &[("WEBHOOK_URL", &web.url("/status/500"))],
    );
    failing.expect_ready();
    let reply = request(&client, "orders.created", r#"{"id":43}"#).await;
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(502));
}

#[test]
fn an_unreadable_ca_file_stops_the_worker_at_start() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('x')");
    let not_pem = scripts.write("ca.pem", "not a certificate");
    let args = ["run", script.to_str().unwrap(), "--http-ca", not_pem.to_str().unwrap()];
    let (code, _, stderr) = run_command(&args, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--http-ca"), "{stderr}");
}

#[tokio::test]
async fn repeated_headers_json_on_a_text_body_redirects_and_dns() {
    let web = HttpServer::start();
    let setup = start(&[]).await;
    let details = call(&setup, "details", serde_json::json!({ "url": web.url("/repeated") })).await;
    assert_eq!(details["multi"], "a, b", "repeated response headers are joined: {details}");
    assert_eq!(details["json_ok"], false, "json raises on a body that is not JSON: {details}");

    let ten = call(&setup, "call", serde_json::json!({ "url": web.url("/redirect/10") })).await;
    assert_eq!((ten["status"].clone(), ten["body"].clone()), (200.into(), "landed".into()), "{ten}");
    let eleven = call(&setup, "call", serde_json::json!({ "url": web.url("/redirect/11") })).await;
    assert_eq!(eleven["code"], 502, "an eleventh redirect fails: {eleven}");
    assert!(eleven["message"].as_str().unwrap().contains("redirect"), "{eleven}");

    let unknown = call(&setup, "call", serde_json::json!({ "url": "http://no-such-host.invalid/" })).await;
    assert_eq!(unknown["code"], 502, "a DNS failure: {unknown}");
}

#[tokio::test]
async fn a_redirect_must_stay_within_the_allow_list() {
    let web = HttpServer::start();
    let port = web.addr.port();
    let setup = start(&["--http-allow", &format!("127.0.0.1:{port}")]).await;
    let within = call(&setup, "call", serde_json::json!({ "url": web.url("/redirect/2") })).await;
    assert_eq!(within["body"], "landed", "{within}");
    let away = call(&setup, "call", serde_json::json!({ "url": web.url(&format!("/away/{port}")) })).await;
    assert_eq!(away["failed"], true, "a redirect to localhost is outside the list: {away}");
    assert!(away["message"].as_str().unwrap().contains("--http-allow"), "{away}");
}

#[tokio::test]
async fn a_call_ends_before_the_handlers_deadline() {
    let web = HttpServer::start();
    let setup = start(&["--handler-timeout", "1s"]).await;
    let mut ended = setup.client.subscribe("ended").await.unwrap();
    setup.client.flush().await.unwrap();
    // Without a timeout of its own the call ends 20 ms before the deadline,
    // raising the timeout, and the handler sees it end.
    let reply = request(&setup.client, "bounded", &serde_json::json!({ "url": web.url("/slow") }).to_string()).await;
    let bounded = json(&next(&mut ended).await);
    assert_eq!(bounded["ok"], false, "{bounded}");
    assert!(bounded["error"].as_str().unwrap().contains("timed out"), "{bounded}");
    let elapsed = bounded["elapsed"].as_f64().unwrap();
    // Before the deadline is the promise; the lower bound only shows the call
    // waited (generous: the handler may start late on a loaded machine).
    assert!((0.5..1.0).contains(&elapsed), "ended {elapsed} s into a 1 s deadline");
    // What the requester gets depends on whether the handler returned in those 20 ms.
    assert!(body(&reply) == "caught" || error_of(&reply).is_some_and(|e| e.0 == 504), "{:?}", body(&reply));
}
