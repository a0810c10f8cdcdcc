//! The agent against a real sample front end over mTLS.

use anyhow::{ensure, Context};
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_client::AgentClient;
use rollgate_tests::{agent_client, eventually, make_artifact, AgentProc, FrontEnd, Pki};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    pki: Pki,
    fe: FrontEnd,
    agent: AgentProc,
    client: AgentClient<Channel>,
}

async fn setup(version: &str) -> anyhow::Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_owned();
    let pki = Pki::new(&root.join("pki"))?;
    let fe = FrontEnd::create(&root, "fe-1", version)?;
    fe.start()?;
    let tls = pki.issue(RoleKind::Agent, "fe-1")?;
    let agent = AgentProc::start(&root, "fe-1", "pool-a", "ud-1", &tls, &fe).await?;
    let coord = pki.issue(RoleKind::Coordinator, "c1")?;
    let client = agent_client(agent.addr, &coord).await?;
    Ok(Setup {
        _tmp: tmp,
        root,
        pki,
        fe,
        agent,
        client,
    })
}

fn header(id: &str, epoch: u64) -> Option<pb::OperationHeader> {
    Some(pb::OperationHeader {
        operation_id: id.into(),
        epoch,
    })
}

/// A client connection to the front end, checked to be served.
async fn connect(
    port: u16,
) -> anyhow::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (r, w) = s.into_split();
    Ok((BufReader::new(r), w))
}

async fn ask(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &str,
) -> anyhow::Result<String> {
    w.write_all(format!("{line}\n").as_bytes()).await?;
    let mut out = String::new();
    let n = tokio::time::timeout(WAIT, r.read_line(&mut out)).await??;
    ensure!(n > 0, "connection closed while asking {line:?}");
    Ok(out.trim().to_owned())
}

async fn refuses_new_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_err()
}

async fn health(c: &mut AgentClient<Channel>) -> anyhow::Result<pb::HealthReport> {
    Ok(c.health(pb::HealthRequest {}).await?.into_inner())
}

fn state(r: &pb::OperationResult) -> pb::OperationState {
    pb::OperationState::try_from(r.state).unwrap_or(pb::OperationState::Unspecified)
}

#[tokio::test]
async fn graceful_drain_lets_open_connections_finish_while_new_ones_are_refused(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving,
        "{h:?}"
    );
    assert_eq!(h.installed_version, "1.0");
    assert_eq!(
        (
            h.server_id.as_str(),
            h.pool.as_str(),
            h.upgrade_domain.as_str()
        ),
        ("fe-1", "pool-a", "ud-1")
    );
    assert!(h.accepting_connections && h.healthy && !h.busy);
    assert!(!h.boot_id.is_empty());

    // Two clients hold connections open across the drain.
    let (mut r1, mut w1) = connect(s.fe.port).await?;
    let (mut r2, mut w2) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r1, &mut w1, "VERSION").await?, "1.0");
    assert_eq!(ask(&mut r2, &mut w2, "VERSION").await?, "1.0");
    let counted = eventually("the agent to count 2 active connections", WAIT, || {
        let mut c = s.client.clone();
        async move {
            health(&mut c)
                .await
                .ok()
                .filter(|h| h.active_connections == 2)
        }
    })
    .await?;
    assert_eq!(counted.active_connections, 2);

    let mut c = s.client.clone();
    let drain = tokio::spawn(async move {
        c.drain(pb::DrainRequest {
            header: header("drain-1", 1),
            timeout_ms: 30_000,
            on_timeout: pb::DrainTimeoutAction::Fail as i32,
        })
        .await
    });
    let port = s.fe.port;
    eventually("new connections to be refused", WAIT, || async move {
        refuses_new_connections(port).await.then_some(())
    })
    .await?;
    let h = eventually("the agent to report draining", WAIT, || {
        let mut c = s.client.clone();
        async move {
            health(&mut c)
                .await
                .ok()
                .filter(|h| h.state == pb::ServiceState::Draining as i32)
        }
    })
    .await?;
    assert!(!h.accepting_connections);
    // Open connections still work during the drain, and the drain waits for them.
    assert_eq!(ask(&mut r1, &mut w1, "still here").await?, "still here");
    drop((r1, w1));
    assert_eq!(ask(&mut r2, &mut w2, "VERSION").await?, "1.0");
    assert!(
        !drain.is_finished(),
        "the drain must wait for the last open connection"
    );
    drop((r2, w2));
    let res = tokio::time::timeout(WAIT, drain).await???.into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert!(res.message.contains("drained"), "{res:?}");
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Drained
    );
    assert_eq!(h.active_connections, 0);
    Ok(())
}

/// The connections a timed-out drain says are still open: at least the test's own. The count
/// may also take in the agent's accept probes from just before the drain, whose server side
/// the service has not closed yet on a loaded machine (CLOSE_WAIT, counted as any client that
/// hung up before the service answered).
fn still_open(res: &pb::OperationResult) -> anyhow::Result<u32> {
    res.message
        .split_once(" connection(s) still open")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no count of open connections in {res:?}"))
}

#[tokio::test]
async fn drain_timeout_fails_or_forces_as_asked() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    let res = s
        .client
        .drain(pb::DrainRequest {
            header: header("d-fail", 1),
            timeout_ms: 300,
            on_timeout: pb::DrainTimeoutAction::Fail as i32,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Failed, "{res:?}");
    assert!(still_open(&res)? >= 1, "{res:?}");
    assert_eq!(
        ask(&mut r, &mut w, "alive").await?,
        "alive",
        "a failed drain must not cut connections"
    );
    let res = s
        .client
        .drain(pb::DrainRequest {
            header: header("d-force", 1),
            timeout_ms: 300,
            on_timeout: pb::DrainTimeoutAction::Force as i32,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert!(res.message.contains("by force"), "{res:?}");
    Ok(())
}

#[tokio::test]
async fn immediate_stop_cuts_connections_at_once() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    let res = s
        .client
        .stop(pb::StopRequest {
            header: header("stop-1", 1),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert!(refuses_new_connections(s.fe.port).await);
    // The held connection is gone: the next read sees EOF or an error.
    let _ = w.write_all(b"x\n").await;
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, r.read_line(&mut line))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "connection should be cut, read {line:?}");
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Stopped
    );
    Ok(())
}

