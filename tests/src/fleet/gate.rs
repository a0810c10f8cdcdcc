//! What a simulated agent's connections do: answer, break (a crash) or go silent (a hang).
//!
//! A hang must look like a frozen process, not like a closed socket: TCP stays open, nothing is
//! read or written, so the coordinator only finds out from missing reports and its own
//! keep-alives. Gating the connection's reads and writes gives exactly that without touching
//! the gRPC service.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How a simulated agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers normally.
    Up,
    /// Listener and connections closed, as when the process died.
    Crashed,
    /// Connections open but silent, no new connection answered, no report sent.
    Hung,
}

type Wake = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection that follows its agent's [`Mode`].
pub struct GatedIo<T> {
    inner: T,
    mode: watch::Receiver<Mode>,
    // Registered with the connection's task so that a mode change wakes it even when the
    // socket has nothing to say (a crash must close an idle Watch connection at once).
    wake: Option<Wake>,
}

impl<T> GatedIo<T> {
    /// Wraps `inner`, gated by `mode`.
    pub fn new(inner: T, mode: watch::Receiver<Mode>) -> Self {
        GatedIo {
            inner,
            mode,
            wake: None,
        }
    }

    fn gate(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A change seen while registering means the mode moved: look again, a few times at most.
        for _ in 0..4 {
            let mode = *self.mode.borrow_and_update();
            let wake = self.wake.get_or_insert_with(|| {
                let mut rx = self.mode.clone();
                Box::pin(async move {
                    if rx.changed().await.is_err() {
                        // The agent is gone: never wake again for it.
                        std::future::pending::<()>().await;
                    }
                })
            });
            if wake.as_mut().poll(cx).is_ready() {
                self.wake = None;
                continue;
            }
            return match mode {
                Mode::Up => Poll::Ready(Ok(())),
                Mode::Hung => Poll::Pending,
                Mode::Crashed => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "simulated agent crash",
                ))),
            };
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GatedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.gate(cx))?;
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GatedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        std::task::ready!(me.gate(cx))?;
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.gate(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T> tonic::transport::server::Connected for GatedIo<T> {
    // The client's role was checked right after the handshake; the service needs nothing more.
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_hang_stops_reads_until_restored_and_a_crash_breaks_them() -> anyhow::Result<()> {
        let (tx, rx) = watch::channel(Mode::Up);
        let (a, mut b) = tokio::io::duplex(64);
        let mut gated = GatedIo::new(a, rx);
        b.write_all(b"x").await?;
        let mut one = [0u8; 1];
        gated.read_exact(&mut one).await?;
        tx.send_replace(Mode::Hung);
        b.write_all(b"y").await?;
        let hung =
            tokio::time::timeout(std::time::Duration::from_millis(100), gated.read(&mut one)).await;
        assert!(hung.is_err(), "a hung connection must not deliver data");
        tx.send_replace(Mode::Up);
        gated.read_exact(&mut one).await?;
        assert_eq!(&one, b"y");
        let read = tokio::spawn(async move { gated.read(&mut [0u8; 1]).await });
        tx.send_replace(Mode::Crashed);
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), read).await??;
        assert_eq!(
            r.err().map(|e| e.kind()),
            Some(io::ErrorKind::ConnectionReset)
        );
        Ok(())
    }
}
