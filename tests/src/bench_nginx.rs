//! B1 on a real nginx pool, side by side with Ansible `serial`: the peers' pool
//! (`peers/ansible-rolling/fleet.sh`, N nginx instances on 127.0.0.1) driven by one real agent
//! per server whose hooks are the same `fleet.sh step` commands Ansible runs, and one
//! coordinator. Three denominators, each measured in the same run:
//! - the peers' floor, DOMAINS × one server's drain + install + start + verify chain run
//!   alone, which Ansible's figures share;
//! - DOMAINS × one domain's chains run at once by `fleet.sh` alone (no orchestrator): what a
//!   domain's servers side by side cost on these cores, which no tool can go below;
//! - B1's own (DESIGN.md), Σ over domains of the slowest server's drain + install + restart +
//!   verify as its agent's journal timed them in the run itself (the agent's own time in a
//!   step counts as work here, so the two floors above are the stricter measures).

use crate::cluster::{operator_client, start_upgrade, CoordinatorProc};
use crate::{http_get, AgentProc, Pki};
use anyhow::{anyhow, bail, Context};
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as opb;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What one `rollgate-bench nginx` invocation measures.
#[derive(Debug, Clone)]
pub struct Options {
    /// Independent runs (a fresh pool each).
    pub runs: usize,
    /// Servers in the pool.
    pub servers: usize,
    /// Upgrade domains.
    pub domains: usize,
    /// How long each server's install step sleeps.
    pub install: Duration,
    /// How long verify needs the service stable.
    pub verify_stable: Duration,
    /// The peers' directory (holds `ansible-rolling/`).
    pub peers: PathBuf,
    /// `ansible-playbook` to run the Ansible side in the same run, if any.
    pub ansible: Option<PathBuf>,
    /// Use a real etcd (one member) instead of the embedded store.
    pub etcd: bool,
    /// The pool's ports are `base_port + 1 ..= base_port + servers`.
    pub base_port: u16,
    /// Print each rollgate run's timeline: the coordinator's events and the agents' journals,
    /// in ms from StartUpgrade (where the time between the steps goes).
    pub trace: bool,
}

/// One side's figures for one run.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// From the start of the upgrade to its last step, in seconds.
    pub wall: f64,
    /// DOMAINS × one chain run alone, in seconds.
    pub floor: f64,
    /// DOMAINS × one domain's chains run at once by `fleet.sh` alone, in seconds: what a
    /// domain's servers cost side by side on this machine with no orchestrator. Only rollgate's
    /// runs measure it (the peers' `run.sh` does not).
    pub at_once: Option<f64>,
    /// B1's own denominator (DESIGN.md): Σ over domains of the slowest server's drain +
    /// install + restart + verify, as its agent's journal timed them in this run, in seconds.
    /// Only rollgate has it (Ansible keeps no journal).
    pub work: Option<f64>,
}

impl Figures {
    /// wall / floor.
    pub fn ratio(&self) -> f64 {
        self.wall / self.floor
    }

    /// (wall − floor) / domains, in milliseconds.
    pub fn per_domain_ms(&self, domains: usize) -> f64 {
        (self.wall - self.floor) * 1000.0 / domains as f64
    }

    /// wall / at_once.
    pub fn at_once_ratio(&self) -> Option<f64> {
        self.at_once.map(|a| self.wall / a)
    }

    /// (wall − at_once) / domains, in milliseconds.
    pub fn at_once_per_domain_ms(&self, domains: usize) -> Option<f64> {
        self.at_once
            .map(|a| (self.wall - a) * 1000.0 / domains as f64)
    }

    /// wall / work.
    pub fn work_ratio(&self) -> Option<f64> {
        self.work.map(|w| self.wall / w)
    }

    /// (wall − work) / domains, in milliseconds.
    pub fn work_per_domain_ms(&self, domains: usize) -> Option<f64> {
        self.work.map(|w| (self.wall - w) * 1000.0 / domains as f64)
    }
}

/// The steps B1 counts as a server's work.
const WORK_STEPS: [&str; 4] = ["drain", "install", "restart", "verify"];