#[tokio::test]
async fn install_checks_sha256_then_restart_and_verify_serve_the_new_version() -> anyhow::Result<()>
{
    let mut s = setup("1.0").await?;
    let (artifact, sha) = make_artifact(&s.root, "2.0")?;
    let install = |id: &str, sha: &str| pb::InstallPatchRequest {
        header: header(id, 1),
        artifact: format!("file://{}", artifact.display()),
        sha256: sha.into(),
        version: "2.0".into(),
        timeout_ms: 0,
        ..Default::default()
    };

    // Installing over a serving service is refused: it would take it down without a drain.
    let err = s
        .client
        .install_patch(install("i-0", &sha))
        .await
        .expect_err("install while serving");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("drain or stop"), "{err:?}");

    let res = s
        .client
        .stop(pb::StopRequest {
            header: header("stop", 1),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded);

    // A wrong checksum: clear error, nothing runs, nothing is journaled.
    let wrong = "0".repeat(64);
    let err = s
        .client
        .install_patch(install("i-bad", &wrong))
        .await
        .expect_err("bad checksum");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("sha256") && err.message().contains("nothing was installed"),
        "{err:?}"
    );
    assert!(
        s.fe.installs().is_empty(),
        "the install command must not have run"
    );
    let err = s
        .client
        .operation_status(pb::OperationStatusRequest {
            operation_id: "i-bad".into(),
        })
        .await
        .expect_err("not journaled");
    assert_eq!(err.code(), Code::NotFound);

    // The right checksum installs.
    let res = s
        .client
        .install_patch(install("i-good", &sha))
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert_eq!(res.version, "2.0");
    assert_eq!(s.fe.installs(), vec!["2.0"]);

    let res = s
        .client
        .restart(pb::RestartRequest {
            header: header("restart", 1),
            timeout_ms: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    let res = s
        .client
        .verify(pb::VerifyRequest {
            header: header("verify", 1),
            stable_ms: Some(500),
            timeout_ms: 10_000,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "2.0");
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving
    );
    assert_eq!(h.installed_version, "2.0");

    // Rollback reinstalls the previous version from the agent's own cache.
    let res = s
        .client
        .stop(pb::StopRequest {
            header: header("stop-2", 1),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded);
    // The initial version was not installed by the agent: it has no artifact to roll back to.
    let err = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb-0", 1),
            timeout_ms: 0,
            from_version: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("no previous");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("cannot roll back to version 1.0")
            && err.message().contains("give the plan a rollback artifact"),
        "{err:?}"
    );
    let (artifact3, sha3) = make_artifact(&s.root, "3.0")?;
    let res = s
        .client
        .install_patch(pb::InstallPatchRequest {
            header: header("i-3", 1),
            artifact: artifact3.display().to_string(),
            sha256: sha3,
            version: "3.0".into(),
            timeout_ms: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    // Rollback reinstalls the previous version from the agent's own artifact cache.
    let res = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb-1", 1),
            timeout_ms: 0,
            from_version: "3.0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert_eq!(res.version, "2.0");
    assert_eq!(s.fe.installs(), vec!["2.0", "3.0", "2.0"]);
    // A second rollback "from 3.0" (a new operation id, e.g. a retry by a new leader) finds 3.0
    // no longer installed and does nothing: a version is never rolled back twice.
    let res = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb-2", 1),
            timeout_ms: 0,
            from_version: "3.0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert!(res.message.contains("nothing to roll back"), "{res:?}");
    assert_eq!(s.fe.installs(), vec!["2.0", "3.0", "2.0"]);
    let res = s
        .client
        .restart(pb::RestartRequest {
            header: header("restart-2", 1),
            timeout_ms: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "2.0");
    Ok(())
}

#[tokio::test]
async fn verify_fails_while_busy_or_unhealthy_and_passes_once_stable() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    std::fs::write(s.fe.dir.join("busy"), "")?;
    let res = s
        .client
        .verify(pb::VerifyRequest {
            header: header("v1", 1),
            stable_ms: Some(200),
            timeout_ms: 800,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Failed, "{res:?}");
    assert!(res.message.contains("busy"), "{res:?}");
    std::fs::remove_file(s.fe.dir.join("busy"))?;
    std::fs::write(s.fe.dir.join("unhealthy"), "")?;
    let res = s
        .client
        .verify(pb::VerifyRequest {
            header: header("v2", 1),
            stable_ms: Some(200),
            timeout_ms: 800,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Failed, "{res:?}");
    assert!(res.message.contains("503"), "{res:?}");
    std::fs::remove_file(s.fe.dir.join("unhealthy"))?;
    let res = s
        .client
        .verify(pb::VerifyRequest {
            header: header("v3", 1),
            stable_ms: Some(200),
            timeout_ms: 5000,
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    Ok(())
}

#[tokio::test]
async fn stale_epoch_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let f = s
        .client
        .fence(pb::FenceRequest { epoch: 7 })
        .await?
        .into_inner();
    assert_eq!(f.epoch, 7);
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("old-leader-stop", 3),
        })
        .await
        .expect_err("stale epoch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("stale epoch 3") && err.message().contains("epoch 7"),
        "{err:?}"
    );
    let err = s
        .client
        .fence(pb::FenceRequest { epoch: 6 })
        .await
        .expect_err("stale fence");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Nothing changed: still serving, nothing journaled, epoch still 7.
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving
    );
    assert_eq!(h.epoch, 7);
    let err = s
        .client
        .operation_status(pb::OperationStatusRequest {
            operation_id: "old-leader-stop".into(),
        })
        .await
        .expect_err("not journaled");
    assert_eq!(err.code(), Code::NotFound);
    // The epoch is durable: still refused after a restart.
    s.agent.kill().await?;
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c1")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let err = c
        .stop(pb::StopRequest {
            header: header("old-leader-stop", 3),
        })
        .await
        .expect_err("stale after restart");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // A newer epoch is accepted and raises the fence.
    let res = c
        .stop(pb::StopRequest {
            header: header("new-leader-stop", 9),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded);
    assert_eq!(health(&mut c).await?.epoch, 9);
    Ok(())
}

#[tokio::test]
async fn repeated_operation_id_is_answered_from_the_journal_across_a_restart() -> anyhow::Result<()>
{
    let mut s = setup("1.0").await?;
    let (artifact, sha) = make_artifact(&s.root, "3.1")?;
    let res = s
        .client
        .stop(pb::StopRequest {
            header: header("plan1/fe-1/stop", 2),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded);
    let req = pb::InstallPatchRequest {
        header: header("plan1/fe-1/install", 2),
        artifact: artifact.display().to_string(),
        sha256: sha.clone(),
        version: "3.1".into(),
        timeout_ms: 0,
        ..Default::default()
    };
    let first = s.client.install_patch(req.clone()).await?.into_inner();
    assert_eq!(state(&first), pb::OperationState::Succeeded, "{first:?}");
    assert!(!first.replayed);

    // Same id again, same process: from the journal.
    let again = s.client.install_patch(req.clone()).await?.into_inner();
    assert!(again.replayed);
    assert_eq!(again.started_at_ms, first.started_at_ms);

    // Graceful restart of the agent (SIGTERM), then the same id once more.
    let status = s.agent.terminate().await?;
    assert!(
        status.success(),
        "agent exit status on SIGTERM: {status:?}\n{}",
        s.agent.log()
    );
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c2")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let after = c.install_patch(req.clone()).await?.into_inner();
    assert!(after.replayed, "{after:?}");
    assert_eq!(state(&after), pb::OperationState::Succeeded);
    assert_eq!(
        (after.started_at_ms, after.finished_at_ms),
        (first.started_at_ms, first.finished_at_ms)
    );
    assert_eq!(s.fe.installs(), vec!["3.1"], "installed exactly once");

    // And after a SIGKILL too; OperationStatus reads the same record.
    s.agent.kill().await?;
    s.agent.restart().await?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let st = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: "plan1/fe-1/install".into(),
        })
        .await?
        .into_inner();
    assert_eq!(state(&st), pb::OperationState::Succeeded);
    assert_eq!(st.version, "3.1");
    let after = c.install_patch(req).await?.into_inner();
    assert!(after.replayed);
    assert_eq!(s.fe.installs(), vec!["3.1"], "installed exactly once");
    // The same id with another kind is refused.
    let err = c
        .stop(pb::StopRequest {
            header: header("plan1/fe-1/install", 2),
        })
        .await
        .expect_err("kind mismatch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("install operation"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn only_coordinators_may_change_state() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    for (kind, name) in [(RoleKind::Operator, "alice"), (RoleKind::Agent, "fe-2")] {
        let tls = s.pki.issue(kind, name)?;
        let mut c = agent_client(s.agent.addr, &tls).await?;
        let err = c
            .stop(pb::StopRequest {
                header: header("sneaky", 1),
            })
            .await
            .expect_err("wrong role must be refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{kind}: {err:?}");
        assert!(err.message().contains("coordinator role"), "{err:?}");
        let err = c
            .fence(pb::FenceRequest { epoch: 99 })
            .await
            .expect_err("fence needs coordinator");
        assert_eq!(err.code(), Code::PermissionDenied);
        if kind == RoleKind::Operator {
            // Operators may read.
            health(&mut c).await?;
        }
    }
    // A certificate from another CA does not get a connection at all.
    let foreign = s.pki.foreign(RoleKind::Coordinator, "mallory")?;
    let res = async {
        let mut c = agent_client(s.agent.addr, &foreign).await?;
        c.stop(pb::StopRequest {
            header: header("sneaky", 1),
        })
        .await
        .map_err(anyhow::Error::from)
    }
    .await;
    assert!(res.is_err(), "a foreign-CA certificate must be refused");
    // An expired certificate likewise.
    let expired = s.pki.issue_with(
        RoleKind::Coordinator,
        "old",
        rollgate_common::pki::Validity {
            not_before_ago: Duration::from_secs(7200),
            not_after_in: None,
        },
    )?;
    let res = async {
        let mut c = agent_client(s.agent.addr, &expired).await?;
        c.stop(pb::StopRequest {
            header: header("sneaky", 1),
        })
        .await
        .map_err(anyhow::Error::from)
    }
    .await;
    assert!(res.is_err(), "an expired certificate must be refused");
    // Nothing changed.
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving
    );
    assert_eq!(h.epoch, 0);
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let err = s
        .client
        .stop(pb::StopRequest { header: None })
        .await
        .expect_err("no header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("missing header"), "{err:?}");
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("x", 0),
        })
        .await
        .expect_err("epoch 0");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("has space", 1),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let req = |artifact: &str, sha: &str, version: &str| pb::InstallPatchRequest {
        header: header("inst", 1),
        artifact: artifact.into(),
        sha256: sha.into(),
        version: version.into(),
        timeout_ms: 0,
        ..Default::default()
    };
    let stop = s
        .client
        .stop(pb::StopRequest {
            header: header("stop", 1),
        })
        .await?
        .into_inner();
    assert_eq!(state(&stop), pb::OperationState::Succeeded);
    let err = s
        .client
        .install_patch(req("/tmp/x", "abc", "2"))
        .await
        .expect_err("short sha");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("64 hex"), "{err:?}");
    // Outside artifact_dirs: refused before the file system is asked, so a caller learns
    // nothing about the file.
    let err = s
        .client
        .install_patch(req("/nonexistent/artifact", &"a".repeat(64), "2"))
        .await
        .expect_err("outside artifact_dirs");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("/nonexistent/artifact"), "{err:?}");
    assert!(err.message().contains("artifact_dirs"), "{err:?}");
    let missing = s.root.join("no-such-release.txt");
    let err = s
        .client
        .install_patch(req(missing.to_str().context("path")?, &"a".repeat(64), "2"))
        .await
        .expect_err("missing artifact");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains(missing.to_str().context("path")?),
        "{err:?}"
    );
    let err = s
        .client
        .install_patch(req("ftp://example/x", &"a".repeat(64), "2"))
        .await
        .expect_err("bad scheme");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .install_patch(req("/tmp/x", &"a".repeat(64), ""))
        .await
        .expect_err("no version");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .verify(pb::VerifyRequest {
            header: header("v", 1),
            stable_ms: Some(5000),
            timeout_ms: 100,
        })
        .await
        .expect_err("impossible verify");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .operation_status(pb::OperationStatusRequest {
            operation_id: "nope".into(),
        })
        .await
        .expect_err("unknown op");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"));
    // An oversized message is refused before it reaches the handler.
    let big = req("/tmp/x", &"a".repeat(64), &"v".repeat(1024 * 1024));
    let err = s.client.install_patch(big).await.expect_err("oversized");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    // Nothing changed beyond the stop.
    assert!(s.fe.installs().is_empty());
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Stopped
    );
    assert_eq!(h.installed_version, "1.0");
    Ok(())
}

