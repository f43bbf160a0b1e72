//! `agent-block test`: Lua test files (`*_test.lua`) run offline. Each file gets a
//! Lua VM with the `test` global; `test.worker(script)` loads the script under
//! test into a real VM pool whose bridges are fakes ([`fakes`]), and events sent
//! to it are settled as in production, then reported back to the test.

pub mod fakes;
mod partition;
pub mod report;
mod runner;
mod schedule;
mod worker;

pub use runner::run_file;
