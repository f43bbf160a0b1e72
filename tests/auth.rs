//! Authentication against servers that require it: user and password (flags,
//! environment, URL), token (flag, URL), NKey, creds file (operator mode with a
//! memory resolver), mutual TLS with a private CA. Every worker logs at
//! `RUST_LOG=trace`, and its whole output is searched for the secret.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use async_nats::ConnectOptions;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;

const APP: &str = r#"
bus.subscribe("ping")
bus.on("ping", function() return "pong" end)
"#;

/// Every record the worker can write, the NATS client's included.
const TRACE_ALL: &str = "trace";

struct Case {
    _scripts: Scripts,
    script: PathBuf,
}

fn app() -> Case {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", APP);
    Case { _scripts: scripts, script }
}

/// `agent-block run app.lua --nats-url URL ARGS` at trace level, ready.
fn serve(case: &Case, url: &str, args: &[&str], env: &[(&str, &str)]) -> Worker {
    let mut all = vec!["run", case.script.to_str().unwrap(), "--nats-url", url, "--workers", "1"];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("RUST_LOG", TRACE_ALL));
    let worker = Worker::spawn_with_env(&all, &env);
    worker.expect_ready();
    worker
}

/// Asserts that the worker's output holds none of `secrets`, and that the log
/// really was at trace level (else the search proves nothing).
fn assert_no_secret(worker: &Worker, secrets: &[&str]) {
    let log = format!("{}{}", worker.stdout.text(), worker.stderr.text());
    assert!(log.contains("\"level\":\"TRACE\"") || log.contains("\"level\":\"DEBUG\""), "not a trace log:\n{log}");
    for secret in secrets {
        assert!(!log.contains(secret), "the log shows the secret {secret:?}:\n{log}");
    }
}

async fn assert_serves(client: &async_nats::Client) {
    assert_eq!(body(&request(client, "ping", "").await), "pong");
}

const PASSWORD: &str = "pa55-word-7f3a";
const TOKEN: &str = "t0ken-9c1e55";

fn password_server() -> NatsServer {
    server_with_config(&format!("authorization {{ user: alice, password: \"{PASSWORD}\" }}"))
}

fn token_server() -> NatsServer {
    server_with_config(&format!("authorization {{ token: \"{TOKEN}\" }}"))
}

async fn password_client(server: &NatsServer) -> async_nats::Client {
    ConnectOptions::with_user_and_password("alice".into(), PASSWORD.into())
        .connect(server.url())
        .await
        .expect("connect with the password")
}

