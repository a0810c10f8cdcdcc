//! The rollgate coordinator, in layers (each uses only the ones below it):
//!
//! - [`cli`]: the `rollgate` command; [`api`]: the operator gRPC adapter (wire ↔ domain, role
//!   checks, one error → status map); [`web`] and [`metrics`]: the read-only `[http]` side;
//!   [`server`]: wiring and the shutdown path.
//! - [`control`]: the leader-side use cases (start with plan defaults, commands, readiness,
//!   events, failover), typed errors; [`pool_locks`]: a start lock per pool and its pairs.
//! - [`node`]: campaign, take over (fence agents, resume upgrades and the roll-out), step down.
//! - [`rollout_driver`]: the loop around a fleet-wide roll-out: store, then start, pause,
//!   resume or abort pools' upgrades through [`control`]; [`rollout`]: its pure state machine.
//! - [`driver`]: the loop around the engine: store the new state (fenced), then act.
//! - [`engine`]: the pure upgrade state machine `(state, event) -> (state, actions)`.
//! - [`progress`]: typed records and key layout in the store.
//! - [`store`]: leadership and fenced transactions: etcd, or an embedded snapshot and log.
//! - [`readiness`]: Ready / Busy / InsufficientActiveFrontEnds, a pure function; [`health`]:
//!   the live health model (entries in place, per-domain counters, one expiry queue).
//! - [`link`]: the `AgentLink` seam to the agents; [`inventory`]: its tonic implementation
//!   and the live health model; [`report_line`]: the light health stream (reports, fence)
//!   per agent; [`agent_tls`]: mTLS to agents with their identity checked;
//!   [`env`]: the store, agents, hooks and clock the leader runs on.
//! - [`config`]: the TOML config, pools and their upgrade domains.

pub mod agent_tls;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod driver;
pub mod engine;
pub mod env;
pub mod health;
pub mod history_codec;
pub mod inventory;
pub mod link;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pool_locks;
pub mod progress;
pub mod readiness;
pub mod report_line;
pub mod rollout;
pub mod rollout_driver;
pub mod server;
pub mod store;
pub mod web;
