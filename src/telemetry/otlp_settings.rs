//! Span export settings from the standard `OTEL_*` variables, read as the
//! OpenTelemetry SDK and OTLP exporter specifications say: the signal-specific
//! variable (`..._TRACES_...`) before the general one, the general endpoint with
//! `/v1/traces` appended for OTLP/HTTP, headers as `key=value` pairs with
//! percent-encoded values, times in milliseconds.

use std::time::Duration;

use thiserror::Error;

/// Why span export could not be set up from the environment.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct TraceSetupError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    HttpProtobuf,
    Grpc,
}

/// How finished spans are batched (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub max_export_batch_size: usize,
}

#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub protocol: Protocol,
    /// The full URL that batches are sent to.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub batch: BatchSettings,
}

const HTTP_TRACES_PATH: &str = "/v1/traces";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Whether the environment asks for span export at all.
pub fn export_requested() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && !exporter_none && endpoint_variable().is_some()
}

fn endpoint_variable() -> Option<(&'static str, String)> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .find_map(|var| env(var).map(|value| (var, value)))
}

/// The settings, or `None` when no endpoint is configured.
pub fn from_env() -> Result<Option<ExportSettings>, TraceSetupError> {
    let Some((variable, value)) = endpoint_variable() else { return Ok(None) };
    let protocol = protocol()?;
    let endpoint = match (protocol, variable) {
        (Protocol::HttpProtobuf, "OTEL_EXPORTER_OTLP_ENDPOINT") => {
            format!("{}{HTTP_TRACES_PATH}", value.strip_suffix('/').unwrap_or(&value))
        }
        _ => value.clone(),
    };
    if url::Url::parse(&endpoint).is_err() {
        return Err(TraceSetupError(format!(
            "{variable}={value:?} is not a URL; give the collector as http://host:port"
        )));
    }
    let mut headers = env("OTEL_EXPORTER_OTLP_HEADERS").map(|text| parse_headers(&text)).unwrap_or_default();
    for (name, value) in env("OTEL_EXPORTER_OTLP_TRACES_HEADERS").map(|text| parse_headers(&text)).unwrap_or_default() {
        headers.retain(|(known, _)| !known.eq_ignore_ascii_case(&name));
        headers.push((name, value));
    }
    let timeout = ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .into_iter()
        .find_map(|var| env(var)?.parse().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    Ok(Some(ExportSettings { protocol, endpoint, headers, timeout, batch: batch_settings() }))
}

fn protocol() -> Result<Protocol, TraceSetupError> {
    let name = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|var| env(var).map(|value| (var, value)));
    match name {
        None => Ok(Protocol::HttpProtobuf),
        Some((_, value)) if value.eq_ignore_ascii_case("http/protobuf") => Ok(Protocol::HttpProtobuf),
        Some((_, value)) if value.eq_ignore_ascii_case("grpc") => Ok(Protocol::Grpc),
        Some((var, value)) => Err(TraceSetupError(format!(
            "{var}={value:?} is not supported; use \"http/protobuf\" (the default) or \"grpc\""
        ))),
    }
}

/// The SDK's batch defaults (queue 2048, delay 5 s, batch 512), overridden by
/// `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY` and
/// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`; a batch is never larger than the queue.
fn batch_settings() -> BatchSettings {
    let number = |name: &str, default: u64| env(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(default);
    let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048).max(1) as usize;
    BatchSettings {
        max_queue_size,
        schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)),
        max_export_batch_size: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).max(1) as usize).min(max_queue_size),
    }
}

/// `key1=value1,key2=value2`, values percent-decoded; malformed pairs are skipped.
fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let name = name.trim();
            let value = percent_decode(value.trim())?;
            (!name.is_empty()).then(|| (name.to_string(), value))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pairs_with_percent_encoded_values() {
        assert_eq!(
            parse_headers("api-key=abc%3D%3D, x-team = shop ,broken,=nameless,authorization=Bearer%20t"),
            vec![
                ("api-key".to_string(), "abc==".to_string()),
                ("x-team".to_string(), "shop".to_string()),
                ("authorization".to_string(), "Bearer t".to_string()),
            ]
        );
        assert_eq!(parse_headers("bad=%zz"), vec![]);
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
    }
}
