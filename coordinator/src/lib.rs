//! The rollgate coordinator.
//!
//! - [`config`]: the TOML config, pools and their upgrade domains.
//! - [`store`]: leadership and progress: etcd, or an embedded file for one coordinator; every
//!   leader write fenced by the election key's create revision.
//! - [`inventory`]: one health stream per agent, in memory; agent clients.
//! - [`readiness`]: Ready / Busy / InsufficientActiveFrontEnds, a pure function.
//! - [`engine`]: the upgrade engine, a pure state machine `(state, event) -> (state, actions)`.
//! - [`driver`]: the I/O shell around the engine: fenced progress writes, agent calls, hooks.
//! - [`node`]: campaign, lead (fence agents, resume upgrades), step down.
//! - [`api`]: the operator gRPC API; [`server`]: wiring and shutdown; [`cli`]: the `rollgate` CLI.

pub mod api;
pub mod cli;
pub mod config;
pub mod driver;
pub mod engine;
pub mod inventory;
pub mod node;
pub mod readiness;
pub mod server;
pub mod store;