/// Σ over domains of the slowest server's work, in ms, from each server's journal text (JSON
/// lines as the agent writes them) and its domain: per server, the time from each counted
/// step's begin to its end, for steps begun at or after `t0` (this upgrade's).
pub fn work_ms(journals: &[(usize, String)], t0: u64) -> anyhow::Result<u64> {
    let mut slowest: std::collections::BTreeMap<usize, u64> = Default::default();
    for (domain, text) in journals {
        let mut begun: std::collections::HashMap<String, u64> = Default::default();
        let mut total = 0u64;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let (Some(id), Some(at)) = (v["id"].as_str(), v["at_ms"].as_u64()) else {
                continue;
            };
            match v["event"].as_str() {
                Some("begin")
                    if at >= t0 && WORK_STEPS.contains(&v["kind"].as_str().unwrap_or("")) =>
                {
                    begun.insert(id.to_owned(), at);
                }
                Some("end") => {
                    if let Some(b) = begun.remove(id) {
                        total += at.saturating_sub(b);
                    }
                }
                _ => {}
            }
        }
        let e = slowest.entry(*domain).or_default();
        *e = (*e).max(total);
    }
    Ok(slowest.values().sum())
}

/// Fails, naming what is missing, unless nginx, curl (fleet.sh's verify) and, for the Ansible
/// side, bc (run.sh's arithmetic) can run. The benchmark's own need, not the test suite's.
pub fn need_nginx(with_ansible: bool) -> anyhow::Result<()> {
    let mut tools = vec![("nginx", "-v"), ("curl", "--version")];
    if with_ansible {
        tools.push(("bc", "--version"));
    }
    for (tool, arg) in tools {
        let ok = std::process::Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("{tool} not found: apt-get install -y nginx curl bc");
        }
    }
    Ok(())
}

/// The peers' nginx pool, brought up by `fleet.sh up` and down again on drop.
struct Pool {
    fleet: PathBuf,
    dir: PathBuf,
    servers: usize,
    base_port: u16,
}

