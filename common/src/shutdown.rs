//! One shutdown path: SIGINT or SIGTERM cancels a token that every task watches; the daemon then
//! stops taking work and drains with a deadline. A second signal exits at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal forces exit.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Listens for SIGINT and SIGTERM. The first cancels the returned token; the second ends the
/// process with [`FORCED_EXIT_CODE`]. The listener lives as long as the process.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    // Detached on purpose: it must outlive every other task so that a second signal still works
    // while they drain; it holds nothing that needs cleaning up.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down; send again to force"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down; send again to force"),
        }
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now without draining");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(token)
}
