//! Request/reply benchmark: agent-block against a plain async-nats echo responder.
//!
//! `cargo bench --bench reqreply` starts ONE private nats-server and, against it:
//!
//! 1. starts agent-block (`--workers 2`) a few times to measure how long it takes to
//!    be ready and how much memory it holds when idle;
//! 2. runs the same load (64 concurrent requesters over 4 connections, a 128-byte
//!    JSON payload) against a plain async-nats echo responder and then against an
//!    agent-block worker running `bench/echo.lua`, alternately (A B A B), because
//!    figures drift on a small shared machine and only ratios taken in one run mean
//!    anything;
//! 3. prints the figures, the agent-block/plain ratios and PASS/FAIL against the
//!    targets of the design (throughput >= 0.75x, p99 <= 2x, ready < 200 ms, idle
//!    RSS < 30 MiB).
//!
//! Both responders run as separate processes with the same number of worker threads,
//! so neither shares a runtime or a CPU budget with the load generator. The plain
//! responder is this very binary re-executed with `BENCH_ROLE=echo`.
//!
//! Environment: `BENCH_REQUESTS` (measured requests per responder and round,
//! default 100000), `BENCH_WARMUP` (default 5000), `BENCH_WORKERS` (worker threads of
//! each responder, default 2), `BENCH_ROUNDS` (default 2), `NATS_SERVER_BIN`,
//! `BENCH_AGENT_ARGS` (extra `agent-block run` options, split at whitespace).
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a quick smoke pass
//! whose figures mean nothing.

use std::io::{Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "support/children.rs"]
mod children;
#[path = "support/otlp.rs"]
mod otlp;
#[path = "proc_stat.rs"]
mod proc_stat;
use children::{ChildGuard, Lines, log_message};
use proc_stat::cpu_time;

use agent_block::nats_server::NatsServer;
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;

/// The subject both responders answer on.
const SUBJECT: &str = "bench.echo";
/// Client connections of the load generator, and requesters sharing each one:
/// 4 x 16 = 64 requests in flight, as in the peer figures.
const CONNECTIONS: usize = 4;
const TASKS_PER_CONNECTION: usize = 16;
const PAYLOAD_LEN: usize = 128;

/// How long a responder may take to say it is ready before the run gives up.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// A request that takes this long means a responder is stuck, not slow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle memory is read this long after ready, once start-up allocations settled.
const RSS_SETTLE: Duration = Duration::from_secs(1);
/// Ready time and idle memory are measured with this many Lua VMs (the design's figure).
const STARTUP_WORKERS: usize = 2;

const TARGET_THROUGHPUT_RATIO: f64 = 0.75;
const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_READY: Duration = Duration::from_millis(200);
const TARGET_IDLE_RSS_KIB: u64 = 30 * 1024;

