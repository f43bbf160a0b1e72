//! Fairness benchmark: how long a handler that is ready waits for its VM behind N
//! CPU-bound neighbours, with time slices of 1, 10 and 50 ms and with slicing off,
//! and what slicing costs the CPU-bound handlers.
//!
//! `cargo bench --bench fairness` starts one private nats-server and, for each
//! slice and each N (`BENCH_NEIGHBOURS`, default `1,2,4`), an
//! `agent-block run bench/fairness.lua --workers 1 --time-slice SLICE`. It sends N
//! `cpu` requests (`BENCH_ITERATIONS` loop iterations each, default 80 million,
//! about a second alone), and while they run, `probe` requests one after another:
//! each sleeps 5 ms and reports how late after its sleep it was resumed. It prints,
//! per configuration, that delay (p50, p99, max), the probes' round trip (which also
//! counts their start behind the line), the time until all neighbours answered and
//! that time as a ratio of the same run with slicing off (the neighbours'
//! slowdown). A first row without neighbours shows the delay of an idle VM (timer
//! resolution).
//!
//! Without `--bench` it makes a quick smoke pass whose figures mean nothing.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_block::nats_server::NatsServer;
use bytes::Bytes;
use tokio::task::JoinSet;

/// How long a probe sleeps before it measures how late it was resumed.
const PROBE_SLEEP: Duration = Duration::from_millis(5);
/// Slices compared, as `--time-slice` values; `0` is slicing off.
const SLICES: [&str; 4] = ["0", "1ms", "10ms", "50ms"];
/// A reply slower than this means the worker is stuck, not slow.
const REQUEST_LIMIT: Duration = Duration::from_secs(120);
const READY_LIMIT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fairness benchmark: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fairness benchmark: {message}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    iterations: u64,
    neighbours: Vec<usize>,
    slices: Vec<&'static str>,
}

impl Settings {
    fn load() -> Result<Self, String> {
        // cargo passes `--bench` to a harness-less bench under `cargo bench` only.
        let full = std::env::args().any(|arg| arg == "--bench");
        if !full {
            println!("smoke pass (no --bench): the figures below mean nothing; run `cargo bench --bench fairness`");
        }
        let iterations = match std::env::var("BENCH_ITERATIONS") {
            Ok(text) => text.parse().map_err(|_| format!("BENCH_ITERATIONS={text:?} is not a whole number"))?,
            Err(_) if full => 80_000_000,
            Err(_) => 200_000,
        };
        let neighbours = match std::env::var("BENCH_NEIGHBOURS") {
            Ok(text) => text
                .split(',')
                .map(|n| n.trim().parse().map_err(|_| format!("BENCH_NEIGHBOURS={text:?}: expected e.g. 1,2,4")))
                .collect::<Result<_, _>>()?,
            Err(_) if full => vec![1, 2, 4],
            Err(_) => vec![1],
        };
        let slices = if full { SLICES.to_vec() } else { vec!["0", "10ms"] };
        Ok(Settings { iterations, neighbours, slices })
    }
}

async fn run() -> Result<(), String> {
    let settings = Settings::load()?;
    let server = NatsServer::start()?;
    let url = server.url();
    println!(
        "{} iterations per neighbour, probes sleep {} ms; one VM (--workers 1)",
        settings.iterations,
        PROBE_SLEEP.as_millis()
    );
    println!();
    println!(
        "{:>10} {:>6} {:>6}  {:>26}  {:>26}  {:>11} {:>9}",
        "neighbours",
        "slice",
        "probes",
        "ready delay p50/p99/max ms",
        "round trip p50/p99/max ms",
        "neighbours",
        "slowdown"
    );
    let baseline = measure(&url, "10ms", 0, settings.iterations).await?;
    print_row(&baseline, None);
    for &neighbours in &settings.neighbours {
        let mut unsliced = None;
        for slice in &settings.slices {
            let result = measure(&url, slice, neighbours, settings.iterations).await?;
            if *slice == "0" {
                unsliced = Some(result.neighbours_done);
            }
            print_row(&result, unsliced);
        }
    }
    Ok(())
}

struct Measured {
    slice: &'static str,
    neighbours: usize,
    /// How late each probe was resumed after its sleep.
    delays: Vec<Duration>,
    round_trips: Vec<Duration>,
    /// From sending the neighbours until the last one answered.
    neighbours_done: Duration,
}

