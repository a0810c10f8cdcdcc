//! The report line (health and the fence without an HTTP/2 connection per agent): an agent
//! that does not speak it is still watched and fenced, over gRPC; the line holds its callers
//! to the same roles as the gRPC calls.

use rollgate_common::tls::RoleKind;
use rollgate_common::Epoch;
use rollgate_coordinator::agent_tls::AgentTls;
use rollgate_coordinator::inventory::{line_idle, Inventory};
use rollgate_coordinator::link::{AgentCommand, AgentLink, LinkError, OpState};
use rollgate_coordinator::readiness::AgentState;
use rollgate_tests::fleet::agent::SimAgent;
use rollgate_tests::fleet::listen::{self, TlsFactory};
use rollgate_tests::fleet::Identity;
use rollgate_tests::{eventually, AgentProc, FrontEnd, Pki};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LOST_AFTER: Duration = Duration::from_secs(3);

/// Watches `agents` from an inventory holding `tls`, until the returned token is cancelled.
fn watch(
    agents: &[(String, String)],
    tls: AgentTls,
) -> anyhow::Result<(Arc<Inventory>, TaskTracker, CancellationToken)> {
    let inv = Arc::new(Inventory::new(agents, Some(tls))?);
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    inv.watch_all(&tasks, &stop, line_idle(LOST_AFTER));
    Ok((inv, tasks, stop))
}

async fn serving(inv: &Inventory, servers: usize) -> anyhow::Result<()> {
    eventually(
        "every agent reporting serving",
        Duration::from_secs(15),
        || {
            let h = inv.health();
            let ok = h.len() == servers
                && h.values()
                    .all(|h| !h.disconnected && h.state == AgentState::Serving);
            async move { ok.then_some(()) }
        },
    )
    .await
}

