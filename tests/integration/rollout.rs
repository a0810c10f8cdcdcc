//! Fleet-wide roll-outs end to end: one coordinator, five pools of real agents and front ends,
//! the `rollgate` CLI, and a coordinator killed in the middle of a roll-out.

use crate::coordinator::{embedded, start_req, wait_ready};
use anyhow::{bail, ensure, Context};
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use rollgate_tests::browser::Browser;
use rollgate_tests::cluster::{cli, operator_client, CoordinatorProc, Fleet};
use rollgate_tests::{eventually, make_artifact};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::Channel;

const LONG: Duration = Duration::from_secs(120);

/// The roll-out as the web page shows it: its state, its pools and the line under it.
const ROLLOUT_JS: &str = r#"JSON.stringify((() => { const r = document.querySelector('[data-rollout]'); if (!r) return {}; return { state: r.querySelector('[data-rollout-state]').textContent, pools: Array.from(r.querySelectorAll('[data-rollout-pool]')).map(e => e.getAttribute('data-rollout-pool')), reason: r.querySelector('.reason').textContent }; })())"#;

/// The pools: (name, servers, paired pool, tier label).
const POOLS: [(&str, [usize; 2], Option<&str>, &str); 5] = [
    ("web-a", [1, 2], Some("web-b"), "web"),
    ("web-b", [3, 4], Some("web-a"), "web"),
    ("api-a", [5, 6], None, "api"),
    ("api-b", [7, 8], None, "api"),
    ("batch", [9, 10], None, "batch"),
];

/// Ten servers (fe-1..fe-10, in ud-1 and ud-2), spread over [`POOLS`].
fn pools_toml(fleet: &Fleet) -> String {
    let mut s = String::new();
    for (name, servers, paired, tier) in POOLS {
        s.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\nmin_active = 1\nlabels = {{ tier = \"{tier}\" }}\n"
        ));
        if let Some(p) = paired {
            s.push_str(&format!(
                "paired_pool = \"{p}\"\nfailover = [\"true\"]\nfailback = [\"true\"]\n"
            ));
        }
        for i in servers {
            let sv = &fleet.servers[i - 1];
            s.push_str(&format!(
                "\n[[pools.servers]]\nid = \"{}\"\nagent = \"{}\"\nupgrade_domain = \"{}\"\n\n",
                sv.id, sv.agent.addr, sv.domain
            ));
        }
    }
    s
}

async fn start(root: &std::path::Path) -> anyhow::Result<(Fleet, CoordinatorProc, TlsFiles)> {
    start_on(root, &embedded(root)).await
}

/// [`start`] with the `[store]` section given.
async fn start_on(
    root: &std::path::Path,
    store: &str,
) -> anyhow::Result<(Fleet, CoordinatorProc, TlsFiles)> {
    let fleet = Fleet::start(root, "unused", 10, 2, "1.0").await?;
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        // The web view too: the roll-out shows there.
        &format!("{store}\n[http]\nlisten = \"127.0.0.1:0\""),
        &pools_toml(&fleet),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coord.addr, &op).await?;
    for (name, ..) in POOLS {
        wait_ready(&c, name).await?;
    }
    Ok((fleet, coord, op))
}

fn rollout_req(pools: &[&str], artifact: &std::path::Path, sha: &str) -> pb::StartRolloutRequest {
    let mut upgrade = start_req("", artifact, sha);
    upgrade.version = "2.0".into();
    pb::StartRolloutRequest {
        pools: pools.iter().map(|p| (*p).to_owned()).collect(),
        upgrade: Some(upgrade),
        ..Default::default()
    }
}

async fn get(c: &OperatorClient<Channel>) -> Option<pb::RolloutStatus> {
    Some(
        c.clone()
            .get_rollout(pb::RolloutRequest { id: String::new() })
            .await
            .ok()?
            .into_inner(),
    )
}

/// Owned command-line arguments.
fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// The CLI's arguments for the plan of every pool.
fn plan_args(artifact: &std::path::Path, sha: &str, version: &str) -> Vec<String> {
    strings(&[
        "--version",
        version,
        "--artifact",
        &artifact.display().to_string(),
        "--sha256",
        sha,
        "--verify-stable",
        "300ms",
        "--verify-timeout",
        "10s",
        "--drain-timeout",
        "20s",
        "--busy-retry-interval",
        "300ms",
    ])
}

