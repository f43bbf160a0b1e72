//! Liveness and readiness as the HTTP probes report them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use async_nats::connection::State;

#[derive(Clone, Default)]
pub struct Health(Arc<Inner>);

#[derive(Default)]
struct Inner {
    client: OnceLock<async_nats::Client>,
    sources_running: AtomicBool,
    shutting_down: AtomicBool,
}

impl Health {
    pub fn set_client(&self, client: async_nats::Client) {
        let _ = self.0.client.set(client);
    }

    pub fn set_sources_running(&self, running: bool) {
        self.0.sources_running.store(running, Ordering::SeqCst);
    }

    pub fn set_shutting_down(&self) {
        self.0.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Ready means: connected to NATS, every source running, not shutting down.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.0.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        match self.0.client.get().map(|c| c.connection_state()) {
            None => return Err("not connected to NATS yet"),
            Some(State::Connected) => {}
            Some(_) => return Err("NATS connection lost; reconnecting"),
        }
        if !self.0.sources_running.load(Ordering::SeqCst) {
            return Err("sources not running");
        }
        Ok(())
    }
}
