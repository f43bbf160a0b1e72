//! Keyed consumer scaling: messages per second through a keyed consumer with
//! 1, 2 and 4 worker processes and 1, 6 and 24 partitions, against the unkeyed
//! consumer with the same workers, on one nats-server, in one run.
//!
//! `cargo bench --bench partitions` starts one private nats-server (2.11 or
//! newer: `NATS_SERVER_BIN`, else `nats-server` from `PATH`), stores
//! `BENCH_MESSAGES` (default 50000) 128-byte JSON messages over 1000 keys in an
//! unkeyed stream and in one stream per partition count (with the partition
//! transform), then for each worker count and each stream starts that many
//! `agent-block run bench/keyed.lua --workers 1` processes on a fresh consumer,
//! created paused, and once they are ready and share the partitions, resumes it
//! and times until every message is acked.
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a quick smoke pass.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "proc_stat.rs"]
mod proc_stat;
#[path = "support/worker_env.rs"]
mod worker_env;
use proc_stat::cpu_time;
use worker_env::{publish_all, without_caller_settings};

use agent_block::kind::KindTemplate;
use agent_block::nats_server::NatsServer;
use agent_block::partitioning::Partitioning;
use agent_block::source::jetstream::consumer_config;
use agent_block::source_spec::ConsumerSpec;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

