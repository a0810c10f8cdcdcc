//! `rollgate`: the operator CLI (see `rollgate --help`).

use clap::Parser;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = rollgate_coordinator::cli::Cli::parse();
    match rollgate_coordinator::cli::run(cli).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!(
                "error: {}",
                rollgate_common::config::one_line(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}
