//! The engine's vocabulary: server steps, statuses, the persisted state, events in, actions out.

use super::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One step of a server chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Fetch and verify what the chain will install (forward), or check that a rollback can
    /// run (backward), while the server still serves: nothing goes down for a bad artifact.
    Prepare,
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
            Step::Prepare => "prepare",
            Step::Drain => "drain",
            Step::Stop => "stop",
            Step::Install => "install",
            Step::Rollback => "rollback",
            Step::Restart => "restart",
            Step::Verify => "verify",
        }
    }

    /// The step after this one in a chain of `direction`; `None` after Verify. Prepare is
    /// followed by the readiness gate, not by a step: see [`ServerPhase::Prepared`].
    pub fn next(self, direction: Direction) -> Option<Step> {
        match (self, direction) {
            (Step::Prepare, _) => None,
            (Step::Drain | Step::Stop, Direction::Backward) => Some(Step::Rollback),
            (Step::Drain | Step::Stop, _) => Some(Step::Install),
            (Step::Install | Step::Rollback, _) => Some(Step::Restart),
            (Step::Restart, _) => Some(Step::Verify),
            (Step::Verify, _) => None,
        }
    }

    /// Whether a server is out of service from the moment this step starts until its chain
    /// ends (everything but Prepare).
    pub fn takes_down(self) -> bool {
        self != Step::Prepare
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Forward installs the plan's version; Backward rolls back to the previous one; Restore brings
/// a server that a failed or aborted chain left out of service back on whatever it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forward,
    Backward,
    Restore,
}

impl Direction {
    /// [`Direction::Forward`] (a serde default).
    pub fn forward() -> Direction {
        Direction::Forward
    }

    /// Whether this is [`Direction::Forward`].
    pub fn is_forward(&self) -> bool {
        *self == Direction::Forward
    }

    /// The short tag used in operation ids.
    pub fn tag(&self) -> &'static str {
        match self {
            Direction::Forward => "fwd",
            Direction::Backward => "bwd",
            Direction::Restore => "rst",
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Backward => "backward",
            Direction::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerPhase {
    Pending,
    /// The step was sent (its state stored first) and its answer is awaited.
    InFlight {
        step: Step,
        attempt: u32,
    },
    /// Prepare succeeded; the server waits for the readiness gate before it goes down.
    Prepared,
    /// The step was sent but no answer came (agent unreachable past the step's deadline): the
    /// server may be down, the upgrade is paused, and Resume asks the agent again with the
    /// same operation id.
    Unanswered {
        step: Step,
        attempt: u32,
        message: String,
    },
    Done,
    Failed {
        step: Step,
        message: String,
    },
}

/// Stored once per server launched and ended (B7: bytes per upgraded server), so its names are
/// short; the long names it was first stored under still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerProgress {
    #[serde(rename = "ph", alias = "phase")]
    pub phase: ServerPhase,
    /// The pass this phase belongs to. A Forward server that is Pending while the upgrade rolls
    /// back was never touched and is left alone.
    #[serde(
        rename = "dir",
        alias = "direction",
        default = "Direction::forward",
        skip_serializing_if = "Direction::is_forward"
    )]
    pub direction: Direction,
    /// This upgrade took the server out of service (a step that takes it down started) and no
    /// chain has brought it back yet (a chain ends with a verify that passed).
    #[serde(
        rename = "dn",
        alias = "down",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub down: bool,
}

impl ServerProgress {
    /// Why this server is out of service because of this upgrade while nothing works on it,
    /// if it is: a chain that took it down failed, its answer never came, or the run ended
    /// before it was brought back.
    pub fn out_of_service(&self) -> Option<String> {
        if !self.down {
            return None;
        }
        match &self.phase {
            ServerPhase::InFlight { .. } => None,
            ServerPhase::Failed { step, message } => Some(match self.direction {
                Direction::Restore => format!("could not be restored ({step}): {message}"),
                d => format!("{} chain failed at {step}: {message}", d.name()),
            }),
            ServerPhase::Unanswered { step, message, .. } => {
                Some(format!("{step} outcome unknown: {message}"))
            }
            _ => Some("taken out of service; the upgrade ended before it was brought back".into()),
        }
    }
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
    /// Completed, Aborted, Failed or RolledBack. In-flight chains (and restores) may still be
    /// finishing; see [`Upgrade::is_terminal`] for "nothing will ever happen again".
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
    /// Servers of the current domain are prepared, gated on readiness one by one, and run.
    InProgress,
    /// The failover hook runs; its answer is always outstanding in this phase.
    FailingOver,
    /// The canary domain is done; the soak timer runs.
    Soaking,
    /// The next domain waits for one of the plan's maintenance windows to open.
    AwaitingWindow,
}

