//! `rollgate-demo`: a real local run of the per-server procedure. One sample front end, its
//! agent over mTLS, and a client holding a connection open; the agent drains (gracefully),
//! installs a new version (sha256-checked), restarts and verifies it, step by step.
//!
//! Until the coordinator lands this plays the coordinator's part for one server, with its own
//! coordinator certificate and epoch 1.

use anyhow::{ensure, Context};
use clap::Parser;
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as pb;
use rollgate_tests::{agent_client, eventually, make_artifact, AgentProc, FrontEnd, Pki};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
#[command(name = "rollgate-demo", about = "run rollgate's per-server upgrade procedure locally")]
struct Args {
    /// Work directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Version installed before the upgrade.
    #[arg(long, default_value = "1.0")]
    from: String,
    /// Version to upgrade to.
    #[arg(long, default_value = "2.0")]
    to: String,
}

struct Clock(Instant);
impl Clock {
    fn say(&self, msg: impl AsRef<str>) {
        println!("[{:>6.2}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
    }
}

fn state_name(s: i32) -> String {
    pb::ServiceState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("SERVICE_STATE_").to_lowercase())
        .unwrap_or_else(|_| format!("unknown({s})"))
}

fn outcome(r: &pb::OperationResult) -> anyhow::Result<String> {
    ensure!(r.state == pb::OperationState::Succeeded as i32, "{} failed: {}", r.operation_id, r.message);
    Ok(format!("{} ({} ms)", r.message, r.finished_at_ms.saturating_sub(r.started_at_ms)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp;
    let root = match args.dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let t = Clock(Instant::now());
    println!("rollgate demo: one agent upgrading one front end (work dir {})", root.display());

    let pki = Pki::new(&root.join("pki"))?;
    let fe = FrontEnd::create(&root, "fe-1", &args.from)?;
    fe.start()?;
    let mut agent = AgentProc::start(&root, "fe-1", "demo-pool", "ud-1", &pki.issue(RoleKind::Agent, "fe-1")?, &fe).await?;
    let mut c = agent_client(agent.addr, &pki.issue(RoleKind::Coordinator, "demo")?).await?;
    let h = c.health(pb::HealthRequest {}).await?.into_inner();
    t.say(format!(
        "front end fe-1 on 127.0.0.1:{}: {} version {}; agent on {} (mTLS, coordinator role)",
        fe.port, state_name(h.state), h.installed_version, agent.addr
    ));

    // A client holds a connection through the drain, sending a request every 200 ms for 1.5 s.
    let port = fe.port;
    let client = tokio::spawn(async move {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut served = 0;
        for i in 0..8 {
            w.write_all(format!("request {i}\n").as_bytes()).await?;
            let mut line = String::new();
            r.read_line(&mut line).await?;
            ensure!(line.trim() == format!("request {i}"), "open connection cut during drain");
            served += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(served)
    });
    eventually("the client's connection to be counted", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.health(pb::HealthRequest {}).await.ok().map(|r| r.into_inner()).filter(|h| h.active_connections >= 1) }
    })
    .await?;
    t.say("a client holds a connection open and keeps sending requests");

    let hdr = |step: &str| Some(pb::OperationHeader { operation_id: format!("demo/fe-1/{step}"), epoch: 1 });
    t.say("1. drain (graceful): stop new connections, wait for open ones to finish, then stop");
    let mut dc = c.clone();
    let drain = tokio::spawn(async move {
        dc.drain(pb::DrainRequest { header: hdr("drain"), timeout_ms: 30_000, on_timeout: pb::DrainTimeoutAction::Fail as i32 }).await
    });
    eventually("new connections to be refused", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err().then_some(())
    })
    .await?;
    let h = c.health(pb::HealthRequest {}).await?.into_inner();
    t.say(format!("   new connections refused; state {}; {} open connection(s) still served", state_name(h.state), h.active_connections));
    let served = client.await??;
    t.say(format!("   the client finished normally: {served} requests answered, none cut"));
    t.say(format!("   drain: {}", outcome(&drain.await??.into_inner())?));

    let (artifact, sha) = make_artifact(&root, &args.to)?;
    t.say(format!("2. install {} from {} (sha256 {}…)", args.to, artifact.display(), &sha[..12]));
    let r = c
        .install_patch(pb::InstallPatchRequest { header: hdr("install"), artifact: artifact.display().to_string(), sha256: sha, version: args.to.clone(), timeout_ms: 0 })
        .await?
        .into_inner();
    t.say(format!("   install: {}", outcome(&r)?));

    t.say("3. restart: start the service and wait until it accepts connections");
    let r = c.restart(pb::RestartRequest { header: hdr("restart"), timeout_ms: 0 }).await?.into_inner();
    t.say(format!("   restart: {}", outcome(&r)?));

    t.say("4. verify: accepting, healthy and not busy, stable for 300 ms");
    let r = c.verify(pb::VerifyRequest { header: hdr("verify"), stable_ms: 300, timeout_ms: 10_000 }).await?.into_inner();
    t.say(format!("   verify: {}", outcome(&r)?));

    let again = c.install_patch(pb::InstallPatchRequest {
        header: hdr("install"),
        artifact: artifact.display().to_string(),
        sha256: make_artifact(&root, &args.to)?.1,
        version: args.to.clone(),
        timeout_ms: 0,
    });
    let again = again.await?.into_inner();
    t.say(format!("   repeating operation demo/fe-1/install is answered from the journal: replayed={}, nothing reinstalled", again.replayed));

    let h = c.health(pb::HealthRequest {}).await?.into_inner();
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.context("front end not reachable")?;
    let (r, mut w) = s.into_split();
    w.write_all(b"VERSION\n").await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    ensure!(line.trim() == args.to, "front end serves {line:?}, expected {}", args.to);
    t.say(format!(
        "done: fe-1 {} version {} (the front end itself answers {}); accepting={} healthy={} busy={}",
        state_name(h.state), h.installed_version, line.trim(), h.accepting_connections, h.healthy, h.busy
    ));
    let status = agent.terminate().await?;
    ensure!(status.success(), "agent did not stop cleanly: {status:?}");
    fe.stop()?;
    Ok(())
}
