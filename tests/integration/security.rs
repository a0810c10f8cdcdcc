//! Attacks and faults against the parts that steer the fleet: etcd reached without TLS or
//! credentials, and an agent address answered by another server's certificate.

use crate::coordinator::{ended, start_req, wait_ready, wait_status};
use anyhow::{bail, Context};
use etcd_client::{Client, ConnectOptions, Permission, TlsOptions};
use rollgate_common::pki::Ca;
use rollgate_common::tls::{Role, RoleKind};
use rollgate_coordinator::store::{EtcdAccess, EtcdStore, StoreError};
use rollgate_proto::operator::names;
use rollgate_tests::cluster::{operator_client, CoordinatorProc, Fleet};
use rollgate_tests::etcd::{EtcdCluster, EtcdServerTls};
use rollgate_tests::make_artifact;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PREFIX: &str = "/rollgate/secure/";
const USER: &str = "rollgate";
const PASSWORD: &str = "correct horse battery staple";

/// etcd as production runs it: TLS on the client port, client certificates required
/// (`--client-cert-auth`), and user/password authentication with a role limited to rollgate's
/// prefix.
struct SecureEtcd {
    etcd: EtcdCluster,
    /// The CA of etcd's server and client certificates (not the rollgate deployment's CA).
    ca: PathBuf,
    /// A client certificate etcd accepts.
    cert: PathBuf,
    key: PathBuf,
    /// The password file, mode 0600.
    password_file: PathBuf,
    dir: PathBuf,
}

impl SecureEtcd {
    async fn start(dir: &Path) -> anyhow::Result<Option<SecureEtcd>> {
        std::fs::create_dir_all(dir)?;
        let issuer = Ca::generate("etcd test CA")?;
        let ca = dir.join("etcd-ca.crt");
        std::fs::write(&ca, issuer.cert_pem())?;
        let server = issuer.issue(
            &Role::new(RoleKind::Coordinator, "etcd-server"),
            &["127.0.0.1".into(), "localhost".into()],
        )?;
        let (server_cert, server_key) = server.write(dir, "etcd-server")?;
        let client = issuer.issue(&Role::new(RoleKind::Coordinator, "c1"), &[])?;
        let (cert, key) = client.write(dir, "etcd-client")?;
        let password_file = dir.join("etcd-password");
        rollgate_common::pki::write_file(&password_file, &format!("{PASSWORD}\n"), 0o600)?;
        let tls = EtcdServerTls {
            cert: server_cert,
            key: server_key,
            ca: ca.clone(),
            client_cert_auth: true,
        };
        let Some(etcd) = EtcdCluster::start_with(1, Some(tls)).await? else {
            return Ok(None);
        };
        let me = SecureEtcd {
            etcd,
            ca,
            cert,
            key,
            password_file,
            dir: dir.to_owned(),
        };
        me.enable_auth().await?;
        Ok(Some(me))
    }

