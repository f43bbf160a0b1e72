//! The HTTP listener of `--metrics-addr`: `/healthz` (the process lives: 503
//! while a Lua VM is stuck),
//! `/readyz` (200 while connected with every source running, else 503) and
//! `/metrics` (Prometheus text format).

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;

use crate::health::Health;

/// Binds `addr` and serves the probes in the background; returns the bound address.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let liveness = || async {
        match Health::liveness() {
            Ok(()) => (StatusCode::OK, "ok\n".to_string()),
            Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not live: {reason}\n")),
        }
    };
    let app = Router::new()
        .route("/healthz", get(liveness))
        .route(
            "/metrics",
            get(|| async {
                let page = crate::telemetry::metrics::global().encode();
                ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], page)
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.readiness() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "HTTP listener stopped");
        }
    });
    Ok(bound)
}
