//! Nothing a test starts outlives the test process, even one killed with SIGKILL (a runner's
//! timeout, `panic = "abort"`): no `Drop` runs then, so the processes must go by themselves.
//!
//! The test runs a helper (this same test binary, running the ignored test below) that starts
//! what tests start: a sample front end started by the harness, one started by an agent's hook
//! (so by a grandchild, daemonised), the agent, a coordinator, an etcd member and a headless
//! Chromium with its helper processes. Then it SIGKILLs the helper and waits, with a deadline,
//! until every one of them is gone and the front ends' ports refuse connections.

use anyhow::{bail, ensure, Context, Result};
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as apb;
use rollgate_tests::cluster::CoordinatorProc;
use rollgate_tests::owner::{self, ProcessId};
use rollgate_tests::{agent_client, eventually, AgentProc, FrontEnd, Pki};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Set for the helper: the directory it works in.
const HELPER_ENV: &str = "ROLLGATE_LIFETIME_HELPER_DIR";
const HELPER_TEST: &str = "lifetime::helper_starts_processes_then_waits_to_be_killed";
/// What the helper writes once everything runs.
const REPORT: &str = "started.json";

fn sample_pid(fe: &FrontEnd) -> Result<ProcessId> {
    let text = std::fs::read_to_string(fe.dir.join("sample.pid"))
        .with_context(|| format!("no sample.pid in {}", fe.dir.display()))?;
    let pid = text.trim().parse()?;
    ProcessId::of(pid).with_context(|| format!("front end pid {pid} is not running"))
}

fn running(what: &str, pid: Option<u32>) -> Result<ProcessId> {
    let pid = pid.with_context(|| format!("{what} has no pid"))?;
    ProcessId::of(pid).with_context(|| format!("{what} (pid {pid}) is not running"))
}

