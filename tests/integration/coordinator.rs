//! The coordinator end to end: real coordinators (embedded store or real etcd), real agents, real
//! sample front ends, a client load watching from outside, mTLS everywhere.

use anyhow::{bail, ensure, Context};
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::agent::v1 as apb;
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use rollgate_tests::cluster::{
    cli, leader_of, operator_client, wait_leader, CoordinatorProc, Fleet,
};
use rollgate_tests::monitor::Monitor;
use rollgate_tests::{agent_client, eventually, make_artifact};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const LONG: Duration = Duration::from_secs(120);

pub(crate) fn embedded(root: &Path) -> String {
    format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"",
        root.join("store.json").display()
    )
}

pub(crate) fn etcd_store(endpoints: &[String], ttl_s: u64) -> String {
    format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {endpoints:?}\nprefix = \"/rollgate/test/\"\nelection_ttl = \"{ttl_s}s\"")
}

/// Waits until the coordinator behind `c` leads (take-over done) and `pool` is Ready.
pub(crate) async fn wait_ready(c: &OperatorClient<Channel>, pool: &str) -> anyhow::Result<()> {
    eventually("the coordinator to lead", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let r = c.leader(pb::LeaderRequest {}).await.ok()?.into_inner();
            r.this_is_leader.then_some(())
        }
    })
    .await?;
    // Every server active, not only Ready: a pool of 6 with min_active 4 is Ready with one
    // server still coming up, and a test that then stops servers would race with it.
    eventually(
        "the pool to be Ready with every server active",
        Duration::from_secs(30),
        || {
            let (mut c, pool) = (c.clone(), pool.to_owned());
            async move {
                let r = c
                    .readiness(pb::PoolRequest { pool })
                    .await
                    .ok()?
                    .into_inner();
                (r.state == pb::ReadinessState::Ready as i32 && r.active == r.total).then_some(())
            }
        },
    )
    .await
}

pub(crate) fn start_req(pool: &str, artifact: &Path, sha: &str) -> pb::StartUpgradeRequest {
    pb::StartUpgradeRequest {
        pool: pool.into(),
        version: "2.0".into(),
        artifact: artifact.display().to_string(),
        sha256: sha.into(),
        verify_stable_ms: Some(300),
        verify_timeout_ms: Some(10_000),
        busy_retry_interval_ms: Some(300),
        drain_timeout_ms: Some(20_000),
        ..Default::default()
    }
}

