//! rollgate's test harness: real processes, real TCP, real mTLS, in temporary directories.
//!
//! - [`Pki`]: a fresh CA and role certificates (rcgen), nothing committed.
//! - [`FrontEnd`]: a `rollgate-sample` service directory with a version installed.
//! - [`AgentProc`]: a real `rollgate-agent` process driving one front end.
//! - [`eventually`]: poll a condition with a deadline instead of sleeping.
//! - [`cluster_lock`]: taken first by every test that starts a whole cluster, so that such tests
//!   run one at a time under any runner.
//! - [`owner`]: nothing a test starts outlives the test process, even one that is SIGKILLed.
//! - [`ports`]: ports for the processes tests start, kept from every other test until exit.
//! - [`browser`]: a real headless Chromium driven over the DevTools protocol, for web pages.
//! - [`store_bench`]: the embedded store's write cost, for `rollgate-bench embedded`.
//! - [`bench_nginx`]: B1 on the peers' real nginx pool, side by side with Ansible `serial`.

pub mod bench_nginx;
pub mod browser;
pub mod chaos;
pub mod cluster;
pub mod etcd;
pub mod fleet;
pub mod monitor;
pub mod owner;
pub mod ports;
pub mod readiness_bench;
pub mod scale;
pub mod sim;
pub mod store_bench;

use anyhow::{anyhow, bail, Context};
use rollgate_common::pki::Ca;
use rollgate_common::tls::{Role, RoleKind, TlsFiles};
use rollgate_proto::agent::v1::agent_client::AgentClient;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Child;
use tokio::time::Instant;
use tonic::transport::Channel;

/// True when running under CI (`CI=true`): missing parts fail tests instead of skipping them.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The directory holding the workspace's built binaries (`target/<profile>`), or
/// `ROLLGATE_BIN_DIR` when set.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("ROLLGATE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test binary> or target/<profile>/<binary>
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", exe.display()))?
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a workspace binary, with a clear error when it has not been built.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build the workspace first (cargo build --workspace --bins)",
            p.display()
        )
    }
}

/// Polls `check` every 20ms until it returns `Some`, or fails after `limit` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lock file [`cluster_lock`] takes: `ROLLGATE_CLUSTER_LOCK` when set, else
/// `rollgate-tests-cluster.lock` in the system temp dir. `scripts/test` points it outside the
/// run's own temp dir, so that two runs on one machine also take turns.
pub fn cluster_lock_path() -> PathBuf {
    std::env::var_os("ROLLGATE_CLUSTER_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("rollgate-tests-cluster.lock"))
}

/// Held by a test that starts a whole cluster; released on drop.
#[derive(Debug)]
pub struct ClusterGuard {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Waits for, and takes, the exclusive right to run a cluster-heavy test: one starting etcd,
/// several coordinators or a fleet of agents and front ends, with deadlines of its own (lease
/// renewals, health probes) that it misses when another such test starves it of CPU.
///
/// Take it first, and keep the guard to the end of the test (`let _cluster =
/// cluster_lock().await?;`). It is an advisory `flock` on [`cluster_lock_path`]: it serialises
/// the threads of one test process (`cargo test`, each call opens the file anew and flock
/// locks conflict between open files) and separate processes (`cargo nextest`, whose
/// `cluster` test group does the same), and the kernel releases it when a holder dies. The wait
/// runs on a blocking thread, never on a tokio worker. Light tests do not take it and run
/// side by side as before.
pub async fn cluster_lock() -> anyhow::Result<ClusterGuard> {
    let path = cluster_lock_path();
    tokio::task::spawn_blocking(move || lock_exclusive(&path))
        .await
        .context("the cluster lock's waiting thread failed")?
}

fn lock_exclusive(path: &Path) -> anyhow::Result<ClusterGuard> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            // Made by another user (sticky /tmp): reading is enough for flock.
            .or_else(|_| std::fs::File::open(path))
            .with_context(|| format!("cannot open the cluster lock {}", path.display()))
    };
    let mut file = match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok(ClusterGuard { _lock: lock }),
        Err((file, Errno::EWOULDBLOCK)) => file,
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    };
    eprintln!(
        "waiting for the cluster lock {} (another cluster test runs)",
        path.display()
    );
    let t0 = std::time::Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => {
                eprintln!("took the cluster lock after {:.1?}", t0.elapsed());
                return Ok(ClusterGuard { _lock: lock });
            }
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
        }
    }
}

pub use ports::free_port;

/// A CA and the certificates issued from it, under one directory.
pub struct Pki {
    dir: PathBuf,
    ca: Ca,
    ca_path: PathBuf,
}

