//! Checks of every file the settings name, before anything connects: a missing
//! CA or a creds file with a typo is a configuration mistake (exit 2, naming the
//! file and what is wrong), not a connection problem to retry forever.
//!
//! Messages name the file and the problem, never its content: a creds file or a
//! key is a secret.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::ConnectionConfig;

/// Checks the NATS URL, the script and everything `connection` names.
pub fn check_worker(script: &Path, connection: &ConnectionConfig) -> Result<(), String> {
    check_url(connection)?;
    check_script(script)?;
    check_connection(connection)
}

/// The URL list parses, and credentials are given in one place only.
fn check_url(config: &ConnectionConfig) -> Result<(), String> {
    let urls = crate::nats_url::parse(&config.url)?;
    if urls.credentials.is_some() && (config.user.is_some() || config.token.is_some()) {
        return Err("the NATS URL carries credentials and --user/--token are set too; give them in one place".into());
    }
    Ok(())
}

/// The script exists, can be read and compiles (a syntax error is reported with
/// its line before any connection is tried).
pub fn check_script(script: &Path) -> Result<(), String> {
    let source = read(script, "script")?;
    if source.starts_with(b"\x1bLua") {
        // A binary chunk: whether it may load depends on --unsafe-lua, decided later.
        return Ok(());
    }
    let lua = mlua::Lua::new();
    let compiled = lua.load(source).set_name(format!("@{}", script.display())).into_function();
    compiled.map(drop).map_err(|err| format!("script error: {err}"))
}

/// The URL parses; credentials, NKey seed and TLS files are present and well
/// formed, and the credential settings do not contradict each other.
pub fn check_connection(config: &ConnectionConfig) -> Result<(), String> {
    check_url(config)?;
    if let Some(path) = &config.creds {
        let text = String::from_utf8(read(path, "credentials file")?)
            .map_err(|_| format!("credentials file {}: not a text file", path.display()))?;
        async_nats::ConnectOptions::new().credentials(&text).map_err(|err| {
            format!(
                "credentials file {}: {err}; expected a .creds file (user JWT and NKey seed) as nsc writes it",
                path.display()
            )
        })?;
    }
    if let Some(seed) = &config.nkey
        && nkeys::KeyPair::from_seed(seed.trim()).is_err()
    {
        return Err("--nkey is not an NKey seed (a user seed starts with \"SU\")".to_string());
    }
    if let Some(path) = &config.tls_ca {
        certificates(path, "--tls-ca CA certificate")?;
    }
    if let Some(path) = &config.tls_cert {
        certificates(path, "--tls-cert client certificate")?;
    }
    if let Some(path) = &config.tls_key {
        let bytes = read(path, "--tls-key client key")?;
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
            format!(
                "--tls-key client key {}: no PEM private key found (expected \"-----BEGIN ... PRIVATE KEY-----\")",
                path.display()
            )
        })?;
    }
    Ok(())
}

fn certificates(path: &Path, what: &str) -> Result<(), String> {
    let bytes = read(path, what)?;
    let mut count = 0;
    for item in CertificateDer::pem_slice_iter(&bytes) {
        item.map_err(|err| format!("{what} {}: not valid PEM: {err}", path.display()))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!(
            "{what} {}: no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    if path.is_dir() {
        return Err(format!("{what} {}: is a directory, expected a file", path.display()));
    }
    std::fs::read(path).map_err(|err| {
        let problem = match err.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied)".to_string(),
            _ => format!("cannot be read: {err}"),
        };
        format!("{what} {}: {problem}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConnectionConfig {
        ConnectionConfig {
            url: "nats://127.0.0.1:4222".into(),
            creds: None,
            nkey: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout: None,
            client_name: "test".into(),
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let err = check_connection(&ConnectionConfig { tls_ca: Some(missing.clone()), ..config() }).unwrap_err();
        assert!(err.contains(&missing.display().to_string()) && err.contains("no such file"), "{err}");
        let err = check_script(&dir.path().join("app.lua")).unwrap_err();
        assert!(err.starts_with("script ") && err.contains("app.lua"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        for config in [
            ConnectionConfig { tls_ca: Some(junk.clone()), ..config() },
            ConnectionConfig { tls_cert: Some(junk.clone()), ..config() },
            ConnectionConfig { tls_key: Some(junk.clone()), ..config() },
        ] {
            let err = check_connection(&config).unwrap_err();
            assert!(err.contains("junk.pem") && err.contains("PEM"), "{err}");
        }
    }

    #[test]
    fn a_bad_creds_file_is_named_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("user.creds");
        std::fs::write(&creds, "SECRET-LOOKING-TEXT").unwrap();
        let err = check_connection(&ConnectionConfig { creds: Some(creds), ..config() }).unwrap_err();
        assert!(err.contains("user.creds") && !err.contains("SECRET-LOOKING-TEXT"), "{err}");
    }

    #[test]
    fn a_bad_nkey_seed_is_refused_without_echoing_it() {
        let err = check_connection(&ConnectionConfig { nkey: Some("SUnotaseed".into()), ..config() }).unwrap_err();
        assert!(err.contains("--nkey") && !err.contains("SUnotaseed"), "{err}");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        check_connection(&ConnectionConfig { nkey: Some(seed), ..config() }).unwrap();
    }
}
