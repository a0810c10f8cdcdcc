//! The operator's view from scripts: `upgrade watch` exit codes, `--timeout`, one-line errors
//! on stderr, and `-o json` on every command, against a real coordinator and a real pool.

use crate::coordinator::{ended, wait_ready, wait_status};
use anyhow::Context;
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::operator::names;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use rollgate_tests::cluster::{cli, operator_client, CoordinatorProc, Fleet};
use rollgate_tests::make_artifact;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// A pool of 3 servers in 3 domains on 1.0 and one coordinator on the embedded store (with
/// `[http]` on a free port when `http`), Ready; `pool_extra` goes into the pool's table.
struct OnePool {
    fleet: Fleet,
    coord: CoordinatorProc,
    op: TlsFiles,
    c: OperatorClient<Channel>,
}

async fn one_pool(root: &Path, pool_extra: &str, http: bool) -> anyhow::Result<OnePool> {
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let mut store = crate::coordinator::embedded(root);
    if http {
        store.push_str("\n[http]\nlisten = \"127.0.0.1:0\"");
    }
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &store,
        &fleet.pool_toml(pool_extra),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    Ok(OnePool {
        fleet,
        coord,
        op,
        c,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exit_codes_tell_a_script_what_happened() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let OnePool {
        fleet: _fleet,
        coord,
        op,
        c,
    } = one_pool(root, "", false).await?;
    let rollgate = |args: &[&str]| -> anyhow::Result<Output> {
        Ok(cli(&op, &[coord.addr])?.args(args).output()?)
    };
    let (a2, sha2) = make_artifact(root, "2.0")?;
    let a2 = a2.to_str().context("path")?.to_owned();

    // 0: completed.
    let out = rollgate(&[
        "upgrade",
        "start",
        "--pool",
        "pool-a",
        "--version",
        "2.0",
        "--artifact",
        &a2,
        "--sha256",
        &sha2,
        "--verify-stable",
        "200ms",
        "--watch",
    ])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("completed"),
        "{}",
        text(&out.stdout)
    );

    // 2: a server step fails and the plan says pause: the watch stops and says what to run.
    let (a3, _) = make_artifact(root, "3.0")?;
    let wrong = "0".repeat(64);
    let out = rollgate(&[
        "upgrade",
        "start",
        "--pool",
        "pool-a",
        "--version",
        "3.0",
        "--artifact",
        a3.to_str().context("path")?,
        "--sha256",
        &wrong,
        "--server-retries",
        "0",
        "--on-failure",
        "pause",
        "--watch",
    ])?;
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}\n{}", text(&out.stdout));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("paused") && err.contains("rollgate upgrade resume --pool pool-a"),
        "{err}"
    );
    // Watching it again says the same.
    let out = rollgate(&["upgrade", "watch", "--pool", "pool-a"])?;
    assert_eq!(code(&out), Some(2), "{}", text(&out.stderr));

    // 1: aborted.
    let out = rollgate(&["upgrade", "abort", "--pool", "pool-a"])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    let out = rollgate(&["upgrade", "watch", "--pool", "pool-a"])?;
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("aborted"), "{err}");

    // 3: --timeout passes while the upgrade runs; the upgrade goes on.
    let (a4, sha4) = make_artifact(root, "4.0")?;
    let started = Instant::now();
    let out = rollgate(&[
        "upgrade",
        "start",
        "--pool",
        "pool-a",
        "--version",
        "4.0",
        "--artifact",
        a4.to_str().context("path")?,
        "--sha256",
        &sha4,
        "--verify-stable",
        "4s",
        "--watch",
        "--timeout",
        "1s",
    ])?;
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(3), "{err}");
    assert!(err.contains("still running"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let end = wait_status(&[coord.addr], &op, "pool-a", Duration::from_secs(90), ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");

    // The history: every past plan, who started it, how it ended, oldest first.
    let out = rollgate(&["upgrade", "history", "--pool", "pool-a", "-o", "json"])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let got: Vec<(String, String)> = plans
        .iter()
        .map(|p| (p["version"].to_string(), p["outcome"].to_string()))
        .collect();
    let want = [
        ("2.0", "completed"),
        ("3.0", "aborted"),
        ("4.0", "completed"),
    ]
    .map(|(v, o)| (format!("{v:?}"), format!("{o:?}")));
    assert_eq!(got, want, "{plans:?}");
    for p in &plans {
        assert_eq!(p["started_by"], "operator/tester", "{p}");
        assert_eq!(p["servers"], 3, "{p}");
        assert!(p["ended_ms"].as_u64() >= p["started_ms"].as_u64(), "{p}");
        assert!(p["duration_ms"].as_u64().is_some_and(|d| d > 0), "{p}");
    }
    assert!(
        plans[1]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{plans:?}"
    );
    let out = rollgate(&["upgrade", "history", "--pool", "pool-a"])?;
    assert!(
        text(&out.stdout).contains("aborted"),
        "{}",
        text(&out.stdout)
    );

    // Rolling back the completed upgrade: a new plan, domain by domain, every server back to
    // the version it ran before (2.0); its watch ends 1 (rolled back), and it joins the history.
    let out = rollgate(&["upgrade", "rollback", "--pool", "pool-a"])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
    let out = rollgate(&["upgrade", "watch", "--pool", "pool-a"])?;
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}\n{}", text(&out.stdout));
    assert!(err.contains("rolled_back"), "{err}");
    let r = c
        .clone()
        .readiness(rollgate_proto::operator::v1::PoolRequest {
            pool: "pool-a".into(),
        })
        .await?
        .into_inner();
    let versions: Vec<&str> = r
        .domains
        .iter()
        .flat_map(|d| &d.servers)
        .map(|s| s.version.as_str())
        .collect();
    assert_eq!(versions, vec!["2.0"; 3], "{r:?}");
    let out = rollgate(&["upgrade", "history", "--pool", "pool-a", "-o", "json"])?;
    let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(plans.len(), 4, "{plans:?}");
    assert_eq!(plans[3]["outcome"], "rolled_back", "{plans:?}");
    assert_eq!(
        plans[2]["outcome"], "completed",
        "the completed plan keeps its line"
    );
    // Nothing to roll back now: the last upgrade was itself rolled back.
    let out = rollgate(&["upgrade", "rollback", "--pool", "pool-a"])?;
    assert_eq!(code(&out), Some(1));
    assert!(
        text(&out.stderr).contains("rolled_back"),
        "{}",
        text(&out.stderr)
    );

    // A usage error is one line and exit 1 (clap's 2 would read as "paused").
    let out = rollgate(&["upgrade", "watch", "--pool", "pool-a", "--bogus"])?;
    assert_eq!(code(&out), Some(1));
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_speaks_json() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let OnePool {
        fleet: _fleet,
        coord,
        op,
        c: _c,
    } = one_pool(root, "", false).await?;
    let (a2, sha2) = make_artifact(root, "2.0")?;
    let a2 = a2.to_str().context("path")?.to_owned();
    let certs = root.join("new-ca");
    let certs = certs.to_str().context("path")?;
    let cases: Vec<(Vec<&str>, bool)> = vec![
        (vec!["readiness", "--pool", "pool-a"], false),
        (vec!["inventory"], false),
        (vec!["leader"], false),
        (
            vec![
                "upgrade",
                "start",
                "--pool",
                "pool-a",
                "--version",
                "2.0",
                "--artifact",
                &a2,
                "--sha256",
                &sha2,
                "--verify-stable",
                "100ms",
                "--watch",
            ],
            true,
        ),
        (vec!["upgrade", "status", "--pool", "pool-a"], false),
        (vec!["events", "--pool", "pool-a", "--limit", "5"], true),
        (vec!["certs", "init", "--dir", certs], false),
        (
            vec![
                "certs", "issue", "--dir", certs, "--role", "operator", "--name", "bob",
            ],
            false,
        ),
    ];
    for (args, per_line) in cases {
        let out = cli(&op, &[coord.addr])?
            .args(&args)
            .args(["-o", "json"])
            .output()?;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let docs: Vec<&str> = if per_line {
            stdout.lines().collect()
        } else {
            vec![stdout.as_str()]
        };
        assert!(
            !docs.is_empty() && !stdout.trim().is_empty(),
            "{args:?}: no output"
        );
        for d in docs {
            serde_json::from_str::<serde_json::Value>(d)
                .with_context(|| format!("{args:?} printed non-JSON: {d}"))?;
        }
    }
    Ok(())
}

#[test]
fn completions_and_manual_pages_are_generated() -> anyhow::Result<()> {
    let rollgate = rollgate_tests::bin("rollgate")?;
    for (shell, needle) in [
        ("bash", "_rollgate"),
        ("zsh", "#compdef rollgate"),
        ("fish", "complete -c rollgate"),
    ] {
        let out = std::process::Command::new(&rollgate)
            .args(["completions", shell])
            .output()?;
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(needle), "{shell}: {needle} missing");
        for word in ["upgrade", "readiness", "--timeout"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
    let out = std::process::Command::new(&rollgate).arg("man").output()?;
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(
        page.contains(".TH rollgate 1") && page.contains("Exit codes"),
        "{page}"
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("man1");
    let out = std::process::Command::new(&rollgate)
        .arg("man")
        .arg("--dir")
        .arg(&dir)
        .output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let watch = std::fs::read_to_string(dir.join("rollgate-upgrade-watch.1"))?;
    assert!(watch.contains(".TH rollgate-upgrade-watch 1") && watch.contains("timeout"));
    assert!(std::fs::read_dir(&dir)?.count() >= 15);
    Ok(())
}

/// The value of the sample `name` (with its labels exactly as written) in a Prometheus text
/// exposition.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_serve_prometheus_metrics() -> anyhow::Result<()> {
    use rollgate_tests::http_get;
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let OnePool {
        fleet,
        coord,
        op,
        mut c,
    } = one_pool(root, "", true).await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        crate::coordinator::start_req("pool-a", &artifact, &sha),
    )
    .await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", Duration::from_secs(60), ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");

    let (status, m) = http_get(coord.http_addr()?, "/metrics").await?;
    assert_eq!(status, 200, "{m}");
    for (name, want) in [
        ("rollgate_coordinator_leader", 1.0),
        ("rollgate_agents_connected{pool=\"pool-a\"}", 3.0),
        ("rollgate_agents_lost{pool=\"pool-a\"}", 0.0),
        ("rollgate_agent_channels{kind=\"line\"}", 3.0),
        ("rollgate_agent_channels{kind=\"grpc\"}", 0.0),
        (
            "rollgate_pool_readiness{pool=\"pool-a\",state=\"Ready\"}",
            1.0,
        ),
        (
            "rollgate_pool_readiness{pool=\"pool-a\",state=\"Busy\"}",
            0.0,
        ),
        (
            "rollgate_upgrade_status{pool=\"pool-a\",status=\"completed\"}",
            1.0,
        ),
        ("rollgate_upgrade_servers_done{pool=\"pool-a\"}", 3.0),
        (
            "rollgate_step_duration_seconds_count{step=\"install\",result=\"succeeded\"}",
            3.0,
        ),
        ("rollgate_fences_sent_total{result=\"ok\"}", 3.0),
    ] {
        assert_eq!(sample(&m, name), Some(want), "{name} in\n{m}");
    }
    assert!(sample(&m, "rollgate_coordinator_epoch").is_some_and(|e| e >= 1.0));
    assert!(sample(&m, "rollgate_store_write_duration_seconds_count").is_some_and(|n| n >= 3.0));
    assert!(
        m.contains("# TYPE rollgate_step_duration_seconds histogram"),
        "{m}"
    );
    let (status, _) = http_get(coord.http_addr()?, "/nope").await?;
    assert_eq!(status, 404);

    let agent = &fleet.servers.first().context("fe-1")?.agent;
    let (status, m) = http_get(agent.http_addr()?, "/metrics").await?;
    assert_eq!(status, 200, "{m}");
    // Set-up installed 1.0 through the agent, and the upgrade 2.0: two installs.
    assert_eq!(
        sample(
            &m,
            "rollgate_agent_operations_total{kind=\"install\",result=\"succeeded\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "rollgate_agent_operation_duration_seconds_count{kind=\"drain\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert!(sample(&m, "rollgate_agent_probe_duration_seconds_count").is_some_and(|n| n >= 1.0));
    assert_eq!(
        sample(&m, "rollgate_agent_service_state{state=\"serving\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "rollgate_agent_service_state{state=\"draining\"}"),
        Some(0.0)
    );
    Ok(())
}

/// A pool's maintenance windows: outside them an upgrade waits before each domain, touches
/// nothing, and says so in its status and events; inside them it runs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_waits_for_the_pools_maintenance_window() -> anyhow::Result<()> {
    use rollgate_proto::operator::v1 as pb;
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    // Three days from today (UTC): closed now whatever the time.
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let now_days = rollgate_common::time::now_ms() / 86_400_000;
    // 1970-01-01 was a Thursday (index 3 of a Monday-first week).
    let today = usize::try_from((now_days + 3) % 7)?;
    let closed = format!("{} 01:00-02:00 UTC", days[(today + 3) % 7]);
    let OnePool {
        fleet,
        coord,
        op,
        mut c,
    } = one_pool(
        root,
        &format!("maintenance_windows = [\"{closed}\"]"),
        false,
    )
    .await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        crate::coordinator::start_req("pool-a", &artifact, &sha),
    )
    .await?;
    let s = rollgate_tests::eventually(
        "the upgrade to wait for its window",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let s = c
                    .get_upgrade(pb::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (names::domain_phase(s.domain_phase) == "awaiting_window").then_some(s)
            }
        },
    )
    .await?;
    assert_eq!(names::upgrade_state(s.status), "running");
    assert_eq!(s.current_domain, "ud-1");
    let events = c
        .events(pb::EventsRequest {
            pool: "pool-a".into(),
            limit: 100,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "awaiting_window" && e.message.contains(&closed)),
        "{events:?}"
    );
    // Nothing was prepared, drained or installed, and the pool still serves in full.
    assert!(
        s.servers
            .iter()
            .all(|x| names::server_phase(x.phase) == "pending"),
        "{s:?}"
    );
    for (id, installs) in fleet.installs() {
        assert!(installs.is_empty(), "{id}: {installs:?}");
    }
    let out = cli(&op, &[coord.addr])?
        .args(["upgrade", "status", "--pool", "pool-a"])
        .output()?;
    assert!(
        text(&out.stdout).contains("running"),
        "{}",
        text(&out.stdout)
    );
    c.abort_upgrade(pb::PoolRequest {
        pool: "pool-a".into(),
    })
    .await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", Duration::from_secs(30), ended).await?;
    assert_eq!(names::upgrade_state(end.status), "aborted", "{end:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_its_maintenance_windows_an_upgrade_runs_through() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    // Two windows that together cover every minute of every day.
    let OnePool {
        fleet,
        coord,
        op,
        mut c,
    } = one_pool(
        root,
        "maintenance_windows = [\"daily 00:00-12:00 UTC\", \"daily 12:00-00:00 UTC\"]",
        false,
    )
    .await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(
        &mut c,
        crate::coordinator::start_req("pool-a", &artifact, &sha),
    )
    .await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", Duration::from_secs(60), ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");
    for (id, installs) in fleet.installs() {
        assert_eq!(installs, vec!["2.0"], "{id}");
    }
    Ok(())
}