#[tokio::test]
async fn watch_streams_changes_and_sigterm_exits_cleanly() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let mut stream = s.client.watch(pb::WatchRequest {}).await?.into_inner();
    let first = stream.message().await?.context("first report")?;
    assert_eq!(first.server_id, "fe-1");
    let mut c = s.client.clone();
    c.stop(pb::StopRequest {
        header: header("stop", 4),
    })
    .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let stopped = loop {
        let r = tokio::time::timeout_at(deadline, stream.message())
            .await??
            .context("watch stream ended")?;
        if r.state == pb::ServiceState::Stopped as i32 {
            break r;
        }
    };
    assert_eq!(stopped.epoch, 4);
    assert_eq!(
        stopped.last_operation.map(|o| o.operation_id),
        Some("stop".into())
    );
    // SIGTERM with a watcher attached: the agent still exits, cleanly and promptly.
    let status = s.agent.terminate().await?;
    assert!(status.success(), "{status:?}\n{}", s.agent.log());
    Ok(())
}

#[tokio::test]
async fn an_install_cut_short_by_an_agent_crash_is_not_installed_twice() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (artifact, sha) = make_artifact(&s.root, "4.0")?;
    let res = s
        .client
        .stop(pb::StopRequest {
            header: header("stop", 1),
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded);
    // The install command writes the new version, then lingers: the agent dies meanwhile.
    std::fs::write(s.fe.dir.join("slow-install"), "3000")?;
    let req = pb::InstallPatchRequest {
        header: header("crash/install", 1),
        artifact: artifact.display().to_string(),
        sha256: sha,
        version: "4.0".into(),
        timeout_ms: 0,
        ..Default::default()
    };
    let mut c = s.client.clone();
    let pending = tokio::spawn({
        let req = req.clone();
        async move { c.install_patch(req).await }
    });
    let fe = s.fe.clone();
    eventually(
        "the install command to have written the new version",
        WAIT,
        || {
            let fe = fe.clone();
            async move { (fe.installs() == vec!["4.0"]).then_some(()) }
        },
    )
    .await?;
    s.agent.kill().await?;
    assert!(pending.await?.is_err(), "the caller loses its connection");
    std::fs::remove_file(s.fe.dir.join("slow-install"))?;
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c1")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let st = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: "crash/install".into(),
        })
        .await?
        .into_inner();
    assert_eq!(state(&st), pb::OperationState::Interrupted, "{st:?}");
    // The same operation again (what a coordinator does): the agent sees 4.0 is in place.
    let again = c.install_patch(req).await?.into_inner();
    assert_eq!(state(&again), pb::OperationState::Succeeded, "{again:?}");
    assert_eq!(again.attempt, 2);
    assert!(again.output.contains("already installed"), "{again:?}");
    assert_eq!(s.fe.installs(), vec!["4.0"], "installed exactly once");
    assert_eq!(health(&mut c).await?.installed_version, "4.0");
    Ok(())
}

