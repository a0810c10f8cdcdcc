//! `rollgate-bench`: rerunnable measurements, printed as medians over several runs.
//!
//! `rollgate-bench agent`: the agent's footprint (B6 in shared/reference/performance.md):
//! binary size, and idle RSS, peak RSS, threads and CPU time over an idle window with one
//! Watch stream open and one front end probed every report interval. Build with
//! `cargo build --release --workspace --bins` and run with ROLLGATE_BIN_DIR=target/release.

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as pb;
use rollgate_tests::{agent_client, bin, AgentProc, FrontEnd, Pki};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "rollgate-bench")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Agent idle footprint.
    Agent {
        /// Independent runs (fresh agent each); the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Idle window per run.
        #[arg(long, default_value = "10s", value_parser = humantime_parse)]
        idle: Duration,
        /// Report interval configured in the agent (how often it probes).
        #[arg(long, default_value = "2s")]
        report_interval: String,
    },
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}")),
    }
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with(field)).ok_or_else(|| anyhow!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad {field}"))?.parse()?)
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').ok_or_else(|| anyhow!("bad stat"))?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the state field.
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().what {
        What::Agent { runs, idle, report_interval } => agent(runs.clamp(1, 50), idle.min(Duration::from_secs(600)), &report_interval).await,
    }
}

async fn agent(runs: usize, idle: Duration, report_interval: &str) -> anyhow::Result<()> {
    let agent_bin = bin("rollgate-agent")?;
    let size = std::fs::metadata(&agent_bin)?.len();
    println!("agent binary {}: {:.2} MiB", agent_bin.display(), size as f64 / 1048576.0);
    let (mut rss, mut hwm, mut threads, mut cpu) = (vec![], vec![], vec![], vec![]);
    let tick = 100.0; // USER_HZ on Linux
    for run in 1..=runs {
        let tmp = tempfile::tempdir()?;
        let pki = Pki::new(&tmp.path().join("pki"))?;
        let fe = FrontEnd::create(tmp.path(), "fe-1", "1.0")?;
        fe.start()?;
        let tls = pki.issue(RoleKind::Agent, "fe-1")?;
        let mut a = AgentProc::start(tmp.path(), "fe-1", "bench", "ud-1", &tls, &fe).await?;
        // Use the configured report interval rather than the harness's fast one.
        let cfg = std::fs::read_to_string(&a.config)?.replace("report_interval = \"200ms\"", &format!("report_interval = \"{report_interval}\""));
        std::fs::write(&a.config, cfg)?;
        a.terminate().await?;
        a.restart().await?;
        let pid = a.pid().ok_or_else(|| anyhow!("agent not running"))?;
        let mut c = agent_client(a.addr, &pki.issue(RoleKind::Coordinator, "bench")?).await?;
        let mut watch = c.watch(pb::WatchRequest {}).await?.into_inner();
        watch.message().await?;
        // Let start-up settle, then measure an idle window while the watch stream stays open.
        let mut h = c.clone();
        h.health(pb::HealthRequest {}).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = cpu_ticks(pid)?;
        let drain = async { while let Ok(Some(_)) = watch.message().await {} };
        let _ = tokio::time::timeout(idle, drain).await;
        let t1 = cpu_ticks(pid)?;
        let r = status_kib(pid, "VmRSS:")? as f64 / 1024.0;
        let m = status_kib(pid, "VmHWM:")? as f64 / 1024.0;
        let th = status_kib(pid, "Threads:")? as f64;
        let pct = (t1 - t0) as f64 / tick / idle.as_secs_f64() * 100.0;
        println!("run {run}: RSS {r:.2} MiB, peak {m:.2} MiB, {th} threads, CPU {pct:.3}% of one core over {idle:?}");
        rss.push(r);
        hwm.push(m);
        threads.push(th);
        cpu.push(pct);
        a.terminate().await?;
        fe.stop()?;
    }
    println!(
        "median of {runs}: idle RSS {:.2} MiB, peak RSS {:.2} MiB, threads {}, idle CPU {:.3}% of one core (report interval {report_interval}); binary {:.2} MiB",
        median(rss), median(hwm), median(threads), median(cpu), size as f64 / 1048576.0
    );
    Ok(())
}
