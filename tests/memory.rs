//! Memory is given back after a burst: large payloads raise a worker's resident
//! memory while they are handled, and an idle worker returns to a small size.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

const APP: &str = r#"
bus.subscribe("burst")
bus.on("burst", function(ev) return #ev.payload end)
bus.serve()
"#;

/// Resident memory of process `pid`, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS in kB");
    kib * 1024
}

/// A JSON array of strings just under the server's 1 MiB payload limit.
fn megabyte_payload(seed: usize) -> String {
    let item = format!("\"{}\"", "x".repeat(90 + seed % 7));
    let count = 1_000_000 / (item.len() + 1);
    format!("[{}]", vec![item; count].join(","))
}

#[tokio::test]
async fn resident_memory_returns_under_64_mib_after_a_burst_of_1_mb_payloads() {
    let (server, _scripts, worker) = run_app(APP, &["--workers", "2"]);
    let client = client(&server).await;
    let pid = worker.pid();
    let before = resident(pid);
    let payloads: Vec<String> = (0..7).map(megabyte_payload).collect();
    let replies = futures::stream::iter(0..600)
        .map(|i| {
            let client = client.clone();
            let payload = payloads[i % payloads.len()].clone();
            async move { request(&client, "burst", &payload).await }
        })
        .buffer_unordered(160)
        .collect::<Vec<_>>()
        .await;
    assert!(replies.iter().all(|reply| error_of(reply).is_none() && body(reply).parse::<u64>().unwrap() > 9000));
    let peak = resident(pid);
    // Generous: the collector runs on a timer of a few seconds; 30 s absorbs a
    // loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = resident(pid);
    while now >= 64 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        now = resident(pid);
    }
    eprintln!(
        "resident memory: {} MiB before, {} MiB after the burst, {} MiB idle",
        before >> 20,
        peak >> 20,
        now >> 20
    );
    assert!(now < 64 << 20, "still {} MiB resident 30 s after the burst (peak {} MiB)", now >> 20, peak >> 20);
    let reply = request(&client, "burst", "[1,2,3]").await;
    assert_eq!(body(&reply), "3", "the worker still answers");
}