#[tokio::test]
async fn an_agent_whose_journal_lost_its_final_newline_starts_and_keeps_journaling(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header("stop-1", 1),
            })
            .await?
            .into_inner(),
    )?;
    let status = s.agent.terminate().await?;
    ensure!(status.success(), "agent exit on SIGTERM: {status:?}");
    // What a crash between writing the last record and writing its newline leaves behind.
    let journal = s.agent.state_dir.join("journal.jsonl");
    let mut bytes = std::fs::read(&journal)?;
    ensure!(
        bytes.pop() == Some(b'\n'),
        "the journal should end with a newline"
    );
    std::fs::write(&journal, &bytes)?;

    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c2")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    // The unterminated end record was cut: the stop reads back as interrupted, as after a crash
    // before its end was written.
    let st = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: "stop-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(state(&st), pb::OperationState::Interrupted, "{st:?}");
    // A new record goes on a line of its own: the agent starts again afterwards and knows it.
    succeeded(
        &c.restart(pb::RestartRequest {
            header: header("start-1", 1),
            ..Default::default()
        })
        .await?
        .into_inner(),
    )?;
    let status = s.agent.terminate().await?;
    ensure!(status.success(), "agent exit on SIGTERM: {status:?}");
    s.agent
        .restart()
        .await
        .with_context(|| format!("agent did not start again:\n{}", s.agent.log()))?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let st = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: "start-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(state(&st), pb::OperationState::Succeeded, "{st:?}");
    wait_for_state(&c, pb::ServiceState::Serving).await?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    Ok(())
}

async fn wait_for_connections(c: &AgentClient<Channel>, n: u32) -> anyhow::Result<()> {
    eventually(
        &format!("the agent to count {n} active connection(s)"),
        WAIT,
        || {
            let mut c = c.clone();
            async move {
                health(&mut c)
                    .await
                    .ok()
                    .filter(|h| h.active_connections == n)
                    .map(|_| ())
            }
        },
    )
    .await
}

async fn wait_for_state(
    c: &AgentClient<Channel>,
    want: pb::ServiceState,
) -> anyhow::Result<pb::HealthReport> {
    eventually(&format!("the agent to report {want:?}"), WAIT, || {
        let mut c = c.clone();
        async move { health(&mut c).await.ok().filter(|h| h.state == want as i32) }
    })
    .await
}

/// Waits until the journal holds `id` with `epoch` (and returns the record).
async fn wait_for_op_epoch(
    c: &AgentClient<Channel>,
    id: &str,
    epoch: u64,
) -> anyhow::Result<pb::OperationResult> {
    eventually(
        &format!("operation {id} to be journaled with epoch {epoch}"),
        WAIT,
        || {
            let mut c = c.clone();
            let id = id.to_owned();
            async move {
                c.operation_status(pb::OperationStatusRequest { operation_id: id })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
                    .filter(|r| r.epoch == epoch)
            }
        },
    )
    .await
}

fn detail(err: &tonic::Status) -> anyhow::Result<pb::AgentErrorDetail> {
    pb::AgentErrorDetail::from_status(err)
        .with_context(|| format!("no AgentErrorDetail in {err:?}"))
}

async fn not_journaled(c: &mut AgentClient<Channel>, id: &str) -> anyhow::Result<()> {
    let err = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: id.into(),
        })
        .await
        .expect_err("must not be journaled");
    ensure!(err.code() == Code::NotFound, "{id}: {err:?}");
    Ok(())
}

