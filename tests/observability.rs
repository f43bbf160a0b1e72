//! Observability: event spans exported to real OTLP receivers (HTTP and gRPC)
//! started by the test, trace context carried by replies, requests and dead
//! letters, `/metrics` linted by `promtool`, and NATS service discovery.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::sync::Notify;

const APP: &str = r#"
bus.subscribe("orders")
bus.subscribe("stock", { queue = "stock-pool" })
bus.subscribe("fail")

bus.on("orders", function(ev)
  log.info("ordering", { item = ev.payload.item })
  local stock = nats.request("stock", { item = ev.payload.item })
  return { stock = stock.payload.count, trace_id = ev.meta.trace_id, span_id = ev.meta.span_id }
end)
bus.on("stock", function(ev) return { count = 7 } end)
bus.on("fail", function(ev) error({ code = 422, message = "bad order" }) end)
"#;

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A span as the receiver got it, with its resource's service name.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        let value = self.span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
        Some(match value {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an OTLP receiver collected, and the `x-`headers of the HTTP requests.
#[derive(Clone, Default)]
struct Spans(Arc<(Mutex<Vec<Received>>, Notify)>, Arc<Mutex<Vec<(String, String)>>>);

impl Spans {
    fn headers(&self) -> Vec<(String, String)> {
        self.1.lock().unwrap().clone()
    }

    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref().cloned())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received { service: service.clone(), span });
                }
            }
        }
        self.0.1.notify_waiters();
    }

    /// Waits for a span named `name`.
    async fn wait_for(&self, name: &str) -> Received {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.0.1.notified();
                if let Some(span) = self.0.0.lock().unwrap().iter().find(|s| s.span.name == name) {
                    return span.clone();
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no span {name:?} received; got {:?}", self.names()))
    }

    fn names(&self) -> Vec<String> {
        self.0.0.lock().unwrap().iter().map(|s| s.span.name.clone()).collect()
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
async fn http_receiver() -> (String, Spans) {
    let spans = Spans::default();
    let collected = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let collected = collected.clone();
            async move {
                for (name, value) in &headers {
                    if name.as_str().starts_with("x-") {
                        let value = value.to_str().unwrap_or_default().to_string();
                        collected.1.lock().unwrap().push((name.to_string(), value));
                    }
                }
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => collected.add(request),
                    Err(err) => panic!("the exporter sent a body that is not OTLP protobuf: {err}"),
                }
                let response = ExportTraceServiceResponse::default().encode_to_vec();
                ([("content-type", "application/x-protobuf")], response)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

struct GrpcReceiver(Spans);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for (name, value) in request.metadata().clone().into_headers().iter() {
            if name.as_str().starts_with("x-") {
                let value = value.to_str().unwrap_or_default().to_string();
                self.0.1.lock().unwrap().push((name.to_string(), value));
            }
        }
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver.
async fn grpc_receiver() -> (String, Spans) {
    let spans = Spans::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(GrpcReceiver(spans.clone()));
    let incoming = tokio_stream_of(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (format!("http://{addr}"), spans)
}

fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

fn run_traced(server: &NatsServer, script: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Worker {
    let url = server.url();
    let mut all = vec!["run", script.to_str().unwrap(), "--nats-url", &url, "--name", "shop"];
    all.extend_from_slice(args);
    let worker = Worker::spawn_with_env(&all, env);
    worker.expect_ready();
    worker
}

// The receivers run on the test's runtime while the test blocks on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_http_receiver_and_continue_the_callers_trace() {
    let (endpoint, spans) = http_receiver().await;
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    // A short batch delay so the spans arrive while the worker runs; headers as
    // collectors' API keys are given, the traces' own overriding the general ones.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cr%3Dt,x-team=ops"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=shop"),
    ];
    let worker = run_traced(&server, &script, &env, &["--workers", "2"]);
    let client = client(&server).await;

    // Go clients spell the header `Traceparent`.
    let reply = request_with(&client, "orders", Some(headers(&[("Traceparent", INCOMING)])), r#"{"item":"tea"}"#).await;
    let answer = json(&reply);
    assert_eq!(answer["stock"], 7);
    assert_eq!(answer["trace_id"], TRACE_ID, "ev.meta.trace_id is the caller's trace");
    let handler_span = answer["span_id"].as_str().expect("ev.meta.span_id").to_string();
    let reply_parent = reply.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.as_str().to_string());
    assert_eq!(reply_parent, Some(format!("00-{TRACE_ID}-{handler_span}-01")), "the reply names the handler's span");

    let orders = spans.wait_for("process orders").await;
    let sent = spans.headers();
    assert!(sent.contains(&("x-api-key".to_string(), "s3cr=t".to_string())), "{sent:?}");
    assert!(sent.contains(&("x-team".to_string(), "shop".to_string())), "{sent:?}");
    assert!(!sent.contains(&("x-team".to_string(), "ops".to_string())), "{sent:?}");
    assert!(!worker.stderr.text().contains("s3cr"), "the API key is never logged");
    assert_eq!(orders.service, "shop", "the service is named after --name");
    assert_eq!(hex(&orders.span.trace_id), TRACE_ID);
    assert_eq!(orders.parent_id(), "00f067aa0ba902b7", "the caller's span is the parent");
    assert_eq!(orders.span_id(), handler_span);
    assert_eq!(orders.span.kind, 5, "SPAN_KIND_CONSUMER");
    for (key, value) in [
        ("messaging.system", "nats"),
        ("messaging.destination.name", "orders"),
        ("messaging.operation.type", "process"),
        ("messaging.consumer.group.name", "shop"),
        ("messaging.message.body.size", "14"),
        ("agent_block.kind", "orders"),
        ("agent_block.outcome", "ack"),
    ] {
        assert_eq!(orders.attribute(key).as_deref(), Some(value), "{key}");
    }
    assert!(orders.attribute("messaging.message.id").is_some());

    // The handler's nats.request carried its span: the downstream span is a child.
    let stock = spans.wait_for("process stock").await;
    assert_eq!(hex(&stock.span.trace_id), TRACE_ID);
    assert_eq!(stock.parent_id(), orders.span_id());
    assert_eq!(stock.attribute("messaging.consumer.group.name").as_deref(), Some("stock-pool"));

    let failed = request(&client, "fail", "{}").await;
    assert_eq!(error_of(&failed).map(|e| e.0), Some(422));
    let fail = spans.wait_for("process fail").await;
    let status = fail.span.status.clone().expect("status");
    assert_eq!(status.code, 2, "STATUS_CODE_ERROR");
    assert_eq!(status.message, "bad order");
    assert_eq!(fail.attribute("agent_block.outcome").as_deref(), Some("error"));

    // log.* records carry the trace and the handler's span.
    let log = worker.stderr.text();
    let line = log.lines().find(|l| l.contains("\"ordering\"")).expect("log line of the handler");
    let record: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(record["trace_id"], TRACE_ID);
    assert_eq!(record["span_id"], handler_span.as_str());
}

// The receivers run on the test's runtime while the test blocks on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_flushes_the_last_spans_at_shutdown() {
    let (endpoint, spans) = grpc_receiver().await;
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    // A batch delay far beyond the test: only the shutdown flush sends the span.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SERVICE_NAME", "shop-grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X-Api-Key=s3cr%3Dt"),
    ];
    let mut worker = run_traced(&server, &script, &env, &[]);
    let client = client(&server).await;
    let reply = request(&client, "stock", "{}").await;
    assert_eq!(json(&reply)["count"], 7);
    assert!(spans.names().is_empty(), "nothing is exported before the batch is due");
    worker.terminate();
    let status = worker.wait_exit(PATIENCE).expect("the worker exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}; log:\n{}", worker.stderr.text());
    let stock = spans.wait_for("process stock").await;
    assert_eq!(stock.service, "shop-grpc");
    let sent = spans.headers();
    assert!(sent.contains(&("x-api-key".to_string(), "s3cr=t".to_string())), "gRPC metadata: {sent:?}");
    assert_eq!(stock.span.parent_span_id, Vec::<u8>::new(), "no incoming trace: a root span");
}

/// A collector that accepts connections and never answers, counting them; the
/// connections stay open for the life of the test.
struct SilentCollector {
    endpoint: String,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentCollector {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", free_port())).expect("bind the silent collector");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().map_while(Result::ok) {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream);
            }
        });
        SilentCollector { endpoint, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_collector_that_never_answers_neither_fails_nor_slows_the_worker() {
    let collector = SilentCollector::start();
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    // A queue of 8 spans: what the hung export cannot take is dropped and counted.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "8"),
    ];
    let url = server.url();
    let (mut worker, addr) = with_probes(|addr| {
        let args = ["run", script.to_str().unwrap(), "--nats-url", &url, "--name", "shop", "--metrics-addr", addr];
        Worker::spawn_with_env(&args, &env)
    });
    worker.expect_ready();
    let client = client(&server).await;
    // Requests until an export hangs on the collector.
    let deadline = std::time::Instant::now() + PATIENCE;
    while collector.accepted() == 0 {
        assert!(std::time::Instant::now() < deadline, "no export was attempted");
        assert_eq!(json(&request(&client, "stock", "{}").await)["count"], 7);
    }
    // While it hangs (the exporter waits 10 s for an answer), requests are
    // answered as fast as ever: a request takes milliseconds; 1 s only catches
    // one waiting on the export.
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let started = std::time::Instant::now();
        assert_eq!(json(&request(&client, "stock", "{}").await)["count"], 7);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "a request took {slowest:?} while the export hung");
    let page = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics")).await.unwrap().expect("scrape");
    let dropped = page
        .1
        .lines()
        .find_map(|line| line.strip_prefix("agent_block_spans_dropped_total "))
        .and_then(|count| count.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no span drop count on the metrics page:\n{}", page.1));
    // 200 spans while one batch hangs: at most 8 wait in the queue.
    assert!(dropped >= 150, "{dropped} spans counted as dropped");
    assert!(worker.stderr.text().contains("span export queue full"), "log:\n{}", worker.stderr.text());
    worker.terminate();
    // The exporter gives up after its bounded shutdown wait (3 s); PATIENCE is
    // far above it.
    let status = worker.wait_exit(PATIENCE).expect("the worker exits although the collector never answers");
    assert!(status.success(), "log:\n{}", worker.stderr.text());
}

