//! The fleet simulator (`rollgate-fleet`, behind `rollgate-bench scale`) against a real
//! coordinator: its agents pass the coordinator's identity checks, report health, run a whole
//! upgrade, and a crashed one is counted lost and comes back. Kept small so that the simulator
//! cannot rot without a failing test.

use anyhow::{ensure, Result};
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as opb;
use rollgate_tests::cluster::{operator_client, start_upgrade, CoordinatorProc};
use rollgate_tests::fleet::{FleetProc, FleetSpec};
use rollgate_tests::{cluster_lock, eventually, Pki};
use std::time::Duration;

fn server_state(r: &opb::PoolReadiness, id: &str) -> Option<i32> {
    r.domains
        .iter()
        .flat_map(|d| d.servers.iter())
        .find(|s| s.server == id)
        .map(|s| s.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_pool_upgrades_through_a_real_coordinator() -> Result<()> {
    let _cluster = cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let pki = Pki::new(&root.join("pki"))?;
    let spec = FleetSpec {
        agents: 6,
        pools: 1,
        domains: 3,
        version: "1.0".into(),
        step: Duration::from_millis(10),
        report_interval: Duration::from_millis(200),
    };
    let mut fleet = FleetProc::start(root, &pki, &spec, 1).await?;
    ensure!(fleet.agents.len() == 6, "agents: {:?}", fleet.agents);
    let store = format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"",
        root.join("store.json").display()
    );
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &pki.issue(RoleKind::Coordinator, "c1")?,
        &store,
        &fleet.pools_toml(""),
    )
    .await?;
    let mut c = operator_client(coord.addr, &pki.issue(RoleKind::Operator, "t")?).await?;
    let pool = fleet.agents[0].pool.clone();
    let readiness = |c: &opb::operator_client::OperatorClient<_>| {
        let (mut c, pool) = (c.clone(), pool.clone());
        async move {
            c.readiness(opb::PoolRequest { pool })
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    };
    eventually(
        "every simulated agent active",
        Duration::from_secs(20),
        || {
            let r = readiness(&c);
            async move { r.await.filter(|r| r.active == 6) }
        },
    )
    .await?;

    // A crashed agent is counted lost, and active again once it is back.
    let victim = fleet.agents[1].server_id.clone();
    fleet.ask(&format!("crash {victim}")).await?;
    eventually(
        "the crashed agent counted lost",
        Duration::from_secs(10),
        || {
            let (r, v) = (readiness(&c), victim.clone());
            async move {
                r.await
                    .filter(|r| server_state(r, &v) == Some(opb::ServerState::Lost as i32))
            }
        },
    )
    .await?;
    fleet.ask(&format!("restore {victim}")).await?;
    eventually("the restored agent active", Duration::from_secs(15), || {
        let r = readiness(&c);
        async move { r.await.filter(|r| r.active == 6) }
    })
    .await?;

    let (artifact, sha256) = ("/srv/fleet/release-2.0.tar".to_string(), "ab".repeat(32));
    start_upgrade(
        &mut c,
        opb::StartUpgradeRequest {
            pool: pool.clone(),
            version: "2.0".into(),
            artifact,
            sha256,
            parallelism: Some(2),
            verify_stable_ms: Some(0),
            verify_timeout_ms: Some(5_000),
            ..Default::default()
        },
    )
    .await?;
    let end = eventually("the upgrade to end", Duration::from_secs(30), || {
        let (mut c, pool) = (c.clone(), pool.clone());
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
    ensure!(
        names::upgrade_state(end.status) == "completed",
        "upgrade ended {}: {}\n{}",
        names::upgrade_state(end.status),
        end.reason,
        coord.log()
    );
    let versions = fleet.ask("versions").await?;
    ensure!(
        versions["versions"] == serde_json::json!({"2.0": 6}),
        "versions at the simulator: {versions}"
    );
    // Every agent was fenced at the coordinator's epoch.
    let fenced = fleet.ask("fenced 1").await?;
    ensure!(fenced["fenced"] == 6, "fenced: {fenced}");
    coord.terminate().await?;
    Ok(())
}