fn succeeded(res: &pb::OperationResult) -> anyhow::Result<()> {
    ensure!(
        state(res) == pb::OperationState::Succeeded,
        "expected success: {res:?}"
    );
    Ok(())
}

/// Stop, install `version` through the agent, restart: the front end serves `version`.
async fn upgrade(s: &mut Setup, version: &str, epoch: u64) -> anyhow::Result<String> {
    let (artifact, sha) = make_artifact(&s.root, version)?;
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header(&format!("up-{version}/stop"), epoch),
            })
            .await?
            .into_inner(),
    )?;
    succeeded(
        &s.client
            .install_patch(pb::InstallPatchRequest {
                header: header(&format!("up-{version}/install"), epoch),
                artifact: artifact.display().to_string(),
                sha256: sha.clone(),
                version: version.into(),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    succeeded(
        &s.client
            .restart(pb::RestartRequest {
                header: header(&format!("up-{version}/restart"), epoch),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    ensure!(ask(&mut r, &mut w, "VERSION").await? == version);
    Ok(sha)
}

#[tokio::test]
async fn a_newer_epoch_adopts_a_running_drain_instead_of_failing_it() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (mut r1, mut w1) = connect(s.fe.port).await?;
    let (mut r2, mut w2) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r1, &mut w1, "VERSION").await?, "1.0");
    assert_eq!(ask(&mut r2, &mut w2, "VERSION").await?, "1.0");
    wait_for_connections(&s.client, 2).await?;
    let id = "plan-1/fe-1/drain";
    let drain = |epoch| pb::DrainRequest {
        header: header(id, epoch),
        timeout_ms: 30_000,
        on_timeout: pb::DrainTimeoutAction::Fail as i32,
    };
    let mut c = s.client.clone();
    let first = tokio::spawn(async move { c.drain(drain(1)).await });
    wait_for_state(&s.client, pb::ServiceState::Draining).await?;
    let port = s.fe.port;
    eventually("new connections to be refused", WAIT, || async move {
        refuses_new_connections(port).await.then_some(())
    })
    .await?;

    // A new leader fences, then repeats the step it found running, under its own epoch.
    let f = s
        .client
        .fence(pb::FenceRequest { epoch: 2 })
        .await?
        .into_inner();
    assert_eq!(f.epoch, 2);
    let mut c = s.client.clone();
    let second = tokio::spawn(async move { c.drain(drain(2)).await });
    let running = wait_for_op_epoch(&s.client, id, 2).await?;
    assert_eq!(state(&running), pb::OperationState::Running, "{running:?}");
    assert!(
        !first.is_finished() && !second.is_finished(),
        "the drain must keep waiting for the open connections"
    );
    // The drain goes on: open connections still work.
    assert_eq!(ask(&mut r1, &mut w1, "still here").await?, "still here");
    assert_eq!(ask(&mut r2, &mut w2, "VERSION").await?, "1.0");
    drop((r1, w1));
    drop((r2, w2));
    let a = tokio::time::timeout(WAIT, first).await???.into_inner();
    let b = tokio::time::timeout(WAIT, second).await???.into_inner();
    for res in [&a, &b] {
        succeeded(res)?;
        assert!(res.message.contains("drained"), "{res:?}");
        assert_eq!(
            res.epoch, 2,
            "the record carries the adopter's epoch: {res:?}"
        );
        assert_eq!(res.attempt, 1, "one run, not two: {res:?}");
    }
    assert_eq!(a.started_at_ms, b.started_at_ms, "the same run");

    // The adoption is journaled, and replayed after an agent restart.
    let journal = std::fs::read_to_string(s.agent.state_dir.join("journal.jsonl"))?;
    let adopted = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| v["event"] == "adopt" && v["id"] == id && v["epoch"] == 2);
    assert!(adopted, "no adopt line in the journal:\n{journal}");
    s.agent.kill().await?;
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c2")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let st = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: id.into(),
        })
        .await?
        .into_inner();
    succeeded(&st)?;
    assert_eq!(st.epoch, 2, "{st:?}");
    Ok(())
}

#[tokio::test]
async fn a_newer_epoch_adopts_a_running_verify() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    std::fs::write(s.fe.dir.join("busy"), "")?;
    let id = "plan-1/fe-1/verify";
    let verify = |epoch| pb::VerifyRequest {
        header: header(id, epoch),
        stable_ms: Some(300),
        timeout_ms: 15_000,
    };
    let mut c = s.client.clone();
    let first = tokio::spawn(async move { c.verify(verify(1)).await });
    wait_for_op_epoch(&s.client, id, 1).await?;
    s.client.fence(pb::FenceRequest { epoch: 3 }).await?;
    let mut c = s.client.clone();
    let second = tokio::spawn(async move { c.verify(verify(3)).await });
    let running = wait_for_op_epoch(&s.client, id, 3).await?;
    assert_eq!(state(&running), pb::OperationState::Running, "{running:?}");
    assert!(
        !first.is_finished(),
        "a raised epoch must not end the verify"
    );
    std::fs::remove_file(s.fe.dir.join("busy"))?;
    let a = tokio::time::timeout(WAIT, first).await???.into_inner();
    let b = tokio::time::timeout(WAIT, second).await???.into_inner();
    for res in [&a, &b] {
        succeeded(res)?;
        assert_eq!(res.epoch, 3, "{res:?}");
    }
    Ok(())
}

