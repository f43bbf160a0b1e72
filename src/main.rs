//! The `agent-block` command: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = agent_block::cli::Cli::parse();
    agent_block::command::execute(cli)
}

/// Handlers allocate and free many small objects per event (Lua tables and
/// strings, messages); mimalloc serves those faster than the system allocator.
#[global_allocator]
static ALLOCATOR: agent_block::allocator::Allocator = agent_block::allocator::Allocator;
