//! Sources turn messages into events on the bus. Each source is one module with
//! the same shape: it is built (subscribed) before the worker reports ready, then
//! [`Source::run`] forwards events until `stop` fires, draining what it already
//! received.

pub mod core;
pub mod replay;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;

pub trait Source: Send {
    /// What this source reads, for logs (`subject "orders.*" (queue agent-block)`).
    fn describe(&self) -> String;

    /// Forwards events until the input ends or `stop` is cancelled and drained.
    fn run(self: Box<Self>, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()>;
}
