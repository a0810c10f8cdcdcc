//! `rollgate-bench scale`: real coordinators (leader and follower) and a real etcd against a
//! simulated fleet of N agents in P pools (`rollgate-fleet`), measuring what issue #8 asks
//! for: coordinator memory and CPU per 1,000 agents, readiness latency under report load, time
//! to count crashed and hung agents lost, take-over fencing time, etcd transactions and bytes
//! per upgraded server, and the time for every pool to plan and dispatch.
//!
//! Every phase reports what it saw or why it failed, and the run goes on with the next phase
//! while the coordinators live, so that a size that does not work still yields a table.

use crate::cluster::{leader_of, operator_client, start_upgrade, CoordinatorProc};
use crate::fleet::agent::unix_us;
use crate::fleet::{FleetProc, FleetSpec, Identity};
use crate::Pki;
use anyhow::{anyhow, bail, Context};
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as opb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleOpts {
    /// Simulated agents.
    pub agents: usize,
    /// Pools.
    pub pools: usize,
    /// Upgrade domains per pool.
    pub domains: usize,
    /// Step duration of the simulated agents.
    pub step: Duration,
    /// Report interval of the simulated agents.
    pub report_interval: Duration,
    /// The coordinators' lost_after.
    pub lost_after: Duration,
    /// The election lease TTL, whole seconds.
    pub ttl: u64,
    /// One idle window for RSS and CPU.
    pub idle: Duration,
    /// Idle windows (and their median).
    pub idle_runs: usize,
    /// Readiness calls timed per coordinator.
    pub readiness_samples: usize,
    /// Agents crashed (then hung) per run.
    pub lose: usize,
    /// Crash runs and hang runs.
    pub loss_runs: usize,
    /// Leader kills.
    pub failover_runs: usize,
}

/// One figure of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The figure (or why it could not be had).
    pub value: String,
}

/// The report: figures in order, and the same as JSON.
#[derive(Debug, Default)]
pub struct ScaleReport {
    /// Figures, in the order measured.
    pub figures: Vec<Figure>,
    /// Machine-readable figures.
    pub json: serde_json::Map<String, serde_json::Value>,
}

impl ScaleReport {
    fn add(&mut self, name: &str, value: String) {
        println!("  {name}: {value}");
        self.figures.push(Figure {
            name: name.into(),
            value,
        });
    }

    fn num(&mut self, key: &str, v: f64) {
        self.json.insert(key.into(), serde_json::json!(v));
    }

    fn failed(&mut self, phase: &str, e: &anyhow::Error) {
        self.add(phase, format!("FAILED: {e:#}"));
        self.json.insert(
            format!("{phase}_error"),
            serde_json::json!(format!("{e:#}")),
        );
    }

    /// A two-column table.
    pub fn table(&self) -> String {
        let w = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for f in &self.figures {
            s.push_str(&format!("| {:w$} | {} |\n", f.name, f.value));
        }
        s
    }
}

/// Median, min and max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