/// The whole engine state. It is stored after every transition that leads to an action, before
/// the action, so a new leader resumes from it.
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
    /// The domain index of the readiness check whose answer is awaited, if any.
    #[serde(default)]
    pub readiness_outstanding: Option<usize>,
    /// How many readiness checks were ever asked; the outstanding one has this number. An
    /// answer is taken only when it carries it: a check asked before a rollback, a pause or a
    /// leader change may still answer, and its answer predates servers taken down since.
    #[serde(default)]
    pub readiness_asked: u64,
    /// Busy (or not-ReadyForUpgrade) answers in a row at the current gate.
    #[serde(default)]
    pub busy_answers: u32,
    /// How many times the upgrade was resumed. A failed server retried on Resume uses attempt
    /// `server_retries + 1 + resume_count`, so every retry gets a fresh operation id and the
    /// agent's journal cannot answer it with the previous failure.
    #[serde(default)]
    pub resume_count: u32,
}

/// How a step ended, as far as the coordinator knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The agent ran it and it worked.
    Succeeded { message: String },
    /// The agent ran it (or refused it) and it did not work.
    Failed { message: String },
    /// No answer: the agent could not be reached for longer than the step's deadline, or the
    /// coordinator's own task failed. The step may have run; nothing is assumed.
    Unknown { message: String },
}

impl Outcome {
    pub fn message(&self) -> &str {
        match self {
            Outcome::Succeeded { message }
            | Outcome::Failed { message }
            | Outcome::Unknown { message } => message,
        }
    }
}

/// What the driver feeds back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Answer to `CheckReadiness` number `id`.
    Readiness {
        id: u64,
        state: PoolState,
        domain_ready: bool,
        reason: String,
    },
    /// Answer to `RunStep` (same server, step and attempt).
    StepDone {
        server: String,
        step: Step,
        attempt: u32,
        outcome: Outcome,
    },
    FailoverDone {
        ok: bool,
        message: String,
    },
    SoakDone,
    /// Answer to `AwaitWindow`: a maintenance window is open.
    WindowOpen,
    /// Something the driver cannot turn into an answer (e.g. one of its tasks failed): the
    /// upgrade pauses with `message` instead of waiting forever.
    Internal {
        message: String,
    },
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
    /// Wait `after`, compute the pool's readiness and whether `domain` is ReadyForUpgrade (the
    /// plan's servers in flight counted as down), feed `Event::Readiness`. Asked before every
    /// server goes down.
    CheckReadiness {
        /// Echoed in the answer.
        id: u64,
        domain: String,
        #[serde(with = "humantime_serde")]
        after: Duration,
    },
    /// Call the agent with `op_id`, feed `Event::StepDone` with the same server, step, attempt.
    RunStep {
        server: String,
        step: Step,
        direction: Direction,
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
    /// Wait until one of the plan's maintenance windows is open (at once if one is), feed
    /// `Event::WindowOpen`.
    AwaitWindow { domain: String },
    /// An entry for the durable event history.
    Record {
        kind: String,
        server: Option<String>,
        domain: Option<String>,
        message: String,
    },
    /// The upgrade reached a terminal status and nothing is in flight; emitted exactly once.
    Finished { status: Status },
}

impl Action {
    /// Whether carrying the action out changes something outside the coordinator or commits
    /// to a wait, so that the state that produced it must be stored first. A readiness check
    /// asked at once is a read; a record is written with the next stored state.
    pub fn needs_stored_state(&self) -> bool {
        match self {
            Action::RunStep { .. }
            | Action::Failover { .. }
            | Action::Soak { .. }
            | Action::AwaitWindow { .. }
            | Action::Finished { .. } => true,
            Action::CheckReadiness { after, .. } => !after.is_zero(),
            Action::Record { .. } => false,
        }
    }
}
