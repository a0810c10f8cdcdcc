//! The coordinator's side of the report line ([`rollgate_proto::line`]): one session per agent
//! carrying its reports in, and the requests that idle agents need (a report now, the fence)
//! out, so that an idle agent costs a TLS session and a frame buffer rather than an HTTP/2
//! connection. [`crate::inventory`] runs the sessions and falls back to the gRPC Watch for an
//! agent that does not speak the line.
//!
//! A request goes through a [`LineQueue`]: the caller puts it in the outbox and waits on a
//! oneshot; the session writes the outbox when woken and hands each answer to its waiter by
//! id. A caller never writes to the connection itself, so that no lock is held across I/O and
//! a session's end fails every waiter at once.

use rollgate_proto::agent::v1 as pb;
use rollgate_proto::line::{self, Frames};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, Notify};

/// Why a request on the line got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// Requests to this agent use gRPC (see [`LineQueue::set_grpc_only`]).
    #[error("requests to the agent use gRPC, not the report line")]
    NotUp,
    /// The line did not come up within the caller's limit (the agent is unreachable).
    #[error("no report line to the agent came up within {0:?}")]
    Down(Duration),
    /// The session ended before the answer came.
    #[error("the report line ended before the agent answered")]
    Lost,
    /// No answer within the caller's limit.
    #[error("the agent did not answer on the report line within {0:?}")]
    TimedOut(Duration),
}

#[derive(Debug, Default)]
struct Inner {
    up: bool,
    /// Requests use gRPC at once: nobody dials this line (no watch task runs for it, or no
    /// TLS), or the agent refused the line's protocol on the last try.
    grpc_only: bool,
    next_id: u64,
    outbox: Vec<pb::LineRequest>,
    waiting: Vec<(u64, oneshot::Sender<pb::LineMessage>)>,
}

/// The requests of one agent's line and their waiters. Empty vectors do not allocate: an idle
/// agent's queue is a few words.
#[derive(Debug, Default)]
pub struct LineQueue {
    inner: Mutex<Inner>,
    wake: Notify,
    /// Told when a session comes up.
    came_up: Notify,
}

impl LineQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a session is up.
    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// True when requests to this agent use gRPC (see [`LineQueue::set_grpc_only`]).
    pub fn is_grpc_only(&self) -> bool {
        self.lock().grpc_only
    }

    /// Sends requests over gRPC from now on (the agent does not speak the line, or nobody
    /// dials it), or, with `false`, over the line once it is up.
    pub fn set_grpc_only(&self, grpc_only: bool) {
        self.lock().grpc_only = grpc_only;
    }

    /// Sends `kind` on the line and waits up to `limit` for its answer. While the line is down
    /// (not yet dialled, or being dialled again) it waits up to `up_wait` (within `limit`) for
    /// it to come up: a fence at take-over must not open an HTTP/2 connection to every agent
    /// whose line is a moment late, and a step with a long limit gives up on an unreachable
    /// agent as soon as a connect would have. Only an agent on gRPC answers `NotUp` at once.
    pub async fn ask(
        &self,
        kind: pb::line_request::Kind,
        up_wait: Duration,
        limit: Duration,
    ) -> Result<pb::LineMessage, AskError> {
        let start = tokio::time::Instant::now();
        let deadline = start + limit;
        let up_by = start + up_wait.min(limit);
        loop {
            let came_up = self.came_up.notified();
            tokio::pin!(came_up);
            // Registered before the look, so that a session coming up in between is not missed.
            came_up.as_mut().enable();
            {
                let inner = self.lock();
                if inner.up {
                    break;
                }
                if inner.grpc_only {
                    return Err(AskError::NotUp);
                }
            }
            if tokio::time::timeout_at(up_by, came_up).await.is_err() {
                return Err(AskError::Down(up_wait.min(limit)));
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.lock();
            if !inner.up {
                return Err(AskError::Lost);
            }
            inner.next_id += 1;
            let id = inner.next_id;
            inner.outbox.push(pb::LineRequest {
                id,
                kind: Some(kind),
            });
            inner.waiting.push((id, tx));
            id
        };
        self.wake.notify_one();
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(AskError::Lost),
            Err(_) => {
                let mut inner = self.lock();
                inner.waiting.retain(|(w, _)| *w != id);
                inner.outbox.retain(|r| r.id != id);
                Err(AskError::TimedOut(limit))
            }
        }
    }

    fn set_up(&self, up: bool) {
        let dropped = {
            let mut inner = self.lock();
            inner.up = up;
            if up {
                inner.grpc_only = false;
            }
            inner.outbox = Vec::new();
            std::mem::take(&mut inner.waiting)
        };
        // Dropping the senders tells their waiters the line is gone.
        drop(dropped);
        if up {
            self.came_up.notify_waiters();
        }
    }

    fn take_outbox(&self) -> Vec<pb::LineRequest> {
        std::mem::take(&mut self.lock().outbox)
    }

    /// Hands `m` to its waiter; gives it back when nobody waits for it (a report sent on the
    /// agent's own account, or an answer whose caller gave up).
    fn deliver(&self, m: pb::LineMessage) -> Option<pb::LineMessage> {
        if m.id == 0 {
            return Some(m);
        }
        let waiter = {
            let mut inner = self.lock();
            let at = inner.waiting.iter().position(|(id, _)| *id == m.id);
            at.map(|i| inner.waiting.swap_remove(i).1)
        };
        match waiter {
            Some(tx) => tx.send(m).err(),
            None => Some(m),
        }
    }
}

