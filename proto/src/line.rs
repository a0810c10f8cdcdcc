//! The report line (see `LineRequest` in `agent.proto`): length-prefixed prost frames over the
//! agent's TLS port, chosen by the ALPN protocol [`ALPN`] instead of HTTP/2.
//!
//! Why it exists: every coordinator, the follower included, keeps a health stream to every
//! agent. Over gRPC that stream costs an HTTP/2 connection's fixed buffers (h2's 16 KiB write
//! and 8 KiB read buffers, hyper's and tower's queue blocks: about 50 KiB per agent, measured
//! with a heap profile); a frame reader and a TLS session cost a few KiB. The line carries
//! only what an idle agent needs: its reports, a report on demand and the fence. The steps of
//! an upgrade stay gRPC calls, on connections made when they are needed.
//!
//! This module holds what both ends share: the framing ([`write`], [`Frames`]) and the agent's
//! side ([`serve`]), used by the agent and by the benchmark's simulated agents alike.

use crate::agent::v1 as pb;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message;
use std::future::Future;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The TLS ALPN protocol that selects the line instead of HTTP/2 (`h2`).
pub const ALPN: &[u8] = b"rollgate-line/1";

/// The largest frame either end accepts (a report is a few hundred bytes).
pub const MAX_FRAME: usize = 1 << 20;

/// Requests an agent works on at once per line; more are refused until one ends (a client
/// has at most a fence and a refresh out).
pub const MAX_PENDING: usize = 16;

/// Room made for each read: one report or a few.
const READ_CHUNK: usize = 512;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Writes `m` as one frame and flushes it.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(w: &mut W, m: &M) -> io::Result<()> {
    let len = m.encoded_len();
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "line frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    let mut buf = Vec::with_capacity(4 + len);
    // len <= MAX_FRAME < 2^32.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf)
        .map_err(|e| invalid(format!("cannot encode a line frame: {e}")))?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// The frames read from one end of a line: [`Frames::fill`] reads (cancel-safe, so it can sit
/// in a `select!`), [`Frames::take`] takes the whole frames read so far.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// An empty reader.
    pub fn new() -> Self {
        Frames::default()
    }

    /// Reads what has arrived; `Ok(false)` when the peer closed the line. Cancel-safe: bytes
    /// are only ever appended by a read that completed.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<bool> {
        self.buf.reserve(READ_CHUNK);
        Ok(r.read_buf(&mut self.buf).await? > 0)
    }

    /// The next whole frame, if one has arrived. A frame over [`MAX_FRAME`] or one that does not
    /// decode is an error: the line is then unusable (its framing is lost).
    pub fn take<M: Message + Default>(&mut self) -> io::Result<Option<M>> {
        let Some(head) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!(
                "line frame of {len} bytes announced, over the {MAX_FRAME}-byte limit"
            )));
        }
        let Some(body) = self.buf.get(4..4 + len) else {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        };
        let m = M::decode(body).map_err(|e| invalid(format!("unreadable line frame: {e}")))?;
        self.buf.drain(..4 + len);
        if self.buf.is_empty() && self.buf.capacity() > 8 * READ_CHUNK {
            // One large frame must not keep its buffer for the line's whole life.
            self.buf = Vec::new();
        }
        Ok(Some(m))
    }
}

/// A refusal as the gRPC call would have answered it.
pub fn error(id: u64, status: &tonic::Status) -> pb::LineMessage {
    pb::LineMessage {
        id,
        kind: Some(pb::line_message::Kind::Error(pb::LineError {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec(),
        })),
    }
}

/// The status a [`pb::LineError`] stands for.
pub fn status_of(e: pb::LineError) -> tonic::Status {
    tonic::Status::with_details(tonic::Code::from(e.code), e.message, e.details.into())
}

/// Answers `req` through `api`'s method of the same name, so that a request on the line is
/// checked, run and refused exactly as the gRPC call (the agent's and the simulator's alike).
pub async fn answer<A: pb::agent_server::Agent>(api: &A, req: pb::LineRequest) -> pb::LineMessage {
    use pb::line_message::Kind as Out;
    use pb::line_request::Kind as In;
    use tonic::{Request, Response, Status};
    fn out<T>(r: Result<Response<T>, Status>, kind: fn(T) -> Out) -> Result<Out, Status> {
        r.map(|r| kind(r.into_inner()))
    }
    let id = req.id;
    let kind = match req.kind {
        Some(In::Health(m)) => out(api.health(Request::new(m)).await, Out::Report),
        Some(In::Fence(m)) => out(api.fence(Request::new(m)).await, Out::Fenced),
        Some(In::Drain(m)) => out(api.drain(Request::new(m)).await, Out::Result),
        Some(In::Stop(m)) => out(api.stop(Request::new(m)).await, Out::Result),
        Some(In::InstallPatch(m)) => out(api.install_patch(Request::new(m)).await, Out::Result),
        Some(In::Rollback(m)) => out(api.rollback(Request::new(m)).await, Out::Result),
        Some(In::Restart(m)) => out(api.restart(Request::new(m)).await, Out::Result),
        Some(In::Verify(m)) => out(api.verify(Request::new(m)).await, Out::Result),
        Some(In::OperationStatus(m)) => {
            out(api.operation_status(Request::new(m)).await, Out::Result)
        }
        None => Err(Status::invalid_argument(
            "line request without a kind: is the client newer than this agent?",
        )),
    };
    match kind {
        Ok(kind) => pb::LineMessage {
            id,
            kind: Some(kind),
        },
        Err(status) => error(id, &status),
    }
}

