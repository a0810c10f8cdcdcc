//! `rollgate-coordinator`: run a coordinator, or check a config file.

use clap::{Parser, Subcommand};
use rollgate_coordinator::config::CoordinatorConfig;
use std::path::PathBuf;
use std::process::ExitCode;

const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "rollgate-coordinator",
    version,
    about = "rollgate's leader-elected coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Run {
        /// The config file (see deploy/coordinator.example.toml).
        #[arg(long, short, env = "ROLLGATE_COORDINATOR_CONFIG")]
        config: PathBuf,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `log_level`.
        #[arg(long)]
        log_level: Option<String>,
        /// Write the bound address here once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Check a config file: exit 0 if valid, else one line saying what is wrong.
    Validate {
        /// The config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { config } => match CoordinatorConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run {
            config,
            listen,
            log_level,
            addr_file,
        } => {
            let mut cfg = match CoordinatorConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(l) = log_level {
                cfg.log_level = l;
            }
            rollgate_common::telemetry::init(cfg.log_format, &cfg.log_level);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                let shutdown = rollgate_common::shutdown::on_signals()?;
                rollgate_coordinator::server::run(cfg, shutdown, addr_file).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
