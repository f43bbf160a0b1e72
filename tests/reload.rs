//! Hot reload: a steady stream of requests across several reloads is answered
//! exactly once each, switching to the new script; a broken script keeps the old
//! one serving.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use common::*;

fn version(v: &str) -> String {
    // The short sleep keeps handlers in flight while a reload happens.
    format!("bus.subscribe('version')\nbus.on('version', function(ev)\n  time.sleep(0.005)\n  return '{v}'\nend)\n")
}

fn hangup(worker: &Worker) {
    let status = std::process::Command::new("kill").args(["-HUP", &worker.pid().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_answer_every_request_exactly_once_and_switch_behaviour() {
    let server = server();
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", &version("v1"));
    let worker = Worker::run(&server, &script, &["--workers", "2"]);
    let client = client(&server).await;
    let mut replies = client.subscribe("_INBOX.reload.>").await.unwrap();
    client.flush().await.unwrap();

    let answers: Arc<std::sync::Mutex<BTreeMap<u64, Vec<String>>>> = Default::default();
    let arrivals: Arc<std::sync::Mutex<Vec<u64>>> = Default::default();
    let collector = {
        let (answers, arrivals) = (answers.clone(), arrivals.clone());
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let n: u64 = message.subject.rsplit('.').next().unwrap().parse().unwrap();
                let answer = match message.status {
                    Some(status) => format!("status {status}"),
                    None => body(&message),
                };
                answers.lock().unwrap().entry(n).or_default().push(answer);
                arrivals.lock().unwrap().push(n);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                client.publish_with_reply("version", format!("_INBOX.reload.{sent}"), "".into()).await.unwrap();
                sent += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client.flush().await.unwrap();
            sent
        })
    };

    // Each version answers a stretch of the stream before the next reload.
    let answered_more = |more: usize| {
        let answers = answers.clone();
        async move {
            let target = answers.lock().unwrap().len() + more;
            let deadline = std::time::Instant::now() + PATIENCE;
            while answers.lock().unwrap().len() < target && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for (reload, v) in ["v2", "v3", "v4"].into_iter().enumerate() {
        answered_more(50).await;
        scripts.write("app.lua", &version(v));
        hangup(&worker);
        let needle = format!("\"reloads\":{}", reload + 1);
        assert!(worker.stderr.wait_for(&needle, PATIENCE), "no reload {v}:\n{}", worker.stderr.text());
    }
    scripts.write("app.lua", "bus.subscribe('version')\nbus.on('version', function(ev)\n  return 1 +\nend)\n");
    hangup(&worker);
    assert!(worker.stderr.wait_for("reload failed", PATIENCE), "{}", worker.stderr.text());
    assert!(worker.stderr.text().contains("app.lua:4:"), "the error names file:line: {}", worker.stderr.text());

    // Keep the stream going past the failed reload: the old script still answers.
    answered_more(50).await;
    stop.store(true, Ordering::SeqCst);
    let sent = sender.await.unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while (answers.lock().unwrap().len() as u64) < sent && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A quiet moment in which a second answer to any request would show up,
    // then a marker request through the same path: its answer must come last.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.publish_with_reply("version", format!("_INBOX.reload.{sent}"), "".into()).await.unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !answers.lock().unwrap().contains_key(&sent) {
        assert!(std::time::Instant::now() < deadline, "the marker request was not answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    collector.abort();
    assert_eq!(arrivals.lock().unwrap().last(), Some(&sent), "answers came after the marker's");
    answers.lock().unwrap().remove(&sent);

    let answers = answers.lock().unwrap();
    let missing: Vec<u64> = (0..sent).filter(|n| !answers.contains_key(n)).collect();
    assert!(missing.is_empty(), "requests not answered: {missing:?} of {sent}; worker log:\n{}", worker.stderr.text());
    let mut seen = std::collections::BTreeSet::new();
    for (n, list) in answers.iter() {
        assert_eq!(list.len(), 1, "request {n} answered {} times: {list:?}", list.len());
        assert!(list[0].starts_with('v'), "request {n} got {:?}", list[0]);
        seen.insert(list[0].clone());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["v1", "v2", "v3", "v4"]);
    let last: Vec<&String> = answers.values().rev().take(20).map(|list| &list[0]).collect();
    assert!(last.iter().all(|v| *v == "v4"), "the last answers come from the last good script: {last:?}");
    assert!(sent > 200, "a steady stream ({sent} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_reloads_when_a_module_changes() {
    let scripts = Scripts::new();
    scripts.write("answer.lua", "return 'v1'\n");
    let script = scripts
        .write("app.lua", "bus.subscribe('version')\nbus.on('version', function() return require('answer') end)\n");
    let mut dev = Worker::spawn(&["dev", script.to_str().unwrap(), "--workers", "1"]);
    assert!(dev.stdout.wait_for("nats-server running at ", PATIENCE), "{}", dev.stderr.text());
    dev.expect_ready();
    let url =
        dev.stdout.text().lines().find_map(|l| l.strip_prefix("nats-server running at ")).unwrap().trim().to_string();
    let client = async_nats::connect(&url).await.unwrap();
    assert_eq!(body(&request(&client, "version", "").await), "v1");
    scripts.write("answer.lua", "return 'v2'\n");
    assert!(dev.stderr.wait_for("script reloaded", PATIENCE), "{}", dev.stderr.text());
    // The old VMs stay in the queue group until their unsubscribe reaches the
    // server, so a request right after the reload may still get the old answer.
    let reloaded = Instant::now();
    loop {
        let reply = client.request("version", "".into()).await;
        let answer = body(&reply.unwrap_or_else(|err| panic!("{err} right after a reload: {}", dev.stderr.text())));
        if answer == "v2" {
            break;
        }
        assert_eq!(answer, "v1", "an answer from the old or the new module");
        assert!(reloaded.elapsed() < PATIENCE, "the new module never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dev.terminate();
    assert_eq!(dev.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
}
