//! The upgrade engine: a pure state machine `(Upgrade, Event) -> (Upgrade, Vec<Action>)`.
//!
//! It does no I/O and reads no clock. A driver executes the [`Action`]s (agent RPCs, the
//! failover hook, timers, history writes), persists the [`Upgrade`] after every transition, and
//! feeds results back as [`Event`]s. A new leader loads the persisted state and issues
//! [`Upgrade::resume`]; operation ids are deterministic ([`Upgrade::op_id`]) so an agent's
//! journal recognises a step it already ran.
//!
//! # Model
//!
//! The plan lists upgrade domains in order. Exactly one domain is current, in one of four
//! phases:
//!
//! - `WaitingReady`: a readiness check is asked. Ready with the domain ReadyForUpgrade starts
//!   the domain; Busy (or a domain not ready) asks again after `busy_retry_interval` until
//!   `busy_retries` answers exhaust the patience; InsufficientActiveFrontEnds exhausts at once.
//!   Exhausted means fail over (then no more readiness gating: the traffic is on the paired
//!   pool), pause, or abort.
//! - `FailingOver`: the failover hook runs.
//! - `InProgress`: up to `parallelism` servers of the domain run their chain
//!   (drain|stop → install → restart → verify), in name order; a failed step is retried
//!   `server_retries` times with a new attempt number, then the failure policy applies.
//! - `Soaking`: after the canary (first) domain, a timer runs before the next domain.
//!
//! Pause and Abort only stop *launching* chains: a server already in flight finishes its chain,
//! so no server is left drained by an operator's command. Abort's `Finished` therefore waits for
//! the last in-flight chain.
//!
//! A rollback turns the direction Backward: every server this plan touched (done, failed or in
//! flight) gets a backward chain (drain|stop → rollback → restart → verify), walking domains from
//! the current one back to the first, each gated on readiness like the forward pass. A forward
//! step in flight when the rollback starts is allowed to finish, then that server joins the
//! backward pass. A backward chain that fails after its retries ends the upgrade as `Failed`
//! instead of looping.
//!
//! Every transition ends in one place (`settle`) that decides what follows from the new state,
//! which is what keeps the invariants (one domain in flight, at most `parallelism` servers, no
//! launch while paused or aborted, exactly one `Finished`) true whatever the event order.

mod machine;
mod model;
mod plan;

pub use model::{
    Action, Direction, DomainPhase, Event, PoolState, ServerPhase, ServerProgress, Status, Step,
    Upgrade,
};
pub use plan::{
    Domain, DrainMode, ExhaustedAction, FailureAction, Plan, PlanError, DEFAULT_BUSY_RETRIES,
    DEFAULT_BUSY_RETRY_INTERVAL,
};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
