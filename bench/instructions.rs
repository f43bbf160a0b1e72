//! Instructions per event: agent-block against plain programs doing the same job,
//! counted by valgrind's callgrind instead of timed.
//!
//! `cargo bench --bench instructions` starts one private nats-server and runs each
//! responder under `valgrind --tool=callgrind --instr-atstart=no`. Once the
//! responder is ready, `callgrind_control -i on` starts counting; the load runs;
//! after the last event `callgrind_control -d` dumps the count. So only the window
//! from ready to the last event is counted: user-space instructions of all the
//! responder's threads, start-up and shutdown excluded. The workloads:
//!
//! - request/reply: 128-byte JSON requests, 16 in flight. agent-block runs
//!   `bench/echo.lua` (`return ev.payload`) with `--workers 1`; the plain program
//!   is an async-nats responder that decodes each payload into a
//!   `serde_json::Value` and encodes it again.
//! - JetStream: messages published to a stream after the consumer is ready.
//!   agent-block runs `bench/consume.lua` (reads `ev.payload`, returns `true`);
//!   the plain program is an async-nats pull consumer that parses each payload and
//!   acks it. Counted until the consumer has acked every message.
//! - request/reply with every span exported over OTLP/HTTP to a receiver in this
//!   process, reported as the instructions added per event.
//!
//! The plain programs are this binary re-executed with `BENCH_ROLE`. Settings:
//! `BENCH_REQUESTS` (default 10000), `BENCH_MESSAGES` (default 10000),
//! `NATS_SERVER_BIN`, `BENCH_PROFILES` (a folder to keep the callgrind profiles
//! in, for `callgrind_annotate`). valgrind is installed with apt-get when missing. Without
//! `--bench` it makes a quick smoke pass whose figures mean nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/callgrind.rs"]
mod callgrind;
#[path = "support/children.rs"]
mod children;
#[path = "support/otlp.rs"]
mod otlp;
use callgrind::ensure_valgrind;
use children::{ChildGuard, Lines, log_message};

use agent_block::nats_server::NatsServer;
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;

const ECHO_SUBJECT: &str = "bench.echo";
const STREAM: &str = "BENCH";
const JS_SUBJECT: &str = "bench.js";
const IN_FLIGHT: usize = 16;
/// Start-up under callgrind is some 50 times slower than native.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// A request or a drain that takes this long means a responder is stuck.
const EVENT_LIMIT: Duration = Duration::from_secs(300);
/// The line the plain programs print once they serve.
const PLAIN_READY: &str = "plain ready";

const TARGET_REQUEST_RATIO: f64 = 2.0;
const TARGET_JETSTREAM_RATIO: f64 = 2.5;
const TARGET_EXPORT_EXTRA: f64 = 6_000.0;

fn main() -> ExitCode {
    let result = match std::env::var("BENCH_ROLE").as_deref() {
        Ok("json-echo") => plain::run(plain::json_echo()),
        Ok("pull-ack") => plain::run(plain::pull_ack()),
        _ => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("instructions benchmark: {message}");
            ExitCode::FAILURE
        }
    }
}

