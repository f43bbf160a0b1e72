//! A 3-node JetStream cluster on loopback: the node a worker is connected to dies
//! while a known number of messages are in its handlers; the worker fails over to
//! the others and every message is handled, none lost.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;

/// One cluster node: client and monitoring ports chosen by the server.
struct Node {
    child: Child,
    client_port: u16,
    monitor_port: u16,
}

/// Route ports must be known before the nodes start (a JetStream cluster needs
/// its routes configured), so they come from the test's own port range.
fn route_ports() -> [u16; 3] {
    static PORTS: std::sync::OnceLock<[u16; 3]> = std::sync::OnceLock::new();
    *PORTS.get_or_init(|| [free_port(), free_port(), free_port()])
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(dir: &std::path::Path, index: usize) -> Node {
        let name = format!("n{index}");
        let ports = route_ports();
        let routes: Vec<String> = ports.iter().map(|port| format!("\"nats-route://127.0.0.1:{port}\"")).collect();
        let config = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:-1\"\nhttp: \"127.0.0.1:-1\"\n\
             jetstream {{ store_dir: \"{}\" }}\n\
             cluster {{ name: \"loop\", listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
            dir.join(&name).display(),
            ports[index],
            routes.join(", ")
        );
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, config).expect("write node config");
        let mut child = Command::new(agent_block::nats_server::binary())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a cluster node");
        let stderr = child.stderr.take().expect("piped stderr");
        let (ports_tx, ports_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut client, mut monitor) = (None, None);
            let mut ports_tx = Some(ports_tx);
            let port_in = |line: &str, marker: &str| {
                line.split(marker).nth(1).and_then(|rest| rest.trim().rsplit(':').next()?.parse::<u16>().ok())
            };
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                client = client.or(port_in(&line, "Listening for client connections on "));
                monitor = monitor.or(port_in(&line, "Starting http monitor on "));
                if line.contains("Server is ready")
                    && let Some(tx) = ports_tx.take()
                {
                    let _ = tx.send((client, monitor));
                }
            }
        });
        match ports_rx.recv_timeout(PATIENCE) {
            Ok((Some(client_port), Some(monitor_port))) => Node { child, client_port, monitor_port },
            other => panic!("cluster node {name} did not start: {other:?}"),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Connections from the worker (named after `--name`) on this node.
    fn worker_connections(&self) -> usize {
        let (_, body) = http_get(&format!("127.0.0.1:{}", self.monitor_port), "/connz").expect("connz");
        let connz: serde_json::Value = serde_json::from_str(&body).expect("connz JSON");
        connz["connections"]
            .as_array()
            .map(|list| list.iter().filter(|c| c["name"] == "agent-block").count())
            .unwrap_or(0)
    }
}

async fn connect_all(urls: &[String]) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> = urls.iter().map(|url| url.parse().expect("a server URL")).collect();
    async_nats::connect(servers).await.expect("connect to the cluster")
}

/// A consumer whose handlers are held at a gate (see [`gated_handler`]).
const CONSUMER: &str = r#"
bus.consume({ stream = "JOBS", consumer = "work", subject = "jobs.>", ack_wait = "3s" })
"#;

/// The consumer's state, read from whichever node answers.
async fn consumer_info(js: &jetstream::Context) -> Option<jetstream::consumer::Info> {
    let stream = js.get_stream("JOBS").await.ok()?;
    let mut consumer = stream.get_consumer::<jetstream::consumer::pull::Config>("work").await.ok()?;
    consumer.info().await.ok().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fails_over_when_its_cluster_node_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..3).map(|index| Node::start(dir.path(), index)).collect();
    let urls: Vec<String> = nodes.iter().map(Node::url).collect();

    // The cluster elects its JetStream leaders within a few seconds.
    let client = connect_all(&urls).await;
    let js = jetstream::new(client.clone());
    let config = jetstream::stream::Config {
        name: "JOBS".into(),
        subjects: vec!["jobs.>".into()],
        num_replicas: 3,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(err) = js.create_stream(config.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "the cluster never accepted an R3 stream: {err}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let scripts = Scripts::new();
    let (gate, handled) = (scripts.path().join("gate"), scripts.path().join("handled"));
    let source = format!("{CONSUMER}{}", gated_handler(&gate, &handled));
    let script = scripts.write("app.lua", &source);
    let url_list = urls.join(",");
    let args = ["run", script.to_str().unwrap(), "--nats-url", &url_list, "--workers", "2", "--concurrency", "4"];
    let worker = Worker::spawn(&[&args[..], &["--unsafe-lua"]].concat());
    worker.expect_ready();
    let total: u64 = 40;
    for n in 0..total {
        js.publish("jobs.run", n.to_string().into()).await.unwrap().await.unwrap();
    }
    // 2 VMs x 4 slots, every handler held at the gate: 8 in flight, 32 waiting.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let info = consumer_info(&js).await;
        if let Some(info) = &info
            && info.num_ack_pending == 8
        {
            assert_eq!(info.num_pending, total - 8, "{info:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never 8 in flight: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(handled_ids(&handled).is_empty(), "nothing finished before the node died");

    // Kill the node holding most of the worker's connections (not the test's).
    let victim = (0..nodes.len()).max_by_key(|&i| nodes[i].worker_connections()).unwrap();
    assert!(nodes[victim].worker_connections() > 0, "the worker is connected somewhere");
    nodes.remove(victim);
    std::fs::write(&gate, "").unwrap();
    let survivors: Vec<String> = nodes.iter().map(Node::url).collect();
    let js = jetstream::new(connect_all(&survivors).await);

    // The consumer's state and the handlers' record prove that none was lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = consumer_info(&js).await;
        if let Some(info) = &info
            && info.num_pending == 0
            && info.num_ack_pending == 0
            && info.ack_floor.stream_sequence == total
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream was not drained after fail-over: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids = handled_ids(&handled);
    let missing: Vec<u64> = (1..=total).filter(|n| !ids.contains(&format!("JOBS:{n}"))).collect();
    assert!(missing.is_empty(), "messages never handled after fail-over: {missing:?}");
}
