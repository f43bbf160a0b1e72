//! The Lua boundary under hostile input: generated JSON of every depth and
//! width, control characters headed for headers, whitespace bodies, invalid
//! trace context. Every message gets an answer (a success or an error with a
//! code) and the worker stays up and correct after each.

mod common;
#[path = "common/json_shapes.rs"]
mod json_shapes;

use common::*;
use serde_json::Value;

const APP: &str = r#"
bus.subscribe("fz.>", { kind = "{{wildcard(1)}}" })
bus.on("echo", function(ev) return ev.payload end)
bus.on("coded", function(ev) error({ code = 422, message = "bad " .. ev.data }) end)
bus.on("raised", function(ev) error("bad " .. ev.data, 0) end)
bus.on("reply_header", function(ev) return bus.reply("ok", { headers = { ["X-Echo"] = ev.data } }) end)
bus.on("bad_header_name", function(ev) return bus.reply("ok", { headers = { ["Bad Name"] = "v" } }) end)
bus.on("publish", function(ev)
  nats.publish("seen", "x", { headers = { ["X-Echo"] = ev.data } })
  return "sent"
end)
bus.on("trace", function(ev) return { trace_id = ev.meta.trace_id or json.null } end)
bus.serve()
"#;

const PLAIN: &str = r#"{"plain":[1,"two",{"three":3.5}]}"#;

/// A plain request still gets the right answer.
async fn assert_sound(client: &async_nats::Client, after: &str) {
    let reply = request(client, "fz.echo", PLAIN).await;
    assert_eq!(error_of(&reply), None, "after {after}");
    assert_eq!(json(&reply), serde_json::from_str::<Value>(PLAIN).unwrap(), "after {after}");
}

async fn echo_every_shape(args: &[&str]) {
    let app = start_app(APP, args).await;
    for (name, text) in json_shapes::shapes(0x5eed_1234, 400) {
        let reply = request(&app.client, "fz.echo", &text).await;
        match serde_json::from_str::<Value>(&text) {
            Ok(expected) => {
                assert_eq!(error_of(&reply), None, "{name}: {text:.200}");
                match expected {
                    // A returned string is the reply's bytes, as they are.
                    Value::String(text) => assert_eq!(body(&reply), text, "{name}"),
                    expected => assert_eq!(json(&reply), expected, "{name}: {text:.200}"),
                }
            }
            Err(_) => {
                let (code, message) = error_of(&reply).unwrap_or_else(|| panic!("{name}: no error reply"));
                assert_eq!(code, 400, "{name}: {message}");
            }
        }
        assert_sound(&app.client, &name).await;
    }
    assert!(!app.worker.stderr.text().contains("disconnected"), "{}", app.worker.stderr.text());
}

#[tokio::test]
async fn generated_json_roundtrips_through_a_memory_limited_vm() {
    echo_every_shape(&[]).await;
}

#[tokio::test]
async fn generated_json_roundtrips_through_an_unlimited_vm() {
    echo_every_shape(&["--lua-memory-limit", "0"]).await;
}

#[tokio::test]
async fn floats_come_back_exactly() {
    let app = start_app(APP, &[]).await;
    for text in ["12409406.297733545", "2.4703282292062328e-324", "[0.1,-5e-324,1.7976931348623157e308]"] {
        let reply = request(&app.client, "fz.echo", text).await;
        assert_eq!(json(&reply), serde_json::from_str::<Value>(text).unwrap(), "{text}");
    }
}

