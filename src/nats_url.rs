//! NATS server URLs as the user writes them: comma-separated for a cluster, with
//! optional credentials in the userinfo (`nats://user:password@host`,
//! `nats://token@host`) as every NATS client accepts.
//!
//! The credentials are taken out of each URL before the client sees it, so they
//! reach the server as CONNECT fields and never appear in an address the client
//! or this crate prints. [`redact`] is the only form of a URL that goes to a log
//! line or an error message.

use async_nats::ServerAddr;

/// Credentials found in the userinfo of the URLs.
#[derive(Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    UserPassword { user: String, password: String },
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            UrlCredentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// The server addresses (without userinfo) and the credentials they carried.
#[derive(Debug)]
pub struct NatsUrls {
    pub servers: Vec<ServerAddr>,
    pub credentials: Option<UrlCredentials>,
}

/// Parses `--nats-url`. Every URL of a cluster list must carry the same
/// credentials or none: the client sends one set to whichever server it reaches.
pub fn parse(urls: &str) -> Result<NatsUrls, String> {
    let mut servers = Vec::new();
    let mut credentials: Option<UrlCredentials> = None;
    for text in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let shown = redact(text);
        let address: ServerAddr = text.parse().map_err(|err| format!("invalid NATS URL {shown:?}: {err}"))?;
        let mut url = address.into_inner();
        if let Some(found) = credentials_of(&url)? {
            match &credentials {
                Some(seen) if *seen != found => {
                    return Err(format!(
                        "the NATS URLs carry different credentials ({shown}); give one set for the cluster"
                    ));
                }
                _ => credentials = Some(found),
            }
            // Neither call can fail for a nats://, tls://, ws:// or wss:// URL with a host.
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        let address = url.as_str().parse().map_err(|err| format!("invalid NATS URL {shown:?}: {err}"))?;
        servers.push(address);
    }
    if servers.is_empty() {
        return Err("no NATS URL given; set --nats-url or NATS_URL".to_string());
    }
    Ok(NatsUrls { servers, credentials })
}

fn credentials_of(url: &url::Url) -> Result<Option<UrlCredentials>, String> {
    let user = decode(url.username())?;
    let password = url.password().map(decode).transpose()?;
    Ok(match (user.is_empty(), password) {
        (true, None) => None,
        (false, None) => Some(UrlCredentials::Token(user)),
        (_, Some(password)) => Some(UrlCredentials::UserPassword { user, password }),
    })
}

/// Percent-decoding of the userinfo (`p%40ss` is `p@ss`).
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                None => return Err("the credentials in the NATS URL have a bad %-escape".to_string()),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the credentials in the NATS URL are not UTF-8".to_string())
}

/// `urls` fit for a log line: the userinfo of each URL becomes `user:***` (a
/// password) or `***` (a token). Works on text that does not parse, too.
pub fn redact(urls: &str) -> String {
    urls.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}{shown}{}", &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_password_come_out_of_the_url() {
        let urls = parse("nats://alice:s%40cret@127.0.0.1:4222").unwrap();
        assert_eq!(
            urls.credentials,
            Some(UrlCredentials::UserPassword { user: "alice".into(), password: "s@cret".into() })
        );
        assert_eq!(urls.servers[0].as_url_str(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn a_lone_userinfo_is_a_token() {
        let urls = parse("nats://t0ken@localhost").unwrap();
        assert_eq!(urls.credentials, Some(UrlCredentials::Token("t0ken".into())));
        assert!(!urls.servers[0].as_url_str().contains("t0ken"));
    }

    #[test]
    fn a_cluster_list_shares_one_set_of_credentials() {
        let urls = parse("nats://a:b@h1:4222, nats://h2:4222").unwrap();
        assert_eq!(urls.servers.len(), 2);
        assert!(urls.credentials.is_some());
        let err = parse("nats://a:b@h1:4222,nats://a:c@h2:4222").unwrap_err();
        assert!(!err.contains("a:c@"), "{err}");
        assert!(err.contains("different credentials"), "{err}");
    }

    #[test]
    fn errors_never_show_the_password() {
        let err = parse("nats://alice:hunter2@bad host").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(parse("").unwrap_err().contains("--nats-url"));
    }

    #[test]
    fn redaction_keeps_the_user_and_hides_the_secret() {
        assert_eq!(redact("nats://alice:hunter2@h:4222"), "nats://alice:***@h:4222");
        assert_eq!(redact("nats://t0ken@h"), "nats://***@h");
        assert_eq!(redact("nats://h:4222,tls://u:p@h2"), "nats://h:4222,tls://u:***@h2");
        assert_eq!(redact("u:p@h"), "u:***@h");
        assert_eq!(redact("nats://h/path@x"), "nats://h/path@x");
    }
}
