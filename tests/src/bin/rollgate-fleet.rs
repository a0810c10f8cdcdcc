//! `rollgate-fleet`: one process serving N simulated agents over real gRPC and mTLS, each on
//! its own loopback port with its own certificate; driven by commands on stdin (see
//! `rollgate_tests::fleet::control`). `rollgate-bench scale` and the integration tests start it.

use anyhow::Context;
use clap::Parser;
use rollgate_tests::fleet::{self, FleetSpec, SimFleet};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "rollgate-fleet")]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Pools they are spread over.
    #[arg(long, default_value_t = 1)]
    pools: usize,
    /// Upgrade domains per pool.
    #[arg(long, default_value_t = 3)]
    domains: usize,
    /// The version every agent starts with.
    #[arg(long, default_value = "1.0")]
    version: String,
    /// How long each step takes, in ms.
    #[arg(long, default_value_t = 20)]
    step_ms: u64,
    /// Health report interval of an unchanged agent, in ms.
    #[arg(long, default_value_t = 1000)]
    report_interval_ms: u64,
    /// Serve only the agents from this index of the fleet's layout (one of several processes
    /// sharing a fleet too large for one process's open-file limit).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// How many agents from --first (default: all the rest).
    #[arg(long)]
    count: Option<usize>,
    /// The deployment's CA certificate (PEM).
    #[arg(long)]
    ca_cert: PathBuf,
    /// The CA's private key (PEM), to sign every agent's certificate.
    #[arg(long)]
    ca_key: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rollgate_common::telemetry::init(rollgate_common::telemetry::LogFormat::Text, "warn");
    let a = Args::parse();
    anyhow::ensure!(
        (1..=100_000).contains(&a.agents),
        "--agents must be 1 to 100000"
    );
    let first = a.first.min(a.agents);
    let count = a.count.unwrap_or(a.agents - first).min(a.agents - first);
    // A listener and one connection per coordinator (and some spare) per agent.
    let want = u64::try_from(count)? * 4 + 1024;
    let got = fleet::raise_nofile(want)?;
    if got < want {
        tracing::warn!("open-file limit {got} is below the {want} this fleet may need");
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let spec = FleetSpec {
        agents: a.agents,
        pools: a.pools.clamp(1, a.agents),
        domains: a.domains.max(1),
        version: a.version,
        step: Duration::from_millis(a.step_ms.min(600_000)),
        report_interval: Duration::from_millis(a.report_interval_ms.clamp(50, 600_000)),
    };
    let sim = SimFleet::start(
        &spec,
        first..first + count,
        &read(&a.ca_cert)?,
        &read(&a.ca_key)?,
    )
    .await?;
    fleet::control::serve(&sim, fleet::control::stdin_lines(), std::io::stdout()).await
}
