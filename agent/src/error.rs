//! The agent's errors: what a caller did wrong, what the service did, and what is worth retrying.

use rollgate_common::Epoch;

/// Why a call to the agent was refused or could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed; nothing changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's epoch is older than one the agent already accepted; nothing changed.
    #[error("stale epoch {got}: this agent has accepted epoch {current}; a newer leader exists")]
    StaleEpoch {
        /// The epoch in the call.
        got: Epoch,
        /// The highest epoch the agent has accepted.
        current: Epoch,
    },
    /// The operation id is known with a different kind; nothing changed.
    #[error("operation {id} is already recorded as a {recorded} operation, not {requested}")]
    KindMismatch {
        /// The operation id.
        id: String,
        /// What the journal says it is.
        recorded: &'static str,
        /// What the call asked for.
        requested: &'static str,
    },
    /// Another operation is running; nothing changed. Retry when it ends.
    #[error("operation {running} ({kind}) is running; one operation at a time")]
    Busy {
        /// The running operation's id.
        running: String,
        /// Its kind.
        kind: &'static str,
    },
    /// The service is not in a state where this is safe; nothing changed.
    #[error("{0}")]
    Precondition(String),
    /// No operation with this id is known.
    #[error("no operation {} in the journal", rollgate_common::quote::quoted(.0))]
    UnknownOperation(String),
    /// The artifact could not be fetched or did not verify; nothing was installed.
    #[error(transparent)]
    Artifact(#[from] crate::artifact::ArtifactError),
    /// The state directory is missing, not private, or not the agent's.
    #[error(transparent)]
    StateDir(#[from] crate::durable::StateDirError),
    /// The journal, epoch or state files could not be written.
    #[error("agent storage failed: {0}")]
    Storage(String),
    /// The agent is shutting down and takes no new work.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl AgentError {
    /// True when the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Busy { .. } | AgentError::ShuttingDown | AgentError::Storage(_) => true,
            AgentError::Artifact(e) => e.is_retryable(),
            AgentError::StateDir(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<crate::journal::JournalError> for AgentError {
    fn from(e: crate::journal::JournalError) -> Self {
        AgentError::Storage(e.to_string())
    }
}
