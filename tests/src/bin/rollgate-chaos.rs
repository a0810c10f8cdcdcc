//! `rollgate-chaos`: the fault suite for a longer soak. Each run is a rolling upgrade of nine
//! servers under random faults from a printed seed (replay one with `--seed`). Bounded in runs
//! and time; prints a summary with how many runs and faults were survived.

use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "rollgate-chaos",
    about = "rolling upgrades under injected faults, checked against rollgate's invariants"
)]
struct Args {
    /// Number of runs (each with a fresh cluster).
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Faults injected per run.
    #[arg(long, default_value_t = 4)]
    faults: usize,
    /// Replay exactly this seed (one run).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop starting new runs after this many minutes.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let start = Instant::now();
    let budget = Duration::from_secs(a.minutes.min(24 * 60) * 60);
    let base = a.seed.unwrap_or_else(rollgate_common::time::now_ms);
    let runs = if a.seed.is_some() {
        1
    } else {
        a.runs.clamp(1, 10_000)
    };
    let (mut ok, mut faults, mut failed) = (0u32, 0usize, Vec::new());
    for i in 0..runs {
        if start.elapsed() > budget {
            println!("time budget of {} min used: stopping", a.minutes);
            break;
        }
        let seed = base.wrapping_add(u64::from(i));
        println!("run {}/{runs}: seed {seed}", i + 1);
        match rollgate_tests::chaos::run(seed, a.faults.min(50)).await {
            Ok(r) => {
                ok += 1;
                faults += r.faults.len();
                println!(
                    "  ok in {:.1}s: {} connections served, {} refused; faults: {}",
                    r.took.as_secs_f64(),
                    r.served,
                    r.refused,
                    r.faults.join("; ")
                );
            }
            Err(e) => {
                println!("  FAILED: {e:#}");
                failed.push(seed);
            }
        }
    }
    println!(
        "{ok} runs survived ({faults} faults injected), {} failed{}",
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(
                ": replay with --seed {}",
                failed
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" / --seed ")
            )
        }
    );
    println!("{} passed, {} failed", ok, failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}
