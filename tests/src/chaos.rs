//! The fault suite, in the spirit of Jepsen: a real 3-member etcd, three coordinators, nine
//! agents with sample front ends in three upgrade domains and a client load, all real processes
//! on loopback. During a rolling upgrade, faults chosen from a printed seed are injected at
//! random moments; afterwards the recorded history (agents' journals, the front ends' install
//! logs, the client load's samples, the final state) is checked against the invariants.
//!
//! Every coordinator reaches etcd and each agent through its own TCP proxies, so that the
//! harness can cut one coordinator off from etcd, or from the agents, without touching the rest.

use crate::cluster::{leader_of, operator_client, CoordinatorProc, Fleet};
use crate::etcd::{EtcdCluster, TcpProxy};
use crate::monitor::Monitor;
use crate::sim::rng::Rng;
use crate::{eventually, make_artifact};
use anyhow::{anyhow, bail, ensure, Context};
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as pb;
use std::path::Path;
use std::time::{Duration, Instant};

/// The faults the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the leader (restarted a moment later).
    KillLeader,
    /// SIGSTOP of the leader past its lease, then SIGCONT.
    PauseLeader,
    /// The leader cut off from etcd (but not from the agents) past its lease.
    LeaderEtcdPartition,
    /// The leader cut off from the agents (but not from etcd) for a while.
    LeaderAgentPartition,
    /// SIGKILL of an agent while its server is installing (restarted a moment later).
    KillAgentDuringInstall,
    /// SIGKILL of an agent while its server is draining.
    KillAgentDuringDrain,
    /// Loss of one etcd member, restarted later.
    KillEtcdMember,
    /// Loss of etcd quorum (two of three members) for a while.
    EtcdQuorumLoss,
    /// The leader's etcd answers held back for a while: its writes commit, their responses are
    /// lost (the proxy forwards requests but not answers).
    LostResponse,
}

/// Every fault, for random choice.
pub const ALL_FAULTS: [Fault; 9] = [
    Fault::KillLeader,
    Fault::PauseLeader,
    Fault::LeaderEtcdPartition,
    Fault::LeaderAgentPartition,
    Fault::KillAgentDuringInstall,
    Fault::KillAgentDuringDrain,
    Fault::KillEtcdMember,
    Fault::EtcdQuorumLoss,
    Fault::LostResponse,
];

/// What one run did and saw.
#[derive(Debug)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// The faults injected, with what was hit.
    pub faults: Vec<String>,
    /// Wall time of the run.
    pub took: Duration,
    /// The upgrade's final status.
    pub status: String,
    /// Client connections served and refused during the run.
    pub served: u64,
    /// Connections refused (servers out of service).
    pub refused: u64,
}

const TTL_S: u64 = 2;

struct Coord {
    proc_: CoordinatorProc,
    etcd_proxies: Vec<TcpProxy>,
    agent_proxies: Vec<TcpProxy>,
}

struct World {
    etcd: EtcdCluster,
    fleet: Fleet,
    coords: Vec<Coord>,
    op: TlsFiles,
}

impl World {
    async fn leader(&self) -> Option<usize> {
        for c in &self.coords {
            if c.proc_.pid().is_none() {
                continue;
            }
            let ask = async {
                let mut oc = operator_client(c.proc_.addr, &self.op).await.ok()?;
                leader_of(&mut oc).await
            };
            let got = tokio::time::timeout(Duration::from_secs(2), ask)
                .await
                .ok()
                .flatten();
            if let Some((id, _)) = got {
                return self
                    .coords
                    .iter()
                    .position(|x| x.proc_.id == id && x.proc_.pid().is_some());
            }
        }
        None
    }