#[tokio::test]
async fn installing_the_installed_version_again_keeps_the_real_previous_version(
) -> anyhow::Result<()> {
    let mut s = setup("0.9").await?;
    let (a1, sha1) = make_artifact(&s.root, "1.0")?;
    let (a2, sha2) = make_artifact(&s.root, "2.0")?;
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header("stop", 1),
            })
            .await?
            .into_inner(),
    )?;
    for (id, artifact, sha, version) in [
        ("i-1.0", &a1, &sha1, "1.0"),
        ("i-2.0", &a2, &sha2, "2.0"),
        // The same version again under a new id (e.g. a second plan): nothing to rotate.
        ("i-2.0-again", &a2, &sha2, "2.0"),
    ] {
        let res = s
            .client
            .install_patch(pb::InstallPatchRequest {
                header: header(id, 1),
                artifact: artifact.display().to_string(),
                sha256: sha.clone(),
                version: version.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        succeeded(&res)?;
        assert_eq!(res.version, version);
    }
    let res = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb", 1),
            from_version: "2.0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    succeeded(&res)?;
    assert_eq!(res.version, "1.0", "rollback must return to 1.0: {res:?}");
    assert_eq!(s.fe.installs(), vec!["1.0", "2.0", "2.0", "1.0"]);
    succeeded(
        &s.client
            .restart(pb::RestartRequest {
                header: header("restart", 1),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    Ok(())
}

#[tokio::test]
async fn install_prepare_only_fetches_and_verifies_without_touching_the_service(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (artifact, sha) = make_artifact(&s.root, "2.0")?;
    s.client.fence(pb::FenceRequest { epoch: 5 }).await?;
    let prepare = |id: &str, epoch: u64, sha: &str| pb::InstallPatchRequest {
        header: header(id, epoch),
        artifact: artifact.display().to_string(),
        sha256: sha.into(),
        version: "2.0".into(),
        prepare_only: true,
        ..Default::default()
    };
    // A bad artifact is found while the service still serves.
    let err = s
        .client
        .install_patch(prepare("prep-bad", 5, &"0".repeat(64)))
        .await
        .expect_err("wrong checksum");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::Artifact
    );
    let err = s
        .client
        .install_patch(prepare("prep-old", 4, &sha))
        .await
        .expect_err("stale epoch");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::StaleEpoch,
        "{err:?}"
    );
    let res = s
        .client
        .install_patch(prepare("prep", 6, &sha))
        .await?
        .into_inner();
    succeeded(&res)?;
    assert!(!res.replayed);
    assert!(
        s.agent.state_dir.join("artifacts").join(&sha).is_file(),
        "the verified artifact must be in the cache"
    );
    // The service was not touched, nothing was journaled, the epoch was not raised.
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    assert!(s.fe.installs().is_empty());
    not_journaled(&mut s.client, "prep").await?;
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving
    );
    assert_eq!(h.epoch, 5, "prepare_only must not raise the epoch");
    Ok(())
}

#[tokio::test]
async fn rollback_of_a_first_managed_upgrade_needs_a_rollback_artifact() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    // 1.0 was installed outside rollgate: the agent has no artifact of it.
    let (a1, sha1) = make_artifact(&s.root, "1.0")?;
    upgrade(&mut s, "2.0", 1).await?;
    let err = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb-prep", 1),
            from_version: "2.0".into(),
            prepare_only: true,
            ..Default::default()
        })
        .await
        .expect_err("no previous artifact, no fallback");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::Precondition
    );
    assert!(
        err.message().contains("1.0")
            && err.message().contains("rollback artifact")
            && !err.message().contains('\n'),
        "{err:?}"
    );
    // The check took nothing down.
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "2.0");
    drop((r, w));
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Serving
    );
    not_journaled(&mut s.client, "rb-prep").await?;

    // The real rollback without a fallback is refused the same way; with one, it uses it.
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header("stop", 1),
            })
            .await?
            .into_inner(),
    )?;
    let rollback = |fallback: Option<(&std::path::Path, &str)>| pb::RollbackRequest {
        header: header("rb", 1),
        from_version: "2.0".into(),
        fallback_artifact: fallback
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default(),
        fallback_sha256: fallback.map(|(_, s)| s.to_owned()).unwrap_or_default(),
        ..Default::default()
    };
    let err = s
        .client
        .rollback(rollback(None))
        .await
        .expect_err("no previous artifact");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::Precondition
    );
    assert!(err.message().contains("rollback artifact"), "{err:?}");
    let res = s
        .client
        .rollback(rollback(Some((&a1, &sha1))))
        .await?
        .into_inner();
    succeeded(&res)?;
    assert_eq!(res.version, "1.0");
    succeeded(
        &s.client
            .restart(pb::RestartRequest {
                header: header("restart", 1),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    assert_eq!(s.fe.installs(), vec!["2.0", "1.0"]);
    Ok(())
}

#[tokio::test]
async fn rollback_prepare_with_a_fallback_makes_the_real_rollback_possible() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (a1, sha1) = make_artifact(&s.root, "1.0")?;
    let sha2 = upgrade(&mut s, "2.0", 1).await?;
    let h = health(&mut s.client).await?;
    assert_eq!(h.installed_sha256, sha2);
    assert_eq!(h.previous_version, "1.0");
    let prepare = |sha: &str| pb::RollbackRequest {
        header: header("rb-prep", 1),
        from_version: "2.0".into(),
        prepare_only: true,
        fallback_artifact: a1.display().to_string(),
        fallback_sha256: sha.into(),
        ..Default::default()
    };
    let err = s
        .client
        .rollback(prepare(&"0".repeat(64)))
        .await
        .expect_err("a fallback that does not verify");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::Artifact,
        "{err:?}"
    );
    let res = s.client.rollback(prepare(&sha1)).await?.into_inner();
    succeeded(&res)?;
    assert!(!res.replayed);
    not_journaled(&mut s.client, "rb-prep").await?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "2.0");
    drop((r, w));

    // The plan goes on as usual: drain, rollback (no fallback needed now), restart.
    succeeded(
        &s.client
            .drain(pb::DrainRequest {
                header: header("drain", 1),
                timeout_ms: 10_000,
                on_timeout: pb::DrainTimeoutAction::Fail as i32,
            })
            .await?
            .into_inner(),
    )?;
    let res = s
        .client
        .rollback(pb::RollbackRequest {
            header: header("rb", 1),
            from_version: "2.0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    succeeded(&res)?;
    assert_eq!(res.version, "1.0");
    succeeded(
        &s.client
            .restart(pb::RestartRequest {
                header: header("restart", 1),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    let h = health(&mut s.client).await?;
    assert_eq!(
        (h.installed_version.as_str(), h.installed_sha256.as_str()),
        ("1.0", sha1.as_str())
    );
    assert_eq!(h.previous_version, "2.0");
    Ok(())
}

#[tokio::test]
async fn restart_with_drain_if_accepting_drains_first_and_never_cuts_a_connection(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    wait_for_connections(&s.client, 1).await?;
    let restart = |id: &str, drain_timeout_ms| pb::RestartRequest {
        header: header(id, 1),
        drain_if_accepting: true,
        drain_timeout_ms,
        ..Default::default()
    };
    let mut c = s.client.clone();
    let req = restart("restart-1", 10_000);
    let pending = tokio::spawn(async move { c.restart(req).await });
    let port = s.fe.port;
    eventually("new connections to be refused", WAIT, || async move {
        refuses_new_connections(port).await.then_some(())
    })
    .await?;
    // The held connection is still served while the restart waits for it.
    assert_eq!(ask(&mut r, &mut w, "still here").await?, "still here");
    assert!(
        !pending.is_finished(),
        "the restart must wait for the open connection"
    );
    drop((r, w));
    let res = tokio::time::timeout(WAIT, pending).await???.into_inner();
    succeeded(&res)?;
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    wait_for_state(&s.client, pb::ServiceState::Serving).await?;

    // Connections that outlive the drain timeout: the restart fails and cuts nothing.
    wait_for_connections(&s.client, 1).await?;
    let res = s
        .client
        .restart(restart("restart-2", 300))
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Failed, "{res:?}");
    assert!(still_open(&res)? >= 1, "{res:?}");
    assert_eq!(ask(&mut r, &mut w, "alive").await?, "alive");
    let h = health(&mut s.client).await?;
    assert_eq!(
        pb::ServiceState::try_from(h.state)?,
        pb::ServiceState::Draining
    );
    Ok(())
}

#[tokio::test]
async fn refusals_carry_a_typed_error_detail() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    s.client.fence(pb::FenceRequest { epoch: 7 }).await?;
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("old", 3),
        })
        .await
        .expect_err("stale epoch");
    let d = detail(&err)?;
    assert_eq!(d.reason_or_unspecified(), pb::AgentErrorReason::StaleEpoch);
    assert_eq!(d.current_epoch, 7);
    assert!(!d.retryable);

    let err = s
        .client
        .stop(pb::StopRequest { header: None })
        .await
        .expect_err("no header");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::InvalidArgument
    );
    let err = s
        .client
        .operation_status(pb::OperationStatusRequest {
            operation_id: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::UnknownOperation
    );

    // Busy names the running operation and may be retried.
    let (mut r, mut w) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r, &mut w, "VERSION").await?, "1.0");
    wait_for_connections(&s.client, 1).await?;
    let mut c = s.client.clone();
    let drain = tokio::spawn(async move {
        c.drain(pb::DrainRequest {
            header: header("d1", 7),
            timeout_ms: 30_000,
            on_timeout: pb::DrainTimeoutAction::Fail as i32,
        })
        .await
    });
    wait_for_op_epoch(&s.client, "d1", 7).await?;
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("s1", 7),
        })
        .await
        .expect_err("busy");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let d = detail(&err)?;
    assert_eq!(d.reason_or_unspecified(), pb::AgentErrorReason::Busy);
    assert_eq!(d.running_operation_id, "d1");
    assert!(d.retryable);
    drop((r, w));
    succeeded(&tokio::time::timeout(WAIT, drain).await???.into_inner())?;

    // The same id as another kind is a kind mismatch.
    let err = s
        .client
        .stop(pb::StopRequest {
            header: header("d1", 7),
        })
        .await
        .expect_err("kind mismatch");
    assert_eq!(
        detail(&err)?.reason_or_unspecified(),
        pb::AgentErrorReason::KindMismatch
    );
    Ok(())
}

