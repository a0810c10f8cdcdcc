//! `rollgate-bench`: rerunnable measurements, printed as medians over several runs.
//!
//! `rollgate-bench agent`: the agent's footprint (B6 in shared/reference/performance.md):
//! binary size, and idle RSS, peak RSS, threads and CPU time over an idle window with one
//! Watch stream open and one front end probed every report interval. Build with
//! `cargo build --release --workspace --bins` and run with ROLLGATE_BIN_DIR=target/release.
//!
//! `rollgate-bench embedded`: the embedded store's write latency and bytes written per write
//! with a fleet-sized keyspace (the harness is `rollgate_tests::store_bench`).

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::operator::names;
use rollgate_tests::scale::{cpu_ticks, status_kib};
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
    /// Leader failover (B2): SIGKILL, or SIGTERM (resign), of the leader of three coordinators
    /// on a real etcd; time until every agent has been fenced by the new leader.
    Failover {
        /// Independent kills per mode.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Lease TTL in whole seconds.
        #[arg(long, default_value_t = 2)]
        ttl: u64,
    },
    /// Orchestration overhead (B1): wall time of a rolling upgrade divided by the sum, over
    /// domains, of the slowest server's drain + install + restart + verify (from the agents'
    /// journals), with every server of a domain upgraded in parallel.
    Overhead {
        /// Independent upgrades.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Servers in the pool.
        #[arg(long, default_value_t = 6)]
        servers: usize,
        /// Upgrade domains.
        #[arg(long, default_value_t = 3)]
        domains: usize,
        /// How long verify needs the service stable (the bulk of a server's step time).
        #[arg(long, default_value = "2s", value_parser = humantime_parse)]
        verify_stable: Duration,
        /// Use a real etcd (one member) instead of the embedded store.
        #[arg(long)]
        etcd: bool,
    },
    /// The embedded store's write path: median latency of one small fenced write and bytes
    /// written per write, with a fleet-sized keyspace (pools x keys) already stored.
    Embedded {
        /// Independent runs (fresh store each); medians are reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Pools in the keyspace.
        #[arg(long, default_value_t = 100)]
        pools: usize,
        /// Keys per pool.
        #[arg(long, default_value_t = 100)]
        keys: usize,
        /// Bytes per value.
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
        /// Measured writes per run (one put each).
        #[arg(long, default_value_t = 500)]
        writes: usize,
        /// Writers at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Where the stores go (a fresh directory per run under it); default: the temp dir.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// B1 on a real nginx pool (the peers' `fleet.sh`), hooks = the same `fleet.sh step`
    /// commands Ansible runs; wall / (domains × one chain run alone), optionally side by side
    /// with Ansible `serial` in the same run.
    Nginx {
        /// Independent runs (a fresh pool each); medians and ranges are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Servers in the pool.
        #[arg(long, default_value_t = 6)]
        servers: usize,
        /// Upgrade domains.
        #[arg(long, default_value_t = 3)]
        domains: usize,
        /// How long each server's install step takes.
        #[arg(long, default_value = "1s", value_parser = humantime_parse)]
        install: Duration,
        /// How long verify needs the service stable.
        #[arg(long, default_value = "1ms", value_parser = humantime_parse)]
        verify_stable: Duration,
        /// The peers' directory (with ansible-rolling/fleet.sh and run.sh).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/peers"))]
        peers: std::path::PathBuf,
        /// ansible-playbook to run the Ansible side in the same run.
        #[arg(long)]
        ansible: Option<std::path::PathBuf>,
        /// Use a real etcd (one member) instead of the embedded store.
        #[arg(long)]
        etcd: bool,
        /// The pool listens on 127.0.0.1:(base-port + 1 ..= base-port + servers).
        #[arg(long, default_value_t = 18080)]
        base_port: u16,
        /// Print each rollgate run's timeline (coordinator events and agent journals).
        #[arg(long)]
        trace: bool,
    },
    /// Fleet scale (B3, B5, B7, B11, take-over): a leader and a follower on a real etcd
    /// driving N simulated agents (`rollgate-fleet`, real gRPC and mTLS) in P pools.
    Scale {
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Pools the agents are spread over.
        #[arg(long, default_value_t = 100)]
        pools: usize,
        /// Upgrade domains per pool.
        #[arg(long, default_value_t = 3)]
        domains: usize,
        /// How long each simulated step takes.
        #[arg(long, default_value = "20ms", value_parser = humantime_parse)]
        step: Duration,
        /// Health report interval of the simulated agents.
        #[arg(long, default_value = "1s", value_parser = humantime_parse)]
        report_interval: Duration,
        /// The coordinators' lost_after.
        #[arg(long, default_value = "3s", value_parser = humantime_parse)]
        lost_after: Duration,
        /// Election lease TTL in whole seconds.
        #[arg(long, default_value_t = 3)]
        ttl: u64,
        /// One idle window for RSS and CPU.
        #[arg(long, default_value = "10s", value_parser = humantime_parse)]
        idle: Duration,
        /// Idle windows measured (median and range reported).
        #[arg(long, default_value_t = 3)]
        idle_runs: usize,
        /// Readiness calls timed on each coordinator.
        #[arg(long, default_value_t = 2000)]
        readiness_samples: usize,
        /// Agents crashed (and, separately, hung) per run.
        #[arg(long, default_value_t = 10)]
        lose: usize,
        /// Crash runs, and hang runs.
        #[arg(long, default_value_t = 3)]
        loss_runs: usize,
        /// Leader kills.
        #[arg(long, default_value_t = 3)]
        failover_runs: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Pool readiness latency (B5) at fleet scale while reports stream in: the code path
    /// before the health model (clone the map, evaluate) against the model's counters and
    /// its in-place rows, in the same sitting.
    Readiness {
        /// Independent runs per path (fresh fleet each); medians and ranges are reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Servers in the fleet.
        #[arg(long, default_value_t = 10_000)]
        servers: usize,
        /// Pools (servers are dealt evenly).
        #[arg(long, default_value_t = 100)]
        pools: usize,
        /// Upgrade domains per pool.
        #[arg(long, default_value_t = 5)]
        domains: usize,
        /// Reports a second (10,000 agents with a 500ms heartbeat: 20,000).
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// Every this long, one report from every server at once.
        #[arg(long, default_value = "2s", value_parser = humantime_parse)]
        burst_every: Duration,
        /// Readiness calls timed per run (one a millisecond).
        #[arg(long, default_value_t = 2_000)]
        samples: usize,
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
        What::Agent {
            runs,
            idle,
            report_interval,
        } => {
            agent(
                runs.clamp(1, 50),
                idle.min(Duration::from_secs(600)),
                &report_interval,
            )
            .await
        }
        What::Failover { runs, ttl } => failover(runs.clamp(1, 50), ttl.clamp(2, 60)).await,
        What::Overhead {
            runs,
            servers,
            domains,
            verify_stable,
            etcd,
        } => {
            overhead(
                runs.clamp(1, 20),
                servers.clamp(1, 60),
                domains.clamp(1, 20),
                verify_stable.min(Duration::from_secs(60)),
                etcd,
            )
            .await
        }
        What::Embedded {
            runs,
            pools,
            keys,
            value_bytes,
            writes,
            concurrency,
            dir,
        } => {
            let p = rollgate_tests::store_bench::Params {
                pools: pools.clamp(1, 10_000),
                keys_per_pool: keys.clamp(1, 10_000),
                value_bytes: value_bytes.clamp(1, 1 << 20),
                writes: writes.clamp(1, 1_000_000),
                concurrency: concurrency.clamp(1, 256),
            };
            embedded(runs.clamp(1, 50), p, dir.as_deref()).await
        }
        What::Nginx {
            runs,
            servers,
            domains,
            install,
            verify_stable,
            peers,
            ansible,
            etcd,
            base_port,
            trace,
        } => {
            rollgate_tests::bench_nginx::bench(&rollgate_tests::bench_nginx::Options {
                runs: runs.clamp(1, 20),
                servers: servers.clamp(1, 60),
                domains: domains.clamp(1, 20),
                install: install.min(Duration::from_secs(60)),
                verify_stable: verify_stable.min(Duration::from_secs(60)),
                peers,
                ansible,
                etcd,
                base_port,
                trace,
            })
            .await
        }
        What::Scale {
            agents,
            pools,
            domains,
            step,
            report_interval,
            lost_after,
            ttl,
            idle,
            idle_runs,
            readiness_samples,
            lose,
            loss_runs,
            failover_runs,
            json,
        } => {
            let o = rollgate_tests::scale::ScaleOpts {
                agents: agents.clamp(3, 100_000),
                pools: pools.clamp(1, agents.max(1)),
                domains: domains.clamp(1, 20),
                step: step.min(Duration::from_secs(60)),
                report_interval: report_interval
                    .clamp(Duration::from_millis(100), Duration::from_secs(60)),
                lost_after: lost_after.clamp(Duration::from_millis(200), Duration::from_secs(600)),
                ttl: ttl.clamp(2, 60),
                idle: idle.min(Duration::from_secs(600)),
                idle_runs: idle_runs.clamp(1, 20),
                readiness_samples: readiness_samples.clamp(1, 1_000_000),
                lose: lose.clamp(1, agents.max(1)),
                loss_runs: loss_runs.clamp(1, 20),
                failover_runs: failover_runs.clamp(0, 20),
            };
            let rep = rollgate_tests::scale::run(&o).await?;
            println!("\n{}", rep.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rep.json)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
        What::Readiness {
            runs,
            servers,
            pools,
            domains,
            rate,
            burst_every,
            samples,
        } => {
            let load = rollgate_tests::readiness_bench::Load {
                servers: servers.clamp(1, 1_000_000),
                pools: pools.clamp(1, 10_000),
                domains: domains.clamp(1, 100),
                rate: rate.clamp(1, 10_000_000),
                burst_every: burst_every.max(Duration::from_millis(100)),
                samples: samples.clamp(10, 100_000),
            };
            readiness(runs.clamp(1, 50), &load)
        }
    }
}

async fn embedded(
    runs: usize,
    p: rollgate_tests::store_bench::Params,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (mut p50, mut p99, mut bytes, mut rate, mut lag) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        let tmp = match dir {
            Some(d) => tempfile::tempdir_in(d)?,
            None => tempfile::tempdir()?,
        };
        let o = rollgate_tests::store_bench::run(tmp.path(), p).await?;
        let mut l = o.latencies_us.clone();
        l.sort_by(f64::total_cmp);
        let q99 = l
            .get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0);
        let m = median(l);
        println!(
            "run {run}: median write {:.3} ms, p99 {:.3} ms, {:.0} bytes written per write, {:.0} writes/s, worst 1 ms timer lag {:.1} ms, {:.2} MiB on disk",
            m / 1e3,
            q99 / 1e3,
            o.bytes_per_write,
            o.writes_per_sec,
            o.worst_timer_lag_ms,
            o.disk_bytes as f64 / 1048576.0
        );
        p50.push(m / 1e3);
        p99.push(q99 / 1e3);
        bytes.push(o.bytes_per_write);
        rate.push(o.writes_per_sec);
        lag.push(o.worst_timer_lag_ms);
    }
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.3}-{hi:.3}")
    };
    println!(
        "median of {runs} ({} pools x {} keys, {} B values, {} writes, {} at once): write {:.3} ms ({}), p99 {:.3} ms, {:.0} bytes written per write, {:.0} writes/s, worst timer lag {:.1} ms",
        p.pools,
        p.keys_per_pool,
        p.value_bytes,
        p.writes,
        p.concurrency,
        median(p50.clone()),
        range(&p50),
        median(p99),
        median(bytes),
        median(rate),
        median(lag)
    );
    Ok(())
}