// The receivers run on the test's runtime while the test blocks on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_the_handlers_span() {
    let (endpoint, spans) = http_receiver().await;
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
bus.consume({ stream = "JOBS", consumer = "work", subject = "jobs.>", max_deliver = 1,
  dead_letter = "dead.jobs", create_stream = { subjects = { "jobs.>" } } })
bus.on("jobs.bad", function(ev) error("cannot do it") end)
"#,
    );
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let _worker = run_traced(&server, &script, &env, &[]);
    let client = client(&server).await;
    let mut dead = client.subscribe("dead.jobs").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    let mut message = async_nats::HeaderMap::new();
    message.insert("traceparent", INCOMING);
    js.publish_with_headers("jobs.bad", message, "{}".into()).await.unwrap().await.unwrap();
    let letter = next(&mut dead).await;
    let span = spans.wait_for("process jobs.bad").await;
    assert_eq!(span.attribute("messaging.consumer.group.name").as_deref(), Some("work"));
    let traceparent = letter.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.as_str().to_string());
    assert_eq!(traceparent, Some(format!("00-{TRACE_ID}-{}-01", span.span_id())));
}

#[tokio::test]
async fn the_metrics_page_counts_events_and_passes_promtool() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write(
        "app.lua",
        r#"
bus.subscribe("orders")
bus.subscribe("fail")
bus.consume({ stream = "JOBS", consumer = "work", subject = "jobs.>", max_deliver = 1,
  dead_letter = "dead.jobs", create_stream = { subjects = { "jobs.>" } } })
bus.on("orders", function(ev) return "ok" end)
bus.on("stock", function(ev) return { count = 7 } end)
bus.on("fail", function(ev) error({ code = 422, message = "bad order" }) end)
bus.on("jobs.bad", function(ev) error("cannot do it") end)
"#,
    );
    let url = server.url();
    let (worker, addr) = with_probes(|addr| {
        Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--metrics-addr", addr, "--workers", "2"])
    });
    worker.expect_ready();
    let client = client(&server).await;
    for _ in 0..3 {
        request(&client, "orders", "{}").await;
    }
    request(&client, "fail", "{}").await;
    let mut dead = client.subscribe("dead.jobs").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    js.publish("jobs.bad", "{}".into()).await.unwrap().await.unwrap();
    next(&mut dead).await;

    // The dead letter arrives before its settling has counted it: scrape until
    // the count shows (the bound catches a count that never comes).
    let dead_lettered = "agent_block_jetstream_dead_letters_total{stream=\"JOBS\",consumer=\"work\"} 1";
    let deadline = std::time::Instant::now() + PATIENCE;
    let page = loop {
        let scrape = addr.clone();
        let page = tokio::task::spawn_blocking(move || http_get(&scrape, "/metrics")).await.unwrap().expect("scrape");
        assert_eq!(page.0, 200);
        if page.1.contains(dead_lettered) || std::time::Instant::now() > deadline {
            break page.1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for expected in [
        "agent_block_events_total{kind=\"orders\",outcome=\"ack\"} 3",
        "agent_block_events_total{kind=\"fail\",outcome=\"error\"} 1",
        "agent_block_handler_duration_seconds_count{kind=\"orders\"} 3",
        "agent_block_handlers_in_flight 0",
        "agent_block_queued_events 0",
        "agent_block_intake_rejected_total 0",
        "agent_block_nats_connected 1",
        "agent_block_nats_connections{state=\"connected\"} 3",
        "agent_block_nats_reconnects_total 0",
        "agent_block_jetstream_dead_letters_total{stream=\"JOBS\",consumer=\"work\"} 1",
        "agent_block_jetstream_pull_batch_messages_count{stream=\"JOBS\",consumer=\"work\"}",
    ] {
        assert!(page.contains(expected), "missing {expected:?} in:\n{page}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &page).unwrap();
    let lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool runs (Debian package `prometheus`; tests/run installs it)");
    assert!(
        lint.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}

#[tokio::test]
async fn discovery_answers_ping_info_and_stats_for_the_process() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let _worker = Worker::run(&server, &script, &["--name", "shop", "--workers", "2"]);
    let client = client(&server).await;
    for _ in 0..4 {
        request(&client, "stock", "{}").await;
    }
    request(&client, "fail", "{}").await;

    // Every instance answers a plain PING; one process is one instance.
    let reply_to = client.new_inbox();
    let mut inbox = client.subscribe(reply_to.clone()).await.unwrap();
    let ping_inbox = reply_to.clone();
    client.publish_with_reply("$SRV.PING", reply_to, "".into()).await.unwrap();
    let ping = json(&next(&mut inbox).await);
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "shop");
    let id = ping["id"].as_str().expect("instance id").to_string();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut inbox)).await.is_err(),
        "a second answer would mean one instance per VM"
    );
    // A marker to the same inbox comes next: no second answer was on its way.
    client.publish(ping_inbox.clone(), "marker".into()).await.unwrap();
    assert_eq!(body(&next(&mut inbox).await), "marker", "a second answer came before the marker");

    let info = json(&request(&client, "$SRV.INFO.shop", "").await);
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    let endpoints = info["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 3);
    assert_eq!(endpoints[1]["subject"], "stock");
    assert_eq!(endpoints[1]["queue_group"], "stock-pool");

    let stats = json(&request(&client, &format!("$SRV.STATS.shop.{id}"), "").await);
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    let stock = &stats["endpoints"][1];
    assert_eq!(stock["num_requests"], 4, "summed over both VMs: {stats}");
    assert_eq!(stock["num_errors"], 0);
    let fail = &stats["endpoints"][2];
    assert_eq!(fail["num_errors"], 1);
    assert_eq!(fail["last_error"], "422:bad order");
    assert!(stock["processing_time"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn export_settings_are_checked_at_start() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    let url = server.url();
    let args = ["run", script.to_str().unwrap(), "--nats-url", &url];

    let mut refused = Worker::spawn_with_env(
        &args,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
    );
    let status = refused.wait_exit(PATIENCE).expect("an unsupported protocol stops the worker");
    assert_eq!(status.code(), Some(2));
    assert!(refused.stderr.text().contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\" is not supported"));

    // Disabled, nothing reaches the collector, not even the spans a shutdown
    // would flush (enabled, the test above sees the same collector contacted).
    let collector = SilentCollector::start();
    let mut disabled = Worker::spawn_with_env(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    disabled.expect_ready();
    let client = client(&server).await;
    for _ in 0..20 {
        assert_eq!(json(&request(&client, "stock", "{}").await)["count"], 7);
    }
    disabled.terminate();
    let status = disabled.wait_exit(PATIENCE).expect("the worker exits");
    assert!(status.success(), "log:\n{}", disabled.stderr.text());
    assert_eq!(collector.accepted(), 0, "OTEL_SDK_DISABLED=true: no export is attempted");
    assert!(!disabled.stderr.text().contains("exporting event spans"), "OTEL_SDK_DISABLED=true turns export off");
}
