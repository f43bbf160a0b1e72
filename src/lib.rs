//! agent-block: a Lua-first worker runtime for NATS.
//!
//! Messages flow `source -> bus -> dispatch (on a Lua VM thread) -> ack`:
//! a [`source`] turns NATS messages (or replay lines) into [`event::Event`]s, the
//! [`bus`] queues them for one of the [`vm`] threads, [`dispatch`] runs the Lua handler
//! for the event's kind under a deadline and turns what it did into an
//! [`outcome::Outcome`], and [`ack`] settles that outcome (reply, error reply,
//! replay output).

pub mod ack;
pub mod bridge;
pub mod bus;
pub mod cli;
pub mod command;
pub mod config;
pub mod connect;
pub mod dispatch;
pub mod duration;
pub mod event;
pub mod health;
pub mod http;
pub mod kind;
pub mod logging;
pub mod lua_api;
pub mod nats_server;
pub mod outcome;
pub mod runtime;
pub mod source;
pub mod transport;
pub mod vm;
