//! The agent's side of the report line ([`rollgate_proto::line`]): the same reports as the
//! Watch stream, and every request a coordinator makes (a report now, the fence, the steps,
//! an operation's status), answered through the gRPC adapter itself ([`AgentApi`], by
//! [`line::answer`]), so that a request on the line is checked, run and refused exactly as the
//! call of the same name.
//! The caller's roles are read once, from the certificate it proved in the handshake.

use crate::core::AgentCore;
use crate::grpc::{reports, AgentApi, READERS};
use rollgate_common::tls::{authorize_roles, leaf_roles};
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::line;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::Status;

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
        async move { line::answer(&api, req).await }
    };
    let stop = core.shutdown_token().clone().cancelled_owned();
    if let Err(e) = line::serve(stream, reports(Arc::clone(&core)), answer, stop).await {
        tracing::debug!(error = %e, "report line ended");
    }
}
