//! Integration tests: real agent processes, real sample front ends, real mTLS on loopback.
//! One test binary with modules, to keep link time down.

mod agent;
mod browser;
mod config;
mod coordinator;
mod fault;
mod fleet;
mod fuzz;
mod lifetime;
mod line;
mod liveness;
mod membership;
mod operator;
mod rollout;
mod security;
mod sim;
mod store;
mod web;
