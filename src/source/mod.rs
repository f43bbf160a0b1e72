//! Sources turn messages into events. Each source is one module with the same
//! shape: a [`Source`] is opened on a VM thread (it subscribes or binds and
//! returns once the server confirmed), then forwards events into a [`Sink`]
//! until `stop` fires, draining what it already received. Each event carries its
//! own way to settle ([`crate::event::Settle`]).
//!
//! The pool decides where a source runs from its [`Placement`]: on every VM with
//! that VM's own connection and intake (the default, so a message is received,
//! handled and answered on one thread), or once per process feeding the shared
//! intake.

pub mod core;
pub mod declared;
pub mod jetstream;
pub mod replay;

use std::sync::Arc;

use futures::future::LocalBoxFuture;
use tokio_util::sync::CancellationToken;

use crate::intake::Sink;

pub use crate::source_spec::{ConsumerSpec, Queue, SourceSpec, SubscriptionSpec};

/// Where a source runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On every VM, with the VM's connection and intake.
    EveryVm,
    /// Once per process, feeding the shared intake.
    Once,
}

/// What a source gets to run with on a VM thread.
pub struct Link {
    /// The VM's NATS connection; `None` without NATS (replay).
    pub client: Option<async_nats::Client>,
    pub sink: Sink,
    pub stop: CancellationToken,
    /// The source's place among the declared sources, stamped on its events.
    pub index: u32,
}

/// A future forwarding a source's events; it ends when the source is drained.
pub type Forwarding = LocalBoxFuture<'static, ()>;

pub trait Source: Send + Sync {
    /// What this source reads, for logs.
    fn describe(&self) -> String;

    fn placement(&self) -> Placement;

    /// Subscribes or binds on the VM thread this is called on; resolves once the
    /// server confirmed, with the future that forwards events until `stop`.
    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>>;
}

/// Why a source could not start delivering on a VM.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}: no NATS connection")]
    NoConnection(String),
    #[error("cannot subscribe for {what}")]
    Subscribe {
        what: String,
        #[source]
        cause: async_nats::SubscribeError,
    },
    #[error("cannot join the workers sharing {what}")]
    Membership {
        what: String,
        #[source]
        cause: async_nats::Error,
    },
    #[error("cannot confirm subscriptions with NATS")]
    Unconfirmed(#[from] crate::connect::RoundTripError),
    #[error("a Lua VM stopped before its sources were open")]
    VmStopped,
    /// A source that takes its events from one channel was opened a second time.
    #[error("{0} opened twice")]
    OpenedTwice(String),
}
