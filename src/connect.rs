//! Connecting to NATS: options from the settings, and at start a retry loop with
//! backoff that names the URL and the cause each time. After the first connection
//! the client reconnects by itself and resubscribes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use tokio::time::Instant;

use crate::config::ConnectionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach NATS at {url} within {}: {cause}; is nats-server running? set --nats-url or NATS_URL", humantime::format_duration(*.after))]
    TimedOut { url: String, after: Duration, cause: String },
    #[error("{0}")]
    Settings(String),
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Connects, retrying until `connect_timeout` (forever when unset).
pub async fn connect(config: &ConnectionConfig) -> Result<async_nats::Client, ConnectError> {
    let servers = servers(&config.url)?;
    let started = Instant::now();
    let mut delay = FIRST_RETRY;
    loop {
        let attempt = options(config).await?.connect(servers.clone());
        let result = match config.connect_timeout {
            Some(limit) => match tokio::time::timeout_at(started + limit, attempt).await {
                Ok(result) => result.map_err(|err| err.to_string()),
                Err(_) => Err("connection attempt timed out".to_string()),
            },
            None => attempt.await.map_err(|err| err.to_string()),
        };
        let cause = match result {
            Ok(client) => {
                tracing::info!(url = %config.url, "connected to NATS");
                return Ok(client);
            }
            Err(cause) => cause,
        };
        if let Some(limit) = config.connect_timeout
            && started.elapsed() + delay >= limit
        {
            return Err(ConnectError::TimedOut { url: config.url.clone(), after: limit, cause });
        }
        tracing::warn!(url = %config.url, error = %cause, retry_in = ?delay, "cannot connect to NATS; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

fn servers(url: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|err| ConnectError::Settings(format!("invalid NATS URL {u:?}: {err}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err(ConnectError::Settings("no NATS URL given; set --nats-url".to_string()))
            } else {
                Ok(servers)
            }
        })
}

async fn options(config: &ConnectionConfig) -> Result<ConnectOptions, ConnectError> {
    let mut options = match &config.creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|err| ConnectError::Settings(format!("cannot read credentials file {}: {err}", path.display())))?,
        None => ConnectOptions::new(),
    };
    if let Some(seed) = &config.nkey {
        options = options.nkey(seed.clone());
    }
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => options = options.user_and_password(user.clone(), password.clone()),
        (None, None) => {}
        _ => return Err(ConnectError::Settings("--user and --password go together".to_string())),
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => return Err(ConnectError::Settings("--tls-cert and --tls-key go together".to_string())),
    }
    let was_down = Arc::new(AtomicBool::new(false));
    Ok(options.name(&config.client_name).max_reconnects(None).event_callback(move |event| {
        let was_down = was_down.clone();
        async move { log_event(event, &was_down) }
    }))
}

fn log_event(event: Event, was_down: &AtomicBool) {
    match event {
        Event::Connected if was_down.swap(false, Ordering::SeqCst) => tracing::info!("NATS connection restored"),
        Event::Disconnected => {
            was_down.store(true, Ordering::SeqCst);
            tracing::warn!("NATS disconnected; reconnecting")
        }
        Event::ServerError(err) => tracing::warn!(error = %err, "NATS server error"),
        Event::SlowConsumer(sid) => {
            crate::telemetry::metrics::global().slow_consumer();
            tracing::warn!(sid, "slow consumer: NATS dropped messages for a subscription")
        }
        other => tracing::debug!(event = %other, "NATS event"),
    }
}

/// Time allowed for the last replies to leave at shutdown.
pub const FLUSH_LIMIT: Duration = Duration::from_millis(200);

/// Flushes what the client still buffers, giving up after [`FLUSH_LIMIT`] (a dead
/// server must not hold up shutdown).
pub async fn flush_briefly(client: &async_nats::Client) {
    if tokio::time::timeout(FLUSH_LIMIT, client.flush()).await.is_err() {
        tracing::warn!("could not flush the last replies to NATS");
    }
}