#[tokio::test]
async fn health_reports_the_limits_and_fetch_timeout_bounds_a_download() -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let h = health(&mut s.client).await?;
    // From the test config: hook, drain and verify limits set, the others default.
    assert_eq!(
        h.limits,
        Some(pb::AgentLimits {
            hook_timeout_ms: 20_000,
            install_timeout_ms: 600_000,
            start_timeout_ms: 60_000,
            fetch_timeout_ms: 600_000,
            drain_timeout_ms: 20_000,
            verify_timeout_ms: 10_000,
        })
    );

    // A download that stalls is cut at fetch_timeout, as a retryable artifact error.
    let mut text = std::fs::read_to_string(&s.agent.config)?;
    text.push_str("fetch_timeout = \"500ms\"\n");
    std::fs::write(&s.agent.config, text)?;
    s.agent.kill().await?;
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c2")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let h = health(&mut c).await?;
    assert_eq!(h.limits.map(|l| l.fetch_timeout_ms), Some(500));
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/release-2.0.txt", stalled.local_addr()?);
    // Accepts and never answers; the held sockets live as long as the task.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = stalled.accept().await {
            held.push(sock);
        }
    });
    let started = tokio::time::Instant::now();
    let err = c
        .install_patch(pb::InstallPatchRequest {
            header: header("slow", 1),
            artifact: url,
            sha256: "a".repeat(64),
            version: "2.0".into(),
            ..Default::default()
        })
        .await
        .expect_err("a stalled download");
    server.abort();
    assert!(started.elapsed() < Duration::from_secs(10), "{err:?}");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("fetch_timeout"), "{err:?}");
    let d = detail(&err)?;
    assert_eq!(d.reason_or_unspecified(), pb::AgentErrorReason::Artifact);
    assert!(d.retryable);
    not_journaled(&mut c, "slow").await?;
    let leftovers: Vec<_> = std::fs::read_dir(s.agent.state_dir.join("artifacts"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

/// grpc.health.v1's overall status speaks for the front end, so a load balancer that asks it
/// stops sending new clients the moment a drain is admitted, not at the next probe.
#[tokio::test]
async fn grpc_health_is_not_serving_from_the_moment_a_drain_starts() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let s = setup("1.0").await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c1")?;
    let ch = rollgate_tests::channel(s.agent.addr, &coord).await?;
    let lb = HealthClient::new(ch);
    let status = |svc: &str| {
        let mut lb = lb.clone();
        let service = svc.to_owned();
        async move {
            lb.check(HealthCheckRequest { service })
                .await
                .ok()
                .map(|r| r.into_inner().status)
        }
    };
    eventually("the front end to be reported serving", WAIT, || async {
        (status("").await == Some(ServingStatus::Serving as i32)).then_some(())
    })
    .await?;
    // A client holds a connection, so the drain waits, and its hook is slow to matter: the
    // status must change while the drain is still running.
    let (mut r1, mut w1) = connect(s.fe.port).await?;
    assert_eq!(ask(&mut r1, &mut w1, "VERSION").await?, "1.0");
    let mut c = s.client.clone();
    let drain = tokio::spawn(async move {
        c.drain(pb::DrainRequest {
            header: header("drain-1", 1),
            timeout_ms: 30_000,
            on_timeout: pb::DrainTimeoutAction::Fail as i32,
        })
        .await
    });
    eventually(
        "grpc.health to say NOT_SERVING during the drain",
        WAIT,
        || async { (status("").await == Some(ServingStatus::NotServing as i32)).then_some(()) },
    )
    .await?;
    assert!(
        !drain.is_finished(),
        "the drain waits for the open connection"
    );
    // The agent's own API stays up: it is what finishes the drain.
    assert_eq!(
        status("rollgate.agent.v1.Agent").await,
        Some(ServingStatus::Serving as i32)
    );
    drop((r1, w1));
    let res = tokio::time::timeout(WAIT, drain).await???.into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    assert_eq!(status("").await, Some(ServingStatus::NotServing as i32));
    // Back in service after restart: SERVING again.
    let res = s
        .client
        .clone()
        .restart(pb::RestartRequest {
            header: header("restart-1", 1),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state(&res), pb::OperationState::Succeeded, "{res:?}");
    eventually(
        "the front end to be reported serving again",
        WAIT,
        || async { (status("").await == Some(ServingStatus::Serving as i32)).then_some(()) },
    )
    .await?;
    Ok(())
}

fn mode_of(path: &std::path::Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

#[tokio::test]
async fn the_state_dir_is_private_and_one_others_can_write_is_refused_at_start(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let dir = s.agent.state_dir.clone();
    // The harness created it with the default umask (0755); the agent made it private.
    assert_eq!(mode_of(&dir)?, 0o700);
    assert_eq!(mode_of(&dir.join("artifacts"))?, 0o700);
    let (artifact, sha) = make_artifact(&s.root, "2.0")?;
    s.client.fence(pb::FenceRequest { epoch: 2 }).await?;
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header("stop", 2),
            })
            .await?
            .into_inner(),
    )?;
    succeeded(
        &s.client
            .install_patch(pb::InstallPatchRequest {
                header: header("install", 2),
                artifact: artifact.display().to_string(),
                sha256: sha.clone(),
                version: "2.0".into(),
                ..Default::default()
            })
            .await?
            .into_inner(),
    )?;
    let agent_files = [
        dir.join("journal.jsonl"),
        dir.join("epoch"),
        dir.join("service.json"),
        dir.join("agent.addr"),
        dir.join("artifacts").join(&sha),
    ];
    for f in &agent_files {
        assert_eq!(mode_of(f)?, 0o600, "{}", f.display());
    }
    ensure!(s.agent.terminate().await?.success(), "{}", s.agent.log());

    for mode in [0o777, 0o775, 0o757, 0o1777] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
        let mut cmd = rollgate_tests::owner::tied_tokio(rollgate_tests::bin("rollgate-agent")?)?;
        cmd.arg("run")
            .arg("--config")
            .arg(&s.agent.config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = rollgate_tests::owner::spawn_tokio(cmd)?;
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .context("the agent must exit at once on an unsafe state dir")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mode {mode:o}: started: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .with_context(|| format!("no error line: {stderr}"))?;
        for needle in [
            dir.display().to_string(),
            format!("{mode:04o}"),
            "writable by".into(),
            "chmod 700".into(),
        ] {
            assert!(line.contains(&needle), "{needle:?} not in {line:?}");
        }
        // Refused, not repaired: the operator decides after looking at it.
        assert_eq!(mode_of(&dir)?, mode);
    }
    // Made private again, it starts, with its journal intact.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    s.agent.restart().await?;
    let coord = s.pki.issue(RoleKind::Coordinator, "c2")?;
    let mut c = agent_client(s.agent.addr, &coord).await?;
    let op = c
        .operation_status(pb::OperationStatusRequest {
            operation_id: "install".into(),
        })
        .await?
        .into_inner();
    succeeded(&op)?;
    Ok(())
}