/// Marks the queue down however the session ends (an error, or its task cancelled).
struct Up<'a>(&'a LineQueue);

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.set_up(false);
    }
}

/// How a session ended.
#[derive(Debug)]
pub struct Ended {
    /// At least one frame came in (the line worked for a while).
    pub heard: bool,
    /// Why it ended.
    pub why: String,
}

/// Runs one session over `io` until it fails, the agent closes it or nothing arrives for
/// `idle` (the agent sends a heartbeat far more often: a silent line is a dead peer that TCP
/// has not noticed). Every report the agent sends on its own account goes to `on_report`.
pub async fn session<IO, R>(
    mut io: IO,
    queue: &LineQueue,
    idle: Duration,
    mut on_report: R,
) -> Ended
where
    IO: AsyncRead + AsyncWrite + Unpin,
    R: FnMut(pb::HealthReport),
{
    queue.set_up(true);
    let _up = Up(queue);
    let mut frames = Frames::new();
    let mut heard = false;
    let why = loop {
        tokio::select! {
            () = queue.wake.notified() => {
                for req in queue.take_outbox() {
                    if let Err(e) = line::write(&mut io, &req).await {
                        return Ended { heard, why: format!("report line failed: {e}") };
                    }
                }
            }
            more = tokio::time::timeout(idle, frames.fill(&mut io)) => match more {
                Err(_) => break format!("report line silent for {idle:?}"),
                Ok(Err(e)) => break format!("report line failed: {e}"),
                Ok(Ok(false)) => break "report line closed by the agent".to_owned(),
                Ok(Ok(true)) => loop {
                    match frames.take::<pb::LineMessage>() {
                        Ok(Some(m)) => {
                            heard = true;
                            match queue.deliver(m) {
                                Some(pb::LineMessage { id: 0, kind: Some(pb::line_message::Kind::Report(r)) }) => on_report(r),
                                Some(pb::LineMessage { id: 0, kind: Some(pb::line_message::Kind::Error(e)) }) => {
                                    return Ended { heard, why: format!("the agent refused the report line: {}", e.message) };
                                }
                                _ => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Ended { heard, why: format!("report line failed: {e}") },
                    }
                },
            },
        }
    };
    Ended { heard, why }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::line_message::Kind as Out;
    use pb::line_request::Kind as In;

    fn fence(epoch: u64) -> In {
        In::Fence(pb::FenceRequest { epoch })
    }

    #[tokio::test]
    async fn a_request_without_a_session_is_not_up_and_one_with_a_session_gets_its_answer() {
        let queue = LineQueue::default();
        // Not up yet: the request waits for the line, then gives up within its limit.
        assert_eq!(
            queue
                .ask(
                    fence(3),
                    Duration::from_millis(50),
                    Duration::from_millis(50)
                )
                .await,
            Err(AskError::Down(Duration::from_millis(50)))
        );
        // An agent on gRPC only: at once, so that the caller uses gRPC.
        queue.set_grpc_only(true);
        assert_eq!(
            queue
                .ask(fence(3), Duration::from_secs(60), Duration::from_secs(60))
                .await,
            Err(AskError::NotUp)
        );
        queue.set_grpc_only(false);
        let (coordinator, agent) = tokio::io::duplex(4096);
        let reports = futures_util::stream::pending();
        let answer = |req: pb::LineRequest| async move {
            match req.kind {
                Some(In::Fence(f)) => pb::LineMessage {
                    id: req.id,
                    kind: Some(Out::Fenced(pb::FenceResponse { epoch: f.epoch })),
                },
                _ => line::error(req.id, &tonic::Status::invalid_argument("no")),
            }
        };
        let agent = tokio::spawn(line::serve(
            agent,
            Box::pin(reports),
            answer,
            std::future::pending(),
        ));
        let session = session(coordinator, &queue, Duration::from_secs(30), |_| {});
        let asks = async {
            // Asked before the session is up: they wait for it.
            let (a, b) = tokio::join!(
                queue.ask(fence(5), Duration::from_secs(5), Duration::from_secs(5)),
                queue.ask(fence(6), Duration::from_secs(5), Duration::from_secs(5))
            );
            (a, b)
        };
        let (a, b) = tokio::select! {
            ended = session => panic!("session ended: {}", ended.why),
            ab = asks => ab,
        };
        // Each waiter got the answer to its own request.
        assert!(matches!(
            a.expect("line test").kind,
            Some(Out::Fenced(pb::FenceResponse { epoch: 5 }))
        ));
        assert!(matches!(
            b.expect("line test").kind,
            Some(Out::Fenced(pb::FenceResponse { epoch: 6 }))
        ));
        // The session was dropped: the queue is down again.
        assert!(!queue.is_up());
        agent.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_line_ends_after_its_idle_limit_and_fails_its_waiters() {
        let queue = LineQueue::default();
        let (coordinator, _agent) = tokio::io::duplex(4096);
        let idle = Duration::from_secs(15);
        let (ended, asked) = tokio::join!(session(coordinator, &queue, idle, |_| {}), async {
            while !queue.is_up() {
                tokio::task::yield_now().await;
            }
            queue
                .ask(fence(2), Duration::from_secs(60), Duration::from_secs(60))
                .await
        });
        assert!(ended.why.contains("silent"), "{}", ended.why);
        assert!(!ended.heard);
        assert_eq!(asked, Err(AskError::Lost));
    }

    #[tokio::test]
    async fn reports_nobody_asked_for_go_to_the_callback() {
        let queue = LineQueue::default();
        let (coordinator, agent) = tokio::io::duplex(4096);
        let reports = futures_util::stream::iter((1..=3).map(|e| pb::HealthReport {
            epoch: e,
            ..Default::default()
        }));
        // The agent's side ends after its three reports: the session sees the line close.
        let answer = |req: pb::LineRequest| async move {
            line::error(req.id, &tonic::Status::unimplemented(""))
        };
        let agent = tokio::spawn(line::serve(
            agent,
            Box::pin(reports),
            answer,
            std::future::pending(),
        ));
        let mut seen = Vec::new();
        let ended = session(coordinator, &queue, Duration::from_secs(30), |r| {
            seen.push(r.epoch)
        })
        .await;
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(ended.heard);
        assert!(ended.why.contains("closed"), "{}", ended.why);
        agent.await.expect("line test").expect("line test");
    }
}