fn run_cli(
    op: &TlsFiles,
    addr: SocketAddr,
    args: &[String],
) -> anyhow::Result<std::process::Output> {
    Ok(cli(op, &[addr])?.args(args).output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_upgrades_many_pools_canary_first_never_with_their_pair_and_survives_a_kill(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let (fleet, mut coord, op) = start(root).await?;
    let c = operator_client(coord.addr, &op).await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;

    // A selector picks pools by label; a dry run resolves every pool's plan and starts nothing.
    let mut args: Vec<String> = strings(&[
        "rollout",
        "start",
        "--selector",
        "tier=web",
        "--dry-run",
        "-o",
        "json",
    ]);
    args.extend(plan_args(&artifact, &sha, "2.0"));
    let out = run_cli(&op, coord.addr, &args)?;
    ensure!(
        out.status.success(),
        "dry run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let picked: Vec<&str> = dry["pools"]
        .as_array()
        .context("pools")?
        .iter()
        .filter_map(|p| p["pool"].as_str())
        .collect();
    ensure!(picked == ["web-a", "web-b"], "tier=web picked {picked:?}");
    ensure!(get(&c).await.is_none(), "a dry run stored nothing");

    // Bad requests are refused, each naming what is wrong, and start nothing.
    let mut cc = c.clone();
    let bad = [
        (
            rollout_req(&["web-a", "nope"], &artifact, &sha),
            "unknown pool \"nope\"",
        ),
        (
            pb::StartRolloutRequest {
                selector: "tier=none".into(),
                ..rollout_req(&[], &artifact, &sha)
            },
            "no pool carries the labels",
        ),
        (
            pb::StartRolloutRequest {
                canary: "batch".into(),
                ..rollout_req(&["web-a"], &artifact, &sha)
            },
            "canary: pool \"batch\" is not one of the roll-out's pools",
        ),
        (
            pb::StartRolloutRequest {
                max_in_flight: Some(0),
                ..rollout_req(&["web-a"], &artifact, &sha)
            },
            "max_in_flight: must be at least 1",
        ),
    ];
    for (req, want) in bad {
        match cc.start_rollout(req).await {
            Ok(r) => bail!("accepted: {:?}", r.into_inner()),
            Err(s) => ensure!(
                s.message().contains(want),
                "{want:?} not in {:?}",
                s.message()
            ),
        }
    }

    // The roll-out: four pools, two at a time, api-a first as the canary, through the CLI.
    let mut args: Vec<String> = strings(&[
        "rollout",
        "start",
        "--pools",
        "web-a,web-b,api-a,api-b",
        "--canary",
        "api-a",
        "--max-in-flight",
        "2",
    ]);
    args.extend(plan_args(&artifact, &sha, "2.0"));
    let out = run_cli(&op, coord.addr, &args)?;
    ensure!(
        out.status.success(),
        "rollout start: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kill the coordinator (SIGKILL) each time the roll-out moves on: once the canary
    // completed and other pools run, then after each further pool completes, up to three
    // times. Each restarted one (on a new port) resumes the roll-out from the store; the CLI
    // then watches it to the end.
    let mut c = c;
    let mut completed_at_kill = 0;
    for kill in 0..3 {
        let moved = eventually("the roll-out to move on", LONG, || {
            let c = &c;
            async move {
                let s = get(c).await?;
                let completed = s.pools.iter().filter(|p| p.stage == "completed").count();
                let running = s.pools.iter().any(|p| p.stage == "running");
                (s.ended || (completed > completed_at_kill && running)).then_some(s)
            }
        })
        .await?;
        if moved.ended {
            ensure!(kill > 0, "the roll-out ended before the first kill");
            break;
        }
        completed_at_kill = moved
            .pools
            .iter()
            .filter(|p| p.stage == "completed")
            .count();
        eprintln!("kill {}: {completed_at_kill} pools completed", kill + 1);
        coord.kill().await?;
        coord.restart().await?;
        c = operator_client(coord.addr, &op).await?;
    }
    let (op2, addr) = (op.clone(), coord.addr);
    let watch: Vec<String> = strings(&["rollout", "watch", "--timeout", "3m"]);
    let out = tokio::task::spawn_blocking(move || run_cli(&op2, addr, &watch)).await??;
    ensure!(
        out.status.code() == Some(0),
        "rollout watch exited {:?}: {}\n{}\ncoordinator log:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        coord.log()
    );
    let c = operator_client(coord.addr, &op).await?;
    let s = get(&c).await.context("the roll-out is stored")?;
    ensure!(s.state == "completed" && s.ended, "{s:?}");
    let at: BTreeMap<String, (u64, u64)> = s
        .pools
        .iter()
        .map(|p| (p.pool.clone(), (p.started_ms, p.ended_ms)))
        .collect();
    ensure!(
        at.len() == 4 && s.pools.iter().all(|p| p.stage == "completed"),
        "{s:?}"
    );
    // The canary went alone and first.
    let canary_end = at["api-a"].1;
    for (p, (start, _)) in &at {
        ensure!(
            p == "api-a" || *start >= canary_end,
            "{p} started before the canary ended: {at:?}"
        );
    }
    // Never more than two at once, never a pool with its pair.
    for (p, (start, _)) in &at {
        let running = at.values().filter(|(s, e)| s <= start && start < e).count();
        ensure!(
            running <= 2,
            "{running} pools in flight when {p} started: {at:?}"
        );
    }
    let (a, b) = (at["web-a"], at["web-b"]);
    ensure!(
        a.1 <= b.0 || b.1 <= a.0,
        "web-a {a:?} and web-b {b:?} overlapped"
    );
    // Each pool's upgrade is an ordinary plan, named after the roll-out.
    let stamp = s.id.trim_start_matches("rollout-");
    let mut cc = c.clone();
    let web_a = cc
        .get_upgrade(pb::PoolRequest {
            pool: "web-a".into(),
        })
        .await?
        .into_inner();
    ensure!(
        web_a.plan_id == format!("web-a-{stamp}"),
        "{}",
        web_a.plan_id
    );
    // Every server of the four pools runs 2.0, installed once; batch was left alone.
    for (i, (id, installs)) in fleet.installs().into_iter().enumerate() {
        if i < 8 {
            ensure!(installs == ["2.0"], "{id}: {installs:?}");
        } else {
            ensure!(
                installs.is_empty(),
                "{id} (batch) was touched: {installs:?}"
            );
        }
    }
    // An ended roll-out takes no command; `rollout status` shows it.
    match cc.pause_rollout(pb::RolloutRequest::default()).await {
        Ok(r) => bail!("paused an ended roll-out: {:?}", r.into_inner()),
        Err(e) => ensure!(
            e.message().contains("is completed: nothing to pause"),
            "{}",
            e.message()
        ),
    }
    // The metrics say it too.
    let (status, m) = rollgate_tests::http_get(coord.http_addr()?, "/metrics").await?;
    ensure!(status == 200, "{m}");
    for (name, want) in [
        ("rollgate_rollout_status{status=\"completed\"}", 1.0),
        ("rollgate_rollout_status{status=\"running\"}", 0.0),
        ("rollgate_rollout_pools{stage=\"completed\"}", 4.0),
        ("rollgate_rollout_pools{stage=\"pending\"}", 0.0),
        ("rollgate_upgrade_held{pool=\"web-a\"}", 0.0),
    ] {
        ensure!(
            crate::operator::sample(&m, name) == Some(want),
            "{name} is not {want} in\n{m}"
        );
    }
    let out = run_cli(&op, coord.addr, &["rollout".into(), "status".into()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("status completed"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pool_stops_the_rollout_until_an_operator_acts() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let (fleet, coord, op) = start(root).await?;
    let mut c = operator_client(coord.addr, &op).await?;
    let (artifact, _) = make_artifact(root, "2.0")?;

    // A wrong checksum: the agents refuse the artifact before anything goes down, so the
    // first pool fails, and the roll-out stops there.
    let wrong = "0".repeat(64);
    let mut req = rollout_req(&["web-a", "api-a", "api-b"], &artifact, &wrong);
    if let Some(u) = req.upgrade.as_mut() {
        u.server_retries = Some(0);
    }
    let first = c.start_rollout(req.clone()).await?.into_inner();
    ensure!(first.state == "running", "{first:?}");
    let s = eventually("the roll-out to stop on web-a", LONG, || {
        let c = &c;
        async move { get(c).await.filter(|s| s.state == "paused") }
    })
    .await?;
    ensure!(
        s.reason.contains("pool web-a"),
        "the reason names the pool: {s:?}"
    );
    let stage = |s: &pb::RolloutStatus, p: &str| {
        s.pools
            .iter()
            .find(|x| x.pool == p)
            .map(|x| x.stage.clone())
            .unwrap_or_default()
    };
    ensure!(
        stage(&s, "api-a") == "pending" && stage(&s, "api-b") == "pending",
        "{s:?}"
    );

    // The web view shows the stopped roll-out and why, in a real browser.
    if let Some(browser) = Browser::start().await? {
        let page = browser
            .open(&format!("http://{}/", coord.http_addr()?))
            .await?;
        let shown = eventually("the page to show the paused roll-out", LONG, || {
            let page = &page;
            async move {
                let v = page.eval(ROLLOUT_JS).await.ok()?;
                let v: serde_json::Value = serde_json::from_str(v.as_str()?).ok()?;
                (v["state"] == "paused").then_some(v)
            }
        })
        .await?;
        ensure!(
            shown["pools"] == serde_json::json!(["web-a", "api-a", "api-b"])
                && shown["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("pool web-a")),
            "{shown}"
        );
    }

    // One roll-out at a time; and web-a's paired pool is not upgraded while web-a's upgrade
    // has not ended.
    match c
        .start_rollout(rollout_req(&["batch"], &artifact, &wrong))
        .await
    {
        Ok(r) => bail!("a second roll-out started: {:?}", r.into_inner()),
        Err(e) => ensure!(
            e.code() == tonic::Code::AlreadyExists && e.message().contains(&s.id),
            "{e:?}"
        ),
    }
    match c.start_upgrade(start_req("web-b", &artifact, &wrong)).await {
        Ok(r) => bail!(
            "web-b started with its pair upgrading: {:?}",
            r.into_inner()
        ),
        Err(e) => ensure!(
            e.message().contains("paired with pool web-a"),
            "{}",
            e.message()
        ),
    }

    // Resume: web-a's paused upgrade is resumed with it (and the roll-out runs again); its
    // artifact is still refused, so web-a pauses again and the roll-out stops again.
    let resumed = c
        .resume_rollout(pb::RolloutRequest::default())
        .await?
        .into_inner();
    ensure!(resumed.state == "running", "{resumed:?}");
    // web-a's history says the roll-out resumed it.
    eventually("web-a to be resumed by the roll-out", LONG, || {
        let c = &c;
        let id = s.id.clone();
        async move {
            let page = c
                .clone()
                .events(pb::EventsRequest {
                    pool: "web-a".into(),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            page.events
                .iter()
                .any(|e| e.kind == "resumed" && e.message.contains(&format!("roll-out {id}")))
                .then_some(())
        }
    })
    .await?;
    let again = eventually("the roll-out to stop on web-a again", LONG, || {
        let c = &c;
        async move { get(c).await.filter(|s| s.state == "paused") }
    })
    .await?;
    ensure!(
        again.reason.contains("pool web-a") && stage(&again, "api-a") == "pending",
        "{again:?}"
    );

    // Abort: what has not started is skipped, web-a's upgrade is aborted, nothing changed.
    let aborted = c
        .abort_rollout(pb::RolloutRequest { id: s.id.clone() })
        .await?
        .into_inner();
    ensure!(aborted.state == "aborted", "{aborted:?}");
    let s = eventually("the roll-out to end", LONG, || {
        let c = &c;
        async move { get(c).await.filter(|s| s.ended) }
    })
    .await?;
    ensure!(
        stage(&s, "api-a") == "skipped" && stage(&s, "web-a") == "failed",
        "{s:?}"
    );
    let web_a = c
        .get_upgrade(pb::PoolRequest {
            pool: "web-a".into(),
        })
        .await?
        .into_inner();
    ensure!(web_a.ended, "web-a's upgrade ended: {web_a:?}");
    for (id, installs) in fleet.installs() {
        ensure!(installs.is_empty(), "{id} was changed: {installs:?}");
    }
    // A new roll-out may start now.
    let next = c
        .start_rollout(rollout_req(&["batch"], &artifact, &wrong))
        .await?
        .into_inner();
    ensure!(next.id != s.id && next.state == "running", "{next:?}");
    c.abort_rollout(pb::RolloutRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_on_etcd_survives_leader_kills_and_each_server_is_installed_once(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = rollgate_tests::etcd::EtcdCluster::start(1).await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "unused", 10, 2, "1.0").await?;
    let store = crate::coordinator::etcd_store(&etcd.endpoints(), 2);
    let mut coords = fleet
        .coordinators(root, &["c1", "c2"], &store, &pools_toml(&fleet))
        .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let leader_client = |coords: &Vec<CoordinatorProc>| {
        let addrs: Vec<SocketAddr> = coords.iter().map(|c| c.addr).collect();
        let op = op.clone();
        async move {
            eventually("a leader that has taken over", LONG, || {
                let (addrs, op) = (&addrs, &op);
                async move {
                    for a in addrs {
                        let mut c = operator_client(*a, op).await.ok()?;
                        let r = c.leader(pb::LeaderRequest {}).await.ok()?.into_inner();
                        if r.this_is_leader {
                            return Some((r.this_id, c));
                        }
                    }
                    None
                }
            })
            .await
        }
    };
    let (_, c) = leader_client(&coords).await?;
    for (name, ..) in POOLS {
        wait_ready(&c, name).await?;
    }
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let mut req = rollout_req(&["web-a", "web-b", "api-a", "api-b"], &artifact, &sha);
    req.max_in_flight = Some(2);
    req.canary = "api-a".into();
    let mut c = c;
    let started = c.start_rollout(req).await?.into_inner();

    // SIGKILL whoever leads, twice, each time once the roll-out moved on; the killed one
    // comes back as a follower.
    let mut completed_at_kill = 0;
    let mut kills = 0;
    for _ in 0..2 {
        let (leader, c) = leader_client(&coords).await?;
        let moved = eventually("the roll-out to move on", LONG, || {
            let c = &c;
            async move {
                let s = get(c).await?;
                let completed = s.pools.iter().filter(|p| p.stage == "completed").count();
                let running = s.pools.iter().any(|p| p.stage == "running");
                (s.ended || (completed > completed_at_kill && running)).then_some(s)
            }
        })
        .await?;
        if moved.ended {
            break;
        }
        completed_at_kill = moved
            .pools
            .iter()
            .filter(|p| p.stage == "completed")
            .count();
        let victim = coords
            .iter_mut()
            .find(|p| p.id == leader)
            .context("the leader's process")?;
        eprintln!("killing leader {leader}: {completed_at_kill} pools completed");
        victim.kill().await?;
        victim.restart().await?;
        kills += 1;
    }
    ensure!(kills >= 1, "the roll-out ended before any kill");
    let (_, c) = leader_client(&coords).await?;
    let s = eventually("the roll-out to end", LONG, || {
        let c = &c;
        async move { get(c).await.filter(|s| s.ended) }
    })
    .await?;
    ensure!(s.id == started.id && s.state == "completed", "{s:?}");
    let at: BTreeMap<String, (u64, u64)> = s
        .pools
        .iter()
        .map(|p| (p.pool.clone(), (p.started_ms, p.ended_ms)))
        .collect();
    let (a, b) = (at["web-a"], at["web-b"]);
    ensure!(
        a.1 <= b.0 || b.1 <= a.0,
        "web-a {a:?} and web-b {b:?} overlapped"
    );
    for (i, (id, installs)) in fleet.installs().into_iter().enumerate() {
        let want: &[&str] = if i < 8 { &["2.0"] } else { &[] };
        ensure!(
            installs == want,
            "{id}: {installs:?} after {kills} leader kill(s)"
        );
    }
    crate::coordinator::check_epochs_monotonic(&fleet).await?;
    for c in &mut coords {
        c.terminate().await?;
    }
    Ok(())
}

/// Every pool started at the same moment, three times: exactly one of the paired pools web-a
/// and web-b gets through each time (the other is refused for its pair), and every unpaired
/// pool starts too. Starts of pools that are not paired do not wait for one another (each
/// pool has its own start lock); a pool and its pair share theirs.
///
/// On etcd: its reads are real round trips, during which the other starts run (the embedded
/// store answers at once, so its starts never interleave).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_let_one_of_a_pair_through_and_every_unpaired_pool() -> anyhow::Result<()>
{
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = rollgate_tests::etcd::EtcdCluster::start(1).await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let store = crate::coordinator::etcd_store(&etcd.endpoints(), 2);
    let (_fleet, coord, op) = start_on(root, &store).await?;
    let c = operator_client(coord.addr, &op).await?;
    for version in ["2.0", "3.0", "4.0"] {
        let (artifact, sha) = make_artifact(root, version)?;
        let mut calls = tokio::task::JoinSet::new();
        for (name, ..) in POOLS {
            let mut c = c.clone();
            let mut req = start_req(name, &artifact, &sha);
            req.version = version.into();
            calls.spawn(async move { (name, c.start_upgrade(req).await) });
        }
        let mut started = Vec::new();
        let mut refused = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined? {
                (name, Ok(_)) => started.push(name),
                (name, Err(e)) => refused.push((name, e)),
            }
        }
        started.sort_unstable();
        let webs = started.iter().filter(|p| p.starts_with("web-")).count();
        ensure!(
            webs == 1
                && ["api-a", "api-b", "batch"]
                    .iter()
                    .all(|p| started.contains(p)),
            "version {version}: started {started:?}, refused {refused:?}"
        );
        for (name, e) in &refused {
            ensure!(
                name.starts_with("web-")
                    && e.code() == tonic::Code::FailedPrecondition
                    && e.message().contains("paired with pool web-"),
                "version {version}: {name} refused for another reason: {e:?}"
            );
        }
        for name in &started {
            let end = crate::coordinator::wait_status(
                &[coord.addr],
                &op,
                name,
                LONG,
                crate::coordinator::ended,
            )
            .await?;
            ensure!(
                end.version == version
                    && rollgate_proto::operator::names::upgrade_state(end.status) == "completed",
                "{name}: {end:?}"
            );
        }
    }
    Ok(())
}

/// A pool that carries its paired pool's traffic (the pair was failed over into it, by an
/// upgrade or an operator) is not upgraded: taking its servers down would cut capacity under
/// both pools' clients. Once the pair fails back, it is. (Found by the roll-out simulation: a
/// roll-out upgraded a pool right after its pair's upgrade had failed over into it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_carrying_its_pairs_traffic_is_not_upgraded_until_the_pair_fails_back(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let (_fleet, coord, op) = start(root).await?;
    let mut c = operator_client(coord.addr, &op).await?;
    c.failover(pb::PoolRequest {
        pool: "web-a".into(),
    })
    .await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let refused = c
        .start_upgrade(start_req("web-b", &artifact, &sha))
        .await
        .err()
        .context("web-b started while carrying web-a's traffic")?;
    ensure!(
        refused.code() == tonic::Code::FailedPrecondition
            && refused
                .message()
                .contains("carries the traffic of its paired pool web-a")
            && refused.message().contains("failback web-a"),
        "{refused:?}"
    );
    c.failback(pb::PoolRequest {
        pool: "web-a".into(),
    })
    .await?;
    c.start_upgrade(start_req("web-b", &artifact, &sha)).await?;
    let end = crate::coordinator::wait_status(
        &[coord.addr],
        &op,
        "web-b",
        LONG,
        crate::coordinator::ended,
    )
    .await?;
    ensure!(
        rollgate_proto::operator::names::upgrade_state(end.status) == "completed",
        "{end:?}"
    );
    Ok(())
}
