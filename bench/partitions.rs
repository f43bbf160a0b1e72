//! Keyed consumer scaling: messages per second through a keyed consumer with
//! 1, 2 and 4 worker processes and 1, 6 and 24 partitions, against the unkeyed
//! consumer with the same workers, on one nats-server, in one run.
//!
//! `cargo bench --bench partitions` starts one private nats-server (2.11 or
//! newer: `NATS_SERVER_BIN`, else `nats-server` from `PATH`), stores
//! `BENCH_MESSAGES` (default 20000) 128-byte JSON messages over 1000 keys in an
//! unkeyed stream and in one stream per partition count (with the partition
//! transform), then for each worker count and each stream starts that many
//! `agent-block run bench/keyed.lua --workers 1` processes on a fresh consumer
//! and times them from spawn until every message is acked.
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a quick smoke pass.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "proc_stat.rs"]
mod proc_stat;
use proc_stat::cpu_time;

use agent_block::nats_server::NatsServer;
use async_nats::jetstream::{self, consumer::pull};

const KEYS: usize = 1000;
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// A stream the benchmark drains: unkeyed (`partitions == 0`) or keyed.
struct Layout {
    partitions: u32,
}

impl Layout {
    fn stream(&self) -> String {
        if self.partitions == 0 { "FLAT".to_string() } else { format!("KEYED{}", self.partitions) }
    }

    fn subject(&self) -> String {
        if self.partitions == 0 { "flat.*".to_string() } else { format!("k{}.*", self.partitions) }
    }

    fn label(&self) -> String {
        if self.partitions == 0 { "unkeyed".to_string() } else { format!("keyed, {} partitions", self.partitions) }
    }
}

fn main() -> ExitCode {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let messages = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok());
    let messages = messages.unwrap_or(if measuring { 20_000 } else { 600 });
    let workers: &[usize] = if measuring { &[1, 2, 4] } else { &[2] };
    let partitions: &[u32] = if measuring { &[0, 1, 6, 24] } else { &[0, 6] };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let Ok(runtime) = runtime else {
        eprintln!("cannot start a runtime");
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run(messages, workers, partitions)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("benchmark failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(messages: usize, workers: &[usize], partitions: &[u32]) -> Result<(), String> {
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await.map_err(|e| e.to_string())?;
    if !client.is_server_compatible(2, 11, 0) {
        println!(
            "keyed consumers need nats-server 2.11 or newer; this one is {} (set NATS_SERVER_BIN)",
            client.server_info().version
        );
        return Ok(());
    }
    let server_pid = server.pid().ok_or("the nats-server has no process id")?;
    let js = jetstream::new(client.clone());
    let layouts: Vec<Layout> = partitions.iter().map(|&partitions| Layout { partitions }).collect();
    for layout in &layouts {
        fill(&js, layout, messages).await?;
    }
    println!(
        "Keyed consumer scaling: {messages} messages of 128-byte JSON over {KEYS} keys, nats-server {}, \
         worker processes with --workers 1",
        client.server_info().version
    );
    println!("msgs/s from the first worker's spawn until every message is acked; server cpu in us per message");
    println!("{:<8} {:<24} {:>9} {:>8} {:>11}", "workers", "consumer", "msgs/s", "seconds", "server cpu");
    for &count in workers {
        for layout in &layouts {
            let name = format!("c{count}");
            let server_before = cpu_time(server_pid)?;
            let took = drain(&js, &server.url(), layout, &name, count).await?;
            let server_cpu = cpu_time(server_pid)?.saturating_sub(server_before);
            println!(
                "{count:<8} {:<24} {:>9.0} {:>8.2} {:>11.1}",
                layout.label(),
                messages as f64 / took.as_secs_f64(),
                took.as_secs_f64(),
                server_cpu.as_secs_f64() * 1e6 / messages as f64
            );
        }
    }
    Ok(())
}

async fn fill(js: &jetstream::Context, layout: &Layout, messages: usize) -> Result<(), String> {
    let subject = layout.subject();
    let prefix = subject.trim_end_matches('*');
    js.create_stream(jetstream::stream::Config {
        name: layout.stream(),
        subjects: vec![subject.clone()],
        subject_transform: (layout.partitions > 0).then(|| jetstream::stream::SubjectTransform {
            source: subject.clone(),
            destination: format!("{{{{partition({},1)}}}}.{prefix}{{{{wildcard(1)}}}}", layout.partitions),
        }),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot create stream {}: {e}", layout.stream()))?;
    let body = format!(
        "{{\"id\":\"{}\",\"amount\":1234,\"currency\":\"EUR\",\"note\":\"{}\"}}",
        "x".repeat(32),
        "y".repeat(46)
    );
    let mut pending = Vec::with_capacity(1000);
    for n in 0..messages {
        let ack =
            js.publish(format!("{prefix}key{}", n % KEYS), body.clone().into()).await.map_err(|e| e.to_string())?;
        pending.push(ack);
        if pending.len() == 1000 {
            for ack in pending.drain(..) {
                ack.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for ack in pending {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Starts `count` workers on consumer `name` of `layout`'s stream and waits
/// until the consumer (every partition's, when keyed) has nothing left.
async fn drain(
    js: &jetstream::Context,
    url: &str,
    layout: &Layout,
    name: &str,
    count: usize,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    for _ in 0..count {
        children.push(spawn_worker(url, layout, name)?);
    }
    let consumers: Vec<String> = match layout.partitions {
        0 => vec![name.to_string()],
        n => (0..n).map(|partition| format!("{name}-{partition}")).collect(),
    };
    let result = async {
        let stream = js.get_stream(layout.stream()).await.map_err(|e| e.to_string())?;
        'poll: loop {
            if started.elapsed() > DRAIN_LIMIT {
                return Err(format!("{} workers did not drain {}", count, layout.label()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            for consumer in &consumers {
                let Ok(mut consumer) = stream.get_consumer::<pull::Config>(consumer).await else { continue 'poll };
                let info = consumer.info().await.map_err(|e| e.to_string())?;
                if info.num_pending > 0 || info.num_ack_pending > 0 || info.delivered.stream_sequence == 0 {
                    continue 'poll;
                }
            }
            return Ok(started.elapsed());
        }
    }
    .await;
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn spawn_worker(url: &str, layout: &Layout, name: &str) -> Result<Child, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/keyed.lua");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-block"));
    command
        .args(["run", script, "--nats-url", url, "--workers", "1", "--log-format", "json"])
        .env("BENCH_CONSUMER", name)
        .env("BENCH_STREAM", layout.stream())
        .env("BENCH_SUBJECT", layout.subject())
        .env("BENCH_PARTITIONS", layout.partitions.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (variable, _) in std::env::vars_os() {
        let variable = variable.to_string_lossy();
        if variable.starts_with("AGENT_BLOCK_") || matches!(&*variable, "RUST_LOG" | "NATS_URL") {
            command.env_remove(&*variable);
        }
    }
    command.spawn().map_err(|e| format!("cannot start agent-block: {e}"))
}