/// Polls the upgrade's status (from any coordinator, following to the leader) until `done`.
pub(crate) async fn wait_status(
    addrs: &[std::net::SocketAddr],
    op: &TlsFiles,
    pool: &str,
    limit: Duration,
    done: fn(&pb::UpgradeStatus) -> bool,
) -> anyhow::Result<pb::UpgradeStatus> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    loop {
        for a in addrs {
            if let Ok(mut c) = operator_client(*a, op).await {
                if let Ok(s) = c.get_upgrade(pb::PoolRequest { pool: pool.into() }).await {
                    let s = s.into_inner();
                    if done(&s) {
                        return Ok(s);
                    }
                    last = Some(s);
                    break;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?}; last status: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn ended(s: &pb::UpgradeStatus) -> bool {
    s.ended
}

/// Every agent's journal: the epochs it accepted, in the order it accepted them, never decrease.
pub(crate) async fn check_epochs_monotonic(fleet: &Fleet) -> anyhow::Result<()> {
    for s in &fleet.servers {
        let text = std::fs::read_to_string(s.agent.state_dir.join("journal.jsonl"))?;
        let mut last = 0u64;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v["event"] == "begin" {
                let e = v["epoch"].as_u64().context("epoch")?;
                ensure!(
                    e >= last,
                    "{}: epoch {e} accepted after epoch {last}: a deposed leader acted",
                    s.id
                );
                last = e;
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_over_three_domains_keeps_min_active_under_client_load(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 6, 3, "1.0").await?;
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;

    let ports: Vec<u16> = fleet.servers.iter().map(|s| s.fe.port).collect();
    let domains: Vec<String> = fleet.servers.iter().map(|s| s.domain.clone()).collect();
    let monitor = Monitor::start(ports, LONG);
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let started =
        rollgate_tests::cluster::start_upgrade(&mut c, start_req("pool-a", &artifact, &sha))
            .await?
            .into_inner();
    assert_eq!(names::upgrade_state(started.status), "running");
    assert_eq!(started.domains_total, 3);
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    let report = monitor.stop().await;
    assert_eq!(
        names::upgrade_state(end.status),
        "completed",
        "{end:?}\n{}",
        coord.log()
    );
    report.check(&domains, 4).map_err(anyhow::Error::msg)?;
    assert!(
        report.samples_with_outage() > 0,
        "the load never saw a server out of service: it proved nothing"
    );
    assert!(report.served > 10, "{report:?}");
    for (id, installs) in fleet.installs() {
        assert_eq!(installs, vec!["2.0"], "{id} must be installed exactly once");
    }
    // The last server's final health report may still be on its way: poll, with a deadline.
    eventually(
        "every server serving 2.0 and the pool Ready",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .readiness(pb::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let all = r
                    .domains
                    .iter()
                    .flat_map(|d| &d.servers)
                    .all(|s| s.version == "2.0" && names::server_state(s.state) == "serving");
                (names::readiness_state(r.state) == "Ready" && all).then_some(())
            }
        },
    )
    .await?;
    let events = c
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(events.len() >= 6, "{events:?}");
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // A second upgrade to the same pool is allowed once the first ended; while one runs, not.
    let err = c
        .pause_upgrade(pb::PoolRequest {
            pool: "nope".into(),
        })
        .await
        .expect_err("unknown pool");
    assert_eq!(err.code(), tonic::Code::NotFound);
    check_epochs_monotonic(&fleet).await?;
    let st = coord.terminate().await?;
    assert!(st.success(), "{st:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_three_times_fails_over_then_goes_on_or_pauses_or_aborts() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let busy = fleet.servers[1].fe.dir.join("busy");
    let marker = root.join("failed-over");
    // Failing over moves the traffic away, so the busy server quiets down.
    let hook = format!(
        "min_active = 1\npaired_pool = \"pool-b\"\nfailover = [\"sh\", \"-c\", \"echo $ROLLGATE_EPOCH > {} && rm -f {}\"]\nfailback = [\"true\"]",
        marker.display(),
        busy.display()
    );
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(&hook),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;

    // Pause: three Busy answers, then the upgrade pauses and touches nothing.
    std::fs::write(&busy, "")?;
    let r = c
        .readiness(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();
    let r = if names::readiness_state(r.state) == "Busy" {
        r
    } else {
        eventually("Busy", Duration::from_secs(10), || {
            let mut c = c.clone();
            async move {
                let r = c
                    .readiness(pb::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (names::readiness_state(r.state) == "Busy").then_some(r)
            }
        })
        .await?
    };
    assert!(r.reason.contains("fe-2 reports busy"), "{r:?}");
    let t0 = Instant::now();
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        pb::StartUpgradeRequest {
            on_exhausted: pb::ExhaustedAction::Pause as i32,
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, |s| {
        names::upgrade_state(s.status) == "paused"
    })
    .await?;
    assert!(
        t0.elapsed() >= Duration::from_millis(600),
        "two waits of the busy retry interval come before the third answer"
    );
    assert!(
        fleet.installs().iter().all(|(_, v)| v.is_empty()),
        "nothing may be touched"
    );
    assert!(!marker.exists());
    let events = c
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 100,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let busy_answers = events
        .iter()
        .filter(|e| e.message.to_lowercase().contains("busy"))
        .count();
    assert!(busy_answers >= 3, "{events:#?}");
    assert!(s.reason.to_lowercase().contains("busy"), "{s:?}");
    c.abort_upgrade(pb::PoolRequest {
        pool: "pool-a".into(),
    })
    .await?;
    wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;

    // Abort: the same, but the upgrade ends aborted.
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        pb::StartUpgradeRequest {
            on_exhausted: pb::ExhaustedAction::Abort as i32,
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(s.status), "aborted", "{s:?}");
    assert!(fleet.installs().iter().all(|(_, v)| v.is_empty()));

    // Failover (the default with a paired pool): the hook runs, then the upgrade goes on.
    rollgate_tests::cluster::start_upgrade(&mut c, start_req("pool-a", &artifact, &sha)).await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(
        names::upgrade_state(s.status),
        "completed",
        "{s:?}\n{}",
        coord.log()
    );
    assert!(s.failed_over);
    assert!(marker.exists(), "the failover hook must have run");
    // The hook gets the leader's epoch: a fencing token for the load balancer's API.
    let epoch: u64 = std::fs::read_to_string(&marker)?.trim().parse()?;
    assert!(epoch > 0, "the failover hook got no epoch");
    for (id, v) in fleet.installs() {
        assert_eq!(v, vec!["2.0"], "{id}");
    }
    let r = c
        .readiness(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();
    assert!(r.failed_over, "readiness shows the pool failed over");
    let fb = c
        .failback(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();
    assert!(!fb.failed_over);
    coord.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_active_front_ends_triggers_the_configured_action() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 6, 3, "1.0").await?;
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    // Two servers of different domains go down: no domain can be taken out and keep 4 active.
    fleet.servers[0].fe.stop()?;
    fleet.servers[1].fe.stop()?;
    // Wait until the pool's answer rests on exactly those two. The pool state alone is not
    // enough: wait_ready returns once the pool is Ready, which 5 of 6 active servers already
    // are, so fe-6 may still be coming up. fe-1 stopped and fe-6 not yet accepting read
    // InsufficientActiveFrontEnds before fe-2's stop is reported; a moment later fe-6 serves,
    // and the pool (or the upgrade's gate, which then let fe-1 go) is Ready again.
    let stopped: BTreeSet<String> = ["fe-1", "fe-2"].map(String::from).into();
    let r = eventually(
        "InsufficientActiveFrontEnds with fe-1 and fe-2 inactive",
        Duration::from_secs(15),
        || {
            let mut c = c.clone();
            let stopped = stopped.clone();
            async move {
                let r = c
                    .readiness(pb::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let inactive: BTreeSet<String> = r
                    .domains
                    .iter()
                    .flat_map(|d| &d.servers)
                    .filter(|s| !s.active)
                    .map(|s| s.server.clone())
                    .collect();
                (inactive == stopped
                    && names::readiness_state(r.state) == "InsufficientActiveFrontEnds")
                    .then_some(r)
            }
        },
    )
    .await?;
    assert_eq!(r.active, 4);
    assert!(r.domains.iter().all(|d| !d.ready_for_upgrade));
    // The CLI shows the same, as JSON for programs: the two servers are really stopped, so no
    // later answer can count them again.
    let out = cli(&op, &[coord.addr])?
        .args(["readiness", "--pool", "pool-a", "-o", "json"])
        .output()?;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        v["PoolUpgradeState"], "InsufficientActiveFrontEnds",
        "first answer {r:?}\nthen {v}"
    );
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        pb::StartUpgradeRequest {
            on_exhausted: pb::ExhaustedAction::Pause as i32,
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, |s| {
        names::upgrade_state(s.status) == "paused"
    })
    .await?;
    assert!(
        s.reason.contains("InsufficientActiveFrontEnds")
            || s.reason.to_lowercase().contains("insufficient"),
        "{s:?}"
    );
    assert!(
        fleet.installs().iter().all(|(_, v)| v.is_empty()),
        "{:?}\n{}",
        fleet.installs(),
        coord.log()
    );
    coord.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_verify_is_retried_then_rolled_back_to_the_previous_version() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 6, 3, "1.0").await?;
    // fe-5 (domain ud-2) comes up unhealthy on 2.0.
    std::fs::write(fleet.servers[4].fe.dir.join("break-on-install"), "2.0")?;
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        pb::StartUpgradeRequest {
            on_failure: pb::FailureAction::Rollback as i32,
            server_retries: Some(1),
            verify_timeout_ms: Some(1_500),
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(
        names::upgrade_state(s.status),
        "rolled_back",
        "{s:?}\n{}",
        coord.log()
    );
    let events = c
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let verify_fails = events
        .iter()
        .filter(|e| e.server == "fe-5" && e.message.contains("verify failed"))
        .count();
    assert!(
        verify_fails >= 2,
        "verify must be tried again before giving up: {events:#?}"
    );
    let installs: std::collections::HashMap<_, _> = fleet.installs().into_iter().collect();
    // ud-1 and fe-2 of ud-2 went to 2.0 and back; fe-5 went to 2.0 (broken) and back; ud-3 untouched.
    for id in ["fe-1", "fe-4", "fe-2", "fe-5"] {
        assert_eq!(installs[id], vec!["2.0", "1.0"], "{id}");
    }
    for id in ["fe-3", "fe-6"] {
        assert!(installs[id].is_empty(), "{id} was never touched");
    }
    eventually("every server back on 1.0", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c
                .readiness(pb::PoolRequest {
                    pool: "pool-a".into(),
                })
                .await
                .ok()?
                .into_inner();
            r.domains
                .iter()
                .flat_map(|d| &d.servers)
                .all(|s| s.version == "1.0")
                .then_some(())
        }
    })
    .await?;
    coord.terminate().await?;
    Ok(())
}

/// A coordinator cluster on a real etcd; `None` when etcd is missing outside CI.
async fn etcd_cluster() -> anyhow::Result<Option<rollgate_tests::etcd::EtcdCluster>> {
    rollgate_tests::etcd::EtcdCluster::start(1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_mid_domain_resumes_and_installs_each_server_exactly_once(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = etcd_cluster().await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 6, 3, "1.0").await?;
    let ttl = 2;
    let mut coords = Vec::new();
    for i in 1..=3 {
        let id = format!("c{i}");
        coords.push(
            CoordinatorProc::start(
                root,
                &id,
                &fleet.pki.issue(RoleKind::Coordinator, &id)?,
                &etcd_store(&etcd.endpoints(), ttl),
                &fleet.pool_toml(""),
            )
            .await?,
        );
    }
    let addrs: Vec<_> = coords.iter().map(|c| c.addr).collect();
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(addrs[0], &op).await?;
    let (leader, epoch) = wait_leader(&c, 0, Duration::from_secs(20)).await?;
    let mut lc = operator_client(
        coords
            .iter()
            .find(|x| x.id == leader)
            .context("leader")?
            .addr,
        &op,
    )
    .await?;
    wait_ready(&lc, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let ports: Vec<u16> = fleet.servers.iter().map(|s| s.fe.port).collect();
    let domains: Vec<String> = fleet.servers.iter().map(|s| s.domain.clone()).collect();
    let monitor = Monitor::start(ports, LONG);
    // A leader change must not fail a step under way: with no retries and rollback on
    // failure, a drain or verify failed by the new leader's epoch would roll the pool back.
    let started = rollgate_tests::cluster::start_upgrade(
        &mut lc,
        pb::StartUpgradeRequest {
            verify_stable_ms: Some(2_000),
            server_retries: Some(0),
            on_failure: pb::FailureAction::Rollback as i32,
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?
    .into_inner();
    assert_eq!(names::upgrade_state(started.status), "running");
    // Kill the leader in the middle of the second domain, while a drain or a verify runs.
    let at = wait_status(&addrs, &op, "pool-a", LONG, |s| {
        s.domain_index == 1
            && s.servers.iter().any(|x| {
                names::server_phase(x.phase) == "in_flight"
                    && matches!(names::step(x.step).as_str(), "drain" | "verify")
            })
    })
    .await?;
    let running: Vec<String> = at
        .servers
        .iter()
        .filter(|x| names::server_phase(x.phase) == "in_flight")
        .map(|x| format!("{}:{}", x.server, names::step(x.step)))
        .collect();
    let li = coords
        .iter()
        .position(|x| x.id == leader)
        .context("leader")?;
    coords[li].kill().await?;
    let killed = Instant::now();
    let others: Vec<_> = coords
        .iter()
        .filter(|x| x.id != leader)
        .map(|x| x.addr)
        .collect();
    let mut oc = operator_client(others[0], &op).await?;
    let (new_leader, new_epoch) = eventually("a new leader", Duration::from_secs(20), || {
        let mut c = oc.clone();
        let old = leader.clone();
        async move { leader_of(&mut c).await.filter(|(id, _)| *id != old) }
    })
    .await?;
    let takeover = killed.elapsed();
    assert!(
        new_epoch > epoch,
        "epochs must grow: {epoch} -> {new_epoch}"
    );
    assert!(
        takeover < Duration::from_secs(ttl) + Duration::from_millis(1500),
        "takeover took {takeover:?} with a {ttl}s TTL"
    );
    let end = wait_status(&others, &op, "pool-a", LONG, ended).await?;
    let report = monitor.stop().await;
    assert_eq!(
        names::upgrade_state(end.status),
        "completed",
        "killed while {running:?} ran: {end:?}"
    );
    // Across the failover too: min_active kept, one domain at a time, no open connection cut.
    report.check(&domains, 4).map_err(anyhow::Error::msg)?;
    for (id, v) in fleet.installs() {
        assert_eq!(v, vec!["2.0"], "{id} must be installed exactly once");
    }
    check_epochs_monotonic(&fleet).await?;
    let events = oc
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.coordinator == new_leader),
        "the new leader recorded steps"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.kind == "server_failed" || e.kind == "step_retried"),
        "no step failed because the leader changed: {events:#?}"
    );
    drop(c);
    Ok(())
}

/// A take-over fences every agent, also one that was down while it happened: the background
/// pass tries a failed fence again with a growing pause, so the agent is at the new leader's
/// epoch soon after it is back, although no command reaches it (its pool is idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_down_during_a_take_over_is_fenced_once_it_is_back() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = etcd_cluster().await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let mut coords = fleet
        .coordinators(
            root,
            &["c1", "c2"],
            &etcd_store(&etcd.endpoints(), 2),
            &fleet.pool_toml(""),
        )
        .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coords[0].addr, &op).await?;
    let (leader, epoch) = wait_leader(&c, 0, Duration::from_secs(20)).await?;
    let li = coords
        .iter()
        .position(|x| x.id == leader)
        .context("the leader is one of the two")?;
    wait_ready(&operator_client(coords[li].addr, &op).await?, "pool-a").await?;
    // An agent's epoch, as its Health answer gives it.
    let observer = fleet.pki.issue(RoleKind::Coordinator, "observer")?;
    let at_epoch = |addrs: Vec<std::net::SocketAddr>, want: u64| {
        let observer = observer.clone();
        async move {
            for a in addrs {
                let mut ac = agent_client(a, &observer).await.ok()?;
                let h = ac.health(apb::HealthRequest {}).await.ok()?.into_inner();
                if h.epoch != want {
                    return None;
                }
            }
            Some(())
        }
    };
    let addrs: Vec<_> = fleet.servers.iter().map(|s| s.agent.addr).collect();
    eventually(&format!("every agent at epoch {epoch}"), LONG, || {
        at_epoch(addrs.clone(), epoch)
    })
    .await?;

    // fe-3's agent goes down, then the leader is killed: the take-over cannot fence fe-3.
    fleet.servers[2].agent.kill().await?;
    coords[li].kill().await?;
    let oc = operator_client(coords[1 - li].addr, &op).await?;
    let (_, newer) = wait_leader(&oc, epoch, LONG).await?;
    eventually(&format!("fe-1 and fe-2 at epoch {newer}"), LONG, || {
        at_epoch(addrs[..2].to_vec(), newer)
    })
    .await?;
    // fe-3 comes back at the epoch it had, and a retry of its fence raises it.
    fleet.servers[2].agent.restart().await?;
    let mut ac = agent_client(fleet.servers[2].agent.addr, &observer).await?;
    let back = ac.health(apb::HealthRequest {}).await?.into_inner().epoch;
    ensure!(
        back <= newer,
        "fe-3 came back at epoch {back}, past {newer}"
    );
    eventually(
        &format!("fe-3 at epoch {newer} (it came back at {back})"),
        Duration::from_secs(40),
        || at_epoch(vec![addrs[2]], newer),
    )
    .await?;
    // Fenced, not commanded: the pool is idle and nothing ran on fe-3.
    ensure!(
        fleet.servers[2].fe.installs().is_empty(),
        "fe-3 was upgraded: {:?}",
        fleet.servers[2].fe.installs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_is_fenced_off_when_it_wakes() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = etcd_cluster().await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 4, 2, "1.0").await?;
    let ttl = 2;
    let mut coords = Vec::new();
    for i in 1..=2 {
        let id = format!("c{i}");
        coords.push(
            CoordinatorProc::start(
                root,
                &id,
                &fleet.pki.issue(RoleKind::Coordinator, &id)?,
                &etcd_store(&etcd.endpoints(), ttl),
                &fleet.pool_toml("min_active = 2"),
            )
            .await?,
        );
    }
    let addrs: Vec<_> = coords.iter().map(|c| c.addr).collect();
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(addrs[0], &op).await?;
    let (leader, epoch) = wait_leader(&c, 0, Duration::from_secs(20)).await?;
    let li = coords
        .iter()
        .position(|x| x.id == leader)
        .context("leader")?;
    let fi = 1 - li;
    let mut lc = operator_client(coords[li].addr, &op).await?;
    wait_ready(&lc, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut lc,
        pb::StartUpgradeRequest {
            verify_stable_ms: Some(1_000),
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    wait_status(&addrs, &op, "pool-a", LONG, |s| {
        s.servers
            .iter()
            .any(|x| names::server_phase(x.phase) == "in_flight")
    })
    .await?;
    // Freeze the leader past its lease: the follower takes over and fences the agents.
    coords[li].stop_process()?;
    let mut fc = operator_client(coords[fi].addr, &op).await?;
    let (_, new_epoch) = eventually("the follower to take over", Duration::from_secs(20), || {
        let mut c = fc.clone();
        let old = leader.clone();
        async move { leader_of(&mut c).await.filter(|(id, _)| *id != old) }
    })
    .await?;
    assert!(new_epoch > epoch);
    // The old leader's own epoch is refused by the agents, whatever it still believes.
    let stale = fleet.pki.issue(RoleKind::Coordinator, &leader)?;
    let mut a = agent_client(fleet.servers[0].agent.addr, &stale).await?;
    eventually(
        "the agents to be fenced at the new epoch",
        Duration::from_secs(10),
        || {
            let mut a = a.clone();
            async move {
                (a.health(apb::HealthRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .epoch
                    >= new_epoch)
                    .then_some(())
            }
        },
    )
    .await?;
    let err = a
        .stop(apb::StopRequest {
            header: Some(apb::OperationHeader {
                operation_id: "stale-leader-call".into(),
                epoch,
            }),
        })
        .await
        .expect_err("stale epoch");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // Wake it: it must notice it lost leadership and do no harm.
    coords[li].continue_process()?;
    let end = wait_status(&[coords[fi].addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");
    for (id, v) in fleet.installs() {
        assert_eq!(v, vec!["2.0"], "{id} must be installed exactly once");
    }
    check_epochs_monotonic(&fleet).await?;
    eventually(
        "the old leader to log its loss of leadership",
        Duration::from_secs(10),
        || {
            let log = coords[li].log();
            async move {
                (log.contains("leadership lost") || log.contains("fenced") || log.contains("stale"))
                    .then_some(())
            }
        },
    )
    .await?;
    let (now_leader, _) = leader_of(&mut fc).await.context("leader")?;
    assert_ne!(
        now_leader, leader,
        "the woken leader must not lead again by itself"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_dry_run_prints_the_plan_and_bad_input_gets_one_line() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let out = cli(&op, &[coord.addr])?
        .args([
            "upgrade",
            "start",
            "--pool",
            "pool-a",
            "--version",
            "2.0",
            "--artifact",
            artifact.to_str().context("path")?,
            "--sha256",
            &sha,
            "--dry-run",
            "--domain-order",
            "ud-3,ud-1,ud-2",
            // An explicit zero is kept (one good probe), not taken for "the default".
            "--verify-stable",
            "0s",
            "-o",
            "json",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<_> = plan["domains"]
        .as_array()
        .context("domains")?
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, vec!["ud-3", "ud-1", "ud-2"]);
    assert_eq!(plan["busy_retries"], 3);
    assert_eq!(plan["verify_stable"], "0s", "{plan}");
    // Defaults come from one place, whoever asks: the CLI sends nothing it was not given.
    assert_eq!(plan["server_retries"], 1, "{plan}");
    assert_eq!(plan["verify_timeout"], "2m", "{plan}");
    assert_eq!(
        plan["min_active"], 2,
        "fixed in the plan when it starts: {plan}"
    );
    let mut c = operator_client(coord.addr, &op).await?;
    let s = c
        .get_upgrade(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        names::upgrade_state(s.status),
        "none",
        "a dry run starts nothing"
    );
    // `upgrade start` for pool-a with `sha` and `extra` arguments.
    let start = |sha: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "upgrade",
            "start",
            "--pool",
            "pool-a",
            "--version",
            "2.0",
            "--artifact",
            "/x",
            "--sha256",
            sha,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let words = |a: &[&str]| -> Vec<String> { a.iter().map(|w| w.to_string()).collect() };
    for (args, needle) in [
        (words(&["readiness", "--pool", "nope"]), "unknown pool"),
        (start("abc", &[]), "sha256"),
        (start(&sha, &["--domain-order", "ud-9"]), "ud-9"),
        (
            words(&["upgrade", "pause", "--pool", "pool-a"]),
            "no upgrade",
        ),
        // Every duration and count has an upper bound and a one-line error (it once crashed
        // every coordinator that resumed the plan).
        (
            start(&sha, &["--drain-timeout", "100000000years"]),
            "drain_timeout",
        ),
        (
            start(&sha, &["--busy-retries", "1000"]),
            "busy_retries (1000) exceeds its upper bound of 100",
        ),
    ] {
        let out = cli(&op, &[coord.addr])?.args(&args).output()?;
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8(out.stderr)?;
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    // Two starts at once: exactly one upgrade runs; the other is told one is already running.
    wait_ready(&c, "pool-a").await?;
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let req = start_req("pool-a", &artifact, &sha);
    let (a, b) = tokio::join!(c1.start_upgrade(req.clone()), c2.start_upgrade(req));
    let codes: Vec<_> = [&a, &b]
        .iter()
        .map(|r| r.as_ref().err().map(tonic::Status::code))
        .collect();
    assert!(
        codes.contains(&None) && codes.contains(&Some(tonic::Code::AlreadyExists)),
        "{a:?} {b:?}"
    );
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed");
    for (id, v) in fleet.installs() {
        assert_eq!(v, vec!["2.0"], "{id} installed exactly once");
    }
    // An agent certificate may not use the operator API.
    let agent_cert = fleet.pki.issue(RoleKind::Agent, "fe-1")?;
    let out = cli(&agent_cert, &[coord.addr])?
        .args(["readiness", "--pool", "pool-a"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("operator role"));
    coord.terminate().await?;
    Ok(())
}

/// #1: a plan value an older version accepted (`--drain-timeout 100000000years`) once crashed
/// every coordinator that resumed it. Now a stored plan beyond its bounds pauses with the
/// reason, on every coordinator that resumes it, and the pool stays manageable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_plan_beyond_its_bounds_pauses_and_crashes_no_coordinator() -> anyhow::Result<()> {
    use rollgate_coordinator::engine::{Domain, DrainMode, Plan, Upgrade};
    use rollgate_coordinator::progress::{self, UpgradeRecord};
    use rollgate_coordinator::store::{Candidate, EmbeddedStore, Store};
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    // What an older version stored: a running upgrade whose drain timeout is absurd.
    let sane = Plan {
        id: "pool-a-old".into(),
        pool: "pool-a".into(),
        version: "2.0".into(),
        artifact: artifact.display().to_string(),
        sha256: sha.clone(),
        drain: DrainMode::Graceful {
            timeout: Duration::from_secs(60),
        },
        parallelism: 1,
        verify_stable: Duration::from_millis(300),
        verify_timeout: Duration::from_secs(10),
        busy_retry_interval: Duration::from_secs(1),
        busy_retries: 3,
        on_exhausted: Default::default(),
        server_retries: 1,
        on_failure: Default::default(),
        domains: fleet
            .servers
            .iter()
            .map(|s| Domain {
                name: s.domain.clone(),
                servers: vec![s.id.clone()],
            })
            .collect(),
        canary_soak: None,
        paired_pool: None,
        min_active: Some(2),
        rollback_artifact: None,
        windows: vec![],
    };
    let (mut upgrade, _) = Upgrade::new(sane.clone())?;
    upgrade.plan.drain = DrainMode::Graceful {
        timeout: Duration::from_secs(100_000_000 * 365 * 86_400),
    };
    {
        let store = Store::Embedded(EmbeddedStore::open(&root.join("store.json"))?);
        let me = Candidate {
            id: "old-version".into(),
            address: "127.0.0.1:1".into(),
        };
        let lead = store
            .campaign(&me, Duration::from_secs(5), &Default::default())
            .await?;
        let record = UpgradeRecord {
            upgrade,
            next_event: 0,
            started_by: String::new(),
            started_ms: 0,
        };
        store
            .fenced_write(&lead, progress::full_writes(&record))
            .await?;
        store.resign(&lead).await?;
    }
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let paused = |s: &pb::UpgradeStatus| {
        names::upgrade_state(s.status) == "paused" && s.reason.contains("drain_timeout")
    };
    for round in 0..2 {
        let s = wait_status(&[coord.addr], &op, "pool-a", LONG, paused).await?;
        assert!(s.reason.contains("upper bound"), "round {round}: {s:?}");
        // Resuming it is refused with the reason; the coordinator keeps running. (The paused
        // state can be read from the store before this coordinator has finished taking over,
        // when leader calls are answered "retry shortly".)
        let c = operator_client(coord.addr, &op).await?;
        eventually("resume to be answered", LONG, || {
            let mut c = c.clone();
            async move {
                match c
                    .resume_upgrade(pb::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                {
                    Err(e) if e.code() == tonic::Code::Unavailable => None,
                    other => Some(other.map(|_| ())),
                }
            }
        })
        .await??;
        let s = wait_status(&[coord.addr], &op, "pool-a", LONG, paused).await?;
        assert_eq!(s.plan_id, "pool-a-old");
        // Another coordinator resuming the same stored plan (here: this one, restarted).
        let st = coord.terminate().await?;
        assert!(st.success(), "round {round}: exit {st:?}\n{}", coord.log());
        coord.restart().await?;
    }
    assert!(fleet.installs().iter().all(|(_, v)| v.is_empty()));
    // The pool can be managed again: abort the stored upgrade, then run a sane one.
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    c.abort_upgrade(pb::PoolRequest {
        pool: "pool-a".into(),
    })
    .await?;
    wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    rollgate_tests::cluster::start_upgrade(&mut c, start_req("pool-a", &artifact, &sha)).await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");
    coord.terminate().await?;
    Ok(())
}

/// #7: a server whose drain timed out is left draining (its open connections are never cut)
/// and shown as out of service; an abort brings it back on its old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_brings_back_a_server_whose_drain_timed_out() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 4, 2, "1.0").await?;
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        &fleet.pool_toml("min_active = 2"),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    // A client keeps a connection open to fe-1, the first server to go down.
    let first = &fleet.servers[0];
    let conn = tokio::net::TcpStream::connect(("127.0.0.1", first.fe.port)).await?;
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        pb::StartUpgradeRequest {
            drain_timeout_ms: Some(1_000),
            server_retries: Some(0),
            ..start_req("pool-a", &artifact, &sha)
        },
    )
    .await?;
    let s = wait_status(&[coord.addr], &op, "pool-a", LONG, |s| {
        names::upgrade_state(s.status) == "paused"
    })
    .await?;
    assert!(
        s.out_of_service.iter().any(|o| o.server == first.id),
        "{first} must be shown out of service: {s:?}",
        first = first.id
    );
    // The drain never cut the open connection.
    w.write_all(b"still there\n").await?;
    assert_eq!(lines.next_line().await?.as_deref(), Some("still there"));
    drop(w);
    drop(lines);
    c.abort_upgrade(pb::PoolRequest {
        pool: "pool-a".into(),
    })
    .await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(end.status), "aborted", "{end:?}");
    assert!(end.out_of_service.is_empty(), "{end:?}\n{}", coord.log());
    eventually("fe-1 serving 1.0 again", Duration::from_secs(20), || {
        let mut c = c.clone();
        let id = first.id.clone();
        async move {
            let r = c
                .readiness(pb::PoolRequest {
                    pool: "pool-a".into(),
                })
                .await
                .ok()?
                .into_inner();
            r.domains
                .iter()
                .flat_map(|d| &d.servers)
                .any(|s| s.server == id && s.active && s.version == "1.0")
                .then_some(())
        }
    })
    .await?;
    let events = c
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "restore_started" && e.server == first.id),
        "{events:#?}"
    );
    assert!(fleet.installs().iter().all(|(_, v)| v.is_empty()));
    coord.terminate().await?;
    Ok(())
}

/// etcd out of space, end to end: a new upgrade is refused at once with the reason (nothing
/// starts, nothing is left behind), an upgrade already running holds where it is and says why
/// in its status, and it goes on, every server installed once, when an operator frees space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_refuses_new_upgrades_and_holds_a_running_one_until_freed(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = rollgate_tests::etcd::EtcdCluster::start_with_args(
        1,
        None,
        &["--quota-backend-bytes", "4194304"],
    )
    .await?
    else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 4, 3, "1.0").await?;
    // pool-a: fe-1..fe-3 over three domains; pool-b: fe-4.
    let mut pools = String::from("[[pools]]\nname = \"pool-a\"\nmin_active = 2\n");
    for s in &fleet.servers[..3] {
        pools.push_str(&format!(
            "\n[[pools.servers]]\nid = \"{}\"\nagent = \"{}\"\nupgrade_domain = \"{}\"\n",
            s.id, s.agent.addr, s.domain
        ));
    }
    pools.push_str(&format!(
        "\n[[pools]]\nname = \"pool-b\"\nmin_active = 1\n\n[[pools.servers]]\nid = \"fe-4\"\nagent = \"{}\"\n",
        fleet.servers[3].agent.addr
    ));
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &etcd_store(&etcd.endpoints(), 5),
        &pools,
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let mut req = start_req("pool-a", &artifact, &sha);
    req.verify_stable_ms = Some(2_000);
    rollgate_tests::cluster::start_upgrade(&mut c, req).await?;
    wait_status(&[coord.addr], &op, "pool-a", LONG, |s| {
        s.servers.iter().any(|x| {
            x.phase == pb::ServerPhase::InFlight as i32 && x.step == pb::Step::Verify as i32
        })
    })
    .await?;

    // An operator following the upgrade: the hold must reach them as it starts, though the
    // upgrade itself does not move while it holds.
    let mut watch = c
        .watch_upgrade(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();

    // Fill etcd (outside rollgate's prefix) until it raises its NOSPACE alarm.
    let mut kv = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let chunk = vec![b'z'; 200 * 1024];
    let mut full = false;
    for i in 0..400 {
        if let Err(e) = kv
            .put(format!("/filler/{}", i % 4), chunk.clone(), None)
            .await
        {
            ensure!(e.to_string().contains("space"), "filling etcd: {e}");
            full = true;
            break;
        }
    }
    ensure!(full, "etcd never ran out of its 4 MiB");

    // The running upgrade holds, and says why: on the watch stream, and to a status call.
    let watched = tokio::time::timeout(LONG, async {
        while let Some(s) = watch.message().await? {
            if !s.held.is_empty() {
                return Ok(s);
            }
        }
        bail!("the upgrade watch ended without showing the hold")
    })
    .await
    .context("the upgrade watch never showed the hold")??;
    ensure!(watched.held.contains("out of space"), "{}", watched.held);
    drop(watch);
    let held = wait_status(&[coord.addr], &op, "pool-a", LONG, |s| !s.held.is_empty()).await?;
    ensure!(held.held.contains("out of space"), "{}", held.held);
    ensure!(!held.ended, "{held:?}");
    // A new upgrade is refused at once, naming the reason; nothing of it is left.
    let t = Instant::now();
    match c.start_upgrade(start_req("pool-b", &artifact, &sha)).await {
        Ok(r) => bail!("started with etcd full: {:?}", r.into_inner()),
        Err(e) => ensure!(
            e.code() == tonic::Code::ResourceExhausted && e.message().contains("out of space"),
            "{e:?}"
        ),
    }
    ensure!(
        t.elapsed() < Duration::from_secs(10),
        "refused only after {:?}",
        t.elapsed()
    );
    let b = c
        .get_upgrade(pb::PoolRequest {
            pool: "pool-b".into(),
        })
        .await?
        .into_inner();
    ensure!(b.status == pb::UpgradeState::None as i32, "{b:?}");
    ensure!(
        fleet.servers[3].fe.installs().is_empty(),
        "fe-4 was touched"
    );

    // An operator frees space: delete, compact, defragment, disarm the alarm.
    kv.delete(
        "/filler/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    let rev = kv
        .get("/", None)
        .await?
        .header()
        .context("no header")?
        .revision();
    kv.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await?;
    kv.defragment().await?;
    let alarms = kv
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await?;
    for a in alarms.alarms() {
        let mut only = etcd_client::AlarmOptions::new();
        only.with_member(a.member_id());
        kv.alarm(
            etcd_client::AlarmAction::Deactivate,
            etcd_client::AlarmType::Nospace,
            Some(only),
        )
        .await?;
    }
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    ensure!(
        names::upgrade_state(end.status) == "completed" && end.held.is_empty(),
        "{end:?}"
    );
    for (id, installs) in fleet.installs().into_iter().take(3) {
        ensure!(installs == ["2.0"], "{id}: {installs:?}");
    }
    Ok(())
}
