//! The Lua core every VM stands on: the state a VM's Lua API reads
//! ([`state`]), the context of the task running Lua code ([`context`]: its
//! deadline, cancellation and trace), and the [`watchdog`] that interrupts Lua
//! code past its deadline or at the end of its time slice. The Lua API builds on
//! it; the worker that runs events builds on both.

pub mod context;
pub mod hook;
pub mod state;
pub mod watchdog;