fn readiness(runs: usize, load: &rollgate_tests::readiness_bench::Load) -> anyhow::Result<()> {
    use rollgate_tests::readiness_bench::{run, Path};
    println!(
        "{} servers in {} pools of {} domains; {} reports/s plus every server every {:?}; \
         {} calls per run, {runs} runs per path",
        load.servers, load.pools, load.domains, load.rate, load.burst_every, load.samples
    );
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut p99s = Vec::new();
    for path in [Path::Before, Path::Gate, Path::Rows] {
        let mut results = Vec::new();
        for _ in 0..runs {
            results.push(run(path, load)?);
        }
        let col = |f: fn(&rollgate_tests::readiness_bench::Run) -> u64| {
            let v: Vec<f64> = results.iter().map(|r| us(f(r))).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            (median(v), lo, hi)
        };
        let (p50, p50_lo, p50_hi) = col(|r| r.p50_ns);
        let (p99, p99_lo, p99_hi) = col(|r| r.p99_ns);
        let (max, _, _) = col(|r| r.max_ns);
        let reports = median(results.iter().map(|r| r.reports as f64).collect());
        println!(
            "{:32} p50 {p50:9.1} µs ({p50_lo:.1}–{p50_hi:.1})  p99 {p99:9.1} µs ({p99_lo:.1}–{p99_hi:.1})  max {max:9.1} µs  reports applied {reports:.0}",
            path.name()
        );
        p99s.push(p99);
    }
    if let [before, gate, rows] = p99s[..] {
        println!(
            "p99 before / gate: {:.0}x; before / rows: {:.0}x",
            before / gate.max(0.001),
            before / rows.max(0.001)
        );
    }
    Ok(())
}

