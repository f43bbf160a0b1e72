//! Shared test helpers: a private nats-server per test, the real `agent-block`
//! binary as a child process, and small NATS client conveniences.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Message};
use bytes::Bytes;

pub use agent_block::nats_server::{NatsServer, ServerOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_agent-block");

/// Generous on purpose: a loaded 2-core CI machine may take seconds to start
/// processes; the bounds catch hangs, not slowness.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Asserts that a process given a `--connect-timeout` of a few seconds at most,
/// started at `started`, gave up soon after it: 15 s only catches a wait that
/// ignores the limit (process start on a loaded machine takes a few seconds at
/// worst).
pub fn assert_gave_up_soon(started: Instant) {
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

/// A private nats-server on a port of this test process's own range (see
/// [`free_port`]), so a restart gets its port back.
pub fn server() -> NatsServer {
    server_with(ServerOptions::default())
}

/// A private server that also reads `config` (a nats-server configuration file's
/// text: authorization, TLS, operator mode).
pub fn server_with_config(config: &str) -> NatsServer {
    server_with(ServerOptions { config: Some(config.to_string()), ..ServerOptions::default() })
}

pub fn server_with(options: ServerOptions) -> NatsServer {
    let mut last_error = String::new();
    // A port of our range may still be taken by a program outside the convention.
    for _ in 0..5 {
        match NatsServer::start_with(ServerOptions { port: Some(free_port()), ..options.clone() }) {
            Ok(server) => return server,
            Err(err) => last_error = err,
        }
    }
    panic!("cannot start a private nats-server: {last_error}")
}

/// A worker running one script against its own server, with a client.
pub struct Running {
    pub server: NatsServer,
    pub scripts: Scripts,
    pub worker: Worker,
    pub client: async_nats::Client,
}

/// Starts `app.lua` holding `source` on one VM (plus `args`) against a private
/// server and waits until it is ready.
pub async fn start_app(source: &str, args: &[&str]) -> Running {
    let mut all = vec!["--workers", "1"];
    all.extend_from_slice(args);
    let (server, scripts, worker) = run_app(source, &all);
    let client = client(&server).await;
    Running { server, scripts, worker, client }
}

/// Runs `app.lua` holding `source` with exactly `args` against a private server
/// and waits until it is ready.
pub fn run_app(source: &str, args: &[&str]) -> (NatsServer, Scripts, Worker) {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", source);
    let worker = Worker::run(&server, &script, args);
    (server, scripts, worker)
}

/// A temporary folder holding test scripts.
pub struct Scripts(tempfile::TempDir);

impl Scripts {
    pub fn new() -> Self {
        Scripts(tempfile::tempdir().expect("create a script folder"))
    }

    pub fn write(&self, name: &str, source: &str) -> PathBuf {
        let path = self.0.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create script subfolder");
        }
        std::fs::write(&path, source).expect("write script");
        path
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Output of a child process, collected line by line as it arrives.
#[derive(Clone, Default)]
pub struct Output(Arc<(Mutex<Collected>, Condvar)>);

#[derive(Default)]
struct Collected {
    text: String,
    /// The stream reached its end.
    closed: bool,
}

impl Output {
    pub fn collect(&self, stream: impl Read + Send + 'static) {
        let output = self.clone();
        std::thread::spawn(move || {
            let (collected, changed) = &*output.0;
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut collected = collected.lock().unwrap();
                collected.text.push_str(&line);
                collected.text.push('\n');
                changed.notify_all();
            }
            collected.lock().unwrap().closed = true;
            changed.notify_all();
        });
    }

    pub fn text(&self) -> String {
        self.0.0.lock().unwrap().text.clone()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_until(|text| text.contains(needle), timeout)
    }

    /// Waits until `done` holds for the output so far.
    pub fn wait_until(&self, done: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        self.wait_for_state(|collected| done(&collected.text), timeout)
    }

    /// Waits until the stream has ended, so [`Output::text`] holds all of it.
    fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_for_state(|collected| collected.closed, timeout)
    }

    fn wait_for_state(&self, done: impl Fn(&Collected) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (collected, changed) = &*self.0;
        let mut collected = collected.lock().unwrap();
        while !done(&collected) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            collected = changed.wait_timeout(collected, deadline - now).unwrap().0;
        }
        true
    }
}

/// An `agent-block` child process; killed on drop.
pub struct Worker {
    child: Child,
    pub stdout: Output,
    pub stderr: Output,
}