/// Not a test on its own: run by [`nothing_outlives_a_killed_test_process`] in a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper, run by lifetime::nothing_outlives_a_killed_test_process"]
async fn helper_starts_processes_then_waits_to_be_killed() -> Result<()> {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return Ok(());
    };
    let root = Path::new(&dir);
    let pki = Pki::new(&root.join("pki"))?;
    let mut procs = Vec::new();

    // Started by the harness itself.
    let by_harness = FrontEnd::create(root, "fe-1", "1.0")?;
    by_harness.start()?;
    procs.push(("front end started by the harness", sample_pid(&by_harness)?));

    // Started by the agent's start hook, as in every upgrade.
    let by_agent = FrontEnd::create(root, "fe-2", "1.0")?;
    let tls = pki.issue(RoleKind::Agent, "fe-2")?;
    let agent = AgentProc::start(root, "fe-2", "pool-a", "ud-1", &tls, &by_agent).await?;
    let mut c = agent_client(agent.addr, &pki.issue(RoleKind::Coordinator, "c1")?).await?;
    let r = c
        .restart(apb::RestartRequest {
            header: Some(apb::OperationHeader {
                operation_id: "helper/start".into(),
                epoch: 1,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        r.state == apb::OperationState::Succeeded as i32,
        "the agent did not start its front end: {r:?}\n{}",
        agent.log()
    );
    procs.push(("front end started by an agent", sample_pid(&by_agent)?));
    procs.push(("agent", running("agent", agent.pid())?));

    let pools = format!(
        "[[pools]]\nname = \"pool-a\"\n\n[[pools.servers]]\nid = \"fe-2\"\nagent = \"{}\"\nupgrade_domain = \"ud-1\"\n",
        agent.addr
    );
    let store = format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"",
        root.join("store.json").display()
    );
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &pki.issue(RoleKind::Coordinator, "c1")?,
        &store,
        &pools,
    )
    .await?;
    procs.push(("coordinator", running("coordinator", coord.pid())?));

    // None when etcd is missing outside CI (under CI, start fails and so does this helper).
    let etcd = rollgate_tests::etcd::EtcdCluster::start(1).await?;
    for pid in etcd.iter().flat_map(|e| e.pids()) {
        procs.push(("etcd member", running("etcd member", Some(pid))?));
    }

    // None when Chromium is missing outside CI. Only the browser process is tied to the
    // helper: its zygotes, renderers and GPU and network processes must go when it does.
    let browser = rollgate_tests::browser::Browser::start().await?;
    if let Some(b) = &browser {
        b.open("about:blank").await?;
        for id in b.processes().into_iter().filter_map(ProcessId::of) {
            procs.push(("chromium process", id));
        }
    }

    let report = serde_json::json!({
        "ports": [by_harness.port, by_agent.port],
        "processes": procs
            .iter()
            .map(|(what, p)| serde_json::json!({"what": what, "id": p.to_string()}))
            .collect::<Vec<_>>(),
    });
    let tmp = root.join(format!("{REPORT}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&report)?)?;
    std::fs::rename(&tmp, root.join(REPORT))?;
    // Now wait to be killed. The cap only bounds a helper whose test forgot it; the helper is
    // also tied to that test's process and dies with it.
    tokio::time::sleep(Duration::from_secs(300)).await;
    bail!("the helper was never killed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_killed_test_process() -> Result<()> {
    // Starts an etcd member, a coordinator, an agent, two front ends and a Chromium.
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let log_path = root.join("helper.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = owner::tied_tokio(std::env::current_exe()?)?;
    cmd.args([HELPER_TEST, "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(HELPER_ENV, root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let mut helper = owner::spawn_tokio(cmd)?;
    let helper_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let started = eventually(
        "the helper to start its processes",
        Duration::from_secs(120),
        || {
            let exited = helper.try_wait().ok().flatten();
            let report = std::fs::read(root.join(REPORT)).ok();
            async move {
                match (report, exited) {
                    (Some(r), _) => Some(Ok(r)),
                    (None, Some(status)) => Some(Err(status)),
                    (None, None) => None,
                }
            }
        },
    )
    .await
    .with_context(helper_log)?;
    let report: serde_json::Value = match started {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(status) => bail!("the helper exited ({status}):\n{}", helper_log()),
    };
    let ports: Vec<u16> = report["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    let mut procs = Vec::new();
    for p in report["processes"].as_array().context("processes")? {
        let what = p["what"].as_str().context("what")?.to_owned();
        let id: ProcessId = p["id"].as_str().context("id")?.parse()?;
        procs.push((what, id));
    }
    ensure!(ports.len() == 2 && procs.len() >= 4, "{report}");
    let accepts = |port: u16| {
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(500),
        )
        .is_ok()
    };
    for (what, id) in &procs {
        ensure!(id.is_alive(), "{what} ({}) is not running", id.pid);
    }
    for &port in &ports {
        ensure!(
            accepts(port),
            "front end on port {port} refuses connections"
        );
    }

    println!(
        "the helper runs: {}; front ends on ports {ports:?}",
        procs
            .iter()
            .map(|(what, id)| format!("{what} (pid {})", id.pid))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // SIGKILL: no Drop, no clean-up code of the helper's runs.
    helper.kill().await?;
    let killed = std::time::Instant::now();
    let left = || {
        let mut left: Vec<String> = procs
            .iter()
            .filter(|(_, id)| id.is_alive())
            .map(|(what, id)| format!("{what} (pid {})", id.pid))
            .collect();
        left.extend(
            ports
                .iter()
                .filter(|&&p| accepts(p))
                .map(|p| format!("a front end accepting on port {p}")),
        );
        left
    };
    let gone = eventually(
        "everything the killed helper started to be gone",
        Duration::from_secs(10),
        || {
            let done = left().is_empty();
            async move { done.then_some(()) }
        },
    )
    .await;
    if let Err(e) = gone {
        let still = left();
        // Do not leave them behind ourselves.
        for (_, id) in &procs {
            if id.is_alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(id.pid)?),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        bail!("{e}: still running: {}", still.join(", "));
    }
    println!("all gone {:?} after the SIGKILL", killed.elapsed());
    Ok(())
}
