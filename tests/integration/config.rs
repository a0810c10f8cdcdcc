//! The documented example config loads, and `validate` says clearly what is wrong.

use rollgate_agent::config::AgentConfig;
use rollgate_common::config::parse_toml;
use rollgate_common::tls::RoleKind;
use rollgate_tests::{bin, Pki};
use std::path::{Path, PathBuf};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml")
}

#[test]
fn the_example_agent_config_loads_and_validates() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(example())?;
    let mut cfg: AgentConfig = parse_toml(&example(), &text)?;
    cfg.resolve_defaults();
    assert_eq!(cfg.server_id, "fe-01");
    assert_eq!(cfg.service.ports, vec![8080]);
    assert_eq!(
        cfg.service.start,
        vec!["systemctl", "start", "frontend.service"]
    );
    assert_eq!(
        (
            cfg.service.fetch_connect_timeout,
            cfg.service.fetch_idle_timeout
        ),
        (
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(30)
        )
    );
    assert_eq!(
        cfg.service.artifact_dirs,
        vec![PathBuf::from("/var/lib/rollgate/incoming")]
    );
    // Its TLS paths point at /etc/rollgate; swap in real certificates to validate the rest.
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path())?;
    cfg.tls = Some(pki.issue(RoleKind::Agent, "fe-01")?);
    cfg.validate().map_err(anyhow::Error::msg)?;
    // A certificate for another server is refused.
    cfg.tls = Some(pki.issue(RoleKind::Agent, "fe-02")?);
    let err = cfg.validate().expect_err("wrong server certificate");
    assert!(err.contains("agent/fe-01"), "{err}");
    Ok(())
}