/// Median (range, runs) with `d` decimals.
fn fmt(v: &[f64], unit: &str, d: usize) -> String {
    let (m, lo, hi) = stats(v);
    format!(
        "{m:.d$} {unit} (range {lo:.d$}..{hi:.d$}, {} runs)",
        v.len()
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A numeric field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`, `Threads:`): kB for sizes.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow!("no {field} for {pid}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad {field}"))?
        .parse()?)
}

/// The user + system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').ok_or_else(|| anyhow!("bad stat"))?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, at 11 and 12 after the state field.
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Linux USER_HZ.
const TICKS_PER_S: f64 = 100.0;

/// A coordinator pair (leader and follower) and how to reach them.
struct Pair {
    coords: Vec<CoordinatorProc>,
    op: TlsFiles,
}

impl Pair {
    async fn start(
        root: &Path,
        pki: &Pki,
        names: [&str; 2],
        settings: &str,
        store: &str,
        pools: &str,
    ) -> anyhow::Result<Pair> {
        let mut coords = Vec::new();
        for id in names {
            coords.push(
                CoordinatorProc::start_with(
                    root,
                    id,
                    &pki.issue(RoleKind::Coordinator, id)?,
                    settings,
                    store,
                    pools,
                )
                .await?,
            );
        }
        Ok(Pair {
            coords,
            op: pki.issue(RoleKind::Operator, "bench")?,
        })
    }

    async fn client(&self, i: usize) -> anyhow::Result<OperatorClient<Channel>> {
        let c = self.coords.get(i).context("no such coordinator")?;
        Ok(operator_client(c.addr, &self.op)
            .await?
            .max_decoding_message_size(64 << 20))
    }

    /// (index of the leader, its epoch), once one leads.
    async fn leader(&self) -> anyhow::Result<(usize, u64)> {
        let live = self
            .coords
            .iter()
            .position(|c| c.pid().is_some())
            .context("no coordinator runs")?;
        let c = self.client(live).await?;
        let (id, epoch) = crate::eventually("a leader", Duration::from_secs(180), || {
            let mut c = c.clone();
            async move { leader_of(&mut c).await }
        })
        .await?;
        let i = self
            .coords
            .iter()
            .position(|c| c.id == id)
            .ok_or_else(|| anyhow!("leader {id} is not one of ours"))?;
        Ok((i, epoch))
    }

    /// Fails naming the coordinators that exited.
    /// The last lines of every coordinator's log (warnings and errors only, colours removed).
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for c in &self.coords {
            let log = c.log();
            let plain: Vec<String> = log
                .lines()
                .map(strip_ansi)
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            out.push_str(&format!("{}:\n", c.id));
            for l in &plain[plain.len().saturating_sub(6)..] {
                out.push_str(&format!(
                    "    {}\n",
                    l.chars().take(300).collect::<String>()
                ));
            }
        }
        out
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for c in &mut self.coords {
            if let Ok(Some(st)) = c.exit_status() {
                let log = c.log();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "coordinator {} exited ({st}); log tail:\n{}",
                    c.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence: up to and including its final letter.
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every pool's readiness, from one Inventory call.
async fn inventory(c: &mut OperatorClient<Channel>) -> anyhow::Result<Vec<opb::PoolReadiness>> {
    let mut r = tonic::Request::new(opb::InventoryRequest {});
    r.set_timeout(Duration::from_secs(30));
    Ok(c.inventory(r).await?.into_inner().pools)
}

fn servers(p: &opb::PoolReadiness) -> impl Iterator<Item = &opb::ServerReadiness> {
    p.domains.iter().flat_map(|d| d.servers.iter())
}

fn is_lost(s: &opb::ServerReadiness) -> bool {
    s.state == opb::ServerState::Lost as i32 || s.state == opb::ServerState::Unknown as i32
}

/// Waits until every server of the fleet is active (serving and reporting); returns how long.
async fn all_active(
    c: &mut OperatorClient<Channel>,
    total: usize,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut last = 0usize;
    while t0.elapsed() < limit {
        if let Ok(pools) = inventory(c).await {
            last = pools.iter().map(|p| p.active as usize).sum();
            if last >= total {
                return Ok(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("only {last} of {total} servers active after {limit:?}")
}

/// RSS (MiB) and CPU (% of one core) of each pid over `window`.
async fn idle_sample(pids: &[u32], window: Duration) -> anyhow::Result<Vec<(f64, f64)>> {
    let t0: Vec<u64> = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(window).await;
    let secs = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (p, t) in pids.iter().zip(t0) {
        let used = cpu_ticks(*p)?.saturating_sub(t) as f64 / TICKS_PER_S;
        out.push((
            status_kib(*p, "VmRSS:")? as f64 / 1024.0,
            used / secs * 100.0,
        ));
    }
    Ok(out)
}

fn store_toml(endpoints: &[String], prefix: &str, ttl: u64) -> String {
    format!(
        "[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {endpoints:?}\nprefix = \"{prefix}\"\nelection_ttl = \"{ttl}s\""
    )
}

/// Runs the whole benchmark and returns its report (figures that failed say so).
pub async fn run(o: &ScaleOpts) -> anyhow::Result<ScaleReport> {
    let mut rep = ScaleReport::default();
    // A size that does not work still gives its table, ending with why.
    if let Err(e) = measure(o, &mut rep).await {
        rep.failed("run stopped", &e);
    }
    Ok(rep)
}

async fn measure(o: &ScaleOpts, rep: &mut ScaleReport) -> anyhow::Result<()> {
    let want = u64::try_from(o.agents)? * 4 + 8192;
    let nofile = crate::fleet::raise_nofile(want)?;
    println!(
        "scale: {} agents in {} pools × {} domains; step {:?}, report interval {:?}, lost_after {:?}, election TTL {}s; open files {nofile}",
        o.agents, o.pools, o.domains, o.step, o.report_interval, o.lost_after, o.ttl
    );
    for (k, v) in [
        ("agents", o.agents as f64),
        ("pools", o.pools as f64),
        ("domains", o.domains as f64),
    ] {
        rep.num(k, v);
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let pki = Pki::new(&root.join("pki"))?;
    let etcd = crate::etcd::EtcdCluster::start(1)
        .await?
        .ok_or_else(|| anyhow!("etcd not found: install etcd-server"))?;
    let spec = FleetSpec {
        agents: o.agents,
        pools: o.pools,
        domains: o.domains,
        version: "1.0".into(),
        step: o.step,
        report_interval: o.report_interval,
    };
    let t = Instant::now();
    // Every agent has a connection from the leader and one from the follower.
    let mut fleet = FleetProc::start(root, &pki, &spec, 2).await?;
    rep.add(
        "simulator start (certificates signed, listeners bound)",
        format!("{:.2} s", t.elapsed().as_secs_f64()),
    );
    let settings = format!(
        "lost_after = \"{}ms\"\nshutdown_grace = \"5s\"\nlog_level = \"warn\"",
        o.lost_after.as_millis()
    );

    // The baseline: the same pair of coordinators driving 3 agents.
    let few: Vec<Identity> = fleet
        .agents
        .iter()
        .filter(|a| a.pool == crate::fleet::pool_name(0))
        .take(3)
        .cloned()
        .collect();
    let base_n = few.len();
    let base = baseline(root, &pki, &etcd, o, &settings, &few).await;
    let (base_rss, base_cpu) = match &base {
        Ok(b) => {
            rep.add(
                &format!("baseline, {base_n} agents: leader / follower RSS"),
                format!("{:.1} / {:.1} MiB", b[0].0, b[1].0),
            );
            rep.add(
                &format!("baseline, {base_n} agents: leader / follower CPU"),
                format!("{:.3} / {:.3} % of a core", b[0].1, b[1].1),
            );
            ([b[0].0, b[1].0], [b[0].1, b[1].1])
        }
        Err(e) => {
            rep.failed("baseline", e);
            ([0.0; 2], [0.0; 2])
        }
    };

    let store = store_toml(&etcd.endpoints(), "/rollgate/scale/", o.ttl);
    let pools = fleet.pools_toml("");
    let t = Instant::now();
    let mut pair = Pair::start(root, &pki, ["c1", "c2"], &settings, &store, &pools).await?;
    let (li, epoch) = match pair.leader().await {
        Ok(l) => l,
        Err(e) => bail!("{e:#}; coordinator logs:\n{}", pair.log_tails()),
    };
    let mut lc = pair.client(li).await?;
    match all_active(&mut lc, o.agents, Duration::from_secs(600)).await {
        Ok(_) => rep.add(
            "coordinator start to every agent active",
            format!("{:.2} s", t.elapsed().as_secs_f64()),
        ),
        Err(e) => {
            rep.failed("start", &e);
            pair.check_alive()?;
        }
    }
    println!("leader {} at epoch {epoch}", pair.coords[li].id);

    // Idle footprint, per 1,000 agents above the baseline.
    let per_k = 1000.0 / (o.agents.saturating_sub(base_n).max(1)) as f64;
    let fi = 1 - li;
    let mut pids = vec![
        pair.coords[li].pid().context("leader pid")?,
        pair.coords[fi].pid().context("follower pid")?,
    ];
    let sims = fleet.pids();
    pids.extend(&sims);
    let mut samples: Vec<Vec<(f64, f64)>> = Vec::new();
    for _ in 0..o.idle_runs {
        match idle_sample(&pids, o.idle).await {
            Ok(s) => samples.push(s),
            Err(e) => {
                rep.failed("idle", &e);
                break;
            }
        }
    }
    for (i, who) in ["leader", "follower"].iter().enumerate() {
        let rss: Vec<f64> = samples.iter().map(|s| s[i].0).collect();
        let cpu: Vec<f64> = samples.iter().map(|s| s[i].1).collect();
        let rss_k: Vec<f64> = rss
            .iter()
            .map(|r| (r - base_rss[i]) * 1024.0 * per_k)
            .collect();
        let cpu_k: Vec<f64> = cpu.iter().map(|c| (c - base_cpu[i]) * per_k).collect();
        rep.add(&format!("{who} RSS"), fmt(&rss, "MiB", 1));
        rep.add(&format!("{who} idle CPU"), fmt(&cpu, "% of a core", 2));
        rep.add(
            &format!("{who} RSS per 1,000 agents (B3 ≤ 16 KiB)"),
            fmt(&rss_k, "KiB", 0),
        );
        rep.add(
            &format!("{who} idle CPU per 1,000 agents (B3 ≤ 0.5 %)"),
            fmt(&cpu_k, "% of a core", 3),
        );
        rep.num(&format!("{who}_rss_kib_per_1000"), stats(&rss_k).0);
        rep.num(&format!("{who}_cpu_pct_per_1000"), stats(&cpu_k).0);
    }
    // The simulator's processes, summed.
    let sim_rss: Vec<f64> = samples
        .iter()
        .map(|s| s[2..].iter().map(|x| x.0).sum())
        .collect();
    let sim_cpu: Vec<f64> = samples
        .iter()
        .map(|s| s[2..].iter().map(|x| x.1).sum())
        .collect();
    rep.add(
        &format!("simulator RSS ({} processes)", sims.len()),
        fmt(&sim_rss, "MiB", 1),
    );
    rep.add("simulator CPU", fmt(&sim_cpu, "% of a core", 1));

    // Readiness latency while the reports stream in.
    for (i, who) in [(li, "leader"), (fi, "follower")] {
        match readiness_latency(&pair, i, o).await {
            Ok((p50, p99, max)) => {
                rep.add(
                    &format!("Readiness RPC on the {who}, p50 / p99 / max (B5 over gRPC)"),
                    format!(
                        "{p50:.0} / {p99:.0} / {max:.0} µs ({} calls, pools of {})",
                        o.readiness_samples,
                        o.agents / o.pools.max(1)
                    ),
                );
                rep.num(&format!("{who}_readiness_p50_us"), p50);
                rep.num(&format!("{who}_readiness_p99_us"), p99);
            }
            Err(e) => rep.failed(&format!("readiness on the {who}"), &e),
        }
    }
    pair.check_alive()?;

    // Crashed and hung agents counted lost.
    for how in ["crash", "hang"] {
        let mut took = Vec::new();
        let mut fps = 0usize;
        for run in 0..o.loss_runs {
            let victims = victims(&fleet.agents, o.lose, run + usize::from(how == "hang") * 7);
            match lose(&mut fleet, &mut lc, &victims, how, o).await {
                Ok((t, fp)) => {
                    took.push(t);
                    fps += fp;
                }
                Err(e) => {
                    rep.failed(&format!("{how} run {}", run + 1), &e);
                    break;
                }
            }
        }
        rep.add(
            &format!("{how} of {} agents → all counted lost (B11 ≤ 3 s)", o.lose),
            fmt(&took, "s", 3),
        );
        rep.add(
            &format!("{how}: healthy agents ever shown lost (false positives)"),
            fps.to_string(),
        );
        rep.num(&format!("{how}_lost_s"), stats(&took).0);
        rep.num(&format!("{how}_false_positives"), fps as f64);
        pair.check_alive()?;
    }

    // Take-over: SIGKILL the leader; every agent fenced at the new epoch.
    let (mut kill_all, mut elect_all, mut spread, mut unfenced) = (vec![], vec![], vec![], vec![]);
    for run in 0..o.failover_runs {
        match takeover(&mut pair, &mut fleet, o).await {
            Ok(t) => {
                kill_all.push(t.kill_to_all);
                elect_all.push(t.elect_to_all);
                spread.push(t.spread);
                unfenced.push((o.agents as u64).saturating_sub(t.fenced) as f64);
            }
            Err(e) => {
                rep.failed(&format!("take-over run {}", run + 1), &e);
                break;
            }
        }
    }
    rep.add(
        &format!("leader SIGKILL → last of {} agents fenced", o.agents),
        fmt(&kill_all, "s", 3),
    );
    rep.add(
        "election (seen by polling Leader) → last agent fenced (target ≤ 2 s)",
        fmt(&elect_all, "s", 3),
    );
    rep.add(
        "agents left unfenced (fence failed, not retried)",
        fmt(&unfenced, "agents", 0),
    );
    rep.add("first → last agent fenced", fmt(&spread, "s", 3));
    rep.num("takeover_kill_to_all_fenced_s", stats(&kill_all).0);
    rep.num("takeover_election_to_all_fenced_s", stats(&elect_all).0);
    pair.check_alive()?;
    let (li, _) = pair.leader().await?;
    lc = pair.client(li).await?;
    if let Err(e) = all_active(&mut lc, o.agents, Duration::from_secs(300)).await {
        rep.failed("active after take-over", &e);
    }

    // etcd transactions and bytes per upgraded server.
    match etcd_per_server(&etcd, &mut lc, &fleet, o).await {
        Ok(EtcdCost {
            servers: n,
            txns,
            bytes,
            by_kind,
            secs,
        }) => {
            rep.add(
                &format!("upgrade of one pool ({n} servers)"),
                format!("{secs:.2} s"),
            );
            rep.add(
                "etcd revisions (transactions) per upgraded server (B7 ≤ 1)",
                format!("{:.2} ({txns} for {n} servers)", txns as f64 / n as f64),
            );
            rep.add(
                "etcd bytes written (key + value of every put) per upgraded server (B7 ≤ 1 KiB)",
                format!("{:.0} B ({bytes} B in all)", bytes as f64 / n as f64),
            );
            let kinds: Vec<String> = by_kind
                .iter()
                .map(|(k, b)| format!("{k} {:.0} B", *b as f64 / n as f64))
                .collect();
            rep.add(
                "etcd bytes per upgraded server, by kind of key",
                kinds.join(", "),
            );
            rep.num("etcd_txns_per_server", txns as f64 / n as f64);
            rep.num("etcd_bytes_per_server", bytes as f64 / n as f64);
        }
        Err(e) => rep.failed("etcd per upgraded server", &e),
    }
    pair.check_alive()?;

    // One roll-out over every pool, all in flight at once: the fleet-wide command's dispatch
    // and its end.
    match rollout_all(&mut lc, &mut fleet, o).await {
        Ok((call, all, med, ended)) => {
            rep.add(
                &format!("StartRollout over {} pools returned", o.pools),
                format!("{call:.3} s"),
            );
            rep.add(
                &format!(
                    "roll-out: first step of every one of {} pools at its agents",
                    o.pools
                ),
                format!("{all:.3} s (median pool {med:.3} s)"),
            );
            rep.add(
                &format!("roll-out of {} pools completed", o.pools),
                format!("{ended:.3} s"),
            );
            rep.num("rollout_dispatch_all_pools_s", all);
            rep.num("rollout_completed_s", ended);
        }
        Err(e) => rep.failed("roll-out over every pool", &e),
    }
    pair.check_alive()?;

    // Every pool planned and dispatched.
    match dispatch_all(&mut lc, &mut fleet, o).await {
        Ok((calls, all, med)) => {
            rep.add(
                &format!(
                    "StartUpgrade on all {} pools (concurrently) returned",
                    o.pools
                ),
                format!("{calls:.3} s"),
            );
            rep.add(
                &format!("first step of every one of {} pools at its agents", o.pools),
                format!("{all:.3} s (median pool {med:.3} s)"),
            );
            rep.num("dispatch_all_pools_s", all);
        }
        Err(e) => rep.failed("plan and dispatch", &e),
    }
    pair.check_alive()?;
    for c in &mut pair.coords {
        if c.pid().is_some() {
            let _ = c.terminate().await;
        }
    }
    Ok(())
}

async fn baseline(
    root: &Path,
    pki: &Pki,
    etcd: &crate::etcd::EtcdCluster,
    o: &ScaleOpts,
    settings: &str,
    few: &[Identity],
) -> anyhow::Result<Vec<(f64, f64)>> {
    let store = store_toml(&etcd.endpoints(), "/rollgate/baseline/", o.ttl);
    let mut pair = Pair::start(
        root,
        pki,
        ["b1", "b2"],
        settings,
        &store,
        &crate::fleet::pools_toml(few, ""),
    )
    .await?;
    let (li, _) = pair.leader().await?;
    let mut c = pair.client(li).await?;
    all_active(&mut c, few.len(), Duration::from_secs(60)).await?;
    let pids = [
        pair.coords[li].pid().context("pid")?,
        pair.coords[1 - li].pid().context("pid")?,
    ];
    let mut rss = [vec![], vec![]];
    let mut cpu = [vec![], vec![]];
    for _ in 0..o.idle_runs {
        let s = idle_sample(&pids, o.idle).await?;
        for i in 0..2 {
            rss[i].push(s[i].0);
            cpu[i].push(s[i].1);
        }
    }
    for c in &mut pair.coords {
        c.terminate().await?;
    }
    Ok((0..2)
        .map(|i| (stats(&rss[i]).0, stats(&cpu[i]).0))
        .collect())
}

async fn readiness_latency(
    pair: &Pair,
    i: usize,
    o: &ScaleOpts,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut c = pair.client(i).await?;
    let mut lat = Vec::with_capacity(o.readiness_samples);
    for n in 0..o.readiness_samples {
        let pool = crate::fleet::pool_name(n % o.pools.max(1));
        let t = Instant::now();
        c.readiness(opb::PoolRequest { pool }).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    Ok((
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    ))
}

/// `k` agents spread over the fleet, a different set for each `run`.
fn victims(agents: &[Identity], k: usize, run: usize) -> Vec<Identity> {
    let n = agents.len();
    let k = k.clamp(1, n);
    let stride = (n / k).max(1);
    (0..k)
        .map(|j| {
            let a = &agents[(j * stride + run * 3 + 1) % n];
            (a.server_id.clone(), a.clone())
        })
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .collect()
}

/// Crashes or hangs `victims`; returns how long until the leader showed all of them lost, and
/// how many other servers it showed lost meanwhile. Restores them and waits for them after.
async fn lose(
    fleet: &mut FleetProc,
    c: &mut OperatorClient<Channel>,
    victims: &[Identity],
    how: &str,
    o: &ScaleOpts,
) -> anyhow::Result<(f64, usize)> {
    let ids: Vec<&str> = victims.iter().map(|v| v.server_id.as_str()).collect();
    let wanted: BTreeSet<&str> = ids.iter().copied().collect();
    let pools: BTreeSet<&str> = victims.iter().map(|v| v.pool.as_str()).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut false_pos: BTreeSet<String> = BTreeSet::new();
    let limit = o.lost_after * 4 + Duration::from_secs(30);
    fleet.ask(&format!("{how} {}", ids.join(" "))).await?;
    let t0 = Instant::now();
    let mut last_sweep = Instant::now();
    let took = loop {
        if t0.elapsed() > limit {
            bail!(
                "{} of {} {how}ed agents still not shown lost after {limit:?}",
                wanted.len() - seen.len(),
                wanted.len()
            );
        }
        for p in &pools {
            let Ok(r) = c
                .readiness(opb::PoolRequest {
                    pool: (*p).to_owned(),
                })
                .await
            else {
                continue;
            };
            for s in servers(r.get_ref()) {
                if is_lost(s) {
                    if wanted.contains(s.server.as_str()) {
                        seen.insert(s.server.clone());
                    } else {
                        false_pos.insert(s.server.clone());
                    }
                }
            }
        }
        if seen.len() == wanted.len() {
            break t0.elapsed().as_secs_f64();
        }
        // The rest of the fleet, now and then: a healthy agent shown lost is a false positive.
        if last_sweep.elapsed() > Duration::from_secs(1) {
            last_sweep = Instant::now();
            if let Ok(all) = inventory(c).await {
                for s in all.iter().flat_map(servers) {
                    if is_lost(s) && !wanted.contains(s.server.as_str()) {
                        false_pos.insert(s.server.clone());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    fleet.ask(&format!("restore {}", ids.join(" "))).await?;
    all_active(c, o.agents, Duration::from_secs(120)).await?;
    println!(
        "  {how} run: {} agents lost after {took:.3} s, {} false positives",
        wanted.len(),
        false_pos.len()
    );
    Ok((took, false_pos.len()))
}

/// One leader kill, as seen by the agents.
struct Takeover {
    /// Kill → the last agent fenced at the new epoch (s).
    kill_to_all: f64,
    /// The new leader seen (polling Leader) → the last agent fenced (s).
    elect_to_all: f64,
    /// First → last agent fenced (s).
    spread: f64,
    /// Agents fenced at the new epoch, of all.
    fenced: u64,
}

/// SIGKILL of the leader; every agent's acceptance of the new epoch. Agents whose fence call
/// fails are not fenced again until their next command (the coordinator logs "it will be
/// fenced by its next command"), so the wait ends once no agent was fenced for 10 s, and the
/// figure says how many were.
async fn takeover(
    pair: &mut Pair,
    fleet: &mut FleetProc,
    o: &ScaleOpts,
) -> anyhow::Result<Takeover> {
    let (li, epoch) = pair.leader().await?;
    let total = o.agents as u64;
    let fenced = |v: &serde_json::Value| v.get("fenced").and_then(serde_json::Value::as_u64);
    let fi = 1 - li;
    let fc = pair.client(fi).await?;
    let kill_us = unix_us();
    pair.coords[li].kill().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (elect_us, new_epoch) = loop {
        let mut c = fc.clone();
        if let Some((id, e)) = leader_of(&mut c).await {
            if e > epoch && id == pair.coords[fi].id {
                break (unix_us(), e);
            }
        }
        if Instant::now() > deadline {
            bail!("no new leader within 60 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut last_count, mut last_change) = (0, Instant::now());
    let answer = loop {
        let a = fleet.ask(&format!("fenced {new_epoch}")).await?;
        let n = fenced(&a).unwrap_or(0);
        if n != last_count {
            (last_count, last_change) = (n, Instant::now());
        }
        if n == total || (n > 0 && last_change.elapsed() > Duration::from_secs(10)) {
            break a;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {total} agents fenced at epoch {new_epoch} after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let at = |k: &str| {
        answer
            .get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| anyhow!("no {k} in {answer}"))
    };
    let (first, last) = (at("first_us")?, at("last_us")?);
    let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
    let r = Takeover {
        kill_to_all: s(last, kill_us),
        elect_to_all: s(last, elect_us),
        spread: s(last, first),
        fenced: last_count,
    };
    println!(
        "  take-over: {} of {total} agents fenced at epoch {new_epoch}; kill → last fenced {:.3} s, election seen → last fenced {:.3} s (epoch {epoch} → {new_epoch})",
        r.fenced, r.kill_to_all, r.elect_to_all
    );
    // Back as the follower, for the next run.
    pair.coords[li].restart().await?;
    Ok(r)
}

fn fake_artifact(version: &str) -> (String, String) {
    use sha2::Digest;
    // The simulated agents never fetch it; the coordinator only passes it on.
    let path = format!("/srv/fleet/release-{version}.tar");
    (
        path.clone(),
        hex::encode(sha2::Sha256::digest(path.as_bytes())),
    )
}

fn upgrade_request(pool: &str, version: &str, per_domain: usize) -> opb::StartUpgradeRequest {
    let (artifact, sha256) = fake_artifact(version);
    opb::StartUpgradeRequest {
        pool: pool.into(),
        version: version.into(),
        artifact,
        sha256,
        parallelism: Some(u32::try_from(per_domain.max(1)).unwrap_or(u32::MAX)),
        verify_stable_ms: Some(0),
        verify_timeout_ms: Some(30_000),
        ..Default::default()
    }
}

async fn etcd_revision(kv: &mut etcd_client::Client) -> anyhow::Result<i64> {
    Ok(kv
        .get("/", None)
        .await?
        .header()
        .context("no header")?
        .revision())
}

/// What [`etcd_per_server`] measured.
struct EtcdCost {
    servers: usize,
    /// etcd revisions used (write transactions).
    txns: i64,
    /// Key + value bytes of every put.
    bytes: u64,
    /// The same bytes by kind of key (the path segment before the pool's name: `runs`,
    /// `events`, ...).
    by_kind: std::collections::BTreeMap<String, u64>,
    secs: f64,
}

/// The kind of a rollgate key: the path segment just before `pool`, or "other".
fn key_kind(key: &[u8], pool: &str) -> String {
    let key = String::from_utf8_lossy(key);
    let parts: Vec<&str> = key.split('/').collect();
    parts
        .windows(2)
        .find(|w| w[1] == pool)
        .map_or_else(|| "other".to_owned(), |w| w[0].to_owned())
}

/// Upgrades pool 0 and measures what it wrote to etcd.
async fn etcd_per_server(
    etcd: &crate::etcd::EtcdCluster,
    c: &mut OperatorClient<Channel>,
    fleet: &FleetProc,
    o: &ScaleOpts,
) -> anyhow::Result<EtcdCost> {
    let pool = crate::fleet::pool_name(0);
    let n = fleet.agents.iter().filter(|a| a.pool == pool).count();
    let mut kv = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let r0 = etcd_revision(&mut kv).await?;
    let t = Instant::now();
    start_upgrade(
        c,
        upgrade_request(&pool, "2.0", n.div_ceil(o.domains.max(1))),
    )
    .await?;
    let end = crate::eventually("the upgrade of one pool", Duration::from_secs(600), || {
        let mut c = c.clone();
        let pool = pool.clone();
        async move {
            let s = c
                .get_upgrade(opb::PoolRequest { pool })
                .await
                .ok()?
                .into_inner();
            (names::upgrade_state(s.status) != "running").then_some(s)
        }
    })
    .await?;
    let secs = t.elapsed().as_secs_f64();
    if names::upgrade_state(end.status) != "completed" {
        bail!(
            "upgrade ended {}: {}",
            names::upgrade_state(end.status),
            end.reason
        );
    }
    let r1 = etcd_revision(&mut kv).await?;
    // etcd's own history of the range: every event from r0+1 to r1.
    let mut bytes = 0u64;
    let mut by_kind = std::collections::BTreeMap::new();
    if r1 > r0 {
        let mut stream = kv
            .watch(
                "",
                Some(
                    etcd_client::WatchOptions::new()
                        .with_all_keys()
                        .with_start_revision(r0 + 1),
                ),
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut upto = r0;
        while upto < r1 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(msg) = tokio::time::timeout(left, stream.message()).await else {
                bail!("etcd history read stopped at revision {upto} of {r1}");
            };
            let Some(resp) = msg? else {
                bail!("etcd watch ended at revision {upto} of {r1}");
            };
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                if kv.mod_revision() > r1 {
                    continue;
                }
                upto = upto.max(kv.mod_revision());
                if ev.event_type() == etcd_client::EventType::Put {
                    let b = (kv.key().len() + kv.value().len()) as u64;
                    bytes += b;
                    *by_kind.entry(key_kind(kv.key(), &pool)).or_insert(0) += b;
                }
            }
        }
    }
    Ok(EtcdCost {
        servers: n,
        txns: r1 - r0,
        bytes,
        by_kind,
        secs,
    })
}

/// StartUpgrade on every pool at once: (all calls returned, every pool's first step at its
/// agents, median pool), seconds from the first call.
/// The pools' first steps at their agents since `t0` (unix µs), in seconds, once every pool
/// has one (at most 300 s).
async fn first_steps(fleet: &mut FleetProc, o: &ScaleOpts, t0: u64) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let a = fleet.ask("first-calls").await?;
        let firsts: Vec<f64> = a
            .get("pools")
            .and_then(serde_json::Value::as_object)
            .map(|m| {
                m.values()
                    .filter_map(serde_json::Value::as_u64)
                    .map(|t| t.saturating_sub(t0) as f64 / 1e6)
                    .collect()
            })
            .unwrap_or_default();
        if firsts.len() >= o.pools {
            return Ok(firsts);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} pools saw a first step within 300 s",
                firsts.len(),
                o.pools
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `StartRollout` over every pool (max in flight: all of them) to 3.0; returns (the call,
/// every pool's first step at an agent, the median pool's, the roll-out's end), in seconds.
async fn rollout_all(
    c: &mut OperatorClient<Channel>,
    fleet: &mut FleetProc,
    o: &ScaleOpts,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    fleet.ask("mark").await?;
    let per_pool = o.agents.div_ceil(o.pools.max(1));
    let mut template = upgrade_request("", "3.0", per_pool.div_ceil(o.domains.max(1)));
    template.pool = String::new();
    let req = opb::StartRolloutRequest {
        pools: (0..o.pools).map(crate::fleet::pool_name).collect(),
        max_in_flight: Some(u32::try_from(o.pools).unwrap_or(u32::MAX)),
        upgrade: Some(template),
        ..Default::default()
    };
    let t0 = unix_us();
    let started = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(20);
    let id = loop {
        match c.start_rollout(req.clone()).await {
            Ok(r) => break r.into_inner().id,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("StartRollout: {}", s.message()),
        }
    };
    let call_s = started.elapsed().as_secs_f64();
    let firsts = first_steps(fleet, o, t0).await?;
    let (med, _, max) = stats(&firsts);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = c
            .get_rollout(opb::RolloutRequest { id: id.clone() })
            .await
            .map_err(|s| anyhow!("GetRollout: {}", s.message()))?
            .into_inner();
        if r.ended {
            anyhow::ensure!(
                r.state == "completed",
                "the roll-out ended {}: {}",
                r.state,
                r.reason
            );
            return Ok((call_s, max, med, started.elapsed().as_secs_f64()));
        }
        if Instant::now() > deadline {
            bail!("the roll-out is still {} after 600 s", r.state);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dispatch_all(
    c: &mut OperatorClient<Channel>,
    fleet: &mut FleetProc,
    o: &ScaleOpts,
) -> anyhow::Result<(f64, f64, f64)> {
    fleet.ask("mark").await?;
    let per_pool = o.agents.div_ceil(o.pools.max(1));
    let t0 = unix_us();
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for p in 0..o.pools {
        let mut c = c.clone();
        let req = upgrade_request(
            &crate::fleet::pool_name(p),
            "4.0",
            per_pool.div_ceil(o.domains.max(1)),
        );
        calls.spawn(async move { start_upgrade(&mut c, req).await });
    }
    while let Some(r) = calls.join_next().await {
        r?.map_err(|s| anyhow!("StartUpgrade: {}", s.message()))?;
    }
    let calls_s = started.elapsed().as_secs_f64();
    let firsts = first_steps(fleet, o, t0).await?;
    let (med, _, max) = stats(&firsts);
    Ok((calls_s, max, med))
}