    fn tls(&self, identity: Option<(&Path, &Path)>) -> anyhow::Result<TlsOptions> {
        let mut t = TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&self.ca)?));
        if let Some((cert, key)) = identity {
            t = t.identity(etcd_client::Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        }
        Ok(t)
    }

    /// Adds root and a `rollgate` user whose role may read and write only under PREFIX, then
    /// turns authentication on (as an operator would with etcdctl).
    async fn enable_auth(&self) -> anyhow::Result<()> {
        let opts = ConnectOptions::new()
            .with_tls(self.tls(Some((&self.cert, &self.key)))?)
            .with_connect_timeout(Duration::from_secs(5));
        let admin = Client::connect(self.etcd.endpoints(), Some(opts)).await?;
        let mut auth = admin.auth_client();
        auth.user_add("root", "root-password", None).await?;
        auth.user_grant_role("root", "root").await?;
        auth.role_add(USER).await?;
        auth.role_grant_permission(USER, Permission::read_write(PREFIX).with_prefix())
            .await?;
        auth.user_add(USER, PASSWORD, None).await?;
        auth.user_grant_role(USER, USER).await?;
        auth.auth_enable().await?;
        Ok(())
    }

    fn access(&self, password: Option<&str>, identity: bool) -> anyhow::Result<EtcdAccess> {
        Ok(EtcdAccess {
            tls: Some(self.tls(identity.then_some((self.cert.as_path(), self.key.as_path())))?),
            user: password.map(|p| (USER.to_owned(), p.to_owned())),
        })
    }

    /// The `[store]` table of a coordinator that reaches this etcd properly.
    fn store_toml(&self) -> String {
        format!(
            "[store]\nkind = \"etcd\"\nendpoints = {:?}\nprefix = \"{PREFIX}\"\nelection_ttl = \"2s\"\n[store.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[store.auth]\nuser = \"{USER}\"\npassword_file = \"{}\"",
            self.etcd.endpoints(),
            self.ca.display(),
            self.cert.display(),
            self.key.display(),
            self.password_file.display()
        )
    }

    /// What is under PREFIX, read as root: the attacker's writes must not be there.
    async fn keys(&self) -> anyhow::Result<Vec<String>> {
        let opts = ConnectOptions::new()
            .with_tls(self.tls(Some((&self.cert, &self.key)))?)
            .with_user("root", "root-password");
        let mut root = Client::connect(self.etcd.endpoints(), Some(opts)).await?;
        let r = root
            .get(
                PREFIX,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await?;
        r.kvs()
            .iter()
            .map(|kv| Ok(kv.key_str()?.to_owned()))
            .collect()
    }
}

/// An attacker's direct write of a plan: what a coordinator would resume and run.
async fn try_plant_a_plan(endpoints: &[String], opts: ConnectOptions) -> anyhow::Result<()> {
    let mut c = Client::connect(endpoints, Some(opts)).await?;
    c.put(
        format!("{PREFIX}upgrades/pool-a"),
        r#"{"artifact":"http://evil.invalid/x"}"#,
        None,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_tls_and_auth_refuses_strangers_and_serves_rollgate() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(secure) = SecureEtcd::start(&tmp.path().join("etcd")).await? else {
        return Ok(());
    };
    let eps = secure.etcd.endpoints();
    assert!(eps.iter().all(|e| e.starts_with("https://")), "{eps:?}");

    // Plaintext to the TLS port: no connection.
    let plain: Vec<String> = eps.iter().map(|e| e.replacen("https", "http", 1)).collect();
    let err = EtcdStore::connect(&plain, PREFIX)
        .await
        .expect_err("plaintext to a TLS etcd");
    assert!(err.is_retryable(), "{err}");

    // TLS without a client certificate: etcd's --client-cert-auth refuses the handshake.
    let err = EtcdStore::connect_with(&eps, PREFIX, secure.access(Some(PASSWORD), false)?)
        .await
        .expect_err("no client certificate");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");

    // A certificate from another CA is refused the same way.
    let stranger =
        Ca::generate("someone else's CA")?.issue(&Role::new(RoleKind::Coordinator, "c1"), &[])?;
    let (sc, sk) = stranger.write(&secure.dir, "stranger")?;
    let mut access = secure.access(Some(PASSWORD), false)?;
    access.tls = Some(secure.tls(Some((&sc, &sk)))?);
    let err = EtcdStore::connect_with(&eps, PREFIX, access)
        .await
        .expect_err("foreign client certificate");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");

    // The right certificate and a wrong password: refused, and not retried as "unavailable".
    let err = EtcdStore::connect_with(&eps, PREFIX, secure.access(Some("guess"), true)?)
        .await
        .expect_err("wrong password");
    assert!(matches!(err, StoreError::Denied(_)), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("authentication failed"), "{err}");

    // An attacker with a stolen client certificate but no password cannot plant a plan.
    let opts = ConnectOptions::new().with_tls(secure.tls(Some((&secure.cert, &secure.key)))?);
    let planted = try_plant_a_plan(&eps, opts).await;
    assert!(planted.is_err(), "a write without a password was accepted");
    // The rollgate user itself may not write outside its prefix.
    let opts = ConnectOptions::new()
        .with_tls(secure.tls(Some((&secure.cert, &secure.key)))?)
        .with_user(USER, PASSWORD);
    let mut c = Client::connect(eps.clone(), Some(opts)).await?;
    let outside = c.put("/elsewhere/x", "y", None).await;
    assert!(
        outside.is_err(),
        "the rollgate role wrote outside its prefix"
    );
    assert!(
        secure.keys().await?.is_empty(),
        "{:?}",
        secure.keys().await?
    );

    // Everything right: the store answers and a fenced write lands.
    let store = EtcdStore::connect_with(&eps, PREFIX, secure.access(Some(PASSWORD), true)?).await?;
    store.get("nothing-yet").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_upgrades_a_pool_through_etcd_with_tls_and_auth() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let Some(secure) = SecureEtcd::start(&root.join("etcd")).await? else {
        return Ok(());
    };
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &secure.store_toml(),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, "pool-a").await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(&mut c, start_req("pool-a", &artifact, &sha)).await?;
    let end = wait_status(&[coord.addr], &op, "pool-a", Duration::from_secs(60), ended).await?;
    assert_eq!(
        names::upgrade_state(end.status),
        "completed",
        "{end:?}\n{}",
        coord.log()
    );
    // Its progress is in the secured etcd, under its prefix.
    let keys = secure.keys().await?;
    if !keys
        .iter()
        .any(|k| k.starts_with(&format!("{PREFIX}upgrades/")))
    {
        bail!("no upgrade record under {PREFIX}: {keys:?}");
    }
    Ok(())
}

