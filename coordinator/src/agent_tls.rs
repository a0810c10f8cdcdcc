//! mTLS to agents: [`rollgate_common::peer_tls`] with each connection held to the agent of
//! the server it is for (`rollgate://agent/<server>`), so that no other agent of the fleet can
//! answer at its address.

use rollgate_common::peer_tls::{Expected, PeerConnector, PeerTls, PeerTlsError};
use rollgate_common::tls::{Role, RoleKind, TlsFiles};
use tokio::net::TcpStream;

pub use rollgate_common::peer_tls::Refusal;

/// The client side of mTLS to agents, shared by every agent connection: one configuration
/// for gRPC (`h2`), one for the report line.
#[derive(Debug, Clone)]
pub struct AgentTls {
    grpc: PeerTls,
    line: PeerTls,
}

impl AgentTls {
    /// Reads the CA, our certificate chain and key.
    pub fn from_files(files: &TlsFiles) -> Result<AgentTls, PeerTlsError> {
        let grpc = PeerTls::from_files(files)?;
        let line = grpc.with_alpn(rollgate_proto::line::ALPN);
        Ok(AgentTls { grpc, line })
    }

    /// Opens a report line to `server`'s agent at `address` (see
    /// [`rollgate_common::peer_tls::protocol_refused`] for an agent that does not speak it).
    pub async fn dial_line(
        &self,
        server: &str,
        address: &str,
        refusal: Refusal,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.line
            .dial(
                address,
                Expected::Exactly(Role::new(RoleKind::Agent, server)),
                refusal,
            )
            .await
    }

    /// A connector for `server`'s agent. A refused identity is also written to `refusal`, so
    /// that readiness and step failures can say why the agent is unreachable.
    pub fn connector(&self, server: &str, refusal: Refusal) -> PeerConnector {
        self.grpc.connector(
            Expected::Exactly(Role::new(RoleKind::Agent, server)),
            refusal,
        )
    }
}
