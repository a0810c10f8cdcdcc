//! mTLS to agents: [`rollgate_common::peer_tls`] with each connection held to the agent of
//! the server it is for (`rollgate://agent/<server>`), so that no other agent of the fleet can
//! answer at its address.

use rollgate_common::peer_tls::{Expected, PeerConnector, PeerTls, PeerTlsError};
use rollgate_common::tls::{Role, RoleKind, TlsFiles};

pub use rollgate_common::peer_tls::Refusal;

/// The client side of mTLS to agents, shared by every agent connection.
#[derive(Debug, Clone)]
pub struct AgentTls(PeerTls);

impl AgentTls {
    /// Reads the CA, our certificate chain and key.
    pub fn from_files(files: &TlsFiles) -> Result<AgentTls, PeerTlsError> {
        PeerTls::from_files(files).map(AgentTls)
    }

    /// A connector for `server`'s agent. A refused identity is also written to `refusal`, so
    /// that readiness and step failures can say why the agent is unreachable.
    pub fn connector(&self, server: &str, refusal: Refusal) -> PeerConnector {
        self.0.connector(
            Expected::Exactly(Role::new(RoleKind::Agent, server)),
            refusal,
        )
    }
}