/// The coordinator's `validate` refuses a plaintext etcd unless told `insecure = true`, and a
/// password file others can read.
#[test]
fn validate_refuses_plaintext_etcd_and_a_readable_password_file() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pw = tmp.path().join("pw");
    rollgate_common::pki::write_file(&pw, "secret\n", 0o644)?;
    let base = "id = \"c1\"\nlisten = \"127.0.0.1:0\"\ninsecure = true\n";
    let run = |store: &str| -> anyhow::Result<(bool, String)> {
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, format!("{base}{store}\n"))?;
        let out = std::process::Command::new(rollgate_tests::bin("rollgate-coordinator")?)
            .arg("validate")
            .arg(&p)
            .output()
            .context("run validate")?;
        Ok((out.status.success(), String::from_utf8(out.stderr)?))
    };
    let plain = "[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]";
    let (ok, err) = run(plain)?;
    assert!(!ok);
    assert!(
        err.contains("plaintext") && err.contains("store.insecure"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, err) = run(&format!("{plain}\ninsecure = true"))?;
    assert!(ok, "{err}");
    let (ok, err) = run("[store]\nkind = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]")?;
    assert!(!ok);
    assert!(err.contains("store.tls"), "{err}");
    let readable = format!(
        "{plain}\ninsecure = true\n[store.auth]\nuser = \"u\"\npassword_file = \"{}\"",
        pw.display()
    );
    let (ok, err) = run(&readable)?;
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let (ok, err) = run(&readable)?;
    assert!(ok, "{err}");
    Ok(())
}