/// Runs one configuration on a fresh worker.
async fn measure(url: &str, slice: &'static str, neighbours: usize, iterations: u64) -> Result<Measured, String> {
    let _worker = Worker::start(url, slice)?;
    let client = async_nats::connect(url).await.map_err(|err| format!("cannot connect to {url}: {err}"))?;
    probe(&client).await?;
    let started = Instant::now();
    let mut cpu = JoinSet::new();
    for _ in 0..neighbours {
        let client = client.clone();
        let body = format!("{{\"n\":{iterations}}}");
        cpu.spawn(async move { request(&client, "fair.cpu", body).await });
    }
    // Let the neighbours start before the first probe.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut delays, mut round_trips) = (Vec::new(), Vec::new());
    loop {
        let sent = Instant::now();
        delays.push(probe(&client).await?);
        round_trips.push(sent.elapsed());
        while let Some(done) = cpu.try_join_next() {
            done.map_err(|err| format!("a neighbour request failed: {err}"))??;
        }
        let finished = if neighbours == 0 { delays.len() >= 200 } else { cpu.is_empty() };
        if finished {
            break;
        }
    }
    let neighbours_done = started.elapsed();
    delays.sort();
    round_trips.sort();
    Ok(Measured { slice, neighbours, delays, round_trips, neighbours_done })
}

/// One probe: how late after its sleep it was resumed.
async fn probe(client: &async_nats::Client) -> Result<Duration, String> {
    let body = format!("{{\"sleep\":{}}}", PROBE_SLEEP.as_secs_f64());
    let reply = request(client, "fair.probe", body).await?;
    let late = reply["late"].as_f64().ok_or_else(|| format!("unexpected probe reply {reply}"))?;
    Ok(Duration::from_secs_f64(late.max(0.0)))
}

async fn request(client: &async_nats::Client, subject: &str, body: String) -> Result<serde_json::Value, String> {
    let request = async_nats::Request::new().payload(Bytes::from(body)).timeout(Some(REQUEST_LIMIT));
    let reply = client.send_request(subject.to_string(), request).await.map_err(|err| format!("{subject}: {err}"))?;
    if let Some(headers) = &reply.headers
        && let Some(error) = headers.get("Nats-Service-Error")
    {
        return Err(format!("{subject} failed: {error}"));
    }
    serde_json::from_slice(&reply.payload).map_err(|err| format!("{subject}: reply is not JSON: {err}"))
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(index).copied().unwrap_or_default()
}

fn spread(sorted: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.2} / {:.2} / {:.2}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

fn print_row(measured: &Measured, unsliced: Option<Duration>) {
    let slice = if measured.slice == "0" { "off" } else { measured.slice };
    let (done, slowdown) = if measured.neighbours == 0 {
        ("-".to_string(), "-".to_string())
    } else {
        let ratio = unsliced.map_or("-".to_string(), |base| {
            format!("{:.3}x", measured.neighbours_done.as_secs_f64() / base.as_secs_f64())
        });
        (format!("{:.2} s", measured.neighbours_done.as_secs_f64()), ratio)
    };
    println!(
        "{:>10} {:>6} {:>6}  {:>26}  {:>26}  {:>11} {:>9}",
        measured.neighbours,
        slice,
        measured.delays.len(),
        spread(&measured.delays),
        spread(&measured.round_trips),
        done,
        slowdown
    );
}

/// An agent-block worker, killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(url: &str, slice: &str) -> Result<Worker, String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/fairness.lua");
        let mut command = Command::new(env!("CARGO_BIN_EXE_agent-block"));
        command
            .args(["run", script, "--nats-url", url, "--workers", "1", "--time-slice", slice])
            .args(["--handler-timeout", "10m", "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("AGENT_BLOCK_") || matches!(&*name, "RUST_LOG" | "NATS_URL" | "NATS_CREDS") {
                command.env_remove(&*name);
            }
        }
        let mut child = command.spawn().map_err(|err| format!("cannot start agent-block: {err}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let worker = Worker(child);
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("worker ready") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx.recv_timeout(READY_LIMIT).map_err(|_| "agent-block did not become ready".to_string())?;
        Ok(worker)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
