//! The engine's vocabulary: server steps, statuses, the persisted state, events in, actions out.

use super::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One step of a server chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Drain,
    Stop,
    Install,
    Rollback,
    Restart,
    Verify,
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::Drain => "drain",
            Step::Stop => "stop",
            Step::Install => "install",
            Step::Rollback => "rollback",
            Step::Restart => "restart",
            Step::Verify => "verify",
        }
    }

    /// The step after this one in a chain of `direction`, `None` after Verify.
    pub fn next(self, direction: Direction) -> Option<Step> {
        match self {
            Step::Drain | Step::Stop => Some(match direction {
                Direction::Forward => Step::Install,
                Direction::Backward => Step::Rollback,
            }),
            Step::Install | Step::Rollback => Some(Step::Restart),
            Step::Restart => Some(Step::Verify),
            Step::Verify => None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Forward installs the plan's version; Backward rolls back to the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forward,
    Backward,
}

impl Direction {
    /// The short tag used in operation ids.
    pub fn tag(&self) -> &'static str {
        match self {
            Direction::Forward => "fwd",
            Direction::Backward => "bwd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerPhase {
    Pending,
    InFlight { step: Step, attempt: u32 },
    Done,
    Failed { step: Step, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerProgress {
    pub phase: ServerPhase,
    /// The pass this phase belongs to. A Forward server that is Pending while the upgrade rolls
    /// back was never touched and is left alone.
    pub direction: Direction,
}

/// The pool-wide readiness answer (`Get-CsPoolUpgradeReadinessState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    Ready,
    Busy,
    InsufficientActiveFrontEnds,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Paused {
        reason: String,
    },
    Completed,
    Aborted {
        reason: String,
    },
    /// A rollback chain failed after its retries: the pool needs a human.
    Failed {
        reason: String,
    },
    RollingBack {
        reason: String,
    },
    RolledBack,
}

impl Status {
    /// Completed, Aborted, Failed or RolledBack. In-flight chains may still be finishing; see
    /// [`Upgrade::is_terminal`] for "nothing will ever happen again".
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Aborted { .. } | Status::Failed { .. } | Status::RolledBack
        )
    }

    /// Running or RollingBack: the only statuses in which new server chains are launched.
    pub fn is_active(&self) -> bool {
        matches!(self, Status::Running | Status::RollingBack { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused { .. } => "paused",
            Status::Completed => "completed",
            Status::Aborted { .. } => "aborted",
            Status::Failed { .. } => "failed",
            Status::RollingBack { .. } => "rolling_back",
            Status::RolledBack => "rolled_back",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Status::Paused { reason }
            | Status::Aborted { reason }
            | Status::Failed { reason }
            | Status::RollingBack { reason } => Some(reason),
            Status::Running | Status::Completed | Status::RolledBack => None,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason() {
            Some(reason) => write!(f, "{}: {reason}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainPhase {
    /// Gated on readiness; `busy_answers` counts Busy (or not-ReadyForUpgrade) answers so far.
    WaitingReady {
        busy_answers: u32,
    },
    /// The failover hook runs; its answer is always outstanding in this phase.
    FailingOver,
    InProgress,
    /// The canary domain is done; the soak timer runs.
    Soaking,
}

/// The whole engine state. It is serialized after every transition so a new leader resumes
/// from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    pub plan: Plan,
    pub status: Status,
    pub direction: Direction,
    /// Index into `plan.domains`; walks back toward 0 during Backward.
    pub domain_index: usize,
    pub domain_phase: DomainPhase,
    pub servers: BTreeMap<String, ServerProgress>,
    /// The pool's traffic is on its paired pool: readiness is no longer asked.
    pub failed_over: bool,
    /// The domain index of the readiness check whose answer is awaited, if any. Readiness
    /// answers carry no domain, so the engine keeps at most one check outstanding and uses this
    /// to drop an answer meant for a domain it has since left (a rollback can leave a domain
    /// that was still being asked about).
    #[serde(default)]
    pub readiness_outstanding: Option<usize>,
    /// How many times the upgrade was resumed. A failed server retried on Resume uses attempt
    /// `server_retries + 1 + resume_count`, so every retry gets a fresh operation id and the
    /// agent's journal cannot answer it with the previous failure.
    #[serde(default)]
    pub resume_count: u32,
}

/// What the driver feeds back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Answer to `CheckReadiness` for the current domain.
    Readiness {
        state: PoolState,
        domain_ready: bool,
        reason: String,
    },
    /// Answer to `RunStep` (same server, step and attempt).
    StepDone {
        server: String,
        step: Step,
        attempt: u32,
        ok: bool,
        message: String,
    },
    FailoverDone {
        ok: bool,
        message: String,
    },
    SoakDone,
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    Abort {
        by: String,
    },
    Rollback {
        by: String,
    },
}

/// What the engine asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Wait `after`, compute the pool's readiness and whether `domain` is ReadyForUpgrade, feed
    /// `Event::Readiness`.
    CheckReadiness {
        domain: String,
        #[serde(with = "humantime_serde")]
        after: Duration,
    },
    /// Call the agent with `op_id`, feed `Event::StepDone` with the same server, step, attempt.
    RunStep {
        server: String,
        step: Step,
        op_id: String,
        attempt: u32,
    },
    /// Run the failover hook, feed `Event::FailoverDone`.
    Failover { pool: String, paired: String },
    /// Wait, feed `Event::SoakDone`.
    Soak {
        #[serde(with = "humantime_serde")]
        after: Duration,
    },
    /// An entry for the durable event history.
    Record {
        kind: String,
        server: Option<String>,
        domain: Option<String>,
        message: String,
    },
    /// The upgrade reached a terminal status; emitted exactly once.
    Finished { status: Status },
}
