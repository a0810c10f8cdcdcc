//! `rollgate-demo`: the main job, run for real on this machine. A pool of sample front ends in
//! upgrade domains, each with its agent (mTLS), a coordinator (embedded store; or, with
//! `--etcd`, three coordinators electing a leader through a local etcd), and a client load that
//! keeps opening and holding connections. The `rollgate` CLI starts the rolling upgrade and
//! watches it live; a final readiness table shows every server on the new version.

use anyhow::{bail, ensure, Context};
use clap::Parser;
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1 as pb;
use rollgate_tests::cluster::{cli, leader_of, operator_client, CoordinatorProc, Fleet};
use rollgate_tests::{eventually, make_artifact};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
#[command(
    name = "rollgate-demo",
    about = "a real local rolling upgrade with rollgate"
)]
struct Args {
    /// Work directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Front ends in the pool.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Upgrade domains.
    #[arg(long, default_value_t = 3)]
    domains: usize,
    /// Run three coordinators on a local etcd instead of one on the embedded store.
    #[arg(long)]
    etcd: bool,
}

#[derive(Default)]
struct Load {
    served: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
}

/// Opens a connection to each front end in turn, holds it for a few requests, closes it; counts
/// what was served, refused (a draining server) and cut (an open connection lost: must be 0).
async fn client_load(ports: Vec<u16>, load: Arc<Load>, stop: tokio_util::sync::CancellationToken) {
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let port = ports[i % ports.len()];
        i += 1;
        let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            load.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut ok = true;
        for n in 0..3 {
            let mut line = String::new();
            let sent = w.write_all(format!("hello {n}\n").as_bytes()).await.is_ok();
            if !sent || r.read_line(&mut line).await.unwrap_or(0) == 0 {
                ok = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if ok {
            load.served.fetch_add(1, Ordering::Relaxed);
        } else {
            load.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.servers >= args.domains && args.domains >= 1,
        "--servers must be at least --domains, and --domains at least 1"
    );
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    println!(
        "== rollgate demo: {} front ends in {} upgrade domains (work dir {})",
        args.servers,
        args.domains,
        root.display()
    );
    let fleet = Fleet::start(&root, "demo", args.servers, args.domains, "1.0").await?;
    for s in &fleet.servers {
        println!(
            "   {} ({}) serving 1.0 on 127.0.0.1:{}, agent on {}",
            s.id, s.domain, s.fe.port, s.agent.addr
        );
    }

    let etcd = if args.etcd {
        let Some(e) = rollgate_tests::etcd::EtcdCluster::start(1).await? else {
            bail!("etcd not found: install it (Debian: apt-get install etcd-server) for --etcd");
        };
        Some(e)
    } else {
        None
    };
    let pools = fleet.pool_toml("min_active = \"majority\"");
    let mut coordinators = Vec::new();
    let n = if args.etcd { 3 } else { 1 };
    for i in 1..=n {
        let id = format!("c{i}");
        let store = match &etcd {
            Some(e) => format!("[store]\nkind = \"etcd\"\ninsecure = true\nendpoints = {:?}\nprefix = \"/rollgate/demo/\"\nelection_ttl = \"2s\"", e.endpoints()),
            None => format!("[store]\nkind = \"embedded\"\npath = \"{}\"", root.join("store.json").display()),
        };
        let tls = fleet.pki.issue(RoleKind::Coordinator, &id)?;
        coordinators.push(CoordinatorProc::start(&root, &id, &tls, &store, &pools).await?);
    }
    let op = fleet.pki.issue(RoleKind::Operator, "demo")?;
    let addrs: Vec<_> = coordinators.iter().map(|c| c.addr).collect();
    let c = operator_client(addrs[0], &op).await?;
    let (leader, epoch) = eventually("a leader", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { leader_of(&mut c).await }
    })
    .await?;
    println!(
        "== {} coordinator(s) {}; leader {leader} at epoch {epoch}",
        n,
        if args.etcd {
            "on etcd"
        } else {
            "on the embedded store"
        }
    );
    eventually("the pool to be Ready", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            let r = c
                .readiness(pb::PoolRequest {
                    pool: "demo".into(),
                })
                .await
                .ok()?
                .into_inner();
            (names::readiness_state(r.state) == "Ready").then_some(())
        }
    })
    .await?;

    println!("\n$ rollgate readiness --pool demo");
    let st = cli(&op, &addrs)?
        .args(["readiness", "--pool", "demo"])
        .status()?;
    ensure!(st.success(), "rollgate readiness failed");

    let load = Arc::new(Load::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let ports: Vec<u16> = fleet.servers.iter().map(|s| s.fe.port).collect();
    let load_task = tokio::spawn(client_load(ports, Arc::clone(&load), stop.clone()));

    let (artifact, sha) = make_artifact(&root, "2.0")?;
    let start = [
        "upgrade",
        "start",
        "--pool",
        "demo",
        "--version",
        "2.0",
        "--artifact",
        artifact.to_str().context("path")?,
        "--sha256",
        &sha,
        "--verify-stable",
        "500ms",
        "--busy-retry-interval",
        "2s",
        "--watch",
    ];
    println!(
        "\n$ rollgate {}",
        start.join(" ").replace(&sha, &format!("{}…", &sha[..12]))
    );
    let t0 = std::time::Instant::now();
    let st = cli(&op, &addrs)?.args(start).status()?;
    let took = t0.elapsed();
    stop.cancel();
    load_task.await?;
    ensure!(st.success(), "the upgrade did not complete (exit {st:?})");

    // The last server's final health report may still be on its way.
    eventually(
        "every server to report 2.0",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .readiness(pb::PoolRequest {
                        pool: "demo".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                r.domains
                    .iter()
                    .flat_map(|d| &d.servers)
                    .all(|s| s.version == "2.0" && names::server_state(s.state) == "serving")
                    .then_some(())
            }
        },
    )
    .await?;
    println!("\n$ rollgate readiness --pool demo");
    let st = cli(&op, &addrs)?
        .args(["readiness", "--pool", "demo"])
        .status()?;
    ensure!(st.success(), "rollgate readiness failed");

    println!("\n$ rollgate events --pool demo --limit 8");
    cli(&op, &addrs)?
        .args(["events", "--pool", "demo", "--limit", "8"])
        .status()?;

    let installs = fleet.installs();
    let once = installs.iter().all(|(_, v)| v == &vec!["2.0".to_owned()]);
    println!(
        "\n== done in {:.1}s: every server on 2.0, each installed exactly once: {once}; client load: {} connections served, {} refused by draining servers, {} open connections cut",
        took.as_secs_f64(),
        load.served.load(Ordering::Relaxed),
        load.refused.load(Ordering::Relaxed),
        load.cut.load(Ordering::Relaxed)
    );
    ensure!(once, "installs: {installs:?}");
    ensure!(
        load.cut.load(Ordering::Relaxed) == 0,
        "an open connection was cut"
    );
    for mut co in coordinators {
        co.terminate().await?;
    }
    drop(c);
    drop(etcd);
    Ok(())
}