fn main() -> ExitCode {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("echo") {
        return report(echo::main());
    }
    report(run())
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reqreply: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What one run does, from the command line and the environment.
struct Settings {
    requests: usize,
    warmup: usize,
    workers: usize,
    rounds: usize,
    starts: usize,
    /// False for the smoke pass: a debug build, tiny counts, figures meaningless.
    full: bool,
    /// Also measure agent-block exporting its spans to a local OTLP receiver.
    otlp: bool,
}

impl Settings {
    fn load() -> Result<Self, String> {
        // cargo passes `--bench` to a harness-less bench under `cargo bench` only.
        let full = std::env::args().any(|arg| arg == "--bench");
        let (requests, warmup, rounds, starts) = if full { (100_000, 5_000, 2, 5) } else { (500, 100, 1, 1) };
        let settings = Settings {
            requests: env_count("BENCH_REQUESTS", requests)?,
            warmup: env_count("BENCH_WARMUP", warmup)?,
            workers: env_count("BENCH_WORKERS", 2)?,
            rounds: env_count("BENCH_ROUNDS", rounds)?,
            starts,
            full,
            otlp: std::env::args().any(|arg| arg == "--otlp") || std::env::var("BENCH_OTLP").as_deref() == Ok("1"),
        };
        if settings.requests == 0 || settings.workers == 0 || settings.rounds == 0 {
            return Err("BENCH_REQUESTS, BENCH_WORKERS and BENCH_ROUNDS must be at least 1".to_string());
        }
        Ok(settings)
    }
}

fn env_count(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(value) => value.trim().parse().map_err(|_| format!("{name}={value:?} is not a whole number")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(err) => Err(format!("{name}: {err}")),
    }
}

fn run() -> Result<(), String> {
    let settings = Settings::load()?;
    let server = NatsServer::start()?;
    let url = server.url();
    let payload = payload();
    // Everything (server, load, responder) shares these CPUs: the figures depend on it.
    let cpus = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".to_string());
    println!(
        "request/reply on {SUBJECT}, {cpus} CPUs: {} requesters ({CONNECTIONS} connections x {TASKS_PER_CONNECTION}), \
         {}-byte JSON, {} warmup + {} measured requests per responder and round, --workers {}, {} round(s)",
        CONNECTIONS * TASKS_PER_CONNECTION,
        payload.len(),
        settings.warmup,
        settings.requests,
        settings.workers,
        settings.rounds,
    );
    if !settings.full {
        println!("smoke pass (no --bench): the figures below mean nothing; run `cargo bench --bench reqreply`");
    }

    if let Ok(extra) = std::env::var("BENCH_AGENT_ARGS") {
        println!("agent-block run options added by BENCH_AGENT_ARGS: {extra}");
    }
    println!("cpu us/req: CPU time (user + system, all threads) the responder process spent per measured request");
    let startup = measure_startup(&url, settings.starts)?;

    let runtime = tokio::runtime::Runtime::new().map_err(|err| format!("cannot start the load generator: {err}"))?;
    let receiver = if settings.otlp { Some(otlp::Receiver::start()?) } else { None };
    let mut rounds = Vec::new();
    let mut traced_rounds = Vec::new();
    for round in 1..=settings.rounds {
        let plain = runtime.block_on(measure(Responder::Plain, &url, &settings, &payload))?;
        let agent = runtime.block_on(measure(Responder::Agent, &url, &settings, &payload))?;
        print_round(round, &plain, &agent);
        if let Some(receiver) = &receiver {
            let traced = runtime.block_on(measure(Responder::Traced(receiver.port), &url, &settings, &payload))?;
            print_row(
                &format!("{round}"),
                traced.responder.label(),
                traced.throughput(),
                &traced.samples,
                Some(traced.cpu_per_request()),
            );
            println!(
                "{:<9} {:<18} {:>9.2}x   export on / off ({} export batches received so far)",
                "",
                "traced/agent-block",
                traced.throughput() / agent.throughput(),
                receiver.batches(),
            );
            traced_rounds.push((
                agent.throughput(),
                traced.throughput(),
                agent.cpu_per_request(),
                traced.cpu_per_request(),
            ));
        }
        rounds.push((plain, agent));
    }
    print_summary(&rounds, &startup, settings.requests);
    if !traced_rounds.is_empty() {
        let off: f64 = traced_rounds.iter().map(|r| r.0).sum();
        let on: f64 = traced_rounds.iter().map(|r| r.1).sum();
        let cpu_off: Duration = traced_rounds.iter().map(|r| r.2).sum();
        let cpu_on: Duration = traced_rounds.iter().map(|r| r.3).sum();
        println!(
            "span export to a local OTLP/HTTP receiver, all rounds: throughput {:.2}x of export off ({} >= 0.90x), \
             cpu us/req {:.1} vs {:.1}",
            on / off,
            verdict(on / off >= 0.90),
            cpu_on.as_secs_f64() * 1e6 / traced_rounds.len() as f64,
            cpu_off.as_secs_f64() * 1e6 / traced_rounds.len() as f64,
        );
    }
    drop(server);
    Ok(())
}

/// A JSON object of a few string and number fields, exactly `PAYLOAD_LEN` bytes.
fn payload() -> Bytes {
    let fields = |note: &str| {
        serde_json::json!({
            "id": "req-7f3a9c21",
            "user": "alice@example.org",
            "action": "lookup",
            "amount": 12345,
            "ratio": 0.25,
            "note": note,
        })
        .to_string()
    };
    let base = fields("").len();
    assert!(base <= PAYLOAD_LEN, "the payload's fixed fields already take {base} bytes");
    let text = fields(&"x".repeat(PAYLOAD_LEN - base));
    assert_eq!(text.len(), PAYLOAD_LEN);
    Bytes::from(text)
}

// ---------------------------------------------------------------------------------
// Responder processes
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Responder {
    Plain,
    Agent,
    /// agent-block exporting spans to the OTLP receiver on this port.
    Traced(u16),
}

impl Responder {
    fn label(self) -> &'static str {
        match self {
            Responder::Plain => "plain async-nats",
            Responder::Agent => "agent-block",
            Responder::Traced(_) => "agent-block+otlp",
        }
    }

    /// Starts the responder and waits until it answers on `SUBJECT`.
    fn start(self, url: &str, workers: usize) -> Result<ChildGuard, String> {
        match self {
            Responder::Plain => start_plain(url, workers),
            Responder::Agent => start_agent(url, workers, None).map(|started| started.guard),
            Responder::Traced(port) => start_agent(url, workers, Some(port)).map(|started| started.guard),
        }
    }
}

