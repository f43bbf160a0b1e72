//! A local HTTP server for the `http` bridge tests, on its own thread and
//! runtime (the tests block on the worker process meanwhile). Routes:
//! `/hello`, `/echo` (the request as JSON), `/status/{code}`, `/slow` (never
//! answers; counts requests in flight so a test sees the bridge hang up),
//! `/wait` (answers after 200 ms), `/big` (2 MiB), `/repeated` (a header sent
//! twice), `/redirect/{n}` (n redirects, then `landed`), `/away/{port}` (a
//! redirect to `localhost:{port}`). Stopped on drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::{any, get};
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Counters {
    /// `/slow` requests whose handler future is still alive.
    pub slow_in_flight: AtomicUsize,
}

pub struct HttpServer {
    pub addr: std::net::SocketAddr,
    pub counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start() -> Self {
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let state = counters.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("test server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind test server");
                ready_tx.send(listener.local_addr().expect("bound address")).expect("report address");
                let app = Router::new()
                    .route("/hello", get(|| async { ([("x-test", "yes")], "hello") }))
                    .route("/echo", any(echo))
                    .route("/status/{code}", get(status))
                    .route("/slow", get(slow))
                    .route(
                        "/wait",
                        get(|| async {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            "waited"
                        }),
                    )
                    .route("/big", get(|| async { vec![b'x'; 2 << 20] }))
                    .route("/repeated", get(repeated))
                    .route("/redirect/{n}", get(redirect))
                    .route(
                        "/away/{port}",
                        get(|Path(port): Path<u16>| async move {
                            axum::response::Redirect::temporary(&format!("http://localhost:{port}/hello"))
                        }),
                    )
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let addr = ready_rx.recv_timeout(Duration::from_secs(30)).expect("test server started");
        HttpServer { addr, counters, stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn slow_in_flight(&self) -> usize {
        self.counters.slow_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Graceful shutdown waits for open connections; do not join a hung one.
        drop(self.thread.take());
    }
}

async fn echo(method: Method, headers: HeaderMap, body: Bytes) -> ([(&'static str, &'static str); 1], String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let reply = serde_json::json!({
        "method": method.as_str(),
        "content_type": header("content-type"),
        "traceparent": header("traceparent"),
        "custom": header("x-custom"),
        "body": String::from_utf8_lossy(&body),
    });
    ([("content-type", "application/json")], reply.to_string())
}

async fn repeated() -> (HeaderMap, &'static str) {
    let mut headers = HeaderMap::new();
    headers.append("x-multi", "a".parse().expect("header value"));
    headers.append("x-multi", "b".parse().expect("header value"));
    (headers, "repeated")
}

async fn redirect(Path(n): Path<u32>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match n {
        0 => "landed".into_response(),
        n => axum::response::Redirect::temporary(&format!("/redirect/{}", n - 1)).into_response(),
    }
}

async fn status(Path(code): Path<u16>) -> (StatusCode, String) {
    (StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT), format!("status {code}"))
}

/// Decrements the in-flight count when hyper drops the handler, which it does
/// when the client closes the connection.
struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.slow_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn slow(State(counters): State<Arc<Counters>>) -> &'static str {
    counters.slow_in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(counters);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    "too late"
}

/// An HTTPS server answering `secure` to any request, with a certificate for
/// 127.0.0.1 signed by a private CA; returns the CA certificate in PEM.
pub struct HttpsServer {
    pub addr: std::net::SocketAddr,
    pub ca_pem: String,
}

impl HttpsServer {
    pub fn start() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let server_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
        let server_cert = server_params.signed_by(&server_key, &issuer).expect("server certificate");

        let key = rustls_pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).expect("server key DER");
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                ready_tx.send(listener.local_addr().expect("address")).expect("report address");
                while let Ok((stream, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let Ok(mut tls) = acceptor.accept(stream).await else { return };
                        let mut request = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let response = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecure";
                        let _ = tls.write_all(response.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
        });
        let addr = ready_rx.recv_timeout(Duration::from_secs(30)).expect("HTTPS server started");
        HttpsServer { addr, ca_pem: ca_cert.pem() }
    }
}