/// Every agent's certificate is signed by the deployment's CA, so TLS alone lets fe-2's agent
/// answer at fe-1's address. The coordinator checks the certificate's role on every
/// connection: a command meant for fe-1 never reaches fe-2, and readiness says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_certificate_names_another_server_is_refused() -> anyhow::Result<()> {
    use rollgate_coordinator::agent_tls::AgentTls;
    use rollgate_coordinator::inventory::Inventory;
    use rollgate_coordinator::link::{AgentCommand, AgentLink, LinkError};
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 3, 3, "1.0").await?;
    let fe2 = fleet.servers.get(1).context("fe-2")?;
    let coord_tls = fleet.pki.issue(RoleKind::Coordinator, "c1")?;
    let tls = AgentTls::from_files(&coord_tls)?;

    // Positive control: fe-2 at its own address is accepted.
    let right = Inventory::new(
        &[("fe-2".into(), fe2.agent.addr.to_string())],
        Some(tls.clone()),
    )?;
    let epoch = rollgate_common::Epoch(2);
    right.fence("fe-2", epoch).await?;

    // fe-2's agent at fe-1's address: fence and drain are refused, naming both roles.
    let wired = Inventory::new(&[("fe-1".into(), fe2.agent.addr.to_string())], Some(tls))?;
    let err = wired
        .fence("fe-1", epoch)
        .await
        .expect_err("fence through an impostor");
    let drain = AgentCommand::Drain {
        timeout: Duration::from_secs(5),
    };
    let err2 = wired
        .run(
            "fe-1",
            "u1/fe-1/drain/1",
            epoch,
            &drain,
            Duration::from_secs(5),
        )
        .await
        .expect_err("drain through an impostor");
    for e in [&err, &err2] {
        let text = e.to_string();
        assert!(matches!(e, LinkError::Refused(_)), "{e:?}");
        assert!(
            text.contains("rollgate://agent/fe-1") && text.contains("agent/fe-2"),
            "{text}"
        );
    }
    // fe-2 was not drained: it still accepts connections and its agent says serving.
    let mut c = rollgate_tests::agent_client(fe2.agent.addr, &coord_tls).await?;
    let h = c
        .health(rollgate_proto::agent::v1::HealthRequest {})
        .await?
        .into_inner();
    assert!(h.accepting_connections, "{h:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", fe2.fe.port)).is_ok());

    // A real coordinator with that miswiring shows it in readiness.
    let mut pools = fleet.pool_toml("");
    let fe1_addr = fleet
        .servers
        .first()
        .context("fe-1")?
        .agent
        .addr
        .to_string();
    pools = pools.replacen(&fe1_addr, &fe2.agent.addr.to_string(), 1);
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &coord_tls,
        &crate::coordinator::embedded(root),
        &pools,
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coord.addr, &op).await?;
    let detail = rollgate_tests::eventually(
        "readiness to name the refused certificate",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .readiness(rollgate_proto::operator::v1::PoolRequest {
                        pool: "pool-a".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let s = r
                    .domains
                    .iter()
                    .flat_map(|d| &d.servers)
                    .find(|s| s.server == "fe-1")?
                    .clone();
                (s.detail.contains("not rollgate://agent/fe-1") && !s.active).then_some(s.detail)
            }
        },
    )
    .await;
    let detail = match detail {
        Ok(d) => d,
        Err(e) => {
            let r = c
                .clone()
                .readiness(rollgate_proto::operator::v1::PoolRequest {
                    pool: "pool-a".into(),
                })
                .await?
                .into_inner();
            bail!("{e}: {r:?}\n{}", coord.log());
        }
    };
    assert!(detail.contains("agent/fe-2"), "{detail}");
    assert!(
        coord.log().contains("agent identity refused"),
        "the refusal is logged loudly"
    );
    Ok(())
}

/// Names may be 128 characters; the operation ids built from them (plan id, server, step)
/// must still be accepted by the agents, or every step of such a pool fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_names_upgrade_a_pool() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let pool = format!("p{}", "o".repeat(127));
    let ids: Vec<String> = (1..=3)
        .map(|i| format!("fe-{i}-{}", "x".repeat(128 - 5)))
        .collect();
    assert!(ids.iter().all(|i| i.len() == 128) && pool.len() == 128);
    let fleet = Fleet::start_named(root, &pool, &ids, 3, "1.0").await?;
    let coord = CoordinatorProc::start(
        root,
        "c1",
        &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
        &crate::coordinator::embedded(root),
        &fleet.pool_toml(""),
    )
    .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let mut c = operator_client(coord.addr, &op).await?;
    wait_ready(&c, &pool).await?;
    let (artifact, sha) = make_artifact(root, "2.0")?;
    rollgate_tests::cluster::start_upgrade(&mut c, start_req(&pool, &artifact, &sha)).await?;
    let end = wait_status(&[coord.addr], &op, &pool, Duration::from_secs(60), ended).await?;
    assert_eq!(
        names::upgrade_state(end.status),
        "completed",
        "{end:?}\n{}",
        coord.log()
    );
    for (id, installs) in fleet.installs() {
        assert_eq!(installs, vec!["2.0"], "{id}");
    }
    Ok(())
}