/// The plain responder: this binary again, in its `echo` role.
fn start_plain(url: &str, workers: usize) -> Result<ChildGuard, String> {
    let exe = std::env::current_exe().map_err(|err| format!("cannot find the benchmark binary: {err}"))?;
    let mut child = Command::new(exe)
        .env("BENCH_ROLE", "echo")
        .env("BENCH_NATS_URL", url)
        .env("BENCH_WORKERS", workers.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|err| format!("cannot start the plain echo responder: {err}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut guard = ChildGuard { child, _stdin: stdin, lines: Lines::follow(stdout) };
    guard.lines.wait_for("the plain echo responder", READY_LIMIT, |line| line == echo::READY)?;
    Ok(guard)
}

/// A started agent-block worker and how long it took to be ready.
struct AgentStart {
    guard: ChildGuard,
    /// From spawn to the "worker ready" log line, as a supervisor would see it.
    ready: Duration,
    /// The worker's own `ready_in_ms` (from its start to ready, without exec).
    reported_ms: Option<u64>,
}

fn start_agent(url: &str, workers: usize, otlp_port: Option<u16>) -> Result<AgentStart, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/echo.lua");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-block"));
    command
        .args(["run", script, "--nats-url", url, "--workers", &workers.to_string()])
        .args(["--name", "bench-agent", "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Settings from the caller's environment (a log filter hiding "worker ready",
    // another concurrency) would make the figures incomparable.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("AGENT_BLOCK_")
            || name.starts_with("OTEL_")
            || matches!(&*name, "RUST_LOG" | "NATS_URL" | "NATS_CREDS")
        {
            command.env_remove(&*name);
        }
    }
    if let Ok(extra) = std::env::var("BENCH_AGENT_ARGS") {
        command.args(extra.split_whitespace());
    }
    if let Some(port) = otlp_port {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
    }
    let spawned = Instant::now();
    let mut child = command.spawn().map_err(|err| format!("cannot start agent-block: {err}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut guard = ChildGuard { child, _stdin: None, lines: Lines::follow(stderr) };
    let (at, line) = guard
        .lines
        .wait_for("agent-block", READY_LIMIT, |line| log_message(line).as_deref() == Some("worker ready"))?;
    let reported_ms = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|record| record.get("ready_in_ms").and_then(serde_json::Value::as_u64));
    Ok(AgentStart { guard, ready: at.duration_since(spawned), reported_ms })
}

// ---------------------------------------------------------------------------------
// Start-up: ready time and idle memory
// ---------------------------------------------------------------------------------

struct Startup {
    ready: Vec<Duration>,
    reported_ms: Vec<u64>,
    idle_rss_kib: Vec<u64>,
}

/// Starts agent-block `starts` times; each start is timed to ready, then left idle
/// for `RSS_SETTLE` and its resident memory read.
fn measure_startup(url: &str, starts: usize) -> Result<Startup, String> {
    let mut startup = Startup { ready: Vec::new(), reported_ms: Vec::new(), idle_rss_kib: Vec::new() };
    for _ in 0..starts {
        let started = start_agent(url, STARTUP_WORKERS, None)?;
        std::thread::sleep(RSS_SETTLE);
        let memory = ProcStatus::read(started.guard.pid())?;
        startup.ready.push(started.ready);
        startup.reported_ms.extend(started.reported_ms);
        startup.idle_rss_kib.push(memory.rss_kib);
    }
    Ok(startup)
}

/// The memory figures of `/proc/<pid>/status`, in KiB.
struct ProcStatus {
    rss_kib: u64,
    peak_rss_kib: u64,
}

impl ProcStatus {
    fn read(pid: u32) -> Result<Self, String> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).map_err(|err| format!("cannot read {path}: {err}"))?;
        let field = |name: &str| -> Result<u64, String> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
                .ok_or_else(|| format!("{path} has no {name} line"))
        };
        Ok(ProcStatus { rss_kib: field("VmRSS:")?, peak_rss_kib: field("VmHWM:")? })
    }
}

