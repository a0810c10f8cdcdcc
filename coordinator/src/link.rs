//! The seam between the leader's logic and the agents: [`AgentLink`]. The driver, the
//! readiness checks and the take-over talk to agents only through it, in domain terms; the
//! tonic implementation lives in [`crate::inventory`], the deterministic simulation has its own.

use crate::config::PoolSpec;
use crate::engine::RollbackArtifact;
use crate::readiness::{self, Clocks, PoolReadiness, ServerHealth};
use rollgate_common::Epoch;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// What a step asks an agent to do, with the plan's parameters resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// Fetch and verify the artifact into the agent's cache; the service keeps running.
    PrepareInstall {
        artifact: String,
        sha256: String,
        version: String,
    },
    /// Check that a rollback from `from_version` can run (fetching `fallback` if the agent has
    /// no previous artifact); the service keeps running.
    PrepareRollback {
        from_version: String,
        fallback: Option<RollbackArtifact>,
    },
    /// Graceful drain: stop new connections, wait for open ones up to `timeout`, then stop.
    /// At the timeout it fails and leaves the service draining (it never cuts connections).
    Drain { timeout: Duration },
    /// Immediate stop (a declared outage).
    Stop,
    Install {
        artifact: String,
        sha256: String,
        version: String,
    },
    Rollback {
        from_version: String,
        fallback: Option<RollbackArtifact>,
    },
    /// Start or restart; if the service accepts connections when it begins (a restart that
    /// timed out may have come up), drain it first for up to `drain_first`.
    Restart { drain_first: Option<Duration> },
    /// Accepting, healthy and not busy for `stable`, trying for up to `timeout`.
    Verify { stable: Duration, timeout: Duration },
}

/// Where an operation stands on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    /// The agent stopped while it ran; sending the same id again runs it again.
    Interrupted,
}

/// An agent's answer about one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpReply {
    pub state: OpState,
    pub message: String,
}

/// Why a call to an agent did not produce an answer. Each kind says what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The agent has accepted a newer epoch: this leader is deposed and must step down.
    #[error("stale epoch: the agent has accepted epoch {current}: {message}")]
    StaleEpoch { current: u64, message: String },
    /// The agent could not be reached (connect, TLS, stream reset).
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// The call's deadline passed before an answer came; the operation may still run.
    #[error("no answer in time: {0}")]
    TimedOut(String),
    /// Another operation runs on the agent; try again when it ends.
    #[error("agent busy with operation {running}: {message}")]
    Busy { running: String, message: String },
    /// The agent has no operation with that id.
    #[error("unknown operation: {0}")]
    NotFound(String),
    /// The agent refused the step for good (bad input, unsafe state, bad artifact): the step
    /// failed and nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The agent could not do it now but may later (shutting down, storage, download).
    #[error("{0}")]
    Retryable(String),
    /// This coordinator has no address for the server.
    #[error("no agent is known for server {0}")]
    UnknownServer(String),
}

impl LinkError {
    /// True when the same call may get an answer later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable(_)
                | LinkError::TimedOut(_)
                | LinkError::Busy { .. }
                | LinkError::Retryable(_)
        )
    }

    /// True when the agent could not be reached at all (as opposed to answering "no").
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LinkError::Unreachable(_) | LinkError::TimedOut(_))
    }
}

/// An agent's own time limits (from its health reports), from which step deadlines derive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    pub hook: Duration,
    pub install: Duration,
    pub start: Duration,
    pub fetch: Duration,
}

impl Default for AgentLimits {
    /// The agent's documented defaults, used until an agent has reported its own.
    fn default() -> Self {
        AgentLimits {
            hook: Duration::from_secs(60),
            install: Duration::from_secs(600),
            start: Duration::from_secs(60),
            fetch: Duration::from_secs(600),
        }
    }
}

/// How the agents are reached (see [`AgentLink::channels`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Channels {
    /// Agents whose report line is up.
    pub line: usize,
    /// Agents watched and called over gRPC.
    pub grpc: usize,
}

/// The leader's line to every agent.
#[tonic::async_trait]
pub trait AgentLink: Send + Sync + std::fmt::Debug {
    /// Every server this coordinator knows an agent for, sorted.
    fn servers(&self) -> Vec<String>;

    /// What each agent last reported (in memory; no call). A copy of the whole fleet's:
    /// readers of one pool or one server use [`AgentLink::health_of`] or
    /// [`AgentLink::readiness`].
    fn health(&self) -> HashMap<String, ServerHealth>;

    /// What `servers`' agents last reported (those heard from).
    fn health_of(&self, servers: &[&String]) -> HashMap<String, ServerHealth> {
        let mut all = self.health();
        servers
            .iter()
            .filter_map(|s| all.remove_entry(s.as_str()))
            .collect()
    }

    /// A pool's readiness at `clocks.now_ms` (see [`readiness::evaluate`]). Without `rows` the
    /// domain rows carry no per-server rows, which lets an implementation answer from counters.
    fn readiness(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
        rows: bool,
    ) -> PoolReadiness {
        let _ = rows;
        readiness::evaluate(spec, &self.health(), clocks, going_down, operation_running)
    }

    /// The monotonic clock health is stamped with (milliseconds).
    fn now_ms(&self) -> u64;

    /// Asks `servers` for a fresh report now and applies it, so that a decision does not rest
    /// on a report that predates the last step.
    async fn refresh(&self, servers: Vec<String>);

    /// Sends a state-changing step under `op_id` and `epoch`, waiting at most `timeout`. The
    /// same id again attaches to (or replays) the same operation.
    async fn run(
        &self,
        server: &str,
        op_id: &str,
        epoch: Epoch,
        command: &AgentCommand,
        timeout: Duration,
    ) -> Result<OpReply, LinkError>;

    /// The agent's journal entry for `op_id`.
    async fn operation(&self, server: &str, op_id: &str) -> Result<OpReply, LinkError>;

    /// Raises the agent's epoch so that older leaders are refused from now on.
    async fn fence(&self, server: &str, epoch: Epoch) -> Result<(), LinkError>;

    /// How many agents are reached over the report line and how many over gRPC (an agent
    /// that does not speak the line, or no TLS), for the metrics. The default: none known.
    fn channels(&self) -> Channels {
        Channels::default()
    }

    /// Takes `(server, address)` as every agent to keep a line to: new ones are connected,
    /// moved ones reconnected, gone ones dropped (membership changes). The default keeps a
    /// fixed set (the simulation's).
    fn set_agents(&self, agents: &[(String, String)]) {
        let _ = agents;
    }
}
