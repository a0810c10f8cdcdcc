//! The rollgate agent: one per server, driving one local service.
//!
//! - [`config`]: the TOML config and its validation.
//! - [`core`]: admission of fenced operations, running them, probing health (no gRPC).
//! - [`grpc`]: the `rollgate.agent.v1.Agent` adapter and the error-to-status mapping;
//!   [`line`]: the same reports and the fence over the lighter report line.
//! - [`server`]: binding, TLS, services and the shutdown path.
//! - [`journal`]: the durable operation journal; [`durable`]: the epoch and service record.
//! - [`hooks`]: running service commands; [`probe`]: TCP, connection count, HTTP and busy
//!   probes, the count asked of the kernel by [`sock_diag`];
//!   [`artifact`]: fetching and sha256-checking artifacts; [`wait`]: waiting for a condition
//!   of the service with short, growing gaps between looks.

pub mod artifact;
pub mod config;
pub mod core;
pub mod durable;
pub mod error;
pub mod grpc;
pub mod hooks;
pub mod join;
pub mod journal;
pub mod line;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod sock_diag;
pub mod wait;
