//! `bus.consume` on a consumer that already exists: an update never moves the
//! consumer's position. Changes that would skip or replay messages on the server
//! in use are refused before anything is sent (exit 2); safe ones are applied and
//! logged. Where nats-server versions differ (a filter change on 2.9), each
//! test asserts what is right on the server it runs against.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::*;

const STREAM: &str = "UPD";
const CONSUMER: &str = "upd";
const PENDING: usize = 20;

/// A script consuming `UPD/upd` with `options` added to the declaration; each
/// handled message is published to `seen`.
fn app(options: &str) -> String {
    format!(
        r#"
bus.consume({{ stream = "UPD", consumer = "upd", kind = "x", {options} }})
bus.on("x", function(ev)
  nats.publish("seen", ev.id)
  return true
end)
"#
    )
}

/// The stream, a consumer made by another tool with `config`, and `count`
/// messages waiting on it. A consumer delivering all messages is returned once
/// the server counts them all as pending, which it does shortly after the last
/// publish is stored.
async fn existing_consumer(server: &NatsServer, config: consumer::pull::Config, count: usize) -> jetstream::Context {
    let js = jetstream::new(client(server).await);
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["upd.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let config = consumer::pull::Config { durable_name: Some(CONSUMER.into()), ..config };
    js.get_stream(STREAM).await.unwrap().create_consumer(config).await.expect("create consumer");
    for n in 0..count {
        js.publish(format!("upd.{}", n % 3), format!("{n}").into()).await.expect("publish").await.expect("stored");
    }
    if consumer_info(&js).await.config.deliver_policy != consumer::DeliverPolicy::All {
        return js;
    }
    let expected = count as u64;
    let deadline = std::time::Instant::now() + PATIENCE;
    while consumer_info(&js).await.num_pending != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never counted {expected} pending: {:?}",
            consumer_info(&js).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    js
}

async fn consumer_info(js: &jetstream::Context) -> consumer::Info {
    js.get_stream(STREAM).await.unwrap().consumer_info(CONSUMER).await.expect("consumer info")
}

/// Starts the worker on `source` without waiting for it to be ready.
fn start(server: &NatsServer, scripts: &Scripts, source: &str) -> Worker {
    let script = scripts.write("app.lua", source);
    let url = server.url();
    Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--workers", "1"])
}

/// Waits for the worker to exit 2 before serving; its log.
fn refused(mut worker: Worker) -> String {
    let status = worker.wait_exit(PATIENCE).expect("the worker exits");
    worker.stderr.wait_for("error:", PATIENCE);
    let log = worker.stderr.text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(!log.contains("worker ready"), "refused before serving: {log}");
    log
}

/// `(field, old, new)` of each "consumer setting updated" record in a JSON log.
fn updates(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record["message"] == "consumer setting updated")
        .map(|record| {
            assert_eq!(record["level"], "INFO", "{record}");
            assert_eq!((record["stream"].as_str(), record["consumer"].as_str()), (Some(STREAM), Some(CONSUMER)));
            let text = |key: &str| record[key].as_str().unwrap_or_default().to_string();
            (text("field"), text("old"), text("new"))
        })
        .collect()
}

fn update(field: &str, old: &str, new: &str) -> (String, String, String) {
    (field.into(), old.into(), new.into())
}

/// Waits until `count` distinct messages were handled.
async fn handled(sub: &mut async_nats::Subscriber, count: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    while seen.len() < count {
        seen.insert(body(&next(sub).await));
    }
    seen
}

