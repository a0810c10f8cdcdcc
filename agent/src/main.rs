//! `rollgate-agent`: run the agent, or check a config file.

use clap::{Parser, Subcommand};
use rollgate_agent::config::AgentConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for a bad config (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "rollgate-agent",
    version,
    about = "rollgate's per-server agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The config file (see deploy/agent.example.toml).
        #[arg(long, short, env = "ROLLGATE_AGENT_CONFIG")]
        config: PathBuf,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `state_dir`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Overrides `log_level`.
        #[arg(long)]
        log_level: Option<String>,
    },
    /// Take this server out of the pool it joined (its config's [join] table names the
    /// coordinators). Run it before retiring the server; a server listed in a coordinator's
    /// config stays listed.
    Leave {
        /// The config file (see deploy/agent.example.toml).
        #[arg(long, short, env = "ROLLGATE_AGENT_CONFIG")]
        config: PathBuf,
        /// Give up after this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Check a config file: exit 0 if it is valid, else print one line saying what is wrong.
    Validate {
        /// The config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match AgentConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Leave { config, timeout } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(rollgate_agent::join::leave(&cfg, timeout)) {
                Ok(message) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config,
            listen,
            state_dir,
            log_level,
        } => {
            let mut cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            if let Some(l) = log_level {
                cfg.log_level = l;
            }
            rollgate_common::telemetry::init(cfg.log_format, &cfg.log_level);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            let result = runtime.block_on(async {
                let shutdown = rollgate_common::shutdown::on_signals()?;
                rollgate_agent::server::run(cfg, shutdown).await
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
