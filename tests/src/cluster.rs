//! A whole local deployment: a pool of sample front ends with their agents, and coordinator
//! processes (embedded store, or a real etcd), all real processes on loopback.

use crate::{agent_client, bin, make_artifact, spawn_daemon, AgentProc, FrontEnd, Pki};
use anyhow::{anyhow, bail};
use rollgate_common::tls::{RoleKind, TlsFiles};
use rollgate_proto::agent::v1 as apb;
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Child;
use tonic::transport::Channel;

/// One server of the pool.
pub struct Server {
    /// Its id (fe-1, fe-2, ...).
    pub id: String,
    /// Its upgrade domain.
    pub domain: String,
    /// The front end.
    pub fe: FrontEnd,
    /// Its agent.
    pub agent: AgentProc,
}

/// A pool of front ends with agents, all serving `version`, installed through the agents (so
/// that a rollback has a previous version to return to).
pub struct Fleet {
    /// Work directory.
    pub root: PathBuf,
    /// The deployment's PKI.
    pub pki: Pki,
    /// The pool's name.
    pub pool: String,
    /// The servers, in id order.
    pub servers: Vec<Server>,
}

impl Fleet {
    /// Starts `n` servers spread round-robin over `domains` domains (ud-1..ud-N).
    pub async fn start(
        root: &Path,
        pool: &str,
        n: usize,
        domains: usize,
        version: &str,
    ) -> anyhow::Result<Fleet> {
        let ids: Vec<String> = (1..=n).map(|i| format!("fe-{i}")).collect();
        Self::start_named(root, pool, &ids, domains, version).await
    }

    /// [`Fleet::start`] with the servers' ids given.
    pub async fn start_named(
        root: &Path,
        pool: &str,
        ids: &[String],
        domains: usize,
        version: &str,
    ) -> anyhow::Result<Fleet> {
        let pki = Pki::new(&root.join("pki"))?;
        let setup = pki.issue(RoleKind::Coordinator, "setup")?;
        let (artifact, sha) = make_artifact(root, version)?;
        let mut servers = Vec::new();
        for (i, id) in (1..).zip(ids) {
            let id = id.clone();
            let domain = format!("ud-{}", (i - 1) % domains.max(1) + 1);
            let fe = FrontEnd::create(root, &id, "0.0")?;
            let tls = pki.issue(RoleKind::Agent, &id)?;
            let agent = AgentProc::start(root, &id, pool, &domain, &tls, &fe).await?;
            // The base version goes in through the agent, as a real first roll-out would.
            let mut c = agent_client(agent.addr, &setup).await?;
            let h = |s: &str| {
                Some(apb::OperationHeader {
                    operation_id: format!("setup/{id}/{s}"),
                    epoch: 1,
                })
            };
            let ok = |r: apb::OperationResult| -> anyhow::Result<()> {
                if r.state == apb::OperationState::Succeeded as i32 {
                    Ok(())
                } else {
                    bail!("set-up step {} failed: {}", r.operation_id, r.message)
                }
            };
            ok(c.stop(apb::StopRequest { header: h("stop") })
                .await?
                .into_inner())?;
            ok(c.install_patch(apb::InstallPatchRequest {
                header: h("install"),
                artifact: artifact.display().to_string(),
                sha256: sha.clone(),
                version: version.into(),
                timeout_ms: 0,
                ..Default::default()
            })
            .await?
            .into_inner())?;
            ok(c.restart(apb::RestartRequest {
                header: h("restart"),
                timeout_ms: 0,
                ..Default::default()
            })
            .await?
            .into_inner())?;
            std::fs::remove_file(fe.dir.join("installs.log"))?;
            servers.push(Server {
                id,
                domain,
                fe,
                agent,
            });
        }
        Ok(Fleet {
            root: root.to_owned(),
            pki,
            pool: pool.to_owned(),
            servers,
        })
    }

    /// The `[[pools]]` section for this fleet; `extra` lines go into the pool table.
    pub fn pool_toml(&self, extra: &str) -> String {
        let mut s = format!("[[pools]]\nname = \"{}\"\n{extra}\n", self.pool);
        for sv in &self.servers {
            s.push_str(&format!(
                "\n[[pools.servers]]\nid = \"{}\"\nagent = \"{}\"\nupgrade_domain = \"{}\"\n",
                sv.id, sv.agent.addr, sv.domain
            ));
        }
        s
    }

    /// Starts one coordinator per id, each with its certificate from this fleet's PKI, the
    /// same `[store]` table and pools.
    pub async fn coordinators(
        &self,
        root: &Path,
        ids: &[&str],
        store_toml: &str,
        pools_toml: &str,
    ) -> anyhow::Result<Vec<CoordinatorProc>> {
        let mut coords = Vec::with_capacity(ids.len());
        for id in ids {
            let tls = self.pki.issue(RoleKind::Coordinator, id)?;
            coords.push(CoordinatorProc::start(root, id, &tls, store_toml, pools_toml).await?);
        }
        Ok(coords)
    }

    /// Every version installed through the agents since set-up, per server.
    pub fn installs(&self) -> Vec<(String, Vec<String>)> {
        self.servers
            .iter()
            .map(|s| (s.id.clone(), s.fe.installs()))
            .collect()
    }
}

