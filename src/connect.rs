//! Connecting to NATS: options from the settings, and at start a retry loop with
//! backoff that names the URL and the cause each time. After the first connection
//! the client reconnects by itself and resubscribes.
//!
//! URLs appear in logs and errors only through [`nats_url::redact`]; credentials
//! in a URL are moved into the connect options (see [`crate::nats_url`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event};
use tokio::time::Instant;

use crate::nats_url::{self, UrlCredentials};
use crate::settings::ConnectionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach NATS at {url} within {}: {cause}; {hint}", humantime::format_duration(*.after))]
    TimedOut { url: String, after: Duration, cause: String, hint: &'static str },
    #[error("{0}")]
    Settings(String),
}

/// What to do about a failed connection attempt, by its kind.
fn hint(kind: Option<ConnectErrorKind>) -> &'static str {
    match kind {
        Some(ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication) => {
            "the server refused the credentials: check --user/--password, --token, --nkey, --creds or the user:password@ in the URL"
        }
        Some(ConnectErrorKind::Tls) => {
            "check --tls-ca (the CA that signed the server's certificate) and --tls-cert/--tls-key if the server verifies clients"
        }
        _ => {
            "is nats-server running? start it, point --nats-url (or NATS_URL) at a running server, or try `agent-block dev SCRIPT` for a private one"
        }
    }
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Connects, retrying until `connect_timeout` (forever when unset).
pub async fn connect(config: &ConnectionConfig) -> Result<async_nats::Client, ConnectError> {
    let urls = nats_url::parse(&config.url).map_err(ConnectError::Settings)?;
    let shown = nats_url::redact(&config.url);
    let servers = urls.servers.clone();
    let started = Instant::now();
    let mut delay = FIRST_RETRY;
    loop {
        let attempt = options(config, urls.credentials.as_ref()).await?.connect(servers.clone());
        let result = match config.connect_timeout {
            Some(limit) => match tokio::time::timeout_at(started + limit, attempt).await {
                Ok(result) => result.map_err(|err| (Some(err.kind()), err.to_string())),
                Err(_) => Err((None, "connection attempt timed out".to_string())),
            },
            None => attempt.await.map_err(|err| (Some(err.kind()), err.to_string())),
        };
        let (kind, cause) = match result {
            Ok(client) => {
                tracing::info!(url = %shown, "connected to NATS");
                return Ok(client);
            }
            Err(failure) => failure,
        };
        let hint = hint(kind);
        if let Some(limit) = config.connect_timeout
            && started.elapsed() + delay >= limit
        {
            return Err(ConnectError::TimedOut { url: shown, after: limit, cause, hint });
        }
        tracing::warn!(url = %shown, error = %cause, retry_in = ?delay, hint, "cannot connect to NATS; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn options(config: &ConnectionConfig, from_url: Option<&UrlCredentials>) -> Result<ConnectOptions, ConnectError> {
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
    match from_url {
        Some(_) if config.user.is_some() || config.token.is_some() => {
            return Err(ConnectError::Settings(
                "the NATS URL carries credentials and --user/--token are set too; give them in one place".to_string(),
            ));
        }
        Some(UrlCredentials::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), password.clone())
        }
        Some(UrlCredentials::Token(token)) => options = options.token(token.clone()),
        None => {}
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

/// Messages the client dropped because a subscription's buffer was full (one
/// slow-consumer event each), over the process's connections.
pub static SLOW_CONSUMER_DROPS: AtomicU64 = AtomicU64::new(0);
static SLOW_CONSUMER_LOGGED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
const SLOW_CONSUMER_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Counts a dropped message; logs the total at most once per interval, so a
/// flood does not become a flood of log lines.
fn slow_consumer(sid: u64) {
    let total = SLOW_CONSUMER_DROPS.fetch_add(1, Ordering::Relaxed) + 1;
    let mut logged = SLOW_CONSUMER_LOGGED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if logged.is_none_or(|at| at.elapsed() >= SLOW_CONSUMER_LOG_INTERVAL) {
        *logged = Some(std::time::Instant::now());
        tracing::warn!(
            sid,
            dropped_total = total,
            "slow consumer: the NATS client dropped messages for a subscription"
        );
    }
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
            slow_consumer(sid)
        }
        other => tracing::debug!(event = %other, "NATS event"),
    }
}

/// Time the server gets to answer [`round_trip`].
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(10);

/// Returns once the server has read everything `client` sent before, its
/// subscriptions included. `Client::flush` only empties the socket buffer; a
/// message to an inbox this client subscribes to comes back only after the
/// server has processed what came before it on the connection. A reload relies
/// on this: the old VMs leave a queue group only once the new ones are in it.
pub async fn round_trip(client: &async_nats::Client) -> Result<(), RoundTripError> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.map_err(RoundTripError::Subscribe)?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(RoundTripError::Publish)?;
    match tokio::time::timeout(ROUND_TRIP_LIMIT, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(RoundTripError::Closed),
        Err(_) => Err(RoundTripError::TimedOut(ROUND_TRIP_LIMIT)),
    }
}

/// Why the server's reading of a connection could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum RoundTripError {
    #[error("cannot subscribe to an inbox")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("cannot publish to the inbox")]
    Publish(#[source] async_nats::PublishError),
    #[error("the connection closed")]
    Closed,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
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
