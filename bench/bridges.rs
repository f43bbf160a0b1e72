//! Bridge benchmark: the per-call cost of `http.request` to a local HTTP server
//! and of a one-row `sql.query` against a private PostgreSQL, side by side with
//! the same calls made from plain Rust (reqwest, sqlx) in the same run.
//!
//! `cargo bench --bench bridges` starts a private nats-server, an HTTP server on
//! its own thread, a private PostgreSQL cluster (see `tests/common/postgres.rs`)
//! and an agent-block worker (`--workers 1`) running `bench/bridges.lua`. Each
//! measurement is `BENCH_CALLS` sequential calls (default 2000) on one keep-alive
//! connection: from Lua inside one handler (timed there, so NATS is crossed once
//! per batch), and from a plain current-thread tokio runtime in this process.
//! Plain and bridge alternate for `BENCH_ROUNDS` rounds (default 3); the best
//! round of each is printed with the ratio. Without `--bench` it runs a quick
//! smoke pass whose figures mean nothing.

#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use agent_block::nats_server::NatsServer;

const READY_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bridges: {err}");
            ExitCode::FAILURE
        }
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run() -> Result<(), String> {
    let measuring = std::env::args().any(|a| a == "--bench");
    let calls = if measuring { env_number("BENCH_CALLS", 2000) } else { 20 };
    let rounds = if measuring { env_number("BENCH_ROUNDS", 3) } else { 1 };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let nats = NatsServer::start()?;
    let web = start_http_server()?;
    let pg = postgres::Postgres::start(|| {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
    });
    let url = format!("http://{web}/ping");
    let worker = Worker::start(&nats.url(), &pg.url())?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.map_err(|e| e.to_string())?;
        let http = reqwest::Client::new();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg.url())
            .await
            .map_err(|e| format!("plain sqlx cannot connect: {e}"))?;
        // Warm both sides: connections open, statements prepared.
        bridge_batch(&client, "bench.http", &url, calls.min(50)).await?;
        bridge_batch(&client, "bench.sql", "", calls.min(50)).await?;
        plain_http(&http, &url, calls.min(50)).await?;
        plain_sql(&pool, calls.min(50)).await?;

        let mut best = [Duration::MAX; 4];
        for round in 1..=rounds {
            let figures = [
                plain_http(&http, &url, calls).await?,
                bridge_batch(&client, "bench.http", &url, calls).await?,
                plain_sql(&pool, calls).await?,
                bridge_batch(&client, "bench.sql", "", calls).await?,
            ];
            println!(
                "round {round}: http plain {} bridge {} | sql plain {} bridge {}",
                per_call(figures[0], calls),
                per_call(figures[1], calls),
                per_call(figures[2], calls),
                per_call(figures[3], calls)
            );
            for (best, figure) in best.iter_mut().zip(figures) {
                *best = (*best).min(figure);
            }
        }
        println!("\nper call, best of {rounds} rounds of {calls} sequential calls:");
        for (name, plain, bridge) in [("http.request", best[0], best[1]), ("sql.query", best[2], best[3])] {
            println!(
                "  {name:<13} plain {}  bridge {}  ratio {:.2}x  (+{:.1} µs)",
                per_call(plain, calls),
                per_call(bridge, calls),
                bridge.as_secs_f64() / plain.as_secs_f64(),
                (bridge.as_secs_f64() - plain.as_secs_f64()) * 1e6 / calls as f64
            );
        }
        Ok::<(), String>(())
    })?;
    drop(worker);
    Ok(())
}

fn per_call(total: Duration, calls: usize) -> String {
    format!("{:7.1} µs", total.as_secs_f64() * 1e6 / calls as f64)
}

async fn bridge_batch(client: &async_nats::Client, subject: &str, url: &str, n: usize) -> Result<Duration, String> {
    let payload = serde_json::json!({ "url": url, "n": n }).to_string();
    let request = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(600)));
    let reply = client.send_request(subject.to_string(), request).await.map_err(|e| e.to_string())?;
    if let Some(error) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")) {
        return Err(format!("{subject} failed: {error}"));
    }
    let value: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    let seconds = value["seconds"].as_f64().ok_or("the handler reported no time")?;
    Ok(Duration::from_secs_f64(seconds))
}

async fn plain_http(client: &reqwest::Client, url: &str, n: usize) -> Result<Duration, String> {
    let started = Instant::now();
    for _ in 0..n {
        let response = client.get(url).send().await.map_err(|e| e.to_string())?;
        if response.status() != 200 {
            return Err(format!("status {}", response.status()));
        }
        response.bytes().await.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

async fn plain_sql(pool: &sqlx::PgPool, n: usize) -> Result<Duration, String> {
    use sqlx::Row;
    let started = Instant::now();
    for i in 1..=n as i64 {
        let row = sqlx::query("select $1::int8 as n").bind(i).fetch_one(pool).await.map_err(|e| e.to_string())?;
        if row.try_get::<i64, _>("n").map_err(|e| e.to_string())? != i {
            return Err("wrong row".to_string());
        }
    }
    Ok(started.elapsed())
}

/// An HTTP server answering `GET /ping` on its own thread.
fn start_http_server() -> Result<std::net::SocketAddr, String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("server runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let _ = ready_tx.send(listener.local_addr().expect("address"));
            let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
            let _ = axum::serve(listener, app).await;
        });
    });
    ready_rx.recv_timeout(READY_LIMIT).map_err(|_| "the HTTP server did not start".to_string())
}

/// The agent-block worker, killed on drop.
struct Worker(Child);

impl Worker {
    fn start(nats_url: &str, sql_url: &str) -> Result<Self, String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/bridges.lua");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agent-block"))
            .args(["run", script, "--workers", "1", "--handler-timeout", "10m", "--log-format", "json"])
            .args(["--nats-url", nats_url, "--sql-url", sql_url])
            .env("RUST_LOG", "warn,agent_block=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start agent-block: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("worker ready")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let worker = Worker(child);
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