fn validate(text: &str) -> anyhow::Result<(bool, String, String)> {
    let tmp = tempfile::tempdir()?;
    let p = tmp.path().join("agent.toml");
    std::fs::write(&p, text)?;
    let out = std::process::Command::new(bin("rollgate-agent")?)
        .arg("validate")
        .arg(&p)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

#[test]
fn validate_subcommand_names_what_is_wrong_on_one_line() -> anyhow::Result<()> {
    let good = r#"
server_id = "fe-1"
pool = "p"
listen = "127.0.0.1:0"
state_dir = "/tmp/x"
insecure = true
[service]
ports = [80]
drain = ["true"]
start = ["true"]
stop = ["true"]
install = ["true"]
"#;
    let (ok, out, err) = validate(good)?;
    assert!(ok, "{err}");
    assert!(out.contains("ok"));
    for (bad, needle) in [
        (good.replace("ports = [80]", "ports = []"), "service.ports"),
        (good.replace("insecure = true", ""), "tls"),
        (
            good.replace("drain = [\"true\"]", "drain = []"),
            "service.drain",
        ),
        (
            good.replace("pool = \"p\"", "pool = \"p\"\npoool = 1"),
            "poool",
        ),
        (
            good.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""),
            "listen",
        ),
        (format!("{good}hook_timeout = \"ten\"\n"), "hook_timeout"),
        (
            format!("{good}fetch_timeout = \"0s\"\n"),
            "service.fetch_timeout",
        ),
        (
            format!("{good}fetch_connect_timeout = \"0s\"\n"),
            "service.fetch_connect_timeout",
        ),
        (
            format!("{good}fetch_idle_timeout = \"0s\"\n"),
            "service.fetch_idle_timeout",
        ),
        (
            format!("{good}artifact_dirs = [\"incoming\"]\n"),
            "service.artifact_dirs: incoming is not an absolute path",
        ),
        (
            format!("{good}artifact_dirs = [\"/srv/a/../b\"]\n"),
            "service.artifact_dirs",
        ),
        (
            format!("{good}artifact_dirs = [\"/\"]\n"),
            "service.artifact_dirs",
        ),
    ] {
        let (ok, _, err) = validate(&bad)?;
        assert!(!ok, "should fail: {bad}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    Ok(())
}

#[test]
fn the_example_coordinator_config_loads_and_validates() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use rollgate_coordinator::config::{CoordinatorConfig, StoreConfig};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.example.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut cfg: CoordinatorConfig = parse_toml(&path, &text)?;
    assert_eq!(cfg.id, "c1");
    assert!(matches!(&cfg.store, StoreConfig::Etcd { endpoints, .. } if endpoints.len() == 3));
    let spec = cfg.pools[0].spec();
    // fe-04 has no explicit domain: it is assigned deterministically.
    assert_eq!(spec.domains.iter().map(|(_, s)| s.len()).sum::<usize>(), 4);
    assert_eq!(spec.min_active, 3);
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path())?;
    cfg.tls = Some(pki.issue(RoleKind::Coordinator, "c1")?);
    // The example names production paths: point them at files that exist here.
    let files = pki.issue(RoleKind::Coordinator, "etcd-client")?;
    let password = tmp.path().join("etcd-password");
    rollgate_common::pki::write_file(&password, "pw\n", 0o600)?;
    match &mut cfg.store {
        StoreConfig::Etcd { tls, auth, .. } => {
            let t = tls.as_mut().context("the example configures etcd TLS")?;
            t.ca = files.ca.clone();
            t.cert = Some(files.cert.clone());
            t.key = Some(files.key.clone());
            let a = auth.as_mut().context("the example configures etcd auth")?;
            assert_eq!(a.user, "rollgate");
            a.password_file = password;
        }
        StoreConfig::Embedded { .. } => anyhow::bail!("the example uses etcd"),
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    cfg.tls = Some(pki.issue(RoleKind::Operator, "c1")?);
    assert!(cfg
        .validate()
        .expect_err("operator cert")
        .contains("coordinator/c1"));
    Ok(())
}

#[test]
fn coordinator_validate_names_what_is_wrong_on_one_line() -> anyhow::Result<()> {
    let good = r#"
id = "c1"
listen = "127.0.0.1:0"
insecure = true
[store]
kind = "embedded"
path = "/tmp/store.json"
[[pools]]
name = "p"
[[pools.servers]]
id = "fe-1"
agent = "127.0.0.1:7001"
"#;
    let run = |text: &str| -> anyhow::Result<(bool, String)> {
        let tmp = tempfile::tempdir()?;
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, text)?;
        let out = std::process::Command::new(bin("rollgate-coordinator")?)
            .arg("validate")
            .arg(&p)
            .output()?;
        Ok((out.status.success(), String::from_utf8(out.stderr)?))
    };
    let (ok, err) = run(good)?;
    assert!(ok, "{err}");
    for (bad, needle) in [
        (
            good.replace("kind = \"embedded\"", "kind = \"zookeeper\""),
            "zookeeper",
        ),
        (
            good.replace("agent = \"127.0.0.1:7001\"", "agent = \"nowhere\""),
            "agent",
        ),
        (
            format!("{good}\n[[pools.servers]]\nid = \"fe-1\"\nagent = \"127.0.0.1:7002\"\n"),
            "twice",
        ),
        (
            good.replace("name = \"p\"", "name = \"p\"\nmin_active = \"150%\""),
            "min_active",
        ),
        (
            good.replace(
                "name = \"p\"",
                "name = \"p\"\nmaintenance_windows = [\"Sat 01:00-05:00 CET\"]",
            ),
            "maintenance_windows",
        ),
        (
            good.replace("name = \"p\"", "name = \"p\"\npaired_pool = \"q\""),
            "failover",
        ),
        (
            good.replace(
                "[store]\nkind = \"embedded\"\npath = \"/tmp/store.json\"",
                "[store]\nkind = \"etcd\"\nendpoints = []",
            ),
            "endpoints",
        ),
    ] {
        let (ok, err) = run(&bad)?;
        assert!(!ok, "should fail: {bad}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    Ok(())
}