// ---------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------

/// The figures of one responder in one round.
struct Measurement {
    responder: Responder,
    /// Every measured request's latency, sorted.
    samples: Vec<Duration>,
    /// From the first measured request sent to the last reply received.
    wall: Duration,
    /// CPU time the responder process used during the measured phase.
    responder_cpu: Duration,
    /// Memory of the responder right after the load.
    memory: ProcStatus,
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }

    fn cpu_per_request(&self) -> Duration {
        self.responder_cpu / self.samples.len() as u32
    }
}

/// Starts `responder`, warms it up (checking its replies), measures it, stops it.
async fn measure(responder: Responder, url: &str, settings: &Settings, payload: &Bytes) -> Result<Measurement, String> {
    let guard = responder.start(url, settings.workers)?;
    let clients = connect_clients(url).await?;
    let expected: serde_json::Value = serde_json::from_slice(payload).expect("the payload is JSON");
    let check = Arc::new(move |reply: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(reply).ok().as_ref() == Some(&expected)
    });
    fire(&clients, settings.warmup, payload, Some(check))
        .await
        .map_err(|err| format!("{} warmup: {err}", responder.label()))?;

    let cpu_before = cpu_time(guard.pid())?;
    let (mut samples, wall) = fire(&clients, settings.requests, payload, None)
        .await
        .map_err(|err| format!("{}: {err}", responder.label()))?;
    let responder_cpu = cpu_time(guard.pid())?.saturating_sub(cpu_before);
    let memory = ProcStatus::read(guard.pid())?;
    drop(guard);
    samples.sort_unstable();
    Ok(Measurement { responder, samples, wall, responder_cpu, memory })
}

async fn connect_clients(url: &str) -> Result<Vec<async_nats::Client>, String> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(|err| format!("cannot connect to {url}: {err}"))?;
        clients.push(client);
    }
    Ok(clients)
}

