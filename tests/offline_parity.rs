//! `agent-block test` runs the production Lua API over fakes at its boundaries:
//! the same handler file gives the same outcome and the same error texts under a
//! real worker (NATS with JetStream KV, a real HTTP server) and offline.

mod common;
#[path = "common/http_server.rs"]
#[allow(dead_code)] // this test uses the plain HTTP server only
mod http_server;

use common::*;
use http_server::HttpServer;

/// Every failure a handler commonly turns into text: a bad argument, a response
/// that is not JSON, a KV compare-and-set conflict; and repeated response
/// headers.
const APP: &str = r#"
bus.subscribe("parity")
bus.on("parity", function(ev)
  local url = ev.payload.url
  local out = {}
  local _, err = pcall(http.request, url .. "/hello", { method = 5 })
  out.bad_argument = tostring(err)
  local response = http.get(url .. "/hello")
  out.status, out.body = response.status, response.body
  _, err = pcall(function() return response.json end)
  out.not_json = tostring(err)
  out.repeated = http.get(url .. "/repeated").headers["x-multi"]
  kv.bucket("parity")
  local revision = kv.put("parity", "k", "v1")
  _, err = pcall(kv.update, "parity", "k", "v2", revision + 5)
  out.conflict, out.conflict_code = tostring(err), err.code
  return out
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_fails_alike_offline_and_against_real_services() {
    let http = HttpServer::start();
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let _worker = Worker::run(&server, &script, &["--workers", "1"]);
    let base = http.url("");
    let body = format!("{{\"url\":{:?}}}", base.trim_end_matches('/'));
    let live = json(&request(&client(&server).await, "parity", &body).await);
    assert_eq!(live["status"], 200, "{live}");
    assert!(live["conflict_code"] == 409 && live["not_json"].is_string(), "{live}");

    let repeated = live["repeated"].as_str().unwrap_or_default();
    let test_file = scripts.write(
        "app_test.lua",
        &format!(
            r#"local w = test.worker("app.lua", {{ kv = {{ parity = {{}} }} }})
test("the same outcome as against real services", function()
  test.http("GET https://parity.test/hello", "hello")
  test.http("GET https://parity.test/repeated", {{ status = 200, headers = {{ ["x-multi"] = {{ {parts} }} }} }})
  local out = w:send("parity", {{ url = "https://parity.test" }})
  test.eq(out.payload, json.decode([==[{live}]==]))
end)
"#,
            parts = repeated.split(", ").map(|part| format!("{part:?}")).collect::<Vec<_>>().join(", "),
        ),
    );
    let (code, stdout, stderr) = run_command(&["test", test_file.to_str().unwrap()], None);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}