impl Pool {
    async fn up(fleet: &Path, dir: &Path, servers: usize, base_port: u16) -> anyhow::Result<Pool> {
        // nginx's workers run as an unprivileged user: they must reach the pool's files.
        if let Some(parent) = dir.parent() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
        let pool = Pool {
            fleet: fleet.to_owned(),
            dir: dir.to_owned(),
            servers,
            base_port,
        };
        // The peers' run.sh stops its pool without waiting for nginx to exit: the ports of the
        // previous run may still be held for a moment.
        crate::eventually(
            "the pool's ports to be free",
            Duration::from_secs(30),
            || {
                let pool = &pool;
                async move {
                    for i in 1..=pool.servers {
                        let addr = SocketAddr::from(([127, 0, 0, 1], pool.port(i).ok()?));
                        if std::net::TcpListener::bind(addr).is_err() {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await?;
        run(&fleet_cmd(
            fleet,
            &[
                "up",
                &path_str(dir)?,
                &servers.to_string(),
                &base_port.to_string(),
            ],
        ))
        .await
        .context("fleet.sh up")?;
        Ok(pool)
    }

    fn port(&self, i: usize) -> anyhow::Result<u16> {
        u16::try_from(i)
            .ok()
            .and_then(|i| self.base_port.checked_add(i))
            .ok_or_else(|| anyhow!("server {i}: port past 65535"))
    }

    fn server_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("fe{i}"))
    }

    /// `fleet.sh step DIR I what args..` as an argv.
    fn step(&self, i: usize, what: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut argv = vec![
            path_str(&self.fleet)?,
            "step".into(),
            path_str(&self.dir)?,
            i.to_string(),
        ];
        argv.extend(what.iter().map(|s| (*s).to_owned()));
        Ok(argv)
    }

    /// One server's drain + install + start + verify, run alone: the peers' floor per domain.
    async fn chain(&self, install: &str) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        self.chain_of(1, install).await?;
        Ok(t0.elapsed())
    }

    /// The chains of servers 1..=`k` run at once by `fleet.sh` alone, no orchestrator: one
    /// domain's work side by side on the same cores, the floor of a domain of `k` servers.
    async fn chains_at_once(&self, k: usize, install: &str) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        futures_util::future::try_join_all((1..=k).map(|i| self.chain_of(i, install))).await?;
        Ok(t0.elapsed())
    }

    /// Server `i`'s chain, `fleet.sh step` by step, to version v0.
    async fn chain_of(&self, i: usize, install: &str) -> anyhow::Result<()> {
        for what in [
            &["drain"][..],
            &["install", "v0", install],
            &["start"],
            &["verify", "v0"],
        ] {
            run(&self.step(i, what)?)
                .await
                .with_context(|| format!("the floor's chain on server {i}: {}", what[0]))?;
        }
        Ok(())
    }

    /// What server `i` serves as its version.
    async fn serving(&self, i: usize) -> anyhow::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port(i)?));
        let (status, body) = http_get(addr, "/version.txt").await?;
        if status != 200 {
            bail!("server {i} answered {status} for /version.txt");
        }
        Ok(body.trim().to_owned())
    }

    /// Brings the pool down and waits until every nginx has exited (its pid file is gone), so
    /// that the next pool on the same ports can start.
    async fn down(&self) -> anyhow::Result<()> {
        run(&fleet_cmd(&self.fleet, &["down", &path_str(&self.dir)?])).await?;
        crate::eventually(
            "the nginx pool to exit",
            Duration::from_secs(20),
            || async {
                (1..=self.servers)
                    .all(|i| !self.server_dir(i).join("nginx.pid").exists())
                    .then_some(())
            },
        )
        .await
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Never leave daemonised nginx instances behind, whatever failed.
        if let Ok(d) = path_str(&self.dir) {
            let _ = std::process::Command::new(&self.fleet)
                .args(["down", &d])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

fn fleet_cmd(fleet: &Path, args: &[&str]) -> Vec<String> {
    let mut v = vec![fleet.display().to_string()];
    v.extend(args.iter().map(|s| (*s).to_owned()));
    v
}

/// Runs `argv` to completion; fails with its output unless it exits 0.
async fn run(argv: &[String]) -> anyhow::Result<String> {
    let (prog, args) = argv.split_first().context("empty command")?;
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{argv:?} timed out"))?
    .with_context(|| format!("cannot run {prog}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{argv:?} failed ({}): {text}", out.status);
    }
    Ok(text)
}

fn toml_argv(argv: &[String]) -> String {
    format!("{argv:?}")
}

/// The agent config for server `i`: the pool's `fleet.sh step` commands as hooks.
fn agent_config(
    pool: &Pool,
    i: usize,
    domain: usize,
    root: &Path,
    tls: &rollgate_common::tls::TlsFiles,
    install: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let id = format!("fe-{i}");
    let state_dir = root.join(format!("agent-{id}"));
    std::fs::create_dir_all(&state_dir)?;
    let port = pool.port(i)?;
    let d = path_str(&pool.server_dir(i))?;
    // Stopping an already stopped nginx succeeds (the agent stops after its drain, and before
    // a start); a running one is drained as fleet.sh does.
    let stop = vec![
        "/bin/sh".to_owned(),
        "-c".into(),
        "[ ! -f \"$1/nginx.pid\" ] || exec \"$2\" step \"$3\" \"$4\" drain".into(),
        "stop".into(),
        d,
        path_str(&pool.fleet)?,
        path_str(&pool.dir)?,
        i.to_string(),
    ];
    let config = state_dir.join("agent.toml");
    let text = format!(
        r#"server_id = "{id}"
pool = "nginx"
upgrade_domain = "ud-{domain}"
listen = "127.0.0.1:{listen}"
state_dir = "{state}"
# The product's defaults for report_interval (a probe every 2s, and at once on every phase
# change) and heartbeat_interval (500ms): liveness rides on the heartbeat, not on probes.
shutdown_grace = "10s"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[service]
ports = [{port}]
artifact_dirs = ["{artifacts}"]
drain = {drain}
start = {start}
stop = {stop}
install = {install}
health_url = "http://127.0.0.1:{port}/version.txt"
hook_timeout = "20s"
drain_timeout = "20s"
"#,
        listen = crate::free_port()?,
        state = state_dir.display(),
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        artifacts = root.display(),
        drain = toml_argv(&pool.step(i, &["drain"])?),
        start = toml_argv(&pool.step(i, &["start"])?),
        stop = toml_argv(&stop),
        install = toml_argv(&pool.step(i, &["install", "v2", install])?),
    );
    std::fs::write(&config, text)?;
    Ok((config, state_dir))
}

fn domain_of(i: usize, domains: usize) -> usize {
    (i - 1) % domains.max(1) + 1
}

/// One rollgate run on a fresh pool: the floor's chain, then the upgrade to v2.
pub async fn rollgate_run(o: &Options) -> anyhow::Result<Figures> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = o.peers.join("ansible-rolling/fleet.sh");
    anyhow::ensure!(
        fleet.is_file(),
        "{} not found: give the peers' directory with --peers",
        fleet.display()
    );
    let install = format!("{}", o.install.as_secs_f64());
    let pool = Pool::up(&fleet, &root.join("pool"), o.servers, o.base_port).await?;
    let chain = pool.chain(&install).await?;
    let per_domain = o.servers.div_ceil(o.domains);
    let at_once = pool.chains_at_once(per_domain, &install).await?;

    let pki = Pki::new(&root.join("pki"))?;
    let mut agents = Vec::new();
    let mut pools = "[[pools]]\nname = \"nginx\"\n".to_owned();
    for i in 1..=o.servers {
        let tls = pki.issue(RoleKind::Agent, &format!("fe-{i}"))?;
        let (config, state_dir) =
            agent_config(&pool, i, domain_of(i, o.domains), root, &tls, &install)?;
        let a = AgentProc::spawn(config, state_dir).await?;
        pools.push_str(&format!(
            "\n[[pools.servers]]\nid = \"fe-{i}\"\nagent = \"{}\"\nupgrade_domain = \"ud-{}\"\n",
            a.addr,
            domain_of(i, o.domains)
        ));
        agents.push(a);
    }
    let etcd = if o.etcd {
        Some(
            crate::etcd::EtcdCluster::start(1)
                .await?
                .ok_or_else(|| anyhow!("etcd not found: install etcd-server"))?,
        )
    } else {
        None
    };
    let store = match &etcd {
        Some(e) => format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {:?}\nprefix = \"/rollgate/bench/\"\nelection_ttl = \"5s\"", e.endpoints()),
        None => format!("[store]\nkind = \"embedded\"\npath = \"{}\"", root.join("store.json").display()),
    };
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &pki.issue(RoleKind::Coordinator, "c1")?,
        &store,
        &pools,
    )
    .await?;
    let mut c = operator_client(coord.addr, &pki.issue(RoleKind::Operator, "bench")?).await?;
    let pool_req = || opb::PoolRequest {
        pool: "nginx".into(),
    };
    crate::eventually("Ready", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            (c.readiness(pool_req()).await.ok()?.into_inner().state
                == opb::ReadinessState::Ready as i32)
                .then_some(())
        }
    })
    .await?;

    let artifact = root.join("release-v2.txt");
    std::fs::write(&artifact, "nginx pool release v2\n")?;
    let sha = hex::encode(Sha256::digest(std::fs::read(&artifact)?));
    let t0 = rollgate_common::time::now_ms();
    start_upgrade(
        &mut c,
        opb::StartUpgradeRequest {
            pool: "nginx".into(),
            version: "v2".into(),
            artifact: path_str(&artifact)?,
            sha256: sha,
            parallelism: Some(u32::try_from(per_domain)?),
            verify_stable_ms: Some(u64::try_from(o.verify_stable.as_millis())?),
            verify_timeout_ms: Some(u64::try_from(o.verify_stable.as_millis())? + 30_000),
            // A Busy answer is asked again after this instead of the default 10 minutes: on a
            // loaded machine a gate can find a server not yet reported serving, and the run
            // must end (each such answer is counted and printed).
            busy_retry_interval_ms: Some(200),
            ..Default::default()
        },
    )
    .await?;
    let end = crate::eventually("the upgrade to end", Duration::from_secs(600), || {
        let mut c = c.clone();
        async move {
            let s = c.get_upgrade(pool_req()).await.ok()?.into_inner();
            (names::upgrade_state(s.status) != "running").then_some(s)
        }
    })
    .await?;
    anyhow::ensure!(
        names::upgrade_state(end.status) == "completed",
        "upgrade ended {}: {}",
        names::upgrade_state(end.status),
        end.reason
    );
    let events = c
        .events(opb::EventsRequest {
            pool: "nginx".into(),
            limit: 10_000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let t1 = events.iter().map(|e| e.at_ms).max().context("no events")?;
    let busy = events.iter().filter(|e| e.kind == "readiness_busy").count();
    if busy > 0 {
        println!("  ({busy} busy answer(s) from the readiness gate in this run)");
    }
    if o.trace {
        print_timeline(t0, &events, &agents)?;
    }
    let journals = agents
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let text = std::fs::read_to_string(a.state_dir.join("journal.jsonl"))?;
            Ok((domain_of(k + 1, o.domains), text))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let work = work_ms(&journals, t0)?;
    for i in 1..=o.servers {
        let v = pool.serving(i).await?;
        anyhow::ensure!(v == "v2", "server {i} serves {v:?} after the upgrade");
    }
    coord.terminate().await?;
    for mut a in agents {
        a.terminate().await?;
    }
    pool.down().await?;
    Ok(Figures {
        wall: t1.saturating_sub(t0) as f64 / 1000.0,
        floor: chain.as_secs_f64() * o.domains as f64,
        at_once: Some(at_once.as_secs_f64() * o.domains as f64),
        work: Some(work as f64 / 1000.0),
    })
}

fn print_timeline(t0: u64, events: &[opb::Event], agents: &[AgentProc]) -> anyhow::Result<()> {
    let mut lines: Vec<(u64, String)> = events
        .iter()
        .map(|e| {
            (
                e.at_ms,
                format!("coordinator {} {} {}", e.kind, e.server, e.message),
            )
        })
        .collect();
    for a in agents {
        let text = std::fs::read_to_string(a.state_dir.join("journal.jsonl"))?;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let at = v["at_ms"].as_u64().unwrap_or(0);
            if at >= t0 {
                lines.push((at, format!("{} {line}", a.state_dir.display())));
            }
        }
    }
    lines.sort();
    for (at, l) in lines {
        println!("  +{:>6} ms {l}", at.saturating_sub(t0));
    }
    Ok(())
}