fn url_with(userinfo: &str, server: &NatsServer) -> String {
    format!("nats://{userinfo}@127.0.0.1:{}", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_the_url_authenticate_and_stay_out_of_the_log() {
    let server = password_server();
    let case = app();
    let worker = serve(&case, &url_with(&format!("alice:{PASSWORD}"), &server), &[], &[]);
    assert_serves(&password_client(&server).await).await;
    assert!(worker.stderr.text().contains(&url_with("alice:***", &server)), "{}", worker.stderr.text());
    assert_no_secret(&worker, &[PASSWORD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_flags_and_environment_authenticate() {
    let server = password_server();
    let case = app();
    let by_flags = serve(&case, &server.url(), &["--user", "alice", "--password", PASSWORD], &[]);
    let by_env = serve(&case, &server.url(), &[], &[("AGENT_BLOCK_USER", "alice"), ("AGENT_BLOCK_PASSWORD", PASSWORD)]);
    let client = password_client(&server).await;
    for _ in 0..4 {
        assert_serves(&client).await;
    }
    assert_no_secret(&by_flags, &[PASSWORD]);
    assert_no_secret(&by_env, &[PASSWORD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_url_or_a_flag_authenticates_and_stays_out_of_the_log() {
    let server = token_server();
    let case = app();
    let by_url = serve(&case, &url_with(TOKEN, &server), &[], &[]);
    let by_flag = serve(&case, &server.url(), &["--token", TOKEN], &[]);
    let client = ConnectOptions::with_token(TOKEN.into()).connect(server.url()).await.expect("connect with the token");
    for _ in 0..4 {
        assert_serves(&client).await;
    }
    assert!(by_url.stderr.text().contains(&url_with("***", &server)), "{}", by_url.stderr.text());
    assert_no_secret(&by_url, &[TOKEN]);
    assert_no_secret(&by_flag, &[TOKEN]);
}

#[test]
fn a_refused_password_is_retried_with_a_redacted_url_and_a_hint() {
    let server = password_server();
    let case = app();
    let url = url_with("alice:wrong-guess-4d2", &server);
    let script = case.script.to_str().unwrap();
    let started = Instant::now();
    let mut worker = Worker::spawn_with_env(
        &["run", script, "--nats-url", &url, "--connect-timeout", "2s"],
        &[("RUST_LOG", TRACE_ALL)],
    );
    let status = worker.wait_exit(PATIENCE).expect("the worker gives up at --connect-timeout");
    assert_eq!(status.code(), Some(1));
    assert_gave_up_soon(started);
    let log = worker.stderr.text();
    assert!(log.contains("cannot connect to NATS; retrying") && log.contains("refused the credentials"), "{log}");
    assert!(log.contains(&url_with("alice:***", &server)), "{log}");
    assert_no_secret(&worker, &["wrong-guess-4d2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_authenticates_and_stays_out_of_the_log() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let server = server_with_config(&format!("authorization {{ users = [ {{ nkey: {} }} ] }}", user.public_key()));
    let case = app();
    let worker = serve(&case, &server.url(), &["--nkey", &seed], &[]);
    let client = ConnectOptions::with_nkey(seed.clone()).connect(server.url()).await.expect("connect with the nkey");
    assert_serves(&client).await;
    assert_no_secret(&worker, &[&seed]);
}

/// A JWT as nats-server reads them: header, claims, Ed25519 signature by the
/// issuer's NKey, each base64url without padding.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = serde_json::json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let claims = serde_json::json!({
        "jti": nuid::next().to_string(),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An operator-mode server (memory resolver) and a creds file for one user.
fn operator_mode(dir: &std::path::Path) -> (NatsServer, PathBuf, String) {
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({ "type": "operator", "version": 2, "system_account": system.public_key() }),
    );
    let account_claims =
        |name| serde_json::json!({ "type": "account", "version": 2, "limits": unlimited, "name": name });
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", account_claims("SYS"));
    let account_jwt = jwt(&operator, &account.public_key(), "APP", account_claims("APP"));
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "worker",
        serde_json::json!({ "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1 }),
    );
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
        system.public_key(),
        system.public_key(),
        account.public_key(),
    );
    let seed = user.seed().unwrap();
    let creds = dir.join("worker.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    (server_with_config(&config), creds, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_authenticates_in_operator_mode_and_stays_out_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (server, creds, seed) = operator_mode(dir.path());
    let creds_text = std::fs::read_to_string(&creds).unwrap();
    let user_jwt = creds_text.lines().nth(1).unwrap().to_string();
    let case = app();
    let by_flag = serve(&case, &server.url(), &["--creds", creds.to_str().unwrap()], &[]);
    let by_env = serve(&case, &server.url(), &[], &[("NATS_CREDS", creds.to_str().unwrap())]);
    let client = ConnectOptions::with_credentials_file(&creds)
        .await
        .unwrap()
        .connect(server.url())
        .await
        .expect("connect with the creds file");
    for _ in 0..4 {
        assert_serves(&client).await;
    }
    // Without credentials the same server refuses: the creds were what let the worker in.
    assert!(async_nats::connect(server.url()).await.is_err(), "operator mode requires credentials");
    assert_no_secret(&by_flag, &[&seed, &user_jwt]);
    assert_no_secret(&by_env, &[&seed, &user_jwt]);
}

/// A private CA, a server certificate for 127.0.0.1 and a client certificate,
/// written as PEM files into `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &std::path::Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "agent-block test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, usage| {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("worker", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca_connects_and_the_key_stays_out_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = server_with_config(&format!(
        "tls {{ cert_file: {:?}\n key_file: {:?}\n ca_file: {:?}\n verify: true }}",
        pki.server_cert, pki.server_key, pki.ca
    ));
    let case = app();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client_cert), path(&pki.client_key));
    let worker = serve(&case, &server.url(), &["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key], &[]);
    let client = ConnectOptions::new()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true)
        .connect(server.url())
        .await
        .expect("connect with mutual TLS");
    assert_serves(&client).await;
    // The key's body, a line of base64 from its middle.
    let key_text = std::fs::read_to_string(&pki.client_key).unwrap();
    let key_line = key_text.lines().nth(1).unwrap();
    assert_no_secret(&worker, &[key_line]);

    // Without a client certificate the server refuses: `verify` is in force.
    let case = app();
    let script = case.script.to_str().unwrap();
    let url = server.url();
    let started = Instant::now();
    let mut refused = Worker::spawn(&["run", script, "--nats-url", &url, "--tls-ca", &ca, "--connect-timeout", "2s"]);
    assert_eq!(refused.wait_exit(PATIENCE).and_then(|s| s.code()), Some(1), "{}", refused.stderr.text());
    assert_gave_up_soon(started);
}

/// Runs the app with `args` until it gives up at a 2 s `--connect-timeout`:
/// exit 1, soon, and a log (at trace level) without `secret`. Returns the log.
fn refused(url: &str, args: &[&str], secret: &str) -> String {
    let case = app();
    let script = case.script.to_str().unwrap();
    let mut all = vec!["run", script, "--nats-url", url, "--connect-timeout", "2s"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let mut worker = Worker::spawn_with_env(&all, &[("RUST_LOG", TRACE_ALL)]);
    let status = worker.wait_exit(PATIENCE).expect("the worker gives up at --connect-timeout");
    assert_eq!(status.code(), Some(1), "{}", worker.stderr.text());
    assert_gave_up_soon(started);
    assert_no_secret(&worker, &[secret]);
    worker.stderr.text()
}

#[test]
fn a_wrong_token_or_nkey_seed_exits_1_naming_the_cause_without_the_secret() {
    let server = token_server();
    let log = refused(&server.url(), &["--token", "wrong-t0ken-51"], "wrong-t0ken-51");
    assert!(log.contains("refused the credentials"), "{log}");

    let allowed = nkeys::KeyPair::new_user();
    let server = server_with_config(&format!("authorization {{ users = [ {{ nkey: {} }} ] }}", allowed.public_key()));
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let log = refused(&server.url(), &["--nkey", &stranger], &stranger);
    assert!(log.contains("refused the credentials"), "{log}");
}

#[test]
fn a_server_certificate_the_worker_does_not_trust_exits_1_naming_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server =
        server_with_config(&format!("tls {{ cert_file: {:?}\n key_file: {:?} }}", pki.server_cert, pki.server_key));
    // The system's roots do not know the private CA.
    let url = server.url().replace("nats://", "tls://");
    let key_text = std::fs::read_to_string(&pki.server_key).unwrap();
    let log = refused(&url, &[], key_text.lines().nth(1).unwrap());
    let lower = log.to_lowercase();
    assert!(lower.contains("certificate") || lower.contains("tls"), "the error names TLS: {log}");
}

#[test]
fn a_tls_ca_requires_tls_from_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    // A server without TLS: with --tls-ca the worker must not talk to it in plain text.
    let server = server();
    let log = refused(&server.url(), &["--tls-ca", pki.ca.to_str().unwrap()], "no secret in this case");
    assert!(log.to_lowercase().contains("tls"), "the error names TLS: {log}");
}
