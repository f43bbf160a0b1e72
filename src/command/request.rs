//! `agent-block request SUBJECT [DATA]`: one request, the reply body on stdout; an
//! error reply (`Nats-Service-Error`) on stderr with exit 1.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::cli::ConnectionArgs;
use crate::connect;
use crate::settings::ConnectionConfig;
use crate::settle::service_error;
use crate::transport::{NatsTransport, Transport};

/// The client gives up connecting after this long unless --connect-timeout says otherwise.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

pub async fn execute(
    subject: String,
    data: Option<String>,
    headers: Vec<String>,
    timeout: Duration,
    connection: &ConnectionArgs,
) -> ExitCode {
    let mut config = ConnectionConfig::from_args(connection, "agent-block-request");
    config.connect_timeout = Some(config.connect_timeout.unwrap_or(CONNECT_LIMIT));
    if let Err(message) = crate::preflight::check_connection(&config) {
        return usage(&message);
    }
    let headers = match parse_headers(&headers) {
        Ok(headers) => headers,
        Err(message) => return usage(&message),
    };
    let body = match data.as_deref() {
        Some("-") => {
            let mut input = Vec::new();
            if let Err(err) = std::io::stdin().read_to_end(&mut input) {
                return usage(&format!("cannot read the request body from stdin: {err}"));
            }
            Bytes::from(input)
        }
        Some(text) => Bytes::from(text.to_string()),
        None => Bytes::new(),
    };
    let client = match connect::connect(&config).await {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    match NatsTransport(client).request(subject, headers, body, timeout).await {
        Ok(response) => {
            if let Some((code, message)) = service_error(response.headers.as_ref()) {
                eprintln!("error {code}: {message}");
                return ExitCode::from(1);
            }
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(&response.data);
            let _ = stdout.write_all(b"\n");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

fn parse_headers(headers: &[String]) -> Result<Option<HeaderMap>, String> {
    if headers.is_empty() {
        return Ok(None);
    }
    let mut map = HeaderMap::new();
    for header in headers {
        let (name, value) =
            header.split_once(':').ok_or_else(|| format!("invalid --header {header:?}: expected NAME:VALUE"))?;
        crate::headers::append(&mut map, name.trim(), value.trim())
            .map_err(|err| format!("invalid --header {header:?}: {err}"))?;
    }
    Ok(Some(map))
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}