/// One Ansible run through the peers' `run.sh`, which brings up its own pool on 18081.. and
/// prints `... wall Ws floor Fs ratio R upgraded K/N`.
pub async fn ansible_run(o: &Options, playbook: &Path) -> anyhow::Result<Figures> {
    let script = o.peers.join("ansible-rolling/run.sh");
    let out = run(&[
        path_str(&script)?,
        path_str(playbook)?,
        o.servers.to_string(),
        o.domains.to_string(),
        format!("{}", o.install.as_secs_f64()),
    ])
    .await?;
    let line = out
        .lines()
        .find(|l| l.starts_with("ansible-serial"))
        .with_context(|| format!("no result line from run.sh: {out}"))?;
    let field = |name: &str| -> anyhow::Result<&str> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name);
        words
            .next()
            .with_context(|| format!("no {name} in {line:?}"))
    };
    let secs =
        |name: &str| -> anyhow::Result<f64> { Ok(field(name)?.trim_end_matches('s').parse()?) };
    let want = format!("{0}/{0}", o.servers);
    anyhow::ensure!(
        field("upgraded")? == want,
        "ansible upgraded only {}",
        field("upgraded")?
    );
    Ok(Figures {
        wall: secs("wall")?,
        floor: secs("floor")?,
        at_once: None,
        work: None,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A denominator only rollgate's runs have: its name, the ratio to it, the overhead per domain.
type Denominator = (
    &'static str,
    fn(&Figures) -> Option<f64>,
    fn(&Figures, usize) -> Option<f64>,
);

/// The smallest and the largest of `v`.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn summary(name: &str, runs: &[Figures], domains: usize) -> String {
    let ratios: Vec<f64> = runs.iter().map(Figures::ratio).collect();
    let per: Vec<f64> = runs.iter().map(|f| f.per_domain_ms(domains)).collect();
    let (lo, hi) = range(&ratios);
    let mut line = format!(
        "{name}: ratio {:.3} ({lo:.3}–{hi:.3}), wall {:.2}s, floor {:.2}s, {:.0} ms per domain",
        median(ratios),
        median(runs.iter().map(|f| f.wall).collect()),
        median(runs.iter().map(|f| f.floor).collect()),
        median(per),
    );
    let others: [Denominator; 2] = [
        (
            "to a domain's chains run at once alone",
            Figures::at_once_ratio,
            Figures::at_once_per_domain_ms,
        ),
        (
            "to the run's own journaled work (B1)",
            Figures::work_ratio,
            Figures::work_per_domain_ms,
        ),
    ];
    for (what, ratio, per_domain) in others {
        let r: Vec<f64> = runs.iter().filter_map(ratio).collect();
        if r.is_empty() {
            continue;
        }
        let (lo, hi) = range(&r);
        let per: Vec<f64> = runs.iter().filter_map(|f| per_domain(f, domains)).collect();
        line.push_str(&format!(
            ";\n    {what}: ratio {:.3} ({lo:.3}–{hi:.3}), {:.0} ms per domain",
            median(r),
            median(per)
        ));
    }
    line
}

/// Runs both sides `o.runs` times, alternating, and prints each run and the medians.
pub async fn bench(o: &Options) -> anyhow::Result<()> {
    need_nginx(o.ansible.is_some())?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 1..=o.runs {
        let f = rollgate_run(o).await?;
        println!(
            "run {r}: rollgate wall {:.3}s floor {:.3}s ratio {:.3} ({:.0} ms per domain); chains at once {:.3}s ratio {:.3} ({:.0} ms per domain); work {:.3}s ratio {:.3} ({:.0} ms per domain)",
            f.wall,
            f.floor,
            f.ratio(),
            f.per_domain_ms(o.domains),
            f.at_once.unwrap_or(f64::NAN),
            f.at_once_ratio().unwrap_or(f64::NAN),
            f.at_once_per_domain_ms(o.domains).unwrap_or(f64::NAN),
            f.work.unwrap_or(f64::NAN),
            f.work_ratio().unwrap_or(f64::NAN),
            f.work_per_domain_ms(o.domains).unwrap_or(f64::NAN),
        );
        ours.push(f);
        if let Some(p) = &o.ansible {
            let f = ansible_run(o, p).await?;
            println!(
                "run {r}: ansible wall {:.3}s floor {:.3}s ratio {:.3} ({:.0} ms per domain)",
                f.wall,
                f.floor,
                f.ratio(),
                f.per_domain_ms(o.domains)
            );
            theirs.push(f);
        }
    }
    println!(
        "median of {} ({} servers, {} domains, install {:?}, verify_stable {:?}, store {}):",
        o.runs,
        o.servers,
        o.domains,
        o.install,
        o.verify_stable,
        if o.etcd { "etcd" } else { "embedded" }
    );
    println!("  {}", summary("rollgate", &ours, o.domains));
    if !theirs.is_empty() {
        println!("  {}", summary("ansible serial", &theirs, o.domains));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_give_ratio_and_overhead_per_domain() {
        let f = Figures {
            wall: 3.3,
            floor: 3.0,
            at_once: Some(3.21),
            work: Some(3.15),
        };
        assert!((f.at_once_ratio().expect("at once") - 3.3 / 3.21).abs() < 1e-9);
        assert!((f.at_once_per_domain_ms(3).expect("at once") - 30.0).abs() < 1e-6);
        assert!((f.ratio() - 1.1).abs() < 1e-9);
        assert!((f.per_domain_ms(3) - 100.0).abs() < 1e-6);
        assert!((f.work_ratio().expect("work") - 3.3 / 3.15).abs() < 1e-9);
        assert!((f.work_per_domain_ms(3).expect("work") - 50.0).abs() < 1e-6);
    }

    /// Two domains: per server the counted steps of this upgrade (a prepare, and a step begun
    /// before t0, are not), the slowest server of each domain, summed.
    #[test]
    fn work_is_the_slowest_servers_steps_per_domain_summed() {
        let line = |ev: &str, id: &str, kind: &str, at: u64| {
            if ev == "begin" {
                format!(
                    r#"{{"event":"begin","id":"{id}","kind":"{kind}","epoch":1,"at_ms":{at},"attempt":1}}"#
                )
            } else {
                format!(
                    r#"{{"event":"end","id":"{id}","at_ms":{at},"state":"succeeded","message":"","version":"","output":""}}"#
                )
            }
        };
        let server = |steps: &[(&str, u64, u64)]| {
            steps
                .iter()
                .flat_map(|(kind, b, e)| {
                    let id = format!("u/{kind}");
                    [line("begin", &id, kind, *b), line("end", &id, kind, *e)]
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let journals = vec![
            // Domain 1: 10 + 100 + 5 + 2 = 117 (the prepare and the old drain not counted).
            (
                1,
                server(&[
                    ("drain", 50, 90),
                    ("prepare", 1000, 1500),
                    ("drain", 1500, 1510),
                    ("install", 1510, 1610),
                    ("restart", 1611, 1616),
                    ("verify", 1616, 1618),
                ]),
            ),
            // Domain 1, faster: 80.
            (1, server(&[("drain", 1500, 1520), ("install", 1520, 1580)])),
            // Domain 2: 30.
            (2, server(&[("verify", 2000, 2030)])),
        ];
        assert_eq!(work_ms(&journals, 1000).expect("parses"), 117 + 30);
        assert!(work_ms(&[(1, "not json".into())], 0).is_err());
    }

    #[test]
    fn servers_spread_round_robin_over_domains() {
        let d: Vec<usize> = (1..=6).map(|i| domain_of(i, 3)).collect();
        assert_eq!(d, [1, 2, 3, 1, 2, 3]);
    }
}
