//! The HTTP client of one VM: rustls with the ring provider, the system's roots
//! plus `--http-ca`, no redirects to hosts outside `--http-allow`.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::BridgeConfig;

/// Time to open a TCP connection; a request's own timeout bounds the rest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept per host, so repeated calls skip the handshake.
const IDLE_PER_HOST: usize = 32;

pub fn build(config: &BridgeConfig) -> Result<reqwest::Client, String> {
    let tls = tls_config(config)?;
    let allow = config.http_allow.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds every URL requested so far: 10 redirects are followed.
        if attempt.previous().len() > 10 {
            attempt.error("too many redirects")
        } else if !allowed(&allow, attempt.url()) {
            attempt.error("redirect to a host outside --http-allow")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .redirect(redirects)
        .build()
        .map_err(|err| format!("cannot build the HTTP client: {err}"))
}

fn tls_config(config: &BridgeConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = &config.http_ca {
        for cert in read_ca(path)? {
            roots.add(cert).map_err(|err| format!("--http-ca {}: {err}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("cannot set up TLS: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The certificates of `--http-ca`; checked at start so a bad file stops the worker.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|err| format!("cannot read --http-ca {}: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("--http-ca {} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Whether `--http-allow` lets a request reach `url` (an empty list allows all).
/// An entry without a port allows every port of that host.
pub fn allowed(allow: &[String], url: &reqwest::Url) -> bool {
    if allow.is_empty() {
        return true;
    }
    let Some(host) = url.host_str().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
    else {
        return false;
    };
    let port = url.port_or_known_default();
    allow.iter().any(|entry| {
        let (entry_host, entry_port) = split_host_port(entry);
        entry_host == host && entry_port.is_none_or(|p| Some(p) == port)
    })
}

/// Why an `--http-allow` entry is not `host` or `host:port`, if it is not.
pub fn check_allow_entry(entry: &str) -> Result<(), &'static str> {
    if entry.contains("://") {
        return Err("a URL, not a host");
    }
    if entry.contains(['/', '@', '?', '#', ' ', '\t']) {
        return Err("not a host name");
    }
    let has_port = entry.strip_prefix('[').map_or_else(
        || entry.rsplit_once(':').filter(|(host, _)| !host.contains(':')).map(|(_, port)| port),
        |rest| rest.split_once(']').and_then(|(_, after)| after.strip_prefix(':')),
    );
    if let Some(port) = has_port
        && port.parse::<u16>().is_err()
    {
        return Err("the port is not a number from 0 to 65535");
    }
    let (host, _) = split_host_port(entry);
    if host.is_empty() {
        return Err("the host is empty");
    }
    Ok(())
}

fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_are_hosts_with_optional_ports() {
        for good in ["api.example.com", "localhost:8080", "127.0.0.1", "[::1]:443", "[::1]"] {
            assert_eq!(check_allow_entry(good), Ok(()), "{good}");
        }
        for bad in ["http://x/y", "x/y", "user@x", "x:http", ":80", "x:99999"] {
            assert!(check_allow_entry(bad).is_err(), "{bad}");
        }
    }

    fn check(allow: &[&str], url: &str) -> bool {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        allowed(&allow, &reqwest::Url::parse(url).expect("test URL"))
    }

    #[test]
    fn allow_list_matches_host_and_optional_port() {
        assert!(check(&[], "https://anywhere.example/x"));
        assert!(check(&["api.example"], "https://API.example/x"));
        assert!(check(&["api.example"], "http://api.example:8080/x"));
        assert!(check(&["api.example:443"], "https://api.example/x"));
        assert!(!check(&["api.example:443"], "http://api.example/x"));
        assert!(!check(&["api.example"], "https://evil.example/x"));
        assert!(check(&["[::1]:8080"], "http://[::1]:8080/"));
        assert!(check(&["127.0.0.1"], "http://127.0.0.1:9/"));
    }
}
