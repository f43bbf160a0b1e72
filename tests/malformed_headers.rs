//! A malformed header block from any publisher (bytes that are not UTF-8, a line
//! without `:`, a name with a space, a stray `\r`, an unreadable version line),
//! or a subject or reply subject that is not UTF-8 or holds whitespace other than
//! a space or tab, must not cost the worker its NATS connection: nats-server
//! forwards such messages unchecked, the worker handles the message, and the
//! requests in flight around it are all answered.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const APP: &str = r#"
bus.subscribe("fz.>", { kind = "{{wildcard(1)}}" })
bus.on("echo", function(ev) return ev.payload end)
bus.on("headers", function(ev) return ev.headers end)
bus.on_any(function(ev) return { subject = ev.subject, reply = ev.reply } end)
"#;

/// Header blocks no NATS client library would send, each with what a handler
/// sees of it in `ev.headers`: bytes that are not UTF-8 decoded lossily, lines
/// that are not `Name: value` dropped, a stray `\r` turned into a space.
const SHAPES: &[(&str, &[u8], &str)] = &[
    ("a value that is not UTF-8", b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n", r#"{"X-Bad":"\ufffd\ufffd"}"#),
    ("a line without a colon", b"NATS/1.0\r\nnocolon\r\n\r\n", "{}"),
    ("a name with a space", b"NATS/1.0\r\nBad Name: v\r\n\r\n", "{}"),
    ("a carriage return in a value", b"NATS/1.0\r\nX-Bad: a\rb\r\n\r\n", r#"{"X-Bad":"a b"}"#),
    ("a name that is not UTF-8", b"NATS/1.0\r\nX-\xff: v\r\nX-Good: yes\r\n\r\n", r#"{"X-Good":"yes"}"#),
    ("no version line", b"X-First: 1\r\nX-Good: yes\r\n\r\n", r#"{"X-Good":"yes"}"#),
    ("a status that is not a number", b"NATS/1.0 abc\r\nX-Good: yes\r\n\r\n", r#"{"X-Good":"yes"}"#),
];

/// Subjects no NATS client library would send, each with what a handler sees of
/// it in `ev.subject`: bytes that are not UTF-8 decoded lossily, and whitespace
/// other than a space or tab, which nats-server keeps inside a subject, kept.
const SUBJECTS: &[(&str, &[u8], &str)] = &[
    ("a subject that is not UTF-8", b"fz.\xff", "fz.\u{fffd}"),
    ("a subject with a Unicode space", b"fz.\xc2\xa0x", "fz.\u{a0}x"),
    ("a subject with a form feed", b"fz.\x0cx", "fz.\u{c}x"),
];

/// A publisher speaking the bare protocol, so it can send any header or subject bytes.
struct RawPublisher {
    stream: BufReader<TcpStream>,
}

impl RawPublisher {
    async fn connect(server: &NatsServer) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", server.port())).await.expect("connect the raw publisher");
        let mut publisher = RawPublisher { stream: BufReader::new(stream) };
        let info = publisher.line().await;
        assert!(info.starts_with(b"INFO "), "expected INFO, got {:?}", String::from_utf8_lossy(&info));
        publisher.send(b"CONNECT {\"headers\":true,\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n").await;
        publisher
    }

    /// `HPUB subject reply` with `header` as the raw header block, then waits for
    /// the server's PONG, so the server has taken the message.
    async fn hpub(&mut self, subject: &str, reply: &str, header: &[u8], body: &[u8]) {
        self.publish(subject.as_bytes(), reply.as_bytes(), Some(header), body).await;
    }

    /// `PUB subject reply` (or `HPUB` with a header block) with raw subject bytes,
    /// then waits for the server's PONG, so the server has taken the message.
    async fn publish(&mut self, subject: &[u8], reply: &[u8], header: Option<&[u8]>, body: &[u8]) {
        let (verb, sizes) = match header {
            Some(header) => ("HPUB", format!("{} {}", header.len(), header.len() + body.len())),
            None => ("PUB", body.len().to_string()),
        };
        let frame = [
            verb.as_bytes(),
            b" ",
            subject,
            b" ",
            reply,
            b" ",
            sizes.as_bytes(),
            b"\r\n",
            header.unwrap_or_default(),
            body,
            b"\r\nPING\r\n",
        ]
        .concat();
        self.send(&frame).await;
        loop {
            let line = self.line().await;
            assert!(!line.starts_with(b"-ERR"), "the server refused the message: {:?}", String::from_utf8_lossy(&line));
            if line.starts_with(b"PONG") {
                return;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.expect("write to the server");
    }

    async fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let read = tokio::time::timeout(PATIENCE, self.stream.read_until(b'\n', &mut line)).await;
        assert!(matches!(read, Ok(Ok(n)) if n > 0), "the server closed the raw connection or said nothing");
        line
    }
}

/// The worker logged neither a lost connection nor a panic.
fn assert_stayed_connected(worker: &Worker) {
    let log = worker.stderr.text();
    assert!(!log.contains("disconnected") && !log.contains("panicked"), "the worker lost its connection:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_header_is_answered_and_the_connection_stays() {
    let app = start_app(APP, &[]).await;
    let mut publisher = RawPublisher::connect(&app.server).await;

    for (i, (shape, header, _)) in SHAPES.iter().enumerate() {
        let reply = format!("malformed.reply.{i}");
        let mut replies = app.client.subscribe(reply.clone()).await.expect("subscribe to the reply subject");
        app.client.flush().await.expect("flush the subscription");
        let body = format!(r#"{{"shape":{i}}}"#);
        publisher.hpub("fz.echo", &reply, header, body.as_bytes()).await;

        let answer = next(&mut replies).await;
        match error_of(&answer) {
            None => assert_eq!(json(&answer), serde_json::json!({ "shape": i }), "{shape}: echoed"),
            Some((code, message)) => panic!("{shape}: answered with error {code} {message}"),
        }
        let plain = request(&app.client, "fz.echo", r#"{"plain":true}"#).await;
        assert_eq!(json(&plain), serde_json::json!({ "plain": true }), "{shape}: a plain request after it");
    }
    assert_stayed_connected(&app.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_sees_the_headers_that_could_be_read() {
    let app = start_app(APP, &[]).await;
    let mut publisher = RawPublisher::connect(&app.server).await;
    let mut replies = app.client.subscribe("malformed.headers").await.expect("subscribe to the reply subject");
    app.client.flush().await.expect("flush the subscription");

    for (shape, header, expected) in SHAPES {
        publisher.hpub("fz.headers", "malformed.headers", header, b"").await;
        let answer = next(&mut replies).await;
        let expected: serde_json::Value = serde_json::from_str(expected).expect("expected headers are JSON");
        assert_eq!(json(&answer), expected, "{shape}: ev.headers");
    }
    assert_stayed_connected(&app.worker);
}

/// A raw message: subject, reply subject, header block (`None`: `PUB`), body.
type Frame<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>, &'a [u8]);

/// Sends 200 echo requests, publishes `frames` after the first half is out,
/// and asserts every request was answered correctly and the worker stayed
/// connected.
async fn assert_requests_in_flight_answered_around(frames: &[Frame<'_>]) {
    const IN_FLIGHT: usize = 200;
    let app = start_app(APP, &[]).await;
    let mut publisher = RawPublisher::connect(&app.server).await;

    let ask = |n: usize| {
        let client = app.client.clone();
        tokio::spawn(async move {
            let request = async_nats::Request::new()
                .payload(Bytes::from(format!(r#"{{"n":{n}}}"#)))
                .timeout(Some(Duration::from_secs(10)));
            let answer = client.send_request("fz.echo", request).await.ok()?;
            (error_of(&answer).is_none() && json(&answer) == serde_json::json!({ "n": n })).then_some(())
        })
    };
    let mut requests: Vec<_> = (0..IN_FLIGHT / 2).map(ask).collect();
    app.client.flush().await.expect("flush the first requests");
    for (subject, reply, header, body) in frames {
        publisher.publish(subject, reply, *header, body).await;
    }
    requests.extend((IN_FLIGHT / 2..IN_FLIGHT).map(ask));

    let answered = futures::stream::iter(requests)
        .then(|request| async { request.await.expect("request task").is_some() })
        .filter(|answered| std::future::ready(*answered))
        .count()
        .await;
    assert_eq!(answered, IN_FLIGHT, "requests answered correctly out of {IN_FLIGHT}");
    let plain = request(&app.client, "fz.echo", r#"{"plain":true}"#).await;
    assert_eq!(json(&plain), serde_json::json!({ "plain": true }), "a plain request afterwards");
    assert_stayed_connected(&app.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_around_malformed_headers_are_all_answered() {
    let frames: Vec<Frame> = SHAPES
        .iter()
        .map(|(_, header, _)| (&b"fz.echo"[..], &b"malformed.ignored"[..], Some(*header), &b"{}"[..]))
        .collect();
    assert_requests_in_flight_answered_around(&frames).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_that_is_not_utf8_reaches_its_handler_decoded_lossily() {
    let app = start_app(APP, &[]).await;
    let mut publisher = RawPublisher::connect(&app.server).await;

    // A subject that is not UTF-8 is delivered, its invalid bytes read as U+FFFD.
    let mut replies = app.client.subscribe("malformed.subject").await.expect("subscribe to the reply subject");
    // A reply subject that is not UTF-8 is answered at its lossy reading, which
    // is not the subject its publisher listens on.
    let mut lossy = app.client.subscribe("malformed.\u{fffd}").await.expect("subscribe to the lossy reply subject");
    app.client.flush().await.expect("flush the subscriptions");

    for header in [None, Some(&b"NATS/1.0\r\n\r\n"[..])] {
        let how = if header.is_some() { "HPUB" } else { "PUB" };
        for (shape, subject, seen) in SUBJECTS {
            publisher.publish(subject, b"malformed.subject", header, b"").await;
            let answer = next(&mut replies).await;
            let expected = serde_json::json!({ "subject": seen, "reply": "malformed.subject" });
            assert_eq!(json(&answer), expected, "{how}, {shape}: the subject a handler sees");
        }

        publisher.publish(b"fz.echo", b"malformed.\xff", header, br#"{"echo":true}"#).await;
        let answer = next(&mut lossy).await;
        assert_eq!(json(&answer), serde_json::json!({ "echo": true }), "{how}: answered at the lossy reply subject");
    }
    let plain = request(&app.client, "fz.echo", r#"{"plain":true}"#).await;
    assert_eq!(json(&plain), serde_json::json!({ "plain": true }), "a plain request after them");
    assert_stayed_connected(&app.worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_around_subjects_that_are_not_utf8_are_all_answered() {
    let shapes = SUBJECTS.iter().map(|(_, subject, _)| (*subject, &b"malformed.ignored"[..]));
    let mut frames: Vec<Frame> = Vec::new();
    for (subject, reply) in shapes.chain([(&b"fz.echo"[..], &b"malformed.\xff"[..])]) {
        frames.push((subject, reply, None, b"{}"));
        frames.push((subject, reply, Some(b"NATS/1.0\r\nX-Any: 1\r\n\r\n"), b"{}"));
    }
    assert_requests_in_flight_answered_around(&frames).await;
}