impl Worker {
    /// Starts `agent-block ARGS` (JSON logs) without waiting.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_with_log_format(args, env, Some("json"))
    }

    /// Starts `agent-block ARGS` with `--log-format FORMAT`, or without the flag
    /// when `format` is `None` (stderr is a pipe, not a terminal).
    pub fn spawn_with_log_format(args: &[&str], env: &[(&str, &str)], format: Option<&str>) -> Self {
        let mut command = Command::new(BIN);
        command.args(args);
        if let Some(format) = format {
            command.args(["--log-format", format]);
        }
        hermetic(&mut command);
        command
            .env("RUST_LOG", "info,async_nats=warn,agent_block::event=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start agent-block");
        let stdout = Output::default();
        let stderr = Output::default();
        stdout.collect(child.stdout.take().expect("piped stdout"));
        stderr.collect(child.stderr.take().expect("piped stderr"));
        Worker { child, stdout, stderr }
    }

    /// `agent-block run SCRIPT --nats-url URL ARGS`, waiting until it is ready.
    pub fn run(server: &NatsServer, script: &Path, args: &[&str]) -> Self {
        let url = server.url();
        let mut all = vec!["run", script.to_str().unwrap(), "--nats-url", &url];
        all.extend_from_slice(args);
        let worker = Self::spawn(&all);
        worker.expect_ready();
        worker
    }

    pub fn expect_ready(&self) {
        assert!(
            self.stderr.wait_for("worker ready", PATIENCE),
            "worker did not become ready; its log:\n{}",
            self.stderr.text()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, and for the rest of its output (a child it
    /// left behind may hold the pipes: that wait is short).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                self.stdout.wait_closed(Duration::from_secs(5));
                self.stderr.wait_closed(Duration::from_secs(5));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a worker through `start` (given the `HOST:PORT` for `--metrics-addr` or
/// `AGENT_BLOCK_METRICS_ADDR`) and waits until its probes listen. A port of this
/// process's range may still be taken by a program outside the convention: the
/// worker then exits saying so, and another port is tried, as for servers.
pub fn with_probes(start: impl Fn(&str) -> Worker) -> (Worker, String) {
    let mut last_log = String::new();
    for _ in 0..5 {
        let addr = format!("127.0.0.1:{}", free_port());
        let worker = start(&addr);
        let settled = |log: &str| log.contains("probes at /healthz") || log.contains("cannot listen on");
        assert!(worker.stderr.wait_until(settled, PATIENCE), "no probes; its log:\n{}", worker.stderr.text());
        if worker.stderr.text().contains("probes at /healthz") {
            return (worker, addr);
        }
        last_log = worker.stderr.text();
    }
    panic!("no free port for the probes; last log:\n{last_log}")
}

/// Runs `agent-block ARGS` to completion: (exit code, stdout, stderr).
pub fn run_command(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    run_command_with_env(args, &[], stdin)
}

/// [`run_command`] with extra environment variables.
pub fn run_command_with_env(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    hermetic(&mut command);
    command.envs(env.iter().copied());
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent-block");
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    let output = child.wait_with_output().expect("wait for agent-block");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub async fn client(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url()).await.expect("connect test client")
}

/// Sends a request and returns the reply.
pub async fn request(client: &async_nats::Client, subject: &str, body: &str) -> Message {
    request_with(client, subject, None, body).await
}

pub async fn request_with(
    client: &async_nats::Client,
    subject: &str,
    headers: Option<HeaderMap>,
    body: &str,
) -> Message {
    let mut request = async_nats::Request::new().payload(Bytes::from(body.to_string())).timeout(Some(PATIENCE));
    if let Some(headers) = headers {
        request = request.headers(headers);
    }
    client
        .send_request(subject.to_string(), request)
        .await
        .unwrap_or_else(|err| panic!("request to {subject} failed: {err}"))
}

/// The `Nats-Service-Error-Code` and `Nats-Service-Error` of a reply, if it is an error.
pub fn error_of(message: &Message) -> Option<(u16, String)> {
    let headers = message.headers.as_ref()?;
    let text = headers.get("Nats-Service-Error")?.as_str().to_string();
    let code = headers.get("Nats-Service-Error-Code")?.as_str().parse().expect("numeric error code");
    Some((code, text))
}

pub fn body(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

pub fn json(message: &Message) -> serde_json::Value {
    serde_json::from_slice(&message.payload)
        .unwrap_or_else(|err| panic!("reply is not JSON ({err}): {:?}", body(message)))
}

/// `GET path` on a local HTTP listener: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

/// The payload of a `Transfer-Encoding: chunked` body (servers such as the
/// nats-server monitor send large responses that way).
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size_field = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_field, 16) else { break };
        let (Some(chunk), Some(tail)) = (after.get(..size), after.get(size..)) else { break };
        if size == 0 {
            break;
        }
        body.push_str(chunk);
        rest = tail.strip_prefix("\r\n").unwrap_or(tail);
    }
    body
}

/// Clears every variable of the developer's shell the worker or its libraries
/// read: its settings (`AGENT_BLOCK_*`, `NATS_*`), the OpenTelemetry SDK's
/// (`OTEL_*`), `RUST_LOG`, PostgreSQL's client defaults (`PG*`), HTTP proxies and
/// extra TLS roots. Keeps `NATS_SERVER_BIN`, which picks the server for `dev`.
pub fn hermetic(command: &mut Command) {
    const PREFIXES: &[&str] = &["AGENT_BLOCK_", "NATS_", "OTEL_", "PG"];
    const NAMES: &[&str] =
        &["RUST_LOG", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"];
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let read_by_worker = PREFIXES.iter().any(|prefix| name.starts_with(prefix))
            || NAMES.iter().any(|known| name.eq_ignore_ascii_case(known));
        if read_by_worker && name != "NATS_SERVER_BIN" {
            command.env_remove(name);
        }
    }
}

/// First port of the ranges tests hand out; below Linux's ephemeral range
/// (32768-60999), so no client socket or `-p -1` server lands in them.
const PORT_RANGES_START: u16 = 20000;
const PORT_RANGE_SIZE: u16 = 200;
const PORT_RANGES: u16 = 60;

/// Ports of this process's ranges. Each range's first port is held open for the
/// life of the process: that listener claims the range, so another test process
/// following the same rule (the deployment checks do too) takes another one.
struct PortRanges {
    claims: Vec<std::net::TcpListener>,
    next: u16,
    end: u16,
}

static PORTS: Mutex<PortRanges> = Mutex::new(PortRanges { claims: Vec::new(), next: 0, end: 0 });

/// A port no other test will be given: taken from a range this process owns and
/// never handed out twice, so it is never bound, released and raced for.
pub fn free_port() -> u16 {
    let mut ports = PORTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if ports.next >= ports.end {
        let first = std::process::id() as u16 % PORT_RANGES;
        let claimed = (0..PORT_RANGES).find_map(|i| {
            let start = PORT_RANGES_START + ((first + i) % PORT_RANGES) * PORT_RANGE_SIZE;
            std::net::TcpListener::bind(("127.0.0.1", start)).ok().map(|claim| (claim, start))
        });
        let (claim, start) = claimed.expect("a free test port range between 20000 and 32000");
        ports.claims.push(claim);
        ports.next = start + 1;
        ports.end = start + PORT_RANGE_SIZE;
    }
    let port = ports.next;
    ports.next += 1;
    port
}

/// The next message of a subscription, failing the test if none comes.
pub async fn next(sub: &mut async_nats::Subscriber) -> Message {
    use futures::StreamExt;
    tokio::time::timeout(PATIENCE, sub.next()).await.expect("message in time").expect("subscription open")
}

/// Headers from name/value pairs; a repeated name adds a value.
pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(*name, *value);
    }
    headers
}

/// A `jobs.run` handler held until the file `gate` exists, then recording its
/// message's id in the file `handled`: a fault can strike while a known number
/// of messages is in flight, and each one's handling shows after.
pub fn gated_handler(gate: &Path, handled: &Path) -> String {
    r#"
bus.on("jobs.run", function(ev)
  while true do
    local gate = io.open("GATE")
    if gate then gate:close() break end
    time.sleep("20ms")
  end
  local handled = assert(io.open("HANDLED", "a"))
  handled:write(ev.id, "\n")
  handled:close()
  return true
end)
"#
    .replace("GATE", gate.to_str().expect("a UTF-8 path"))
    .replace("HANDLED", handled.to_str().expect("a UTF-8 path"))
}

/// The ids a [`gated_handler`] recorded in `handled`.
pub fn handled_ids(handled: &Path) -> std::collections::HashSet<String> {
    std::fs::read_to_string(handled).unwrap_or_default().lines().map(str::to_string).collect()
}
