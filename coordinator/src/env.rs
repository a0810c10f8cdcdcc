//! What the leader's logic runs against: the store, the agents, the pool hooks and a clock,
//! each behind a seam so that the same `control`, `driver` and `node` code runs in the daemon
//! and in the deterministic simulation.

use crate::config::PoolConfig;
use crate::link::AgentLink;
use crate::store::Store;
use rollgate_common::Epoch;
use std::sync::Arc;
use std::time::Duration;

/// Wall-clock time, for plan ids, event timestamps and maintenance windows (which are wall-clock
/// times by definition); every other decision uses tokio's monotonic clock, which the
/// simulation controls.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix milliseconds.
    fn wall_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        rollgate_common::time::now_ms()
    }
}

/// Runs a pool's failover and failback hooks.
#[tonic::async_trait]
pub trait PoolHooks: Send + Sync + std::fmt::Debug {
    /// Fails `pool` over to `paired` (or back, when `over` is false) on behalf of the leader at
    /// `epoch`. Returns one line on success, or why it failed.
    async fn run(
        &self,
        pool: &PoolConfig,
        paired: &str,
        over: bool,
        epoch: Epoch,
    ) -> Result<String, String>;
}

/// Hooks as configured commands (argv, no shell), with ROLLGATE_POOL, ROLLGATE_PAIRED_POOL,
/// ROLLGATE_ACTION (failover or failback) and ROLLGATE_EPOCH in their environment: a load
/// balancer API that takes a fencing token can refuse a deposed leader's call with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommandHooks;

#[tonic::async_trait]
impl PoolHooks for CommandHooks {
    async fn run(
        &self,
        pool: &PoolConfig,
        paired: &str,
        over: bool,
        epoch: Epoch,
    ) -> Result<String, String> {
        let (argv, what) = if over {
            (&pool.failover, "failover")
        } else {
            (&pool.failback, "failback")
        };
        let Some((program, args)) = argv.split_first() else {
            return Err(format!(
                "pool {} has no {what} command configured",
                pool.name
            ));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("ROLLGATE_POOL", &pool.name)
            .env("ROLLGATE_PAIRED_POOL", paired)
            .env("ROLLGATE_ACTION", what)
            .env("ROLLGATE_EPOCH", epoch.get().to_string())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(pool.hook_timeout, cmd.output()).await {
            Err(_) => {
                return Err(format!(
                    "{what} command timed out after {}",
                    humantime::format_duration(pool.hook_timeout)
                ))
            }
            Ok(Err(e)) => return Err(format!("{what} command could not run: {e}")),
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            let tail = String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned();
            return Err(format!(
                "{what} command exited with {}: {tail}",
                out.status.code().unwrap_or(-1)
            ));
        }
        Ok(if over {
            format!("pool {} failed over to {paired}", pool.name)
        } else {
            format!("pool {} failed back from {paired}", pool.name)
        })
    }
}

/// Everything the leader's logic needs that outlives one upgrade. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Env {
    /// This coordinator's id.
    pub me: String,
    /// Leadership and progress.
    pub store: Store,
    /// The agents: commands and live health.
    pub agents: Arc<dyn AgentLink>,
    /// The pools' failover hooks.
    pub hooks: Arc<dyn PoolHooks>,
    /// Wall-clock time for ids and timestamps.
    pub clock: Arc<dyn Clock>,
    /// A server whose agent has not reported for this long counts as lost.
    pub lost_after: Duration,
    /// A server that started serving less than this long ago makes its pool Busy.
    pub stabilization: Duration,
}