fn setting(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(text) => text.parse().map_err(|_| format!("{name}={text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<(), String> {
    let full = std::env::args().any(|arg| arg == "--bench");
    let requests = setting("BENCH_REQUESTS", if full { 10_000 } else { 300 })?;
    let messages = setting("BENCH_MESSAGES", if full { 10_000 } else { 300 })?;
    if !full {
        println!("smoke pass (no --bench): the figures below mean nothing; run `cargo bench --bench instructions`");
    }
    ensure_valgrind()?;
    let server = NatsServer::start()?;
    let url = server.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start a runtime: {err}"))?;
    let _entered = runtime.enter();
    let client = runtime
        .block_on(async_nats::connect(&url))
        .map_err(|err| format!("cannot connect to the benchmark's nats-server: {err}"))?;
    let workdir = tempfile::tempdir().map_err(|err| format!("cannot create a temporary folder: {err}"))?;
    let dir = match std::env::var_os("BENCH_PROFILES") {
        Some(dir) => PathBuf::from(dir),
        None => workdir.path().to_path_buf(),
    };
    std::fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let counter = Counter { dir, url: url.clone() };
    let receiver = otlp::Receiver::start()?;

    let requests_load = |client: &async_nats::Client| runtime.block_on(request_load(client, requests));
    let plain_echo = counter.count("plain json echo", Responder::Plain("json-echo"), || requests_load(&client))?;
    let agent_echo =
        counter.count("agent-block echo", Responder::Agent(AgentRun::echo()), || requests_load(&client))?;
    let traced = AgentRun { otlp_port: Some(receiver.port), ..AgentRun::echo() };
    let agent_traced = counter.count("agent-block echo + OTLP", Responder::Agent(traced), || requests_load(&client))?;

    let js = jetstream::new(client.clone());
    runtime.block_on(create_stream(&js))?;
    let drain = |name: &str| runtime.block_on(publish_and_drain(&js, name, messages));
    runtime.block_on(create_consumer(&js, "plain"))?;
    let plain_js = counter.count("plain pull consumer", Responder::Plain("pull-ack"), || drain("plain"))?;
    // agent-block creates its consumer itself, on a stream emptied of the plain run.
    runtime.block_on(purge(&js))?;
    let agent_js =
        counter.count("agent-block consumer", Responder::Agent(AgentRun::consume("agent")), || drain("agent"))?;

    let per = |total: u64, events: usize| total as f64 / events as f64;
    let (plain_echo, agent_echo, agent_traced) =
        (per(plain_echo, requests), per(agent_echo, requests), per(agent_traced, requests));
    let (plain_js, agent_js) = (per(plain_js, messages), per(agent_js, messages));
    println!();
    println!("instructions per event (callgrind, ready to last event, all threads of the responder):");
    println!("| workload | agent-block | plain | ratio | target |");
    println!("| --- | ---: | ---: | ---: | --- |");
    row(&format!("request/reply, {requests} requests"), agent_echo, plain_echo, TARGET_REQUEST_RATIO);
    row(&format!("JetStream, {messages} messages"), agent_js, plain_js, TARGET_JETSTREAM_RATIO);
    let extra = agent_traced - agent_echo;
    let verdict = if extra <= TARGET_EXPORT_EXTRA { "PASS" } else { "FAIL" };
    println!(
        "| request/reply, spans exported over OTLP | {} | +{} over the row above | | <= +{} {verdict} |",
        thousands(agent_traced),
        thousands(extra),
        thousands(TARGET_EXPORT_EXTRA)
    );
    println!("(the OTLP receiver took {} export requests)", receiver.batches());
    Ok(())
}

fn row(workload: &str, agent: f64, plain: f64, target: f64) {
    let ratio = agent / plain;
    let verdict = if ratio <= target { "PASS" } else { "FAIL" };
    println!("| {workload} | {} | {} | {ratio:.2}x | <= {target:.1}x {verdict} |", thousands(agent), thousands(plain));
}

fn thousands(count: f64) -> String {
    format!("{:.1}k", count / 1000.0)
}

/// An agent-block worker to count.
struct AgentRun {
    script: &'static str,
    consumer: Option<&'static str>,
    otlp_port: Option<u16>,
}

impl AgentRun {
    fn echo() -> Self {
        AgentRun { script: "bench/echo.lua", consumer: None, otlp_port: None }
    }

    fn consume(consumer: &'static str) -> Self {
        AgentRun { script: "bench/consume.lua", consumer: Some(consumer), otlp_port: None }
    }
}

enum Responder {
    /// This binary in the given `BENCH_ROLE`.
    Plain(&'static str),
    Agent(AgentRun),
}

/// Runs responders under callgrind and counts their instructions over a load.
struct Counter {
    dir: PathBuf,
    url: String,
}

impl Counter {
    /// Starts `responder` under callgrind, counts its instructions while `load`
    /// runs, and stops it.
    fn count(
        &self,
        label: &str,
        responder: Responder,
        load: impl FnOnce() -> Result<(), String>,
    ) -> Result<u64, String> {
        let out_file = self.dir.join(format!("{}.callgrind", label.replace(' ', "-")));
        let mut command = Command::new("valgrind");
        command
            .arg("--tool=callgrind")
            .arg("--instr-atstart=no")
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(format!("--log-file={}", self.dir.join(format!("{}.valgrind.log", label.replace(' ', "-"))).display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &responder {
            Responder::Plain(role) => {
                let exe = std::env::current_exe().map_err(|err| format!("cannot find the benchmark binary: {err}"))?;
                command.arg(exe).env("BENCH_ROLE", role).env("BENCH_NATS_URL", &self.url);
            }
            Responder::Agent(run) => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(run.script);
                command.arg(env!("CARGO_BIN_EXE_agent-block")).arg("run").arg(script).args([
                    "--nats-url",
                    &self.url,
                    "--workers",
                    "1",
                    "--log-format",
                    "json",
                ]);
                // Settings from the caller's environment would make the counts incomparable.
                for (name, _) in std::env::vars_os() {
                    let name = name.to_string_lossy();
                    if name.starts_with("AGENT_BLOCK_")
                        || name.starts_with("OTEL_")
                        || matches!(&*name, "RUST_LOG" | "NATS_URL")
                    {
                        command.env_remove(&*name);
                    }
                }
                if let Some(consumer) = run.consumer {
                    command.env("BENCH_CONSUMER", consumer);
                }
                if let Some(port) = run.otlp_port {
                    command.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
                }
            }
        }
        let mut child = command.spawn().map_err(|err| format!("cannot start valgrind: {err}"))?;
        let stdin = child.stdin.take();
        let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let guard = match responder {
            Responder::Plain(_) => {
                let mut guard = ChildGuard { child, _stdin: stdin, lines: Lines::follow(stdout) };
                guard.lines.wait_for(label, READY_LIMIT, |line| line == PLAIN_READY)?;
                guard
            }
            Responder::Agent(_) => {
                let mut guard = ChildGuard { child, _stdin: stdin, lines: Lines::follow(stderr) };
                guard
                    .lines
                    .wait_for(label, READY_LIMIT, |line| log_message(line).as_deref() == Some("worker ready"))?;
                guard
            }
        };
        let pid = guard.pid().to_string();
        callgrind_control(&["-i", "on", &pid])?;
        load()?;
        callgrind_control(&["-d", &pid])?;
        let dump = PathBuf::from(format!("{}.1", out_file.display()));
        let total = callgrind::total(&dump)?;
        println!("{label}: {total} instructions");
        Ok(total)
    }
}

fn callgrind_control(args: &[&str]) -> Result<(), String> {
    let output = Command::new("callgrind_control")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run callgrind_control: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("callgrind_control {args:?} failed: {}", String::from_utf8_lossy(&output.stderr)))
    }
}

/// A 128-byte JSON object, as in the request/reply benchmark.
fn payload() -> Bytes {
    let mut body = format!("{{\"id\":\"{}\",\"amount\":1234,\"currency\":\"EUR\",\"note\":\"", "x".repeat(32));
    let padding = 128 - body.len() - 2;
    body.push_str(&"y".repeat(padding));
    body.push_str("\"}");
    Bytes::from(body)
}

/// `requests` requests, `IN_FLIGHT` at a time; every reply must echo the payload.
async fn request_load(client: &async_nats::Client, requests: usize) -> Result<(), String> {
    let payload = payload();
    let expected: serde_json::Value = serde_json::from_slice(&payload).map_err(|err| err.to_string())?;
    let expected = Arc::new(expected);
    let mut tasks = JoinSet::new();
    for task in 0..IN_FLIGHT {
        let (client, payload, expected) = (client.clone(), payload.clone(), expected.clone());
        let share = requests / IN_FLIGHT + usize::from(task < requests % IN_FLIGHT);
        tasks.spawn(async move {
            for _ in 0..share {
                let request = async_nats::Request::new().payload(payload.clone()).timeout(Some(EVENT_LIMIT));
                let reply = client.send_request(ECHO_SUBJECT, request).await.map_err(|err| err.to_string())?;
                let answer: serde_json::Value =
                    serde_json::from_slice(&reply.payload).map_err(|err| format!("a reply is not JSON: {err}"))?;
                if answer != *expected {
                    return Err(format!("a reply differs from its request: {answer}"));
                }
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|err| err.to_string())??;
    }
    Ok(())
}

async fn create_stream(js: &jetstream::Context) -> Result<(), String> {
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![JS_SUBJECT.into()],
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|err| format!("cannot create the stream: {err}"))
}

async fn purge(js: &jetstream::Context) -> Result<(), String> {
    let stream = js.get_stream(STREAM).await.map_err(|err| err.to_string())?;
    stream.purge().await.map(|_| ()).map_err(|err| format!("cannot purge the stream: {err}"))
}

/// A durable consumer of the (empty) stream, as `bus.consume` would create it.
async fn create_consumer(js: &jetstream::Context, name: &str) -> Result<(), String> {
    let stream = js.get_stream(STREAM).await.map_err(|err| err.to_string())?;
    let config =
        pull::Config { durable_name: Some(name.into()), filter_subject: JS_SUBJECT.into(), ..Default::default() };
    stream.create_consumer(config).await.map(|_| ()).map_err(|err| format!("cannot create consumer {name}: {err}"))
}

/// Publishes `messages` and waits until consumer `name` has acked them all.
async fn publish_and_drain(js: &jetstream::Context, name: &str, messages: usize) -> Result<(), String> {
    let body = payload();
    let mut stored = Vec::with_capacity(1000);
    let mut last = 0;
    for _ in 0..messages {
        stored.push(js.publish(JS_SUBJECT, body.clone()).await.map_err(|err| err.to_string())?);
        if stored.len() == 1000 {
            for ack in stored.drain(..) {
                last = ack.await.map_err(|err| err.to_string())?.sequence;
            }
        }
    }
    for ack in stored {
        last = ack.await.map_err(|err| err.to_string())?.sequence;
    }
    let stream = js.get_stream(STREAM).await.map_err(|err| err.to_string())?;
    let deadline = tokio::time::Instant::now() + EVENT_LIMIT;
    loop {
        let info = stream.consumer_info(name).await.map_err(|err| err.to_string())?;
        if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("consumer {name} did not ack every message: {info:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The plain programs counted against agent-block.
mod plain {
    use super::*;
    use std::io::{Read, Write};

    /// Runs `serve` on a current-thread runtime, the leanest a plain program
    /// would use, until the parent closes stdin.
    pub fn run(serve: impl std::future::Future<Output = Result<(), String>> + Send + 'static) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start a runtime: {err}"))?;
        runtime.block_on(async {
            let serving = tokio::spawn(serve);
            let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
            serving.abort();
            Ok(())
        })
    }

    fn url() -> Result<String, String> {
        std::env::var("BENCH_NATS_URL").map_err(|_| "BENCH_NATS_URL is not set".to_string())
    }

    fn ready() -> Result<(), String> {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{PLAIN_READY}")
            .and_then(|()| stdout.flush())
            .map_err(|err| format!("cannot report ready: {err}"))
    }

    /// Answers each request with its payload decoded into a `serde_json::Value`
    /// and encoded again.
    pub async fn json_echo() -> Result<(), String> {
        let client = async_nats::connect(url()?).await.map_err(|err| err.to_string())?;
        let mut requests =
            client.queue_subscribe(ECHO_SUBJECT, "bench".to_string()).await.map_err(|err| err.to_string())?;
        client.flush().await.map_err(|err| err.to_string())?;
        ready()?;
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let value: serde_json::Value = serde_json::from_slice(&message.payload).map_err(|err| err.to_string())?;
            let body = serde_json::to_vec(&value).map_err(|err| err.to_string())?;
            client.publish(reply, body.into()).await.map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    /// Pulls from the `plain` consumer, parses each payload and acks it.
    pub async fn pull_ack() -> Result<(), String> {
        let client = async_nats::connect(url()?).await.map_err(|err| err.to_string())?;
        let js = jetstream::new(client);
        let stream = js.get_stream(STREAM).await.map_err(|err| err.to_string())?;
        let consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("plain").await.map_err(|err| err.to_string())?;
        let mut messages = consumer.messages().await.map_err(|err| err.to_string())?;
        ready()?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|err| err.to_string())?;
            let _: serde_json::Value = serde_json::from_slice(&message.payload).map_err(|err| err.to_string())?;
            message.ack().await.map_err(|err| err.to_string())?;
        }
        Ok(())
    }
}