/// A real HTTP server on 127.0.0.1 serving `body` to every GET, counting the requests.
async fn serve_http(
    body: Vec<u8>,
) -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
)> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (body, counter) = (body.clone(), counter.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    Ok((addr, count, task))
}

#[tokio::test]
async fn a_retried_install_uses_the_verified_cache_and_errors_hide_url_secrets(
) -> anyhow::Result<()> {
    let mut s = setup("1.0").await?;
    let (artifact, sha) = make_artifact(&s.root, "2.0")?;
    let (addr, requests, server) = serve_http(std::fs::read(&artifact)?).await?;
    let url = format!("http://user:secret@{addr}/release-2.0.txt?sig=XYZ");
    let prepare = |id: &str, sha: &str| pb::InstallPatchRequest {
        header: header(id, 1),
        artifact: url.clone(),
        sha256: sha.into(),
        version: "2.0".into(),
        prepare_only: true,
        ..Default::default()
    };
    // A checksum mismatch of a download: its URL is shown without its secrets.
    let err = s
        .client
        .install_patch(prepare("bad", &"0".repeat(64)))
        .await
        .expect_err("wrong checksum");
    for leak in ["secret", "XYZ"] {
        assert!(!err.message().contains(leak), "{leak}: {err:?}");
    }
    assert!(
        err.message().contains(&format!("{addr}/release-2.0.txt")),
        "{err:?}"
    );
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Prepared once, then the real install (a retry of the same artifact) uses the cache.
    succeeded(
        &s.client
            .install_patch(prepare("p1", &sha))
            .await?
            .into_inner(),
    )?;
    succeeded(
        &s.client
            .install_patch(prepare("p2", &sha))
            .await?
            .into_inner(),
    )?;
    succeeded(
        &s.client
            .stop(pb::StopRequest {
                header: header("stop", 1),
            })
            .await?
            .into_inner(),
    )?;
    let res = s
        .client
        .install_patch(pb::InstallPatchRequest {
            prepare_only: false,
            ..prepare("install", &sha)
        })
        .await?
        .into_inner();
    succeeded(&res)?;
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one download for the bad digest, one for the good: the rest from the cache"
    );
    assert_eq!(s.fe.installs(), ["2.0"]);
    // The URL's secrets are not in the agent's log or journal either.
    server.abort();
    let journal = std::fs::read_to_string(s.agent.state_dir.join("journal.jsonl"))?;
    for text in [journal, s.agent.log()] {
        assert!(!text.contains("secret") && !text.contains("XYZ"), "{text}");
    }
    Ok(())
}
