//! agent-block: a Lua-first worker runtime for NATS.
//!
//! Messages flow `source -> intake -> VM (dispatch) -> settle`: a [`source`]
//! turns NATS messages (or replay lines) into [`event::Event`]s, mostly on the
//! Lua VM thread that will handle them; the [`intake`] admits them as handler
//! slots allow; the [`vm`] runs the Lua handler for the event's kind under a
//! deadline and turns what it did into an [`outcome::Outcome`]; [`settle`] hands
//! that outcome back to the event's own delivery (reply, JetStream ack, replay
//! output).

pub mod ack_subject;
pub mod allocator;
pub mod bridge;
pub mod cli;
pub mod command;
pub mod config;
pub mod connect;
pub mod duration;
pub mod event;
pub mod headers;
pub mod health;
pub mod intake;
pub mod kind;
pub mod log_limit;
pub mod logging;
pub mod lua;
pub mod lua_api;
pub mod memory;
pub mod nats_server;
pub mod nats_url;
pub mod outcome;
pub mod panics;
pub mod partitioning;
pub mod preflight;
pub mod probes;
pub mod report;
pub mod runtime;
pub mod secrets;
pub mod settings;
pub mod settle;
pub mod source;
pub mod source_spec;
pub mod telemetry;
pub mod testkit;
pub mod transport;
pub mod worker;
