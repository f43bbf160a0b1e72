//! What an operator sees of a worker: event spans exported over OTLP
//! ([`trace`]), trace context carried in NATS headers ([`carrier`]), Prometheus
//! metrics for `/metrics` ([`metrics`]), and NATS service discovery
//! ([`discovery`]).

pub mod carrier;
pub mod discovery;
pub mod metrics;
pub mod otlp_settings;
pub mod otlp_wire;
pub mod overload;
pub mod span_export;
pub mod trace;
