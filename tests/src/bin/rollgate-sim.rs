//! `rollgate-sim`: runs the deterministic simulation of the coordinator over many seeds, or one
//! seed in detail. Every failing seed replays exactly: `rollgate-sim --seed N`.

use anyhow::bail;
use clap::Parser;
use rollgate_tests::sim::{self, Options};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "rollgate-sim",
    about = "deterministic simulation of rollgate's coordinators under faults"
)]
struct Cli {
    /// Replay this one seed and print what happened.
    #[arg(long)]
    seed: Option<u64>,
    /// The first seed of a batch.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// How many seeds to run.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// Worker threads (each seed runs on one thread).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Stop after this long even if seeds are left (the count run is printed).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_time: Option<Duration>,
    /// Run roll-out scenarios (several pools, two of them paired, one roll-out) instead of
    /// one pool's upgrade; replay one with `--rollout --seed N`.
    #[arg(long)]
    rollout: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = Options::default();
    let one = if cli.rollout {
        sim::run_rollout
    } else {
        sim::run
    };
    let again = if cli.rollout { "--rollout " } else { "" };
    if let Some(seed) = cli.seed {
        if std::env::var_os("RUST_LOG").is_some() {
            rollgate_common::telemetry::init(Default::default(), "info");
        }
        let opts = Options {
            verbose: true,
            ..opts
        };
        let r = one(seed, &opts);
        for l in &r.lines {
            println!("  {l}");
        }
        println!(
            "seed {seed}: {} in {:.0}s virtual, {} steps, {} commits, {} agent admissions, {} servers taken down, trace {:016x}",
            r.outcome,
            r.virtual_time.as_secs_f64(),
            r.steps,
            r.commits,
            r.admissions,
            r.downs,
            r.trace
        );
        for f in &r.faults {
            println!("  fault: {f}");
        }
        for v in &r.violations {
            println!("  VIOLATION: {v}");
        }
        if !r.passed() {
            bail!("seed {seed} broke an invariant");
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let mut failed = Vec::new();
    let mut done = 0u64;
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    let (mut steps, mut faults) = (0u64, 0u64);
    let batch = 1_000u64;
    let mut start = cli.from;
    let end = cli.from.saturating_add(cli.seeds);
    while start < end {
        if cli.max_time.is_some_and(|m| t0.elapsed() >= m) {
            break;
        }
        let stop = (start + batch).min(end);
        for r in sim::run_many_of(start..stop, cli.threads, &opts, one) {
            done += 1;
            steps += r.steps;
            faults += r.faults.len() as u64;
            let kind = r.outcome.split(':').next().unwrap_or_default().to_string();
            *outcomes.entry(kind).or_default() += 1;
            if !r.passed() {
                eprintln!("seed {}: {}", r.seed, r.violations.join(" | "));
                failed.push(r.seed);
            }
        }
        start = stop;
        eprintln!(
            "{done} seeds, {} failed, {:.1}s",
            failed.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{done} seeds in {secs:.1}s ({:.0} seeds/s on {} threads): {} failed; {steps} steps, {faults} scheduled faults; outcomes {outcomes:?}",
        done as f64 / secs.max(1e-9),
        cli.threads,
        failed.len()
    );
    if !failed.is_empty() {
        bail!(
            "{} seed(s) broke an invariant; replay one with: rollgate-sim {again}--seed {}",
            failed.len(),
            failed[0]
        );
    }
    Ok(())
}
