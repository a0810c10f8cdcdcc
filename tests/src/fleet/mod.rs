//! A fleet simulator: one process serving N agents over real gRPC and real mTLS, each on its
//! own loopback port with its own certificate, with cheap steps (a configurable sleep, version
//! and phase kept in memory), and a control to crash or hang some of them.
//!
//! - [`agent`]: the `rollgate.agent.v1.Agent` contract over in-memory state.
//! - [`gate`]: a connection that answers, breaks (crash) or goes silent (hang).
//! - [`listen`]: each agent's listener and TLS identity.
//! - [`control`]: the line protocol on the simulator's stdin/stdout, and [`FleetProc`], the
//!   harness side that starts `rollgate-fleet` and talks to it.
//!
//! Who each agent is (server id, pool, domain, address) is decided in one place,
//! [`layout`], and turned into coordinator configuration in one place, [`pools_toml`].

pub mod agent;
pub mod control;
pub mod gate;
pub mod listen;

pub use control::FleetProc;

use agent::SimAgent;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A simulated agent's identity: what a coordinator must be told (or, later, be told by the
/// agent joining) to drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Server id (its certificate carries `rollgate://agent/<server_id>`).
    pub server_id: String,
    /// Its pool.
    pub pool: String,
    /// Its upgrade domain.
    pub domain: String,
    /// Where its agent answers.
    pub addr: SocketAddr,
}

/// The shape of a simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Agents in all.
    pub agents: usize,
    /// Pools they are spread over (round-robin).
    pub pools: usize,
    /// Upgrade domains per pool.
    pub domains: usize,
    /// The version every agent starts with.
    pub version: String,
    /// How long every step (drain, stop, install, restart, verify) takes.
    pub step: Duration,
    /// How often an unchanged agent sends a health report on its Watch stream.
    pub report_interval: Duration,
}

/// The pool name of pool `i`.
pub fn pool_name(i: usize) -> String {
    format!("pool-{i:03}")
}

/// Server id, pool and domain of every agent of `spec`, in order.
pub fn layout(spec: &FleetSpec) -> Vec<(String, String, String)> {
    let pools = spec.pools.max(1);
    (0..spec.agents)
        .map(|i| {
            let (pool, nth) = (i % pools, i / pools);
            (
                format!("fe-{i:05}"),
                pool_name(pool),
                format!("ud-{}", nth % spec.domains.max(1) + 1),
            )
        })
        .collect()
}

/// The `[[pools]]` tables of a coordinator config driving `agents`, pools in name order;
/// `extra` lines go into every pool table.
pub fn pools_toml(agents: &[Identity], extra: &str) -> String {
    let mut by_pool: std::collections::BTreeMap<&str, Vec<&Identity>> = Default::default();
    for a in agents {
        by_pool.entry(&a.pool).or_default().push(a);
    }
    let mut s = String::new();
    for (pool, members) in by_pool {
        s.push_str(&format!("[[pools]]\nname = \"{pool}\"\n{extra}\n"));
        for a in members {
            s.push_str(&format!(
                "[[pools.servers]]\nid = \"{}\"\nagent = \"{}\"\nupgrade_domain = \"{}\"\n",
                a.server_id, a.addr, a.domain
            ));
        }
        s.push('\n');
    }
    s
}

/// A running simulated fleet (in this process).
pub struct SimFleet {
    /// Every agent, in [`layout`] order.
    pub agents: Vec<Arc<SimAgent>>,
    stop: CancellationToken,
}

impl SimFleet {
    /// Signs a certificate for every agent of `part` (indexes into [`layout`]), binds its
    /// listener on 127.0.0.1 and serves it.
    pub async fn start(
        spec: &FleetSpec,
        part: std::ops::Range<usize>,
        ca_cert_pem: &str,
        ca_key_pem: &str,
    ) -> anyhow::Result<SimFleet> {
        let tls = listen::TlsFactory::new(ca_cert_pem, ca_key_pem)?;
        let stop = CancellationToken::new();
        let mut agents = Vec::with_capacity(part.len());
        let all = layout(spec);
        let part = all.get(part.clone()).ok_or_else(|| {
            anyhow::anyhow!("agents {part:?} are not in a fleet of {}", all.len())
        })?;
        for (server_id, pool, domain) in part.iter().cloned() {
            let listener = listen::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let addr = listener.local_addr()?;
            let acceptor = tls.acceptor(&server_id, addr)?;
            let agent = Arc::new(SimAgent::new(
                Identity {
                    server_id,
                    pool,
                    domain,
                    addr,
                },
                &spec.version,
                spec.step,
                spec.report_interval,
            ));
            tokio::spawn(listen::serve(
                Arc::clone(&agent),
                listener,
                acceptor,
                stop.clone(),
            ));
            agents.push(agent);
        }
        Ok(SimFleet { agents, stop })
    }

    /// The agents' identities, in order.
    pub fn identities(&self) -> Vec<Identity> {
        self.agents.iter().map(|a| a.id.clone()).collect()
    }

    /// The agent serving `server_id`.
    pub fn agent(&self, server_id: &str) -> Option<&Arc<SimAgent>> {
        self.agents.iter().find(|a| a.id.server_id == server_id)
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Raises this process's open-file limit as far as it may go (up to `want`), since every
/// simulated agent holds a listener and a connection per coordinator. Returns the new limit.
pub fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    // Root may raise the hard limit too (up to fs.nr_open); others stop at the hard limit.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = want.min(nr_open.max(hard));
    if setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)).is_ok() {
        return Ok(target);
    }
    let fallback = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, fallback, hard)?;
    Ok(fallback)
}