#[tokio::test]
async fn control_characters_headed_for_headers_are_replaced() {
    let app = start_app(APP, &[]).await;
    let reply = request(&app.client, "fz.coded", "a\rb").await;
    assert_eq!(error_of(&reply), Some((422, "bad a b".to_string())));
    let reply = request(&app.client, "fz.raised", "a\rb\x07c\nsecond line").await;
    assert_eq!(error_of(&reply), Some((500, "bad a b c".to_string())));
    let reply = request(&app.client, "fz.reply_header", "x\ry\0z").await;
    assert_eq!(body(&reply), "ok");
    assert_eq!(reply.headers.as_ref().and_then(|h| h.get("X-Echo")).map(|v| v.as_str()), Some("x y z"));

    let mut seen = app.client.subscribe("seen").await.unwrap();
    app.client.flush().await.unwrap();
    assert_eq!(body(&request(&app.client, "fz.publish", "p\rq").await), "sent");
    let published = next(&mut seen).await;
    assert_eq!(published.headers.as_ref().and_then(|h| h.get("X-Echo")).map(|v| v.as_str()), Some("p q"));

    let reply = request(&app.client, "fz.bad_header_name", "").await;
    let (code, message) = error_of(&reply).expect("an error reply");
    assert_eq!(code, 500);
    assert!(message.contains(r#"header name "Bad Name" is not valid"#), "{message}");

    assert_sound(&app.client, "header data").await;
    let log = app.worker.stderr.text();
    assert!(!log.contains("panic"), "{log}");
}

#[tokio::test]
async fn a_body_of_only_whitespace_is_not_json() {
    let app = start_app(APP, &[]).await;
    let reply = request(&app.client, "fz.echo", " \n\t ").await;
    let (code, message) = error_of(&reply).expect("an error reply");
    assert_eq!(code, 400, "{message}");
    let empty = request(&app.client, "fz.echo", "").await;
    assert_eq!((error_of(&empty), body(&empty)), (None, String::new()), "an empty body is nil, answered empty");
}

#[tokio::test]
async fn an_invalid_traceparent_starts_a_new_trace() {
    let app = start_app(APP, &[]).await;
    let trace_of = |message: &async_nats::Message| json(message)["trace_id"].clone();
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = request_with(&app.client, "fz.trace", Some(headers(&[("traceparent", valid)])), "").await;
    assert_eq!(trace_of(&reply), "4bf92f3577b34da6a3ce929d0e0e4736");
    for invalid in [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
    ] {
        let reply = request_with(&app.client, "fz.trace", Some(headers(&[("traceparent", invalid)])), "").await;
        assert_eq!(trace_of(&reply), Value::Null, "{invalid}");
    }
}

/// The campaign's mix: random subjects (known kinds and unknown ones), random
/// headers (trace context valid and not, long and odd values), payloads of every
/// generated shape, 16 in flight. Every request is answered with a success or an
/// error with a code, echoes come back equal, and the worker stays connected.
#[tokio::test]
async fn a_seeded_campaign_of_subjects_headers_and_payloads_is_answered() {
    use futures::StreamExt;
    let app = start_app(APP, &[]).await;
    let shapes = json_shapes::shapes(0xca4a_9a16, 300);
    let mut rng = json_shapes::Rng::new(0xca4a_9a16);
    let mut requests = Vec::new();
    for index in 0..600 {
        let kind = ["echo", "coded", "raised", "trace", "reply_header"][rng.below(5) as usize].to_string();
        let subject = match rng.below(6) {
            0 => format!("fz.unknown{}", rng.below(1000)),
            1 => format!("fz.{kind}.deeper.{}", rng.below(10)),
            _ => format!("fz.{kind}"),
        };
        let mut pairs = Vec::new();
        for _ in 0..rng.below(4) {
            let value: String = (0..rng.below(200)).map(|_| (b' ' + rng.below(95) as u8) as char).collect();
            pairs.push((format!("X-Fuzz-{}", rng.below(50)), value));
        }
        if rng.below(3) == 0 {
            let hex =
                |rng: &mut json_shapes::Rng, n| (0..n).map(|_| format!("{:x}", rng.below(16))).collect::<String>();
            let traceparent =
                format!("{}-{}-{}-{}", hex(&mut rng, 2), hex(&mut rng, 32), hex(&mut rng, 16), hex(&mut rng, 2));
            pairs.push(("traceparent".to_string(), traceparent));
        }
        let (name, payload) = shapes[rng.below(shapes.len() as u64) as usize].clone();
        requests.push((index, subject, pairs, name, payload));
    }
    let client = app.client.clone();
    let answered = futures::stream::iter(requests)
        .map(|(index, subject, pairs, name, payload)| {
            let client = client.clone();
            async move {
                let header_pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let reply = request_with(&client, &subject, Some(headers(&header_pairs)), &payload).await;
                if subject == "fz.echo"
                    && let Ok(expected) = serde_json::from_str::<Value>(&payload)
                    && !expected.is_string()
                {
                    assert_eq!(json(&reply), expected, "request {index}: {name}");
                }
                if let Some((code, message)) = error_of(&reply) {
                    assert!((400..600).contains(&code), "request {index} to {subject}: {code} {message}");
                }
            }
        })
        .buffer_unordered(16)
        .count()
        .await;
    assert_eq!(answered, 600);
    assert_sound(&app.client, "the campaign").await;
    let log = app.worker.stderr.text();
    assert!(!log.contains("disconnected") && !log.contains("panic"), "{log}");
}