/// A running `rollgate-coordinator`.
pub struct CoordinatorProc {
    /// Its id.
    pub id: String,
    /// Its directory (config, log).
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl CoordinatorProc {
    /// Writes a config (`store_toml` is the `[store]` table, `pools_toml` the pools) and starts it.
    pub async fn start(
        root: &Path,
        id: &str,
        tls: &TlsFiles,
        store_toml: &str,
        pools_toml: &str,
    ) -> anyhow::Result<CoordinatorProc> {
        let settings = "lost_after = \"2s\"\nshutdown_grace = \"5s\"";
        Self::start_with(root, id, tls, settings, store_toml, pools_toml).await
    }

    /// [`CoordinatorProc::start`] with the top-level `settings` lines (lost_after etc.) given.
    pub async fn start_with(
        root: &Path,
        id: &str,
        tls: &TlsFiles,
        settings: &str,
        store_toml: &str,
        pools_toml: &str,
    ) -> anyhow::Result<CoordinatorProc> {
        let dir = root.join(format!("coordinator-{id}"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "id = \"{id}\"\nlisten = \"127.0.0.1:0\"\n{settings}\n\n{store_toml}\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n{pools_toml}",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            ),
        )?;
        let mut me = CoordinatorProc {
            id: id.into(),
            dir,
            addr: "127.0.0.1:1".parse()?,
            child: None,
        };
        me.spawn().await?;
        Ok(me)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let args = [
            OsString::from("run"),
            OsString::from("--config"),
            self.dir.join("coordinator.toml").into_os_string(),
            OsString::from("--addr-file"),
            self.dir.join("coordinator.addr").into_os_string(),
        ];
        let (child, addr) = spawn_daemon(
            "rollgate-coordinator",
            &args,
            &self.dir.join("coordinator.addr"),
            &self.dir.join("coordinator.log"),
        )
        .await?;
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }

    /// Where it serves the web view and `/metrics` (when its store table adds `[http]`).
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        let p = self.dir.join("coordinator.http");
        Ok(std::fs::read_to_string(&p)
            .map_err(|e| anyhow!("no {}: {e}", p.display()))?
            .trim()
            .parse()?)
    }

    /// How it exited, if it has, without waiting: `None` while it runs.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!(
                "coordinator {} was not started, or was already killed",
                self.id
            ),
        }
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("coordinator {} is not running", self.id))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), sig)?;
        Ok(())
    }

    /// SIGKILL.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// SIGSTOP: frozen, lease not renewed, sockets open.
    pub fn stop_process(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT.
    pub fn continue_process(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    /// SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        Ok(tokio::time::timeout(Duration::from_secs(20), c.wait()).await??)
    }

    /// Starts it again with the same config.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

/// An operator client to `addr`.
pub async fn operator_client(
    addr: SocketAddr,
    tls: &TlsFiles,
) -> anyhow::Result<OperatorClient<Channel>> {
    Ok(OperatorClient::new(crate::channel(addr, tls).await?))
}

/// `StartUpgrade`, retried while the coordinator answers UNAVAILABLE (it is taking over
/// leadership, or no leader is elected yet), for up to 20 s, as the `rollgate` CLI does.
pub async fn start_upgrade(
    c: &mut OperatorClient<Channel>,
    req: pb::StartUpgradeRequest,
) -> Result<tonic::Response<pb::UpgradeStatus>, tonic::Status> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match c.start_upgrade(req.clone()).await {
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < give_up =>
            {
                let wait =
                    rollgate_proto::operator::retry_after(&s).unwrap_or(Duration::from_millis(200));
                tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
            }
            r => return r,
        }
    }
}

/// Who leads, according to `c`: (id, epoch), or None.
pub async fn leader_of(c: &mut OperatorClient<Channel>) -> Option<(String, u64)> {
    let r = c.leader(pb::LeaderRequest {}).await.ok()?.into_inner();
    (!r.id.is_empty()).then_some((r.id, r.epoch))
}

/// Waits (at most `limit`) until `c` names a leader at an epoch above `after` (0: any leader).
pub async fn wait_leader(
    c: &OperatorClient<Channel>,
    after: u64,
    limit: std::time::Duration,
) -> anyhow::Result<(String, u64)> {
    let what = if after == 0 {
        "a leader".to_owned()
    } else {
        format!("a leader at an epoch above {after}")
    };
    crate::eventually(&what, limit, || {
        let mut c = c.clone();
        async move { leader_of(&mut c).await.filter(|(_, e)| *e > after) }
    })
    .await
}

/// A `rollgate` CLI command preset with `tls` and the coordinator addresses.
pub fn cli(tls: &TlsFiles, coordinators: &[SocketAddr]) -> anyhow::Result<std::process::Command> {
    let mut c = std::process::Command::new(bin("rollgate")?);
    c.env("ROLLGATE_CA", &tls.ca)
        .env("ROLLGATE_CERT", &tls.cert)
        .env("ROLLGATE_KEY", &tls.key)
        .env(
            "ROLLGATE_COORDINATOR",
            coordinators
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    Ok(c)
}
