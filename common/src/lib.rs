//! What rollgate's daemons share.
//!
//! - [`config`]: loading TOML config files with errors that name the file and the field.
//! - [`tls`]: mTLS settings for servers and clients, and the role a peer's certificate carries.
//! - [`peer_tls`]: dialling a peer over mTLS with its role checked before anything is sent.
//! - [`pki`]: making a CA and role certificates (tests, local setups, `rollgate certs`).
//! - [`epoch`]: the leader epoch used for fencing.
//! - [`telemetry`]: tracing set-up, human or JSON.
//! - [`shutdown`]: signals to a cancellation token; a second signal forces exit.
//! - [`time`]: wall-clock helpers for records meant for people.
//! - [`quote`]: caller input in error messages, escaped and cut short.

pub mod config;
pub mod epoch;
pub mod http;
pub mod peer_tls;
pub mod pki;
pub mod quote;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use epoch::Epoch;

/// Accepted connections with TCP_NODELAY set: gRPC writes a response as several small frames,
/// and Nagle's algorithm with delayed ACKs would hold the last one back for ~40 ms.
pub fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    })
}