type ReplyCheck = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Sends `total` requests from all requesters at once; returns every latency and
/// the wall time. With `check`, every reply must pass it.
async fn fire(
    clients: &[async_nats::Client],
    total: usize,
    payload: &Bytes,
    check: Option<ReplyCheck>,
) -> Result<(Vec<Duration>, Duration), String> {
    // Requesters take request numbers from one counter, so a fast connection is
    // not held back waiting for a fixed share of a slow one.
    let taken = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut requesters = JoinSet::new();
    for client in clients {
        for _ in 0..TASKS_PER_CONNECTION {
            let requester = requester(client.clone(), taken.clone(), total, payload.clone(), check.clone());
            requesters.spawn(requester);
        }
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(joined) = requesters.join_next().await {
        samples.extend(joined.map_err(|err| format!("a requester panicked: {err}"))??);
    }
    Ok((samples, started.elapsed()))
}

async fn requester(
    client: async_nats::Client,
    taken: Arc<AtomicUsize>,
    total: usize,
    payload: Bytes,
    check: Option<ReplyCheck>,
) -> Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(total / (CONNECTIONS * TASKS_PER_CONNECTION) + 1);
    while taken.fetch_add(1, Ordering::Relaxed) < total {
        let sent = Instant::now();
        let reply = client.request(SUBJECT, payload.clone()).await.map_err(|err| format!("request failed: {err}"))?;
        samples.push(sent.elapsed());
        if let Some(check) = &check
            && !check(&reply.payload)
        {
            return Err(format!("wrong reply: {:?}", String::from_utf8_lossy(&reply.payload)));
        }
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

/// One responder's row: throughput, latency, and the responder's CPU cost.
fn print_row(round: &str, label: &str, throughput: f64, sorted: &[Duration], cpu: Option<Duration>) {
    let cpu = cpu.map(|cpu| format!("{:.1}", cpu.as_secs_f64() * 1e6)).unwrap_or_default();
    println!(
        "{round:<9} {label:<18} {throughput:>10.0} {:>8.3} {:>8.3} {cpu:>10}",
        ms(percentile(sorted, 0.50)),
        ms(percentile(sorted, 0.99)),
    );
}

/// The agent-block/plain ratios and the verdicts on them.
fn print_ratios(throughput_ratio: f64, p99_ratio: f64) {
    println!(
        "{:<9} {:<18} {:>9.2}x {:>8} {:>7.2}x   throughput {} (>= {TARGET_THROUGHPUT_RATIO}x), p99 {} (<= {TARGET_P99_RATIO}x)",
        "",
        "agent-block/plain",
        throughput_ratio,
        "",
        p99_ratio,
        verdict(throughput_ratio >= TARGET_THROUGHPUT_RATIO),
        verdict(p99_ratio <= TARGET_P99_RATIO),
    );
}

fn print_header() {
    println!();
    println!("{:<9} {:<18} {:>10} {:>8} {:>8} {:>10}", "round", "responder", "req/s", "p50 ms", "p99 ms", "cpu us/req");
}

fn print_round(round: usize, plain: &Measurement, agent: &Measurement) {
    print_header();
    for measurement in [plain, agent] {
        let label = measurement.responder.label();
        print_row(
            &round.to_string(),
            label,
            measurement.throughput(),
            &measurement.samples,
            Some(measurement.cpu_per_request()),
        );
    }
    print_ratios(
        agent.throughput() / plain.throughput(),
        ms(percentile(&agent.samples, 0.99)) / ms(percentile(&plain.samples, 0.99)),
    );
    println!(
        "{:<9} agent-block RSS after load {:.1} MiB (peak {:.1} MiB)",
        "",
        agent.memory.rss_kib as f64 / 1024.0,
        agent.memory.peak_rss_kib as f64 / 1024.0
    );
}

/// All rounds pooled (requests over total wall time, percentiles over all samples),
/// which is what the verdict is taken on; then the start-up figures.
fn print_summary(rounds: &[(Measurement, Measurement)], startup: &Startup, requests: usize) {
    let pool = |pick: fn(&(Measurement, Measurement)) -> &Measurement| {
        let mut samples: Vec<Duration> = rounds.iter().flat_map(|round| pick(round).samples.iter().copied()).collect();
        samples.sort_unstable();
        let wall: Duration = rounds.iter().map(|round| pick(round).wall).sum();
        let cpu: Duration = rounds.iter().map(|round| pick(round).responder_cpu).sum();
        let throughput = samples.len() as f64 / wall.as_secs_f64();
        (samples, throughput, cpu / (rounds.len() * requests) as u32)
    };
    let (plain, plain_throughput, plain_cpu) = pool(|round| &round.0);
    let (agent, agent_throughput, agent_cpu) = pool(|round| &round.1);

    println!();
    println!("all {} round(s) pooled:", rounds.len());
    print_header();
    print_row("all", Responder::Plain.label(), plain_throughput, &plain, Some(plain_cpu));
    print_row("all", Responder::Agent.label(), agent_throughput, &agent, Some(agent_cpu));
    print_ratios(agent_throughput / plain_throughput, ms(percentile(&agent, 0.99)) / ms(percentile(&plain, 0.99)));

    let best_ready = startup.ready.iter().min().copied().unwrap_or_default();
    let worst_rss = startup.idle_rss_kib.iter().max().copied().unwrap_or_default();
    let reported = startup.reported_ms.iter().min().map(|ms| format!(", {ms} ms by its own count")).unwrap_or_default();
    println!();
    println!(
        "agent-block start (--workers {STARTUP_WORKERS}), best of {}: ready {:.1} ms after spawn{reported}; target < {} ms: {}",
        startup.ready.len(),
        ms(best_ready),
        TARGET_READY.as_millis(),
        verdict(best_ready < TARGET_READY),
    );
    println!(
        "agent-block idle RSS (--workers {STARTUP_WORKERS}), {:?} after ready, worst of {}: {:.1} MiB; target < {} MiB: {}",
        RSS_SETTLE,
        startup.idle_rss_kib.len(),
        worst_rss as f64 / 1024.0,
        TARGET_IDLE_RSS_KIB / 1024,
        verdict(worst_rss < TARGET_IDLE_RSS_KIB),
    );
}

// ---------------------------------------------------------------------------------
// The plain echo responder (BENCH_ROLE=echo)
// ---------------------------------------------------------------------------------

mod echo {
    use super::*;

    /// The line printed once the subscriptions are confirmed by the server.
    pub const READY: &str = "echo ready";

    /// A queue subscription per worker thread on one connection (agent-block has one
    /// connection and a VM per worker), each answering with the payload unchanged.
    pub fn main() -> Result<(), String> {
        let url = std::env::var("BENCH_NATS_URL").map_err(|_| "BENCH_NATS_URL is not set".to_string())?;
        let workers = env_count("BENCH_WORKERS", 2)?.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start a runtime: {err}"))?;
        runtime.block_on(serve(&url, workers))
    }

    async fn serve(url: &str, workers: usize) -> Result<(), String> {
        let client = async_nats::connect(url).await.map_err(|err| format!("cannot connect to {url}: {err}"))?;
        for _ in 0..workers {
            let subscriber = client
                .queue_subscribe(SUBJECT, "bench-plain".to_string())
                .await
                .map_err(|err| format!("cannot subscribe: {err}"))?;
            tokio::spawn(answer(client.clone(), subscriber));
        }
        client.flush().await.map_err(|err| format!("cannot flush: {err}"))?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{READY}")
            .and_then(|()| stdout.flush())
            .map_err(|err| format!("cannot report ready: {err}"))?;
        // Serve until the parent closes our stdin: it is done, or it died.
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
        Ok(())
    }

    async fn answer(client: async_nats::Client, mut subscriber: async_nats::Subscriber) {
        while let Some(message) = subscriber.next().await {
            if let Some(reply) = message.reply {
                let _ = client.publish(reply, message.payload).await;
            }
        }
    }
}