impl Pki {
    /// A fresh CA in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca = Ca::generate("rollgate test CA")?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca.cert_pem())?;
        Ok(Pki {
            dir: dir.to_owned(),
            ca,
            ca_path,
        })
    }

    /// The CA certificate file.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_path
    }

    /// The CA's private key (PEM), for a process that signs its own certificates (the fleet
    /// simulator).
    pub fn ca_key_pem(&self) -> String {
        self.ca.key_pem()
    }

    /// Certificate files for `role`, valid for 127.0.0.1, ::1 and localhost.
    pub fn issue(&self, kind: RoleKind, name: &str) -> anyhow::Result<TlsFiles> {
        self.issue_with(kind, name, rollgate_common::pki::Validity::default())
    }

    /// [`Pki::issue`] with an explicit validity (e.g. expired).
    pub fn issue_with(
        &self,
        kind: RoleKind,
        name: &str,
        validity: rollgate_common::pki::Validity,
    ) -> anyhow::Result<TlsFiles> {
        let role = Role::new(kind, name);
        let hosts = ["127.0.0.1", "::1", "localhost"].map(String::from);
        let issued = self.ca.issue_with(&role, &hosts, validity)?;
        let stem = format!("{kind}-{name}-{}", rollgate_common::time::now_ms());
        let (cert, key) = issued.write(&self.dir, &stem)?;
        Ok(TlsFiles {
            ca: self.ca_path.clone(),
            cert,
            key,
        })
    }

    /// A second, unrelated CA's certificate for `role` (must be refused by our servers).
    pub fn foreign(&self, kind: RoleKind, name: &str) -> anyhow::Result<TlsFiles> {
        let other = Ca::generate("someone else's CA")?;
        let issued = other.issue(&Role::new(kind, name), &["127.0.0.1".into()])?;
        let (cert, key) = issued.write(&self.dir, &format!("foreign-{kind}-{name}"))?;
        Ok(TlsFiles {
            ca: self.ca_path.clone(),
            cert,
            key,
        })
    }
}

/// An mTLS gRPC channel to `addr` presenting `tls`.
pub async fn channel(addr: SocketAddr, tls: &TlsFiles) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls.client_config()?)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// An agent client over mTLS.
pub async fn agent_client(
    addr: SocketAddr,
    tls: &TlsFiles,
) -> anyhow::Result<AgentClient<Channel>> {
    Ok(AgentClient::new(channel(addr, tls).await?))
}

/// A sample front end: a directory with a version installed, and a port.
#[derive(Debug, Clone)]
pub struct FrontEnd {
    /// The service's directory.
    pub dir: PathBuf,
    /// The port it serves on.
    pub port: u16,
}

impl FrontEnd {
    /// Creates `<root>/<name>` with `version` installed (not started).
    pub fn create(root: &Path, name: &str, version: &str) -> anyhow::Result<FrontEnd> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        // However it is started (by us, or by an agent's hook), the service exits when this
        // process is gone, even if it is killed before any Drop runs.
        owner::write_owner(&dir)?;
        let fe = FrontEnd {
            dir,
            port: free_port()?,
        };
        let (artifact, _) = make_artifact(root, version)?;
        let out = std::process::Command::new(bin("rollgate-sample")?)
            .args(["install", "--dir"])
            .arg(&fe.dir)
            .env("ROLLGATE_ARTIFACT", &artifact)
            .env("ROLLGATE_VERSION", version)
            .output()?;
        if !out.status.success() {
            bail!(
                "initial install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The initial install is set-up, not an upgrade: forget it.
        std::fs::remove_file(fe.dir.join("installs.log"))?;
        Ok(fe)
    }

    /// Starts it (outside any agent) and waits until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        let st = std::process::Command::new(bin("rollgate-sample")?)
            .args(["start", "--dir"])
            .arg(&self.dir)
            .args(["--port", &self.port.to_string()])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("sample front end in {} did not start", self.dir.display());
        }
        Ok(())
    }

    /// Stops it if it runs.
    pub fn stop(&self) -> anyhow::Result<()> {
        std::process::Command::new(bin("rollgate-sample")?)
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status()?;
        Ok(())
    }

    /// The versions installed through the agent, in order (the initial one excluded).
    pub fn installs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("installs.log"))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The `[service]` section of an agent config driving this front end.
    pub fn service_toml(&self) -> anyhow::Result<String> {
        let s = bin("rollgate-sample")?;
        let s = s.display();
        let d = self.dir.display();
        let p = self.port;
        // make_artifact writes releases next to the front ends' directories.
        let artifacts = self
            .dir
            .parent()
            .ok_or_else(|| anyhow!("front end directory {d} has no parent"))?
            .display();
        Ok(format!(
            r#"[service]
ports = [{p}]
artifact_dirs = ["{artifacts}"]
drain = ["{s}", "drain", "--dir", "{d}"]
start = ["{s}", "start", "--dir", "{d}", "--port", "{p}"]
stop = ["{s}", "stop", "--dir", "{d}"]
install = ["{s}", "install", "--dir", "{d}"]
version_command = ["{s}", "version", "--dir", "{d}"]
busy_command = ["{s}", "busy", "--dir", "{d}"]
health_url = "http://127.0.0.1:{p}/health"
hook_timeout = "20s"
drain_timeout = "20s"
verify_stable = "300ms"
verify_timeout = "10s"
"#
        ))
    }
}

