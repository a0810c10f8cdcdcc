//! Lost-agent detection (B11) through the coordinator's live inventory and real agents: an
//! agent that hangs with its connection open is lost within 3 s, and one whose probe is
//! slower than `lost_after` is not (its heartbeat does not wait for the probe).

use anyhow::Context;
use rollgate_common::tls::RoleKind;
use rollgate_coordinator::agent_tls::AgentTls;
use rollgate_coordinator::config::PoolSpec;
use rollgate_coordinator::inventory::Inventory;
use rollgate_coordinator::link::AgentLink;
use rollgate_coordinator::readiness::{Clocks, PoolReadiness, ServerState};
use rollgate_tests::{AgentProc, FrontEnd, Pki};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The coordinator's default.
const LOST_AFTER: Duration = Duration::from_millis(2_500);

fn state_of(r: &PoolReadiness, server: &str) -> Option<ServerState> {
    r.domains
        .iter()
        .flat_map(|d| &d.servers)
        .find(|s| s.server == server)
        .map(|s| s.state)
}

fn signal(agent: &AgentProc, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    let pid = agent.pid().context("agent not running")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), sig)?;
    Ok(())
}

/// Resumes the frozen agent whatever the test's outcome, so that it can shut down.
struct Thaw<'a>(&'a AgentProc);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        let _ = signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_lost_within_3s_and_one_with_a_slow_probe_never_is() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let pki = Pki::new(root)?;
    let mut agents = Vec::new();
    let mut fes = Vec::new();
    for (id, domain) in [("fe-hung", "ud-1"), ("fe-slow", "ud-2")] {
        let fe = FrontEnd::create(root, id, "1.0")?;
        fe.start()?;
        let tls = pki.issue(RoleKind::Agent, id)?;
        let (config, state_dir) = AgentProc::write_config(root, id, "p", domain, &tls, &fe)?;
        if id == "fe-slow" {
            // Every probe takes 3 s, longer than lost_after: only a heartbeat that does not
            // wait for it keeps this agent counted.
            let text = std::fs::read_to_string(&config)?;
            let busy = text
                .lines()
                .find(|l| l.starts_with("busy_command"))
                .context("no busy_command in the agent config")?;
            let text = text.replace(
                busy,
                "busy_command = [\"/bin/sh\", \"-c\", \"sleep 3; exit 1\"]\nprobe_timeout = \"10s\"",
            );
            std::fs::write(&config, text)?;
        }
        agents.push(AgentProc::spawn(config, state_dir).await?);
        fes.push(fe);
    }
    let coord = AgentTls::from_files(&pki.issue(RoleKind::Coordinator, "c1")?)?;
    let inv = Arc::new(Inventory::new(
        &[
            ("fe-hung".into(), agents[0].addr.to_string()),
            ("fe-slow".into(), agents[1].addr.to_string()),
        ],
        Some(coord),
    )?);
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    inv.watch_all(
        &tasks,
        &stop,
        rollgate_coordinator::inventory::line_idle(LOST_AFTER),
    );
    {
        let (inv, stop) = (Arc::clone(&inv), stop.clone());
        tasks.spawn(async move { inv.expire_loop(LOST_AFTER, &stop).await });
    }
    let spec = PoolSpec {
        name: "p".into(),
        domains: vec![
            ("ud-1".into(), vec!["fe-hung".into()]),
            ("ud-2".into(), vec!["fe-slow".into()]),
        ],
        min_active: 0,
        paired_pool: None,
    };
    let none = BTreeSet::new();
    let clocks = || Clocks {
        now_ms: inv.now_ms(),
        lost_after_ms: 2_500,
        stabilization_ms: 0,
    };
    let look = |rows: bool| inv.readiness(&spec, clocks(), &none, false, rows);
    rollgate_tests::eventually("both agents serving", Duration::from_secs(15), || {
        let r = look(true);
        async move { (r.active == 2).then_some(()) }
    })
    .await
    .with_context(|| format!("{:?}\n{}", look(true), agents[1].log()))?;
    // Their health came over the report line: no gRPC connection was made to either.
    assert_eq!(inv.step_clients(), 0, "a gRPC client was made for health");

    let thaw = Thaw(&agents[0]);
    signal(&agents[0], nix::sys::signal::Signal::SIGSTOP)?;
    let frozen = Instant::now();
    let mut lost_after = None;
    // Watched for 5 s: more than one slow probe plus lost_after, so that an agent reporting
    // only when its probe ends would be seen lost.
    let watch_until = frozen + Duration::from_secs(5);
    while Instant::now() < watch_until {
        // One instant for both views, so that they judge the same silence.
        let now = clocks();
        let rows = inv.readiness(&spec, now, &none, false, true);
        let gate = inv.readiness(&spec, now, &none, false, false);
        let slow = state_of(&rows, "fe-slow");
        assert_eq!(
            slow,
            Some(ServerState::Serving),
            "the agent with a slow probe looked {slow:?} {:.1}s after the freeze: {rows:?}",
            frozen.elapsed().as_secs_f64()
        );
        let hung = state_of(&rows, "fe-hung");
        if hung == Some(ServerState::Lost) && lost_after.is_none() {
            lost_after = Some(frozen.elapsed());
        }
        let want = if hung == Some(ServerState::Lost) {
            1
        } else {
            2
        };
        assert_eq!(gate.active, rows.active, "counters and rows disagree");
        assert_eq!(rows.active, want);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(thaw);
    stop.cancel();
    tasks.close();
    let lost_after = lost_after.context("the frozen agent was never counted lost in 5 s")?;
    assert!(
        lost_after <= Duration::from_secs(3),
        "the frozen agent took {lost_after:?} to count as lost"
    );
    eprintln!("frozen agent lost after {lost_after:?}");
    Ok(())
}