async fn agent(runs: usize, idle: Duration, report_interval: &str) -> anyhow::Result<()> {
    let agent_bin = bin("rollgate-agent")?;
    let size = std::fs::metadata(&agent_bin)?.len();
    println!(
        "agent binary {}: {:.2} MiB",
        agent_bin.display(),
        size as f64 / 1048576.0
    );
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
        let cfg = std::fs::read_to_string(&a.config)?.replace(
            "report_interval = \"200ms\"",
            &format!("report_interval = \"{report_interval}\""),
        );
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

async fn etcd() -> anyhow::Result<rollgate_tests::etcd::EtcdCluster> {
    rollgate_tests::etcd::EtcdCluster::start(1)
        .await?
        .ok_or_else(|| anyhow!("etcd not found: install etcd-server"))
}

async fn failover(runs: usize, ttl: u64) -> anyhow::Result<()> {
    use rollgate_tests::cluster::{leader_of, operator_client, CoordinatorProc, Fleet};
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let etcd = etcd().await?;
    let fleet = Fleet::start(root, "bench", 3, 3, "1.0").await?;
    let store = format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {:?}\nprefix = \"/rollgate/bench/\"\nelection_ttl = \"{ttl}s\"", etcd.endpoints());
    let pools = fleet.pool_toml("");
    let op = fleet.pki.issue(RoleKind::Operator, "bench")?;
    let coord_tls = fleet.pki.issue(RoleKind::Coordinator, "bench-reader")?;
    let mut agents = Vec::new();
    for s in &fleet.servers {
        agents.push(agent_client(s.agent.addr, &coord_tls).await?);
    }
    let mut coords = Vec::new();
    for i in 1..=3 {
        let id = format!("c{i}");
        coords.push(
            CoordinatorProc::start(
                root,
                &id,
                &fleet.pki.issue(RoleKind::Coordinator, &id)?,
                &store,
                &pools,
            )
            .await?,
        );
    }
    let fenced_at = |epoch: u64,
                     agents: Vec<
        rollgate_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>,
    >| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut all = true;
            for mut a in agents.clone() {
                let e = a
                    .health(pb::HealthRequest {})
                    .await
                    .map(|r| r.into_inner().epoch)
                    .unwrap_or(0);
                all &= e > epoch;
            }
            if all {
                return Ok::<(), anyhow::Error>(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(anyhow!("agents not fenced by a new leader within 60s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut crash = Vec::new();
    let mut graceful = Vec::new();
    for run in 0..runs * 2 {
        let kill = run % 2 == 0;
        let mut c = operator_client(
            coords
                .iter()
                .find(|c| c.pid().is_some())
                .context("a live coordinator")?
                .addr,
            &op,
        )
        .await?;
        let (leader, epoch) =
            rollgate_tests::eventually("a leader", Duration::from_secs(30), || {
                let mut c = c.clone();
                async move { leader_of(&mut c).await }
            })
            .await?;
        // Every agent must already carry this leader's epoch, so that the next rise is the new one.
        rollgate_tests::eventually("agents fenced", Duration::from_secs(30), || {
            let ag = agents.clone();
            async move {
                for mut a in ag {
                    if a.health(pb::HealthRequest {})
                        .await
                        .ok()?
                        .into_inner()
                        .epoch
                        < epoch
                    {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await?;
        let li = coords
            .iter()
            .position(|x| x.id == leader)
            .context("leader")?;
        let t0 = std::time::Instant::now();
        if kill {
            coords[li].kill().await?;
        } else {
            coords[li].terminate().await?;
        }
        fenced_at(epoch, agents.clone()).await?;
        let took = t0.elapsed().as_secs_f64();
        println!("run {}: {} of leader {leader}: agents fenced by the new leader after {:.3}s ({:.2}x TTL)", run / 2 + 1, if kill { "SIGKILL" } else { "SIGTERM" }, took, took / ttl as f64);
        if kill {
            crash.push(took)
        } else {
            graceful.push(took)
        }
        coords[li].restart().await?;
        c = operator_client(coords[li].addr, &op).await?;
        drop(c);
    }
    let (mc, mg) = (median(crash), median(graceful));
    println!("median over {runs}: crash (SIGKILL) {mc:.3}s = TTL + {:.3}s ({:.2}x TTL {ttl}s); graceful (SIGTERM, resign) {mg:.3}s", mc - ttl as f64, mc / ttl as f64);
    Ok(())
}

async fn overhead(
    runs: usize,
    servers: usize,
    domains: usize,
    verify_stable: Duration,
    use_etcd: bool,
) -> anyhow::Result<()> {
    use rollgate_proto::operator::v1 as opb;
    use rollgate_tests::cluster::{operator_client, CoordinatorProc, Fleet};
    let mut ratios = Vec::new();
    let mut per_domain = Vec::new();
    for run in 1..=runs {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path();
        let etcd = if use_etcd { Some(etcd().await?) } else { None };
        let fleet = Fleet::start(root, "bench", servers, domains, "1.0").await?;
        let store = match &etcd {
            Some(e) => format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {:?}\nprefix = \"/rollgate/bench/\"\nelection_ttl = \"5s\"", e.endpoints()),
            None => format!("[store]\nkind = \"embedded\"\npath = \"{}\"", root.join("store.json").display()),
        };
        let mut coord = CoordinatorProc::start(
            root,
            "c1",
            &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
            &store,
            &fleet.pool_toml(""),
        )
        .await?;
        let op = fleet.pki.issue(RoleKind::Operator, "bench")?;
        let mut c = operator_client(coord.addr, &op).await?;
        rollgate_tests::eventually("Ready", Duration::from_secs(30), || {
            let mut c = c.clone();
            async move {
                (c.readiness(opb::PoolRequest {
                    pool: "bench".into(),
                })
                .await
                .ok()?
                .into_inner()
                .state
                    == opb::ReadinessState::Ready as i32)
                    .then_some(())
            }
        })
        .await?;
        let (artifact, sha) = rollgate_tests::make_artifact(root, "2.0")?;
        let per_domain_servers = servers.div_ceil(domains);
        let t0 = rollgate_common::time::now_ms();
        rollgate_tests::cluster::start_upgrade(
            &mut c,
            opb::StartUpgradeRequest {
                pool: "bench".into(),
                version: "2.0".into(),
                artifact: artifact.display().to_string(),
                sha256: sha,
                parallelism: Some(u32::try_from(per_domain_servers)?),
                verify_stable_ms: Some(u64::try_from(verify_stable.as_millis())?),
                verify_timeout_ms: Some(u64::try_from(verify_stable.as_millis())? + 30_000),
                ..Default::default()
            },
        )
        .await?;
        let end =
            rollgate_tests::eventually("the upgrade to end", Duration::from_secs(600), || {
                let mut c = c.clone();
                async move {
                    let s = c
                        .get_upgrade(opb::PoolRequest {
                            pool: "bench".into(),
                        })
                        .await
                        .ok()?
                        .into_inner();
                    (names::upgrade_state(s.status) != "running").then_some(s)
                }
            })
            .await?;
        anyhow::ensure!(
            names::upgrade_state(end.status) == "completed",
            "upgrade ended {}: {}",
            end.status,
            end.reason
        );
        let events = c
            .events(opb::EventsRequest {
                pool: "bench".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let t1 = events.iter().map(|e| e.at_ms).max().context("no events")?;
        // Per server: the sum of its four forward operations, from its agent's journal.
        let mut slowest: std::collections::BTreeMap<String, u64> =
            std::collections::BTreeMap::new();
        for s in &fleet.servers {
            let text = std::fs::read_to_string(s.agent.state_dir.join("journal.jsonl"))?;
            let mut begin = std::collections::HashMap::new();
            let mut total = 0u64;
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                if !id.starts_with("bench-") {
                    continue;
                }
                match v["event"].as_str() {
                    Some("begin") => {
                        begin.insert(id, v["at_ms"].as_u64().unwrap_or(0));
                    }
                    Some("end") => {
                        total += v["at_ms"]
                            .as_u64()
                            .unwrap_or(0)
                            .saturating_sub(begin.get(&id).copied().unwrap_or(0))
                    }
                    _ => {}
                }
            }
            let e = slowest.entry(s.domain.clone()).or_insert(0);
            *e = (*e).max(total);
        }
        let sum: u64 = slowest.values().sum();
        let wall = t1.saturating_sub(t0);
        let ratio = wall as f64 / sum as f64;
        let per = (wall as f64 - sum as f64) / domains as f64;
        println!("run {run}: wall {wall} ms, sum of slowest per domain {sum} ms ({slowest:?}), ratio {ratio:.4}, overhead {per:.1} ms per domain");
        ratios.push(ratio);
        per_domain.push(per);
        coord.terminate().await?;
    }
    println!(
        "median of {runs}: overhead ratio {:.4} ({:+.2} %), {:.1} ms per domain ({servers} servers, {domains} domains, verify_stable {verify_stable:?}, store {})",
        median(ratios.clone()),
        (median(ratios) - 1.0) * 100.0,
        median(per_domain),
        if use_etcd { "etcd" } else { "embedded" }
    );
    Ok(())
}
