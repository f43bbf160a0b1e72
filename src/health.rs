//! Liveness and readiness as the HTTP probes report them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::connection::State;

use crate::lua::watchdog;

#[derive(Clone, Default)]
pub struct Health(Arc<Inner>);

#[derive(Default)]
struct Inner {
    clients: Mutex<Vec<async_nats::Client>>,
    sources_running: AtomicBool,
    shutting_down: AtomicBool,
}

impl Health {
    /// Adds a connection that must be up for the worker to be ready.
    pub fn add_client(&self, client: async_nats::Client) {
        self.0.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(client);
    }

    /// Replaces the connections that must be up (a reload brings new VMs).
    pub fn set_clients(&self, clients: Vec<async_nats::Client>) {
        *self.0.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = clients;
    }

    pub fn set_sources_running(&self, running: bool) {
        self.0.sources_running.store(running, Ordering::SeqCst);
    }

    pub fn set_shutting_down(&self) {
        self.0.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Live means: no Lua VM is stuck in code past its deadline (see
    /// [`crate::lua::watchdog`]); a stuck VM never recovers by itself, a restart does.
    pub fn liveness() -> Result<(), String> {
        match watchdog::stuck_vms() {
            0 => Ok(()),
            stuck => Err(format!(
                "{stuck} Lua VM(s) stuck past their deadline ({} found stuck since start)",
                watchdog::stuck_total()
            )),
        }
    }

    /// Ready means: connected to NATS, every source running, not shutting down.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.0.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        let clients = self.0.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if clients.is_empty() {
            return Err("not connected to NATS yet");
        }
        if clients.iter().any(|c| c.connection_state() != State::Connected) {
            return Err("NATS connection lost; reconnecting");
        }
        if !self.0.sources_running.load(Ordering::SeqCst) {
            return Err("sources not running");
        }
        Ok(())
    }
}
