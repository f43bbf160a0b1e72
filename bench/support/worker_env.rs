//! What the JetStream benchmarks share: storing messages and starting workers
//! that read none of the caller's settings.

use std::process::Command;

use async_nats::jetstream;

/// Publishes `messages` copies of `body`, the n-th to `subject(n)`, waiting for
/// the stream's acks a thousand at a time.
pub async fn publish_all(
    js: &jetstream::Context,
    messages: usize,
    subject: impl Fn(usize) -> String,
    body: &str,
) -> Result<(), String> {
    let mut pending = Vec::with_capacity(1000);
    for n in 0..messages {
        let ack = js.publish(subject(n), body.to_string().into()).await.map_err(|e| e.to_string())?;
        pending.push(ack);
        if pending.len() == 1000 {
            for ack in pending.drain(..) {
                ack.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for ack in pending {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Removes the caller's agent-block settings (`AGENT_BLOCK_*`, `RUST_LOG`,
/// `NATS_URL`) from `command`, so the worker runs as the benchmark says.
pub fn without_caller_settings(command: &mut Command) {
    for (variable, _) in std::env::vars_os() {
        let variable = variable.to_string_lossy();
        if variable.starts_with("AGENT_BLOCK_") || matches!(&*variable, "RUST_LOG" | "NATS_URL") {
            command.env_remove(&*variable);
        }
    }
}
