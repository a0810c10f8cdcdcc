//! What rollgate's daemons share.
//!
//! - [`config`]: loading TOML config files with errors that name the file and the field.
//! - [`tls`]: mTLS settings for servers and clients, and the role a peer's certificate carries.
//! - [`pki`]: making a CA and role certificates (tests, local setups, `rollgate certs`).
//! - [`epoch`]: the leader epoch used for fencing.
//! - [`telemetry`]: tracing set-up, human or JSON.
//! - [`shutdown`]: signals to a cancellation token; a second signal forces exit.
//! - [`time`]: wall-clock helpers for records meant for people.

pub mod config;
pub mod epoch;
pub mod pki;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use epoch::Epoch;
