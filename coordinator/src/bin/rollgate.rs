//! `rollgate`: the operator CLI (see `rollgate --help`).

use clap::Parser;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match rollgate_coordinator::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
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

/// `--help` and `--version` print as clap does. A usage error becomes one line and exit 1:
/// clap's own exit code, 2, means "paused, needs an operator" to scripts that watch.
fn usage_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("error: {line} (see rollgate --help)");
    ExitCode::FAILURE
}
