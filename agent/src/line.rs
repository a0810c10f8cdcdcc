//! The agent's side of the report line ([`rollgate_proto::line`]): the same reports as the
//! Watch stream, and every request a coordinator makes (a report now, the fence, the steps,
//! an operation's status), answered through the gRPC adapter itself ([`AgentApi`]), so that a
//! request on the line is checked, run and refused exactly as the call of the same name.
//! The caller's roles are read once, from the certificate it proved in the handshake.

use crate::core::AgentCore;
use crate::grpc::{reports, AgentApi, READERS};
use rollgate_common::tls::{authorize_roles, leaf_roles};
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_server::Agent;
use rollgate_proto::line;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::{Request, Response, Status};

/// Serves one line until the peer closes it or the agent shuts down. A client that may not
/// even read (no coordinator or operator role) gets one refusal and the line is closed.
pub async fn serve(core: Arc<AgentCore>, mut stream: TlsStream<TcpStream>) {
    let roles = leaf_roles(stream.get_ref().1.peer_certificates());
    if let Err(refused) = authorize_roles(&roles, READERS) {
        tracing::warn!(reason = %refused.message(), "report line refused");
        let refused = Status::permission_denied(format!(
            "the report line {}",
            refused.message().trim_start_matches("this call ")
        ));
        let _ = line::write(&mut stream, &line::error(0, &refused)).await;
        return;
    }
    let api = AgentApi::for_line(Arc::clone(&core), roles);
    let answer = |req: pb::LineRequest| {
        let api = api.clone();
        async move { answer(&api, req).await }
    };
    let stop = core.shutdown_token().clone().cancelled_owned();
    if let Err(e) = line::serve(stream, reports(Arc::clone(&core)), answer, stop).await {
        tracing::debug!(error = %e, "report line ended");
    }
}

async fn answer(api: &AgentApi, req: pb::LineRequest) -> pb::LineMessage {
    use pb::line_message::Kind as Out;
    use pb::line_request::Kind as In;
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
        Err(status) => line::error(id, &status),
    }
}
