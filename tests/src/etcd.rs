//! Real etcd for tests: [`EtcdCluster`] runs 1 or 3 `etcd` processes on loopback ports in a
//! temporary directory (data and logs), and [`TcpProxy`] sits between a client and a member
//! so a test can cut that client off without touching anyone else.

use crate::{ci, eventually, free_port};
use anyhow::{anyhow, bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a member may take to become healthy.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Port races (another test took the free port first) are retried this often.
const START_ATTEMPTS: usize = 3;

/// Finds the `etcd` binary on PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, so health is probed the same way with TLS on.
    metrics_port: u16,
    child: Option<Child>,
}

/// TLS for etcd's client port: its server certificate and, with `client_cert_auth`, the CA
/// that client certificates must chain to (etcd's `--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// etcd's server certificate (PEM), naming 127.0.0.1.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA for client certificates.
    pub ca: PathBuf,
    /// Require client certificates signed by `ca`.
    pub client_cert_auth: bool,
}

/// A running etcd cluster of real processes, killed on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<EtcdServerTls>,
    extra: Vec<String>,
}

impl EtcdCluster {
    /// Starts `members` (1 or 3) etcd processes and waits until all are healthy. `Ok(None)`
    /// when etcd is not installed, so the caller can skip — except under CI (`CI=true`), where
    /// a missing etcd is an error: tests must fail there, not silently skip.
    pub async fn start(members: usize) -> anyhow::Result<Option<EtcdCluster>> {
        Self::start_with(members, None).await
    }

    /// [`EtcdCluster::start`] with TLS on the client port (`https://` endpoints).
    pub async fn start_with(
        members: usize,
        tls: Option<EtcdServerTls>,
    ) -> anyhow::Result<Option<EtcdCluster>> {
        Self::start_with_args(members, tls, &[]).await
    }

    /// [`EtcdCluster::start_with`] with more etcd flags (e.g. a small `--quota-backend-bytes`).
    pub async fn start_with_args(
        members: usize,
        tls: Option<EtcdServerTls>,
        extra: &[&str],
    ) -> anyhow::Result<Option<EtcdCluster>> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let Some(bin) = etcd_binary() else {
            if ci() {
                bail!("etcd not found on PATH: install it (Debian: apt-get install etcd-server)");
            }
            eprintln!("etcd not found on PATH: skipping (install etcd-server to run this test)");
            return Ok(None);
        };
        let mut last = None;
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("rollgate-etcd-")
                .tempdir()?;
            let mut members_v = Vec::with_capacity(members);
            for i in 0..members {
                members_v.push(Member {
                    name: format!("m{i}"),
                    client_port: free_port()?,
                    peer_port: free_port()?,
                    metrics_port: free_port()?,
                    child: None,
                });
            }
            let token = format!("rollgate-test-{}-{attempt}", std::process::id());
            let mut cluster = EtcdCluster {
                dir,
                bin: bin.clone(),
                token,
                members: members_v,
                tls: tls.clone(),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            };
            match cluster.boot().await {
                Ok(()) => return Ok(Some(cluster)),
                Err(e) => {
                    eprintln!("etcd start attempt {attempt} failed: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    async fn boot(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await?;
        }
        Ok(())
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The log file of member `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }

    /// The log of member `i` so far (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// The directory holding data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let m = self
            .members
            .get(i)
            .ok_or_else(|| anyhow!("no member {i}"))?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        // The data dir remembers the membership on restart; the initial-* flags then are ignored.
        // Tied to this process: killed with it, also when it is SIGKILLed and no Drop runs.
        let mut cmd = crate::owner::tied_std(&self.bin)?;
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", &self.token])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(&self.extra)
            .stdin(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
            if t.client_cert_auth {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&t.ca);
            }
        }
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = crate::owner::spawn_std(cmd)
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        if let Some(m) = self.members.get_mut(i) {
            m.child = Some(child);
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self
            .members
            .get(i)
            .ok_or_else(|| anyhow!("no member {i}"))?
            .metrics_port;
        let members = &mut self.members;
        let outcome = eventually(
            &format!("etcd member m{i} to be healthy"),
            START_LIMIT,
            || {
                let exited = members
                    .get_mut(i)
                    .and_then(|m| m.child.as_mut())
                    .and_then(|c| c.try_wait().ok().flatten());
                async move {
                    if let Some(status) = exited {
                        return Some(Err(status));
                    }
                    healthy(port).await.then_some(Ok(()))
                }
            },
        )
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => bail!(
                "etcd member m{i} exited ({status}) at start:\n{}",
                tail(&self.log(i))
            ),
            Err(e) => bail!("{e}:\n{}", tail(&self.log(i))),
        }
    }

    /// Client URLs of every member, e.g. `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The client address of member `i`.
    pub fn client_addr(&self, i: usize) -> anyhow::Result<SocketAddr> {
        let m = self
            .members
            .get(i)
            .ok_or_else(|| anyhow!("no member {i}"))?;
        Ok(SocketAddr::from(([127, 0, 0, 1], m.client_port)))
    }

    /// SIGKILL member `i` and reap it (no-op if it is not running).
    pub fn kill_member(&mut self, i: usize) -> anyhow::Result<()> {
        let m = self
            .members
            .get_mut(i)
            .ok_or_else(|| anyhow!("no member {i}"))?;
        if let Some(mut c) = m.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts member `i` again on the same ports and data, and waits until it is healthy.
    pub async fn restart_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_member(i)?;
        self.spawn(i)?;
        self.wait_healthy(i).await
    }

    /// The process ids of the members that run.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// True when member `i` answers `/health` as healthy.
    pub async fn is_healthy(&self, i: usize) -> bool {
        match self.members.get(i) {
            Some(m) => healthy(m.metrics_port).await,
            None => false,
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// etcd's `/health` on 127.0.0.1:`port` reports `"health":"true"` (it has a leader and serves
/// a quorum read).
async fn healthy(port: u16) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        Some(
            text.starts_with("HTTP/1.")
                && text.contains(" 200 ")
                && text.contains("\"health\":\"true\""),
        )
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A TCP proxy on 127.0.0.1 in front of one upstream address. [`TcpProxy::freeze`] stops
/// forwarding in both directions without closing anything, like a network partition; the
/// client sees silence, not errors. [`TcpProxy::thaw`] resumes.
pub struct TcpProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    /// Holds only the upstream's answers: requests still go through (and may take effect).
    answers_frozen: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, rx) = watch::channel(false);
        let (answers_frozen, answers_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting the accept task ends them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((inbound, _)) = accepted else { continue };
                        let (rx, arx) = (rx.clone(), answers_rx.clone());
                        conns.spawn(async move {
                            let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                            let (ir, iw) = inbound.into_split();
                            let (or, ow) = outbound.into_split();
                            tokio::join!(pipe(ir, ow, rx.clone(), None), pipe(or, iw, rx, Some(arx)));
                        });
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(TcpProxy {
            addr,
            frozen,
            answers_frozen,
            task,
        })
    }

    /// The proxy's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's URL for an etcd client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding (bytes are held, connections stay open).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Resumes forwarding.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
        self.answers_frozen.send_replace(false);
    }

    /// Holds back only what the upstream sends: requests arrive and take effect, their
    /// responses are lost to the client until [`TcpProxy::thaw`].
    pub fn freeze_answers(&self) {
        self.answers_frozen.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    mut answers_frozen: Option<watch::Receiver<bool>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            break;
        }
        if let Some(a) = answers_frozen.as_mut() {
            if a.wait_for(|f| !*f).await.is_err() {
                break;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
