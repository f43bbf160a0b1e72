//! The `agent-block` command: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = agent_block::cli::Cli::parse();
    agent_block::command::execute(cli)
}
