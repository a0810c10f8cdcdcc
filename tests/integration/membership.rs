//! Agents that join their pool by themselves: no server listed in the coordinator's config.

use crate::coordinator::{embedded, ended, start_req, wait_status};
use anyhow::ensure;
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::membership_client::MembershipClient;
use rollgate_tests::cluster::{operator_client, CoordinatorProc, Fleet};
use rollgate_tests::{eventually, make_artifact};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// The servers of the pool as the coordinator's readiness shows them: (id, domain, state).
async fn seen(
    c: &rollgate_proto::operator::v1::operator_client::OperatorClient<tonic::transport::Channel>,
) -> Option<Vec<(String, String, String)>> {
    let r = c
        .clone()
        .readiness(pb::PoolRequest {
            pool: "pool-a".into(),
        })
        .await
        .ok()?
        .into_inner();
    let mut v: Vec<(String, String, String)> = r
        .domains
        .iter()
        .flat_map(|d| {
            d.servers.iter().map(|s| {
                (
                    s.server.clone(),
                    d.name.clone(),
                    names::server_state(s.state),
                )
            })
        })
        .collect();
    v.sort();
    Some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_join_their_pool_by_starting_their_agent_and_are_upgraded() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    // The coordinator lists no server: the pool's policies only.
    let mut coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &embedded(root),
        "[[pools]]\nname = \"pool-a\"\nmin_active = 2\n",
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coord.addr, &op).await?;
    anyhow::ensure!(
        seen(&c).await.unwrap_or_default().is_empty(),
        "no server before any joined"
    );

    // Each agent gets a [join] table and is restarted: that is all a server needs.
    for s in &mut fleet.servers {
        let mut text = std::fs::read_to_string(&s.agent.config)?;
        text.push_str(&format!("\n[join]\ncoordinators = [\"{}\"]\n", coord.addr));
        std::fs::write(&s.agent.config, text)?;
        s.agent.terminate().await?;
        s.agent.restart().await?;
    }
    let want: Vec<(String, String, String)> = fleet
        .servers
        .iter()
        .map(|s| (s.id.clone(), s.domain.clone(), "serving".to_owned()))
        .collect();
    let got = eventually("the three servers to join and serve", LONG, || {
        let (c, want) = (&c, &want);
        async move { seen(c).await.filter(|v| v == want) }
    })
    .await?;
    assert_eq!(got.len(), 3);

    // Joining again unchanged changes nothing; an operator cannot join as a server; an
    // unknown pool is refused with its name.
    let agent_tls = fleet.pki.issue(RoleKind::Agent, "fe-1")?;
    let mut m = MembershipClient::new(rollgate_tests::channel(coord.addr, &agent_tls).await?);
    let again = m
        .join(pb::JoinRequest {
            pool: "pool-a".into(),
            upgrade_domain: fleet.servers[0].domain.clone(),
            address: fleet.servers[0].agent.addr.to_string(),
        })
        .await?
        .into_inner();
    assert!(!again.changed, "{again:?}");
    let unknown = m
        .join(pb::JoinRequest {
            pool: "pool-nope".into(),
            upgrade_domain: String::new(),
            address: "127.0.0.1:9".into(),
        })
        .await
        .expect_err("an unknown pool");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("pool-nope"), "{unknown:?}");
    let mut as_operator = MembershipClient::new(rollgate_tests::channel(coord.addr, &op).await?);
    let denied = as_operator
        .join(pb::JoinRequest {
            pool: "pool-a".into(),
            upgrade_domain: String::new(),
            address: "127.0.0.1:9".into(),
        })
        .await
        .expect_err("an operator is not a server");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The membership is stored: a restarted coordinator knows the servers before any agent
    // joins again (they joined once and do not ask again).
    coord.terminate().await?;
    coord.restart().await?;
    let c = operator_client(coord.addr, &op).await?;
    eventually("the members after a restart", LONG, || {
        let (c, want) = (&c, &want);
        async move { seen(c).await.filter(|v| v == want) }
    })
    .await?;

    // And they are upgraded like listed servers.
    let (artifact, sha) = make_artifact(root, "2.0")?;
    let mut c = c;
    rollgate_tests::cluster::start_upgrade(&mut c, start_req("pool-a", &artifact, &sha)).await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", LONG, ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");
    for (id, v) in fleet.installs() {
        assert_eq!(v, vec!["2.0".to_owned()], "{id}");
    }
    coord.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_joining_agents_to_the_leader_and_a_server_leaves_by_command(
) -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(etcd) = rollgate_tests::etcd::EtcdCluster::start(1).await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let mut fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let store = crate::coordinator::etcd_store(&etcd.endpoints(), 2);
    let mut coords = fleet
        .coordinators(
            root,
            &["c1", "c2"],
            &store,
            "[[pools]]\nname = \"pool-a\"\nmin_active = 2\n",
        )
        .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coords[0].addr, &op).await?;
    let (leader, _) = rollgate_tests::cluster::wait_leader(&c, 0, LONG).await?;
    let follower = coords
        .iter()
        .find(|c| c.id != leader)
        .map(|c| c.addr)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;

    // Every agent is told only the follower: the follower's answer leads it to the leader.
    for s in &mut fleet.servers {
        let mut text = std::fs::read_to_string(&s.agent.config)?;
        text.push_str(&format!("\n[join]\ncoordinators = [\"{follower}\"]\n"));
        std::fs::write(&s.agent.config, text)?;
        s.agent.terminate().await?;
        s.agent.restart().await?;
    }
    let fc = operator_client(follower, &op).await?;
    let all: Vec<(String, String, String)> = fleet
        .servers
        .iter()
        .map(|s| (s.id.clone(), s.domain.clone(), "serving".to_owned()))
        .collect();
    eventually(
        "the three servers to join through the follower",
        LONG,
        || {
            let (fc, all) = (&fc, &all);
            async move { seen(fc).await.filter(|v| v == all) }
        },
    )
    .await?;

    // `rollgate-agent leave` takes fe-1 out, on every coordinator.
    let leave = || -> anyhow::Result<std::process::Output> {
        Ok(
            std::process::Command::new(rollgate_tests::bin("rollgate-agent")?)
                .args(["leave", "--config"])
                .arg(&fleet.servers[0].agent.config)
                .output()?,
        )
    };
    let out = leave()?;
    assert!(
        out.status.success(),
        "leave: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fe-1 left its pool"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rest = all[1..].to_vec();
    for addr in coords.iter().map(|c| c.addr) {
        let c = operator_client(addr, &op).await?;
        eventually("fe-1 to be gone", LONG, || {
            let (c, rest) = (&c, &rest);
            async move { seen(c).await.filter(|v| v == rest) }
        })
        .await?;
    }
    // Leaving again is no change, said so.
    let out = leave()?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("had not joined"),
        "{out:?}"
    );
    // An agent (fe-3's) answering at the address fe-2 is told is a coordinator: refused before
    // anything is sent, naming what it presented; fe-2 stays a member.
    let impostor = fleet.servers[2].agent.addr;
    let text = std::fs::read_to_string(&fleet.servers[1].agent.config)?.replace(
        &format!("coordinators = [\"{follower}\"]"),
        &format!("coordinators = [\"{impostor}\"]"),
    );
    ensure!(text.contains(&impostor.to_string()), "{text}");
    let misled = root.join("fe-2-misled.toml");
    std::fs::write(&misled, text)?;
    let out = std::process::Command::new(rollgate_tests::bin("rollgate-agent")?)
        .args(["leave", "--config"])
        .arg(&misled)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("presents a certificate for rollgate://agent/fe-3")
            && err.contains("not a coordinator"),
        "{err}"
    );
    eventually("fe-2 still a member", LONG, || {
        let (c, rest) = (&fc, &rest);
        async move { seen(c).await.filter(|v| v == rest) }
    })
    .await?;
    for c in &mut coords {
        c.terminate().await?;
    }
    Ok(())
}
