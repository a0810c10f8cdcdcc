//! The upgrade engine: a pure state machine `(Upgrade, Event) -> (Upgrade, Vec<Action>)`.
//!
//! It does no I/O and reads no clock. A driver executes the [`Action`]s (agent RPCs, the
//! failover hook, timers, history writes), stores the [`Upgrade`] before carrying out any action
//! that follows from it ([`Action::needs_stored_state`]), and feeds results back as [`Event`]s.
//! A new leader loads the stored state and issues [`Upgrade::resume`]; operation ids are
//! deterministic ([`Upgrade::op_id`]) so an agent's journal recognises a step it already ran
//! or is running.
//!
//! # Model
//!
//! The plan lists upgrade domains in order; its domains are fixed when it starts. Exactly one
//! domain is current. In it, each server runs a chain:
//!
//! - `Prepare`: the agent fetches and verifies the artifact (forward) or checks that a rollback
//!   can run (backward) while the server still serves; at most `parallelism` servers are being
//!   prepared or wait prepared.
//! - the readiness gate: before *each* server goes down, readiness is asked (the procedure's
//!   per-server ReadyForUpgrade). Ready with the domain ReadyForUpgrade takes one prepared
//!   server down; Busy (or a domain not ready) asks again after `busy_retry_interval` until
//!   `busy_retries` answers exhaust the patience; InsufficientActiveFrontEnds exhausts at once.
//!   Exhausted means fail over (then no more gating: the traffic is on the paired pool), pause,
//!   or abort. At most `parallelism` servers are down at once.
//! - `Drain|Stop → Install → Restart → Verify` (backward: `Rollback` instead of `Install`); a
//!   failed step is retried `server_retries` times with a new attempt number, then the failure
//!   policy applies. A step whose answer never comes (agent unreachable) is `Unanswered`: the
//!   upgrade pauses and Resume asks the agent again under the same operation id.
//!
//! After the canary (first) domain, `Soaking` runs a timer before the next domain.
//!
//! Pause and Abort only stop *launching*: a server already in flight finishes its chain, so no
//! server is left drained by an operator's command. Once the run has ended (aborted, failed), a
//! server that a failed chain left out of service is *restored* on what it runs now (restart and
//! verify); one that cannot be restored is listed by [`Upgrade::out_of_service`].
//!
//! A rollback turns the direction Backward: every server this plan took down gets a backward
//! chain, walking domains from the current one back to the first, gated like the forward pass.
//! A forward step in flight when the rollback starts finishes, then that server joins the
//! backward pass. A backward chain that fails after its retries ends the upgrade as `Failed`.
//!
//! Every transition ends in one place (`settle`) that decides what follows from the new state,
//! which is what keeps the invariants (one domain in flight, at most `parallelism` servers down,
//! a readiness answer before each server goes down, no launch while paused or aborted, exactly
//! one `Finished`) true whatever the event order.

mod machine;
mod model;
mod plan;
pub mod window;

pub use model::{
    Action, Direction, DomainPhase, Event, Outcome, PoolState, ServerPhase, ServerProgress, Status,
    Step, Upgrade,
};
pub use plan::{
    bounds, Domain, DrainMode, ExhaustedAction, FailureAction, Plan, PlanError, RollbackArtifact,
    DEFAULT_BUSY_RETRIES, DEFAULT_BUSY_RETRY_INTERVAL,
};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
