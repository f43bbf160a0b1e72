//! JetStream consumption benchmark: agent-block against a plain async-nats pull
//! consumer, draining the same stream in one run.
//!
//! `cargo bench --bench jetstream` starts one private nats-server, stores
//! `BENCH_MESSAGES` (default 100000) 128-byte JSON messages in a stream, then
//! alternately (plain, agent-block, plain, agent-block) drains the whole stream
//! through a fresh durable consumer:
//!
//! - plain: an async-nats pull consumer (`messages()`, its default prefetch) in
//!   this process on a 2-thread runtime, parsing each payload as JSON and acking it;
//! - agent-block: `agent-block run bench/consume.lua --workers 2`, whose handler
//!   reads `ev.payload` and returns `true` (a confirmed ack), timed from spawn until
//!   the consumer has nothing pending and nothing unacknowledged.
//!
//! It prints messages per second for each, the CPU time the consumer's process
//! and nats-server spent per message, and the ratio (target >= 0.9x).
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a quick smoke pass.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "proc_stat.rs"]
mod proc_stat;
#[path = "support/worker_env.rs"]
mod worker_env;
use proc_stat::cpu_time;
use worker_env::{publish_all, without_caller_settings};

use agent_block::nats_server::NatsServer;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.js";
const TARGET_RATIO: f64 = 0.9;
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// One drain: wall time and CPU time of the consumer's process and the server.
struct Drain {
    took: Duration,
    consumer_cpu: Duration,
    server_cpu: Duration,
}

fn main() -> ExitCode {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let messages = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok());
    let messages = messages.unwrap_or(if measuring { 100_000 } else { 2_000 });
    let rounds = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let Ok(runtime) = runtime else {
        eprintln!("cannot start a runtime");
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run(messages, rounds)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("benchmark failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(messages: usize, rounds: usize) -> Result<f64, String> {
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await.map_err(|e| e.to_string())?;
    let js = jetstream::new(client.clone());
    fill(&js, messages).await?;
    println!("JetStream consumption: {messages} messages of 128-byte JSON, 2 worker threads each");
    println!("cpu us/msg: CPU time (user + system) per message of the consumer's process and of nats-server");
    println!(
        "{:<7} {:<18} {:>10} {:>9} {:>13} {:>11}",
        "round", "consumer", "msgs/s", "seconds", "consumer cpu", "server cpu"
    );
    let server_pid = server.pid().ok_or("the nats-server has no process id")?;
    let (mut plain_total, mut agent_total) = (Duration::ZERO, Duration::ZERO);
    for round in 1..=rounds {
        let own_pid = std::process::id();
        let plain = measured(own_pid, server_pid, drain_plain(&js, &format!("plain{round}"), messages)).await?;
        print_drain(round, "plain async-nats", messages, &plain);
        let agent = drain_agent(&js, &server.url(), &format!("agent{round}"), server_pid).await?;
        print_drain(round, "agent-block", messages, &agent);
        plain_total += plain.took;
        agent_total += agent.took;
    }
    let ratio = plain_total.as_secs_f64() / agent_total.as_secs_f64();
    println!(
        "all     agent-block/plain {ratio:>5.2}x   {} (>= {TARGET_RATIO}x)",
        if ratio >= TARGET_RATIO { "PASS" } else { "FAIL" }
    );
    Ok(ratio)
}

fn rate(messages: usize, took: Duration) -> f64 {
    messages as f64 / took.as_secs_f64()
}

fn print_drain(round: usize, consumer: &str, messages: usize, drain: &Drain) {
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / messages as f64;
    println!(
        "{round:<7} {consumer:<18} {:>10.0} {:>9.2} {:>13.1} {:>11.1}",
        rate(messages, drain.took),
        drain.took.as_secs_f64(),
        per_message(drain.consumer_cpu),
        per_message(drain.server_cpu)
    );
}

/// Runs `drain` (which returns its wall time), measuring the CPU time `consumer`
/// and `server` spend meanwhile.
async fn measured(
    consumer: u32,
    server: u32,
    drain: impl std::future::Future<Output = Result<Duration, String>>,
) -> Result<Drain, String> {
    let (consumer_before, server_before) = (cpu_time(consumer)?, cpu_time(server)?);
    let took = drain.await?;
    Ok(Drain {
        took,
        consumer_cpu: cpu_time(consumer)?.saturating_sub(consumer_before),
        server_cpu: cpu_time(server)?.saturating_sub(server_before),
    })
}

async fn fill(js: &jetstream::Context, messages: usize) -> Result<(), String> {
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECT.into()],
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot create the stream: {e}"))?;
    let body = format!(
        "{{\"id\":\"{}\",\"amount\":1234,\"currency\":\"EUR\",\"note\":\"{}\"}}",
        "x".repeat(32),
        "y".repeat(50)
    );
    publish_all(js, messages, |_| SUBJECT.to_string(), &body).await
}

async fn drain_plain(js: &jetstream::Context, name: &str, messages: usize) -> Result<Duration, String> {
    let stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::Config { durable_name: Some(name.into()), ..Default::default() })
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut incoming = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut done = 0;
    while done < messages {
        let message = tokio::time::timeout(DRAIN_LIMIT, incoming.next())
            .await
            .map_err(|_| "the plain consumer stalled".to_string())?
            .ok_or("the plain consumer ended")?
            .map_err(|e| e.to_string())?;
        let _: serde_json::Value = serde_json::from_slice(&message.payload).map_err(|e| e.to_string())?;
        message.ack().await.map_err(|e| e.to_string())?;
        done += 1;
    }
    Ok(started.elapsed())
}

async fn drain_agent(js: &jetstream::Context, url: &str, name: &str, server_pid: u32) -> Result<Drain, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/consume.lua");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent-block"));
    command
        .args(["run", script, "--nats-url", url, "--workers", "2", "--log-format", "json"])
        .env("BENCH_CONSUMER", name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    without_caller_settings(&mut command);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("cannot start agent-block: {e}"))?;
    let server_before = cpu_time(server_pid)?;
    let result = async {
        let stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
        loop {
            if started.elapsed() > DRAIN_LIMIT {
                return Err("agent-block did not drain the stream".to_string());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let Ok(mut consumer) = stream.get_consumer::<pull::Config>(name).await else { continue };
            let info = consumer.info().await.map_err(|e| e.to_string())?;
            if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0 {
                return Ok(started.elapsed());
            }
        }
    }
    .await;
    let consumer_cpu = cpu_time(child.id());
    let server_cpu = cpu_time(server_pid).map(|after| after.saturating_sub(server_before));
    let _ = child.kill();
    let _ = child.wait();
    Ok(Drain { took: result?, consumer_cpu: consumer_cpu?, server_cpu: server_cpu? })
}
