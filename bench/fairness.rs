//! Fairness benchmark: how long a handler that is ready waits for its VM behind N
//! CPU-bound neighbours, with time slices of 1, 10 and 50 ms and with slicing off,
//! and what slicing costs the CPU-bound handlers.
//!
//! `cargo bench --bench fairness` starts one private nats-server and, for each
//! slice and each N (`BENCH_NEIGHBOURS`, default `1,2,4`), an
//! `agent-block run bench/fairness.lua --workers 1 --time-slice SLICE`. It sends N
//! `cpu` requests (`BENCH_ITERATIONS` loop iterations each, default 40 million,
//! about half a second alone), and while they run, `probe` requests one after
//! another: each sleeps 2 to 20 ms and reports how late after its sleep it was
//! resumed. It prints,
//! per configuration, that delay (p50, p99, max), the probes' round trip less their
//! sleep (which also counts their start behind the line), the time until all
//! neighbours answered, and
//! the CPU time of the VM's thread meanwhile (from `/proc/<pid>/task/<tid>/schedstat`,
//! in nanoseconds) as a ratio of the same run with slicing off: what slicing costs
//! the CPU-bound handlers. Each configuration runs `BENCH_ROUNDS` times (default 3,
//! the slices alternating) and the round with the least VM CPU is kept, as wall and
//! CPU times drift on a shared machine. A first row without neighbours shows the delay of an idle VM
//! (timer resolution).
//!
//! Without `--bench` it makes a quick smoke pass whose figures mean nothing.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_block::nats_server::NatsServer;
use bytes::Bytes;
use tokio::task::JoinSet;

/// Probes sleep between 2 and 20 ms (a fixed sequence), so they become ready at
/// every point of a neighbour's slice, not always at the same one.
fn probe_sleep(index: usize) -> Duration {
    Duration::from_millis(2 + (index as u64 * 7) % 19)
}
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
    rounds: usize,
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
            Err(_) if full => 40_000_000,
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
        let rounds = match std::env::var("BENCH_ROUNDS") {
            Ok(text) => text.parse().map_err(|_| format!("BENCH_ROUNDS={text:?} is not a whole number"))?,
            Err(_) if full => 3,
            Err(_) => 1,
        };
        Ok(Settings { iterations, neighbours, slices, rounds: rounds.max(1) })
    }
}

async fn run() -> Result<(), String> {
    let settings = Settings::load()?;
    let server = NatsServer::start()?;
    let url = server.url();
    println!(
        "{} iterations per neighbour, probes sleep 2-20 ms; one VM (--workers 1); best of {} rounds",
        settings.iterations, settings.rounds
    );
    println!();
    println!(
        "{:>10} {:>6} {:>6}  {:>26}  {:>26}  {:>10} {:>8} {:>9}",
        "neighbours",
        "slice",
        "probes",
        "ready delay p50/p99/max ms",
        "round trip - sleep, ms",
        "all done",
        "VM CPU",
        "CPU ratio"
    );
    let baseline = measure(&url, "10ms", 0, settings.iterations).await?;
    print_row(&baseline, None);
    for &neighbours in &settings.neighbours {
        // Rounds alternate the slices, so drift of the machine hits each alike.
        let mut best: Vec<Option<Measured>> = settings.slices.iter().map(|_| None).collect();
        for _ in 0..settings.rounds {
            for (slice, best) in settings.slices.iter().zip(best.iter_mut()) {
                let result = measure(&url, slice, neighbours, settings.iterations).await?;
                if best.as_ref().is_none_or(|best| result.vm_cpu < best.vm_cpu) {
                    *best = Some(result);
                }
            }
        }
        let unsliced = best.first().and_then(|m| m.as_ref()).map(|m| m.vm_cpu);
        for result in best.iter().flatten() {
            print_row(result, unsliced);
        }
    }
    Ok(())
}

struct Measured {
    slice: &'static str,
    neighbours: usize,
    /// How late each probe was resumed after its sleep.
    delays: Vec<Duration>,
    /// Each probe's round trip less its sleep: its start behind the line, the
    /// delay after its sleep and the network.
    round_trips: Vec<Duration>,
    /// From sending the neighbours until the last one answered.
    neighbours_done: Duration,
    /// CPU time of the VM's thread meanwhile.
    vm_cpu: Duration,
}

/// Runs one configuration on a fresh worker.
async fn measure(url: &str, slice: &'static str, neighbours: usize, iterations: u64) -> Result<Measured, String> {
    let worker = Worker::start(url, slice)?;
    let client = async_nats::connect(url).await.map_err(|err| format!("cannot connect to {url}: {err}"))?;
    probe(&client, 0).await?;
    let vm_thread = worker.vm_thread()?;
    let cpu_before = thread_cpu(&vm_thread)?;
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
        let (sent, sleep) = (Instant::now(), probe_sleep(delays.len()));
        delays.push(probe(&client, delays.len()).await?);
        round_trips.push(sent.elapsed().saturating_sub(sleep));
        while let Some(done) = cpu.try_join_next() {
            done.map_err(|err| format!("a neighbour request failed: {err}"))??;
        }
        let finished = if neighbours == 0 { delays.len() >= 200 } else { cpu.is_empty() };
        if finished {
            break;
        }
    }
    let neighbours_done = started.elapsed();
    let vm_cpu = thread_cpu(&vm_thread)?.saturating_sub(cpu_before);
    delays.sort();
    round_trips.sort();
    Ok(Measured { slice, neighbours, delays, round_trips, neighbours_done, vm_cpu })
}

/// CPU time a thread used so far: the first field of its `schedstat`, in nanoseconds.
fn thread_cpu(task: &str) -> Result<Duration, String> {
    let path = format!("{task}/schedstat");
    let text = std::fs::read_to_string(&path).map_err(|err| format!("cannot read {path}: {err}"))?;
    let nanos = text.split_whitespace().next().and_then(|field| field.parse().ok());
    nanos.map(Duration::from_nanos).ok_or_else(|| format!("{path}: unexpected format {text:?}"))
}

/// One probe: how late after its sleep it was resumed.
async fn probe(client: &async_nats::Client, index: usize) -> Result<Duration, String> {
    let body = format!("{{\"sleep\":{}}}", probe_sleep(index).as_secs_f64());
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
    let (done, cpu, ratio) = if measured.neighbours == 0 {
        ("-".to_string(), "-".to_string(), "-".to_string())
    } else {
        let ratio = unsliced
            .map_or("-".to_string(), |base| format!("{:.3}x", measured.vm_cpu.as_secs_f64() / base.as_secs_f64()));
        (
            format!("{:.2} s", measured.neighbours_done.as_secs_f64()),
            format!("{:.3} s", measured.vm_cpu.as_secs_f64()),
            ratio,
        )
    };
    println!(
        "{:>10} {:>6} {:>6}  {:>26}  {:>26}  {:>10} {:>8} {:>9}",
        measured.neighbours,
        slice,
        measured.delays.len(),
        spread(&measured.delays),
        spread(&measured.round_trips),
        done,
        cpu,
        ratio
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

impl Worker {
    /// The `/proc` folder of the thread running the VM.
    fn vm_thread(&self) -> Result<String, String> {
        let tasks = format!("/proc/{}/task", self.0.id());
        let entries = std::fs::read_dir(&tasks).map_err(|err| format!("cannot list {tasks}: {err}"))?;
        for entry in entries.flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() == "lua-vm-0" {
                return Ok(entry.path().display().to_string());
            }
        }
        Err(format!("no lua-vm-0 thread in {tasks}"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