/// Serves one line on the agent's side until the peer closes it, `stop` resolves or `reports`
/// ends: every item of `reports` goes out as it comes, and every request is answered by
/// `answer` (several at once, so that a slow probe never holds up reports or a fence).
pub async fn serve<IO, S, A, F>(
    mut io: IO,
    mut reports: S,
    answer: A,
    stop: impl Future<Output = ()>,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Stream<Item = pb::HealthReport> + Unpin,
    A: Fn(pb::LineRequest) -> F,
    F: Future<Output = pb::LineMessage>,
{
    let mut frames = Frames::new();
    let mut pending = FuturesUnordered::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            report = reports.next() => match report {
                Some(report) => {
                    let m = pb::LineMessage { id: 0, kind: Some(pb::line_message::Kind::Report(report)) };
                    write(&mut io, &m).await?;
                }
                None => return Ok(()),
            },
            more = frames.fill(&mut io) => {
                if !more? {
                    return Ok(());
                }
                while let Some(req) = frames.take::<pb::LineRequest>()? {
                    if pending.len() >= MAX_PENDING {
                        let busy = tonic::Status::resource_exhausted(format!(
                            "{MAX_PENDING} line requests are already being answered"
                        ));
                        write(&mut io, &error(req.id, &busy)).await?;
                    } else {
                        pending.push(answer(req));
                    }
                }
            }
            Some(m) = pending.next(), if !pending.is_empty() => write(&mut io, &m).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(server: &str) -> pb::HealthReport {
        pb::HealthReport {
            server_id: server.into(),
            epoch: 7,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn frames_survive_any_split_of_the_byte_stream() {
        let msgs: Vec<pb::LineMessage> = (1..=3)
            .map(|i| pb::LineMessage {
                id: i,
                kind: Some(pb::line_message::Kind::Report(report(&format!("fe-{i}")))),
            })
            .collect();
        let mut bytes = Vec::new();
        for m in &msgs {
            write(&mut bytes, m).await.expect("line test");
        }
        // Every cut of the stream into two reads gives the same three frames.
        for cut in 0..=bytes.len() {
            let mut frames = Frames::new();
            let mut got = Vec::new();
            for part in [&bytes[..cut], &bytes[cut..]] {
                let mut r = part;
                while frames.fill(&mut r).await.expect("line test") {}
                while let Some(m) = frames.take::<pb::LineMessage>().expect("line test") {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn an_oversized_or_garbled_frame_is_an_error_not_a_wait() {
        let mut frames = Frames::new();
        let mut r: &[u8] = &((MAX_FRAME as u32) + 1).to_be_bytes();
        frames.fill(&mut r).await.expect("line test");
        let e = frames.take::<pb::LineMessage>().expect_err("an error");
        assert!(e.to_string().contains("over the"), "{e}");

        let mut frames = Frames::new();
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut r: &[u8] = &bytes;
        frames.fill(&mut r).await.expect("line test");
        let e = frames.take::<pb::LineMessage>().expect_err("an error");
        assert!(e.to_string().contains("unreadable"), "{e}");
    }

    #[tokio::test]
    async fn serve_sends_reports_and_answers_requests_by_id() {
        let (client, agent) = tokio::io::duplex(4096);
        let reports =
            futures_util::stream::iter(vec![report("fe-1")]).chain(futures_util::stream::pending());
        let answer = |req: pb::LineRequest| async move {
            match req.kind {
                Some(pb::line_request::Kind::Fence(f)) => pb::LineMessage {
                    id: req.id,
                    kind: Some(pb::line_message::Kind::Fenced(pb::FenceResponse {
                        epoch: f.epoch,
                    })),
                },
                _ => error(req.id, &tonic::Status::invalid_argument("no")),
            }
        };
        let server = tokio::spawn(serve(
            agent,
            Box::pin(reports),
            answer,
            std::future::pending(),
        ));
        let mut client = client;
        let mut frames = Frames::new();
        let fence = pb::LineRequest {
            id: 42,
            kind: Some(pb::line_request::Kind::Fence(pb::FenceRequest { epoch: 9 })),
        };
        write(&mut client, &fence).await.expect("line test");
        write(&mut client, &pb::LineRequest { id: 43, kind: None })
            .await
            .expect("line test");
        let mut got = Vec::new();
        while got.len() < 3 {
            assert!(
                frames.fill(&mut client).await.expect("line test"),
                "line closed early"
            );
            while let Some(m) = frames.take::<pb::LineMessage>().expect("line test") {
                got.push(m);
            }
        }
        got.sort_by_key(|m| m.id);
        assert!(
            matches!(got[0].kind, Some(pb::line_message::Kind::Report(ref r)) if r.server_id == "fe-1")
        );
        assert!(matches!(
            got[1].kind,
            Some(pb::line_message::Kind::Fenced(pb::FenceResponse {
                epoch: 9
            }))
        ));
        match &got[2].kind {
            Some(pb::line_message::Kind::Error(e)) => {
                assert_eq!(status_of(e.clone()).code(), tonic::Code::InvalidArgument)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        drop(client);
        server.await.expect("line test").expect("line test");
    }
}