/// Asserts the refusal message names the consumer, the change and the ways out.
fn assert_names(log: &str, needles: &[&str]) {
    for needle in [&["\"upd\"", "\"UPD\"", "change the declaration", "nats consumer rm UPD upd"], needles].concat() {
        assert!(log.contains(needle), "{needle:?} missing: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_filter_subject_loses_no_pending_message() {
    let server = server();
    let js = existing_consumer(&server, consumer::pull::Config::default(), PENDING).await;
    let before = consumer_info(&js).await;
    assert_eq!(before.num_pending, PENDING as u64);
    let client = js.client();
    let mut seen = client.subscribe("seen").await.unwrap();
    client.flush().await.unwrap();
    let scripts = Scripts::new();
    let worker = start(&server, &scripts, &app(r#"subject = "upd.>""#));
    if client.is_server_compatible(2, 10, 0) {
        worker.expect_ready();
        assert_eq!(handled(&mut seen, PENDING).await.len(), PENDING);
        assert_eq!(updates(&worker.stderr.text()), [update("filter_subject", "(none: every subject)", "upd.>")]);
        assert_eq!(consumer_info(&js).await.config.filter_subject, "upd.>");
    } else {
        let log = refused(worker);
        assert_names(
            &log,
            &["filter_subject", "(none: every subject)", "upd.>", client.server_info().version.as_str()],
        );
        let after = consumer_info(&js).await;
        assert_eq!(after.config, before.config, "the consumer is unchanged");
        assert_eq!(after.num_pending, PENDING as u64, "{after:?}");
        assert_eq!((after.delivered.stream_sequence, after.ack_floor.stream_sequence), (0, 0), "{after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_deliver_policy_is_refused() {
    let server = server();
    let config = consumer::pull::Config { deliver_policy: consumer::DeliverPolicy::New, ..Default::default() };
    let js = existing_consumer(&server, config, 0).await;
    let before = consumer_info(&js).await;
    let scripts = Scripts::new();
    let log = refused(start(&server, &scripts, &app("")));
    assert_names(&log, &["deliver_policy is new on the server, all in the declaration"]);
    assert_eq!(consumer_info(&js).await.config, before.config, "the consumer is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_start_sequence_is_refused() {
    let server = server();
    let config = consumer::pull::Config {
        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: 5 },
        ..Default::default()
    };
    let js = existing_consumer(&server, config, PENDING).await;
    let before = consumer_info(&js).await;
    let scripts = Scripts::new();
    let log = refused(start(&server, &scripts, &app("")));
    assert_names(&log, &["opt_start_seq is 5 on the server, (none) in the declaration"]);
    let after = consumer_info(&js).await;
    assert_eq!(after.config, before.config, "the consumer is unchanged");
    assert_eq!((after.delivered, after.ack_floor), (before.delivered, before.ack_floor), "the position is kept");
}

/// Runs the worker on a consumer made with `existing` and holding messages, with
/// `options` declared: every message is handled, and the logged updates are
/// `expected`. Returns the consumer as the server then reports it.
async fn applied(
    existing: consumer::pull::Config,
    options: &str,
    expected: &[(String, String, String)],
) -> (NatsServer, Scripts, consumer::Info) {
    let server = server();
    let js = existing_consumer(&server, existing, 5).await;
    let client = js.client();
    let mut seen = client.subscribe("seen").await.unwrap();
    client.flush().await.unwrap();
    let scripts = Scripts::new();
    let worker = start(&server, &scripts, &app(options));
    worker.expect_ready();
    assert_eq!(handled(&mut seen, 5).await.len(), 5, "the position is kept");
    assert_eq!(updates(&worker.stderr.text()), expected);
    let info = consumer_info(&js).await;
    (server, scripts, info)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ack_wait_is_applied_and_logged() {
    let existing = consumer::pull::Config { ack_wait: Duration::from_secs(5), ..Default::default() };
    let (_server, _scripts, info) = applied(existing, r#"ack_wait = "7s""#, &[update("ack_wait", "5s", "7s")]).await;
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_max_deliver_is_applied_and_logged() {
    let existing = consumer::pull::Config { max_deliver: 4, ..Default::default() };
    let (_server, _scripts, info) = applied(existing, "max_deliver = 6", &[update("max_deliver", "4", "6")]).await;
    assert_eq!(info.config.max_deliver, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_max_ack_pending_is_applied_and_logged() {
    let existing = consumer::pull::Config { max_ack_pending: 50, ..Default::default() };
    let expected = [update("max_ack_pending", "50", "80")];
    let (_server, _scripts, info) = applied(existing, "max_ack_pending = 80", &expected).await;
    assert_eq!(info.config.max_ack_pending, 80);
}

/// The worker applies `backoff` itself: a server-side backoff (which the server
/// also reads back as `ack_wait`) is cleared once, and a restart sees the
/// consumer as declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_backoff_is_replaced_and_logged_once() {
    let existing = consumer::pull::Config {
        ack_wait: Duration::from_secs(2),
        backoff: vec![Duration::from_millis(100), Duration::from_millis(100)],
        max_deliver: 3,
        ..Default::default()
    };
    let options = r#"ack_wait = "2s", max_deliver = 3, backoff = { "100ms", "100ms" }"#;
    let expected = [update("ack_wait", "100ms", "2s"), update("backoff", "[100ms, 100ms]", "(none)")];
    let (server, scripts, info) = applied(existing, options, &expected).await;
    assert_eq!((info.config.ack_wait, info.config.backoff.len()), (Duration::from_secs(2), 0));
    let again = start(&server, &scripts, &app(options));
    again.expect_ready();
    assert_eq!(updates(&again.stderr.text()), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_same_declaration_changes_nothing() {
    let server = server();
    let js = jetstream::new(client(&server).await);
    let scripts = Scripts::new();
    let source = app(r#"subject = "upd.>", ack_wait = "3s", max_deliver = 4, backoff = { "1s", "2s" },
           max_ack_pending = 40, create_stream = { subjects = { "upd.>" } }"#);
    let first = start(&server, &scripts, &source);
    first.expect_ready();
    assert_eq!(updates(&first.stderr.text()), [], "created, not updated");
    drop(first);
    let created = consumer_info(&js).await;
    let again = start(&server, &scripts, &source);
    again.expect_ready();
    assert_eq!(updates(&again.stderr.text()), []);
    let after = consumer_info(&js).await;
    assert_eq!(after.config, created.config, "nothing was sent");
    assert_eq!(after.created, created.created);
}

/// A consumer deleted under a running worker (by another tool) is logged by
/// name, from the server's own status for the pull in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_on_the_server_is_logged() {
    let server = server();
    let js = existing_consumer(&server, consumer::pull::Config::default(), 0).await;
    let scripts = Scripts::new();
    let worker = start(&server, &scripts, &app(""));
    worker.expect_ready();
    js.get_stream(STREAM).await.unwrap().delete_consumer(CONSUMER).await.expect("delete the consumer");
    assert!(worker.stderr.wait_for("consumer deleted on the server", PATIENCE), "{}", worker.stderr.text());
}