    async fn status(&self) -> Option<pb::UpgradeStatus> {
        for c in &self.coords {
            if c.proc_.pid().is_none() {
                continue;
            }
            let ask = async {
                let mut oc = operator_client(c.proc_.addr, &self.op).await.ok()?;
                oc.get_upgrade(pb::PoolRequest {
                    pool: "chaos".into(),
                })
                .await
                .ok()
            };
            if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(3), ask).await {
                return Some(s.into_inner());
            }
        }
        None
    }

    /// A server whose current step is `step`, waiting up to a few seconds for one.
    async fn server_in(&self, step: &str) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Some(s) = self.status().await {
                if names::upgrade_state(s.status) != "running" {
                    return None;
                }
                if let Some(x) = s.servers.iter().find(|x| {
                    names::server_phase(x.phase) == "in_flight" && names::step(x.step) == step
                }) {
                    return self.fleet.servers.iter().position(|f| f.id == x.server);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

async fn start_world(root: &Path) -> anyhow::Result<World> {
    let etcd = EtcdCluster::start(3)
        .await?
        .ok_or_else(|| anyhow!("etcd not found: install etcd-server"))?;
    let fleet = Fleet::start(root, "chaos", 9, 3, "1.0").await?;
    // The install command lingers a little, so that "kill the agent during install" can land.
    for s in &fleet.servers {
        std::fs::write(s.fe.dir.join("slow-install"), "300")?;
    }
    let mut coords = Vec::new();
    for i in 1..=3 {
        let id = format!("c{i}");
        let mut etcd_proxies = Vec::new();
        for m in 0..3 {
            etcd_proxies.push(TcpProxy::start(etcd.client_addr(m)?).await?);
        }
        let mut agent_proxies = Vec::new();
        for s in &fleet.servers {
            agent_proxies.push(TcpProxy::start(s.agent.addr).await?);
        }
        let endpoints: Vec<String> = etcd_proxies.iter().map(TcpProxy::url).collect();
        let store = format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {endpoints:?}\nprefix = \"/rollgate/chaos/\"\nelection_ttl = \"{TTL_S}s\"");
        let mut pools = "[[pools]]\nname = \"chaos\"\n".to_owned();
        for (s, p) in fleet.servers.iter().zip(&agent_proxies) {
            pools.push_str(&format!(
                "\n[[pools.servers]]\nid = \"{}\"\nagent = \"{}\"\nupgrade_domain = \"{}\"\n",
                s.id,
                p.addr(),
                s.domain
            ));
        }
        let proc_ = CoordinatorProc::start(
            root,
            &id,
            &fleet.pki.issue(RoleKind::Coordinator, &id)?,
            &store,
            &pools,
        )
        .await?;
        coords.push(Coord {
            proc_,
            etcd_proxies,
            agent_proxies,
        });
    }
    let op = fleet.pki.issue(RoleKind::Operator, "chaos")?;
    Ok(World {
        etcd,
        fleet,
        coords,
        op,
    })
}

/// Injects one fault and heals it; returns a line saying what was done.
async fn inject(w: &mut World, fault: Fault, rng: &mut Rng) -> anyhow::Result<String> {
    let ttl = Duration::from_secs(TTL_S);
    match fault {
        Fault::KillLeader => {
            let Some(l) = w.leader().await else {
                return Ok("kill leader: no leader right now".into());
            };
            w.coords[l].proc_.kill().await?;
            tokio::time::sleep(rng.millis(500, 2500)).await;
            w.coords[l].proc_.restart().await?;
            Ok(format!(
                "SIGKILL leader {} then restart",
                w.coords[l].proc_.id
            ))
        }
        Fault::PauseLeader => {
            let Some(l) = w.leader().await else {
                return Ok("pause leader: no leader right now".into());
            };
            w.coords[l].proc_.stop_process()?;
            let d = ttl + rng.millis(1000, 2500);
            tokio::time::sleep(d).await;
            w.coords[l].proc_.continue_process()?;
            Ok(format!(
                "SIGSTOP leader {} for {d:?} then SIGCONT",
                w.coords[l].proc_.id
            ))
        }
        Fault::LeaderEtcdPartition => {
            let Some(l) = w.leader().await else {
                return Ok("etcd partition: no leader right now".into());
            };
            w.coords[l].etcd_proxies.iter().for_each(TcpProxy::freeze);
            let d = ttl + rng.millis(1000, 2500);
            tokio::time::sleep(d).await;
            w.coords[l].etcd_proxies.iter().for_each(TcpProxy::thaw);
            Ok(format!(
                "leader {} cut off from etcd for {d:?}",
                w.coords[l].proc_.id
            ))
        }
        Fault::LeaderAgentPartition => {
            let Some(l) = w.leader().await else {
                return Ok("agent partition: no leader right now".into());
            };
            w.coords[l].agent_proxies.iter().for_each(TcpProxy::freeze);
            let d = rng.millis(1000, 4000);
            tokio::time::sleep(d).await;
            w.coords[l].agent_proxies.iter().for_each(TcpProxy::thaw);
            Ok(format!(
                "leader {} cut off from the agents for {d:?}",
                w.coords[l].proc_.id
            ))
        }
        Fault::KillAgentDuringInstall | Fault::KillAgentDuringDrain => {
            let step = if fault == Fault::KillAgentDuringInstall {
                "install"
            } else {
                "drain"
            };
            let Some(i) = w.server_in(step).await else {
                return Ok(format!("kill agent during {step}: no server was in {step}"));
            };
            w.fleet.servers[i].agent.kill().await?;
            tokio::time::sleep(rng.millis(200, 1500)).await;
            w.fleet.servers[i].agent.restart().await?;
            Ok(format!(
                "SIGKILL agent {} during {step} then restart",
                w.fleet.servers[i].id
            ))
        }
        Fault::KillEtcdMember => {
            let m = usize::try_from(rng.below(3))?;
            w.etcd.kill_member(m)?;
            tokio::time::sleep(rng.millis(1000, 3000)).await;
            w.etcd.restart_member(m).await?;
            Ok(format!("etcd member {m} killed then restarted"))
        }
        Fault::EtcdQuorumLoss => {
            let a = usize::try_from(rng.below(3))?;
            let b = (a + 1) % 3;
            w.etcd.kill_member(a)?;
            w.etcd.kill_member(b)?;
            let d = rng.millis(1500, 4000);
            tokio::time::sleep(d).await;
            w.etcd.restart_member(a).await?;
            w.etcd.restart_member(b).await?;
            Ok(format!("etcd quorum lost for {d:?} (members {a}, {b})"))
        }
        Fault::LostResponse => {
            let Some(l) = w.leader().await else {
                return Ok("lost response: no leader right now".into());
            };
            // Requests still reach etcd and commit; only the answers are held back.
            w.coords[l]
                .etcd_proxies
                .iter()
                .for_each(TcpProxy::freeze_answers);
            let d = rng.millis(300, 2500);
            tokio::time::sleep(d).await;
            w.coords[l].etcd_proxies.iter().for_each(TcpProxy::thaw);
            Ok(format!("leader {} got no etcd answers for {d:?} (its writes committed, responses held back)", w.coords[l].proc_.id))
        }
    }
}

/// One run: an upgrade of 9 servers under `faults` random faults from `seed`. Fails naming the
/// invariant that broke, with the seed to replay it.
pub async fn run(seed: u64, faults: usize) -> anyhow::Result<RunReport> {
    let t0 = Instant::now();
    let mut rng = Rng::new(seed);
    // ROLLGATE_CHAOS_KEEP keeps the work directory (logs, journals) for a post-mortem.
    let dir = tempfile::tempdir()?;
    let (root, _guard) = if std::env::var_os("ROLLGATE_CHAOS_KEEP").is_some() {
        let p = dir.keep();
        println!("  work dir kept: {}", p.display());
        (p, None)
    } else {
        (dir.path().to_owned(), Some(dir))
    };
    let root = root.as_path();
    let mut w = start_world(root).await?;
    let ports: Vec<u16> = w.fleet.servers.iter().map(|s| s.fe.port).collect();
    let domains: Vec<String> = w.fleet.servers.iter().map(|s| s.domain.clone()).collect();
    let l = eventually("a leader", Duration::from_secs(30), || {
        let w = &w;
        async move { w.leader().await }
    })
    .await?;
    let mut lc = operator_client(w.coords[l].proc_.addr, &w.op).await?;
    eventually("the pool to be Ready", Duration::from_secs(30), || {
        let mut c = lc.clone();
        async move {
            (c.readiness(pb::PoolRequest {
                pool: "chaos".into(),
            })
            .await
            .ok()?
            .into_inner()
            .state
                == pb::ReadinessState::Ready as i32)
                .then_some(())
        }
    })
    .await?;
    let monitor = Monitor::start(ports, Duration::from_secs(300));
    let (artifact, sha) = make_artifact(root, "2.0")?;
    crate::cluster::start_upgrade(
        &mut lc,
        pb::StartUpgradeRequest {
            pool: "chaos".into(),
            version: "2.0".into(),
            artifact: artifact.display().to_string(),
            sha256: sha,
            verify_stable_ms: Some(400),
            verify_timeout_ms: Some(20_000),
            drain_timeout_ms: Some(30_000),
            busy_retry_interval_ms: Some(1_000),
            busy_retries: Some(30),
            server_retries: Some(3),
            ..Default::default()
        },
    )
    .await
    .context("start the upgrade")?;
    let mut done = Vec::new();
    for _ in 0..faults {
        tokio::time::sleep(rng.millis(100, 1500)).await;
        let pool = fault_pool();
        let f = pool[usize::try_from(rng.below(pool.len() as u64))?];
        let line = inject(&mut w, f, &mut rng)
            .await
            .with_context(|| format!("seed {seed}: injecting {f:?}"))?;
        done.push(line);
    }
    // Faults are over: the upgrade must end, and end completed, within a deadline.
    let end = eventually(
        "the upgrade to end after the faults",
        Duration::from_secs(120),
        || {
            let w = &w;
            async move {
                w.status().await.filter(|s| {
                    names::upgrade_state(s.status) != "running"
                        && s.servers
                            .iter()
                            .all(|x| names::server_phase(x.phase) != "in_flight")
                })
            }
        },
    )
    .await
    .with_context(|| format!("seed {seed}: faults {done:?}"))?;
    let report = monitor.stop().await;
    let ctx = || format!("seed {seed}, faults {done:?}");
    ensure!(
        names::upgrade_state(end.status) == "completed",
        "{}: the upgrade ended {} ({})",
        ctx(),
        end.status,
        end.reason
    );
    report
        .check(&domains, 5)
        .map_err(|e| anyhow!("{}: {e}", ctx()))?;
    for (id, v) in w.fleet.installs() {
        ensure!(
            v == vec!["2.0".to_owned()],
            "{}: {id} installs {v:?}: not exactly once",
            ctx()
        );
    }
    // Epochs each agent accepted only increase (no call from a deposed leader after a newer one).
    for s in &w.fleet.servers {
        let text = std::fs::read_to_string(s.agent.state_dir.join("journal.jsonl"))?;
        let mut last = 0u64;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v["event"] == "begin" {
                let e = v["epoch"].as_u64().context("epoch")?;
                ensure!(
                    e >= last,
                    "{}: {} accepted epoch {e} after epoch {last}",
                    ctx(),
                    s.id
                );
                last = e;
            }
        }
    }
    // No server left drained or stopped: every one serves the new version.
    let final_ok = eventually("every server serving 2.0", Duration::from_secs(30), || {
        let w = &w;
        async move {
            for c in &w.coords {
                let Ok(mut oc) = operator_client(c.proc_.addr, &w.op).await else {
                    continue;
                };
                let Ok(r) = oc
                    .readiness(pb::PoolRequest {
                        pool: "chaos".into(),
                    })
                    .await
                else {
                    continue;
                };
                let r = r.into_inner();
                let all = r
                    .domains
                    .iter()
                    .flat_map(|d| &d.servers)
                    .all(|s| names::server_state(s.state) == "serving" && s.version == "2.0");
                if all {
                    return Some(());
                }
            }
            None
        }
    })
    .await;
    if final_ok.is_err() {
        bail!("{}: some server is not serving 2.0 at the end", ctx());
    }
    let took = t0.elapsed();
    drop(w);
    Ok(RunReport {
        seed,
        faults: done,
        took,
        status: names::upgrade_state(end.status),
        served: report.served,
        refused: report.refused,
    })
}

/// The faults to choose from: all, or those named (Debug names, comma-separated) in
/// ROLLGATE_CHAOS_FAULTS, to focus a soak on one kind.
pub fn fault_pool() -> Vec<Fault> {
    let only = std::env::var("ROLLGATE_CHAOS_FAULTS").unwrap_or_default();
    let picked: Vec<Fault> = ALL_FAULTS
        .iter()
        .copied()
        .filter(|f| only.split(',').any(|n| n.trim() == format!("{f:?}")))
        .collect();
    if picked.is_empty() {
        ALL_FAULTS.to_vec()
    } else {
        picked
    }
}

/// The seed printed for a run: from ROLLGATE_CHAOS_SEED when set, else from the clock.
pub fn seed_from_env_or_clock() -> u64 {
    std::env::var("ROLLGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rollgate_common::time::now_ms)
}