const KEYS: usize = 1000;
const DRAIN_LIMIT: Duration = Duration::from_secs(300);
/// Messages published after resuming a consumer, counted with the others.
const NUDGES: usize = 300;

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
    let messages = messages.unwrap_or(if measuring { 50_000 } else { 600 });
    let workers = list("BENCH_WORKERS").unwrap_or(if measuring { vec![1, 2, 4] } else { vec![2] });
    let partitions = list("BENCH_PARTITIONS").unwrap_or(if measuring { vec![0, 1, 6, 24] } else { vec![0, 6] });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let Ok(runtime) = runtime else {
        eprintln!("cannot start a runtime");
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run(messages, &workers, &partitions)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("benchmark failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A comma-separated list of numbers from `variable`, e.g. `BENCH_WORKERS=1,4`.
fn list<T: std::str::FromStr>(variable: &str) -> Option<Vec<T>> {
    let text = std::env::var(variable).ok()?;
    text.split(',').map(|item| item.trim().parse().ok()).collect()
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
    println!(
        "msgs/s from resuming the consumer (workers ready) until every message is acked; server cpu in us per message"
    );
    println!(
        "{:<8} {:<24} {:>9} {:>8} {:>11} {:>12}",
        "workers", "consumer", "msgs/s", "seconds", "server cpu", "workers cpu"
    );
    for (round, &count) in workers.iter().enumerate() {
        for layout in &layouts {
            let name = format!("c{count}");
            let (took, server_cpu, workers_cpu) = drain(&js, &server.url(), layout, &name, count, server_pid).await?;
            // Every drain reads the whole stream, the nudges of earlier drains too.
            let messages = messages + NUDGES * (round + 1);
            println!(
                "{count:<8} {:<24} {:>9.0} {:>8.2} {:>11.1} {:>12.1}",
                layout.label(),
                messages as f64 / took.as_secs_f64(),
                took.as_secs_f64(),
                server_cpu.as_secs_f64() * 1e6 / messages as f64,
                workers_cpu.as_secs_f64() * 1e6 / messages as f64
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
    publish_all(js, messages, |n| format!("{prefix}key{}", n % KEYS), &body).await
}

/// Starts `count` workers on consumer `name` of `layout`'s stream, created
/// paused; once every worker is ready and the partitions are shared, resumes it
/// and waits until the consumer (every partition's, when keyed) has nothing
/// left. So the figure is steady-state consumption, not start-up or rebalancing.
async fn drain(
    js: &jetstream::Context,
    url: &str,
    layout: &Layout,
    name: &str,
    count: usize,
    server_pid: u32,
) -> Result<(Duration, Duration, Duration), String> {
    let stream = js.get_stream(layout.stream()).await.map_err(|e| e.to_string())?;
    let consumers = declared_consumers(layout, name)?;
    let paused_until = async_nats::datetime::now() + Duration::from_secs(3600);
    for config in &consumers {
        let config = consumer::Config { pause_until: Some(paused_until), ..config.clone() };
        stream.create_consumer(config).await.map_err(|e| format!("cannot create a paused consumer: {e}"))?;
    }
    let mut children: Vec<Child> = Vec::new();
    let result = async {
        for _ in 0..count {
            children.push(spawn_worker(url, layout, name)?);
        }
        wait_until_shared(js.client(), layout, count).await?;
        let names: Vec<String> = consumers.iter().filter_map(|config| config.durable_name.clone()).collect();
        for consumer in &names {
            let info = stream.consumer_info(consumer).await.map_err(|e| e.to_string())?;
            if !info.paused {
                return Err(format!("a worker changed consumer {consumer}: it is no longer paused"));
            }
        }
        let started = Instant::now();
        let server_before = cpu_time(server_pid)?;
        let workers_before = workers_cpu(&children)?;
        for consumer in &names {
            stream.resume_consumer(consumer).await.map_err(|e| e.to_string())?;
        }
        // A resumed consumer serves its waiting pulls at its next heartbeat; a
        // new message wakes it at once. Enough keys to reach every partition.
        let prefix = layout.subject().trim_end_matches('*').to_string();
        for n in 0..NUDGES {
            js.publish(format!("{prefix}nudge{n}"), "{}".into()).await.map_err(|e| e.to_string())?;
        }
        'poll: loop {
            if started.elapsed() > DRAIN_LIMIT {
                return Err(format!("{} workers did not drain {}", count, layout.label()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            for consumer in &names {
                let info = stream.consumer_info(consumer).await.map_err(|e| e.to_string())?;
                if info.num_pending > 0 || info.num_ack_pending > 0 || info.delivered.stream_sequence == 0 {
                    continue 'poll;
                }
            }
            let took = started.elapsed();
            let server = cpu_time(server_pid)?.saturating_sub(server_before);
            return Ok((took, server, workers_cpu(&children)?.saturating_sub(workers_before)));
        }
    }
    .await;
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// The consumers the workers declare, built as the worker builds them.
fn declared_consumers(layout: &Layout, name: &str) -> Result<Vec<consumer::Config>, String> {
    let subject = layout.subject();
    let spec = ConsumerSpec::new(&layout.stream(), name, Some(subject.clone()), KindTemplate::parse("job", &subject)?);
    if layout.partitions == 0 {
        return Ok(vec![consumer_config::declared(&spec)]);
    }
    let keyed = Partitioning::parse("{{wildcard(1)}}", layout.partitions, &subject)?;
    let spec = ConsumerSpec { keyed: Some(Box::new(keyed.clone())), ..spec };
    Ok((0..layout.partitions).map(|partition| consumer_config::declared(&spec.partition(&keyed, partition))).collect())
}

/// Waits until `count` workers answer `$SRV.INFO` and, when keyed, every
/// partition is served by exactly one of them with even shares.
async fn wait_until_shared(client: async_nats::Client, layout: &Layout, count: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions = layout.partitions as usize;
    loop {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
        client.publish_with_reply("$SRV.INFO.bench", inbox, "".into()).await.map_err(|e| e.to_string())?;
        let mut shares = Vec::new();
        while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await {
            let Ok(info) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else { continue };
            let list = info["endpoints"][0]["metadata"]["partitions"].as_str().unwrap_or("").to_string();
            shares.push(list.split(',').filter(|p| !p.is_empty()).count());
        }
        let even = partitions == 0
            || (shares.iter().sum::<usize>() == partitions
                && shares.iter().all(|&share| share == partitions / count || share == partitions.div_ceil(count)));
        if shares.len() == count && even {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{count} workers did not share {} (shares {shares:?})", layout.label()));
        }
    }
}

fn workers_cpu(children: &[Child]) -> Result<Duration, String> {
    children.iter().map(|child| cpu_time(child.id())).sum()
}

fn spawn_worker(url: &str, layout: &Layout, name: &str) -> Result<Child, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/keyed.lua");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-block"));
    command
        .args(["run", script, "--nats-url", url, "--workers", "1", "--name", "bench", "--log-format", "json"])
        .env("BENCH_CONSUMER", name)
        .env("BENCH_STREAM", layout.stream())
        .env("BENCH_SUBJECT", layout.subject())
        .env("BENCH_PARTITIONS", layout.partitions.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    without_caller_settings(&mut command);
    command.spawn().map_err(|e| format!("cannot start agent-block: {e}"))
}
