//! The `pinproxy` binary: parse the command line and run the subcommand.
//! Everything else lives in the library (`pinproxy::cli` first).

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    match pinproxy::cli::run(pinproxy::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