impl Drop for FrontEnd {
    fn drop(&mut self) {
        // Never leave a daemonised front end behind a finished test.
        if let Ok(b) = bin("rollgate-sample") {
            let _ = std::process::Command::new(b)
                .args(["stop", "--dir"])
                .arg(&self.dir)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// Writes a sample release artifact for `version` under `root`; returns its path and sha256.
pub fn make_artifact(root: &Path, version: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = root.join(format!("release-{version}.txt"));
    let st = std::process::Command::new(bin("rollgate-sample")?)
        .arg("make-artifact")
        .arg(version)
        .arg(&path)
        .status()?;
    if !st.success() {
        bail!("make-artifact failed");
    }
    let sha = hex::encode(Sha256::digest(std::fs::read(&path)?));
    Ok((path, sha))
}

/// Starts workspace binary `name` with `args`, logging to `log`, and waits until it writes its
/// bound address to `addr_file`. Fails with the log when the process exits first.
pub async fn spawn_daemon(
    name: &str,
    args: &[OsString],
    addr_file: &Path,
    log: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let _ = std::fs::remove_file(addr_file);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // Tied to this process: killed with it, also when it is SIGKILLed and no Drop runs.
    let mut cmd = owner::tied_tokio(bin(name)?)?;
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let mut child = owner::spawn_tokio(cmd).with_context(|| format!("cannot start {name}"))?;
    let addr = eventually(
        &format!("{name} to listen"),
        Duration::from_secs(20),
        || {
            let exited = child.try_wait().ok().flatten().is_some();
            async move {
                if exited {
                    return Some(None);
                }
                std::fs::read_to_string(addr_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                    .map(Some)
            }
        },
    )
    .await?;
    match addr {
        Some(addr) => Ok((child, addr)),
        None => bail!(
            "{name} exited at start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// A running `rollgate-agent` process.
pub struct AgentProc {
    /// The config file it runs with.
    pub config: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl AgentProc {
    /// Writes a config for `server_id` driving `fe`, with TLS `tls`, and starts the agent.
    pub async fn start(
        root: &Path,
        server_id: &str,
        pool: &str,
        domain: &str,
        tls: &TlsFiles,
        fe: &FrontEnd,
    ) -> anyhow::Result<AgentProc> {
        let (config, state_dir) = Self::write_config(root, server_id, pool, domain, tls, fe)?;
        Self::spawn(config, state_dir).await
    }

    /// Writes the config [`AgentProc::start`] uses, in `<root>/agent-<server_id>` (the state
    /// directory); returns the config file and the state directory.
    pub fn write_config(
        root: &Path,
        server_id: &str,
        pool: &str,
        domain: &str,
        tls: &TlsFiles,
        fe: &FrontEnd,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let state_dir = root.join(format!("agent-{server_id}"));
        std::fs::create_dir_all(&state_dir)?;
        let config = state_dir.join("agent.toml");
        let text = format!(
            r#"server_id = "{server_id}"
pool = "{pool}"
upgrade_domain = "{domain}"
listen = "127.0.0.1:{port}"
state_dir = "{state}"
report_interval = "200ms"
shutdown_grace = "10s"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

{http}
{service}"#,
            state = state_dir.display(),
            // Metrics on, unless a benchmark measures the agent without them.
            http = if std::env::var_os("ROLLGATE_AGENT_NO_HTTP").is_some() {
                ""
            } else {
                "[http]\nlisten = \"127.0.0.1:0\"\n"
            },
            // A fixed port, so that a restarted agent is found where the coordinators expect it.
            port = free_port()?,
            ca = tls.ca.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            service = fe.service_toml()?,
        );
        std::fs::write(&config, text)?;
        Ok((config, state_dir))
    }

    /// Where the agent serves `/metrics` (its config has `[http]` on port 0).
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        let p = self.state_dir.join("http.addr");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("no {}", p.display()))?
            .trim()
            .parse()?)
    }

    /// Starts the agent with an existing config.
    pub async fn spawn(config: PathBuf, state_dir: PathBuf) -> anyhow::Result<AgentProc> {
        let args = [
            OsString::from("run"),
            OsString::from("--config"),
            config.clone().into_os_string(),
        ];
        let (child, addr) = spawn_daemon(
            "rollgate-agent",
            &args,
            &state_dir.join("agent.addr"),
            &state_dir.join("agent.log"),
        )
        .await?;
        Ok(AgentProc {
            config,
            state_dir,
            addr,
            child: Some(child),
        })
    }

    /// SIGKILL: the agent dies without any chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent not running"))?;
        let pid = c.id().ok_or_else(|| anyhow!("agent already reaped"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(tokio::time::timeout(Duration::from_secs(20), c.wait()).await??)
    }

    /// Starts the agent again with the same config and state (after kill or terminate).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let again = Self::spawn(self.config.clone(), self.state_dir.clone()).await?;
        *self = again;
        Ok(())
    }

    /// How the agent exited, if it has, without waiting: `None` while it runs. A test that must
    /// not crash it asks this after every call.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("the agent was not started, or was already killed"),
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }
}

/// `GET path` over plain HTTP/1.0 on `addr` (loopback): the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("GET {path} from {addr} timed out"))??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no HTTP header in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: bad status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}