#[tokio::test]
async fn an_agent_without_the_report_line_is_watched_and_fenced_over_grpc() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path())?;
    let factory = TlsFactory::new(
        &std::fs::read_to_string(pki.ca_cert_path())?,
        &pki.ca_key_pem(),
    )?;
    let served = CancellationToken::new();
    let _served = served.clone().drop_guard();
    let mut agents = Vec::new();
    let mut addresses = Vec::new();
    for (id, alpn) in [
        ("fe-old", &[&b"h2"[..]][..]),
        ("fe-new", &[&b"h2"[..], rollgate_proto::line::ALPN][..]),
    ] {
        let listener = listen::bind(([127, 0, 0, 1], 0).into())?;
        let addr = listener.local_addr()?;
        let acceptor = factory.acceptor_with(id, addr, alpn)?;
        let agent = Arc::new(SimAgent::new(
            Identity {
                server_id: id.into(),
                pool: "p".into(),
                domain: "ud-1".into(),
                addr,
            },
            "1.0",
            Duration::from_millis(20),
            Duration::from_millis(500),
        ));
        tokio::spawn(listen::serve(
            Arc::clone(&agent),
            listener,
            acceptor,
            served.clone(),
        ));
        agents.push(agent);
        addresses.push((id.to_string(), addr.to_string()));
    }
    let tls = AgentTls::from_files(&pki.issue(RoleKind::Coordinator, "c1")?)?;
    let (inv, tasks, stop) = watch(&addresses, tls)?;
    serving(&inv, 2).await?;
    // Only the agent without the line needed a gRPC connection: its Watch stream.
    assert_eq!(inv.step_clients(), 1, "gRPC clients made for health");

    for (id, _) in &addresses {
        inv.fence(id, Epoch(5))
            .await
            .map_err(|e| anyhow::anyhow!("fencing {id}: {e}"))?;
    }
    for a in &agents {
        assert!(
            a.fenced_at(5).is_some(),
            "{} was not fenced at epoch 5",
            a.id.server_id
        );
    }
    assert_eq!(
        inv.step_clients(),
        1,
        "the agent with the line was fenced over gRPC"
    );
    // A step and an operation's status, each over the agent's own channel.
    for (id, _) in &addresses {
        let reply = inv
            .run(
                id,
                "stop-1",
                Epoch(5),
                &AgentCommand::Stop,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| anyhow::anyhow!("stop on {id}: {e}"))?;
        assert_eq!(reply.state, OpState::Succeeded, "stop on {id}: {reply:?}");
        let again = inv.operation(id, "stop-1").await?;
        assert_eq!(again.state, OpState::Succeeded, "status of stop on {id}");
    }
    assert_eq!(
        inv.step_clients(),
        1,
        "a step to the agent with the line went over gRPC"
    );
    // A stale fence is refused as the gRPC call refuses it, on the line too.
    for (id, _) in &addresses {
        match inv.fence(id, Epoch(4)).await {
            Err(LinkError::StaleEpoch { current: 5, .. }) => {}
            other => panic!("a fence at epoch 4 after 5 on {id}: {other:?}"),
        }
    }

    stop.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_line_holds_its_callers_to_the_roles_of_the_grpc_calls() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let pki = Pki::new(root)?;
    let fe = FrontEnd::create(root, "fe-1", "1.0")?;
    fe.start()?;
    let tls = pki.issue(RoleKind::Agent, "fe-1")?;
    let (config, state_dir) = AgentProc::write_config(root, "fe-1", "p", "ud-1", &tls, &fe)?;
    let agent = AgentProc::spawn(config, state_dir).await?;
    let addresses = [("fe-1".to_string(), agent.addr.to_string())];

    // An operator may read what the agent reports, but not fence it.
    let operator = AgentTls::from_files(&pki.issue(RoleKind::Operator, "alice")?)?;
    let (inv, tasks, stop) = watch(&addresses, operator)?;
    serving(&inv, 1).await?;
    assert_eq!(inv.step_clients(), 0, "health did not come over the line");
    match inv.fence("fe-1", Epoch(9)).await {
        Err(LinkError::Refused(why)) => assert!(why.contains("coordinator role"), "{why}"),
        other => panic!("an operator's fence: {other:?}"),
    }
    match inv
        .run(
            "fe-1",
            "stop-1",
            Epoch(9),
            &AgentCommand::Stop,
            Duration::from_secs(10),
        )
        .await
    {
        Err(LinkError::Refused(why)) => assert!(why.contains("coordinator role"), "{why}"),
        other => panic!("an operator's stop: {other:?}"),
    }
    // Reading an operation's status is open to operators, as over gRPC.
    match inv.operation("fe-1", "stop-1").await {
        Err(LinkError::NotFound(_)) => {}
        other => panic!("an operator's look at an unknown operation: {other:?}"),
    }

    // Another server's agent certificate may not even read.
    let stranger = AgentTls::from_files(&pki.issue(RoleKind::Agent, "fe-2")?)?;
    let (refused, refused_tasks, refused_stop) = watch(&addresses, stranger)?;
    let detail = eventually(
        "the stranger's line refused",
        Duration::from_secs(15),
        || {
            let h = refused.health().remove("fe-1");
            async move {
                h.filter(|h| h.disconnected && h.detail.contains("refused the report line"))
                    .map(|h| h.detail)
            }
        },
    )
    .await?;
    assert!(detail.contains("coordinator or operator role"), "{detail}");

    // A coordinator fences over the line; the agent's next report carries the epoch.
    let coordinator = AgentTls::from_files(&pki.issue(RoleKind::Coordinator, "c1")?)?;
    let (c_inv, c_tasks, c_stop) = watch(&addresses, coordinator)?;
    serving(&c_inv, 1).await?;
    c_inv.fence("fe-1", Epoch(9)).await?;
    let mut health = tonic::Request::new(rollgate_proto::agent::v1::HealthRequest {});
    health.set_timeout(Duration::from_secs(5));
    let mut client =
        rollgate_tests::agent_client(agent.addr, &pki.issue(RoleKind::Coordinator, "c2")?).await?;
    let epoch = client.health(health).await?.into_inner().epoch;
    assert_eq!(epoch, 9, "the agent's epoch after a fence over the line");
    // A step over the line: the front end really stops.
    let reply = c_inv
        .run(
            "fe-1",
            "stop-1",
            Epoch(9),
            &AgentCommand::Stop,
            Duration::from_secs(20),
        )
        .await?;
    assert_eq!(reply.state, OpState::Succeeded, "{reply:?}");
    let accepting = tokio::net::TcpStream::connect(("127.0.0.1", fe.port))
        .await
        .is_ok();
    assert!(
        !accepting,
        "the front end still accepts after a stop over the line"
    );
    assert_eq!(c_inv.step_clients(), 0, "the fence went over gRPC");

    for (stop, tasks) in [
        (stop, tasks),
        (refused_stop, refused_tasks),
        (c_stop, c_tasks),
    ] {
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }
    Ok(())
}
