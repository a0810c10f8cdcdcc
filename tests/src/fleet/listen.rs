//! Each simulated agent's own listener and TLS identity: what the coordinator dials and checks
//! (the certificate names the address dialled and carries `rollgate://agent/<server id>`).

use super::agent::{AgentService, SimAgent};
use super::gate::{GatedIo, Mode};
use anyhow::{anyhow, Context};
use rollgate_common::pki::Ca;
use rollgate_common::tls::{leaf_roles, Role, RoleKind};
use rollgate_proto::agent::v1::agent_server::AgentServer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// What every agent's TLS server shares: the CA (to sign their certificates and to check
/// clients) and the crypto provider.
pub struct TlsFactory {
    ca: Ca,
    ca_der: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl TlsFactory {
    /// From the deployment's CA certificate and key (PEM).
    pub fn new(ca_cert_pem: &str, ca_key_pem: &str) -> anyhow::Result<TlsFactory> {
        let ca = Ca::from_pem(ca_cert_pem, ca_key_pem)?;
        let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .map_err(|e| anyhow!("ca certificate: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()?;
        Ok(TlsFactory {
            ca,
            ca_der,
            provider,
            verifier,
        })
    }

    /// A TLS acceptor for `server`'s agent answering at `addr`, with a freshly signed
    /// certificate; clients must present a certificate of the same CA. It speaks gRPC and the
    /// report line, as the agent does.
    pub fn acceptor(&self, server: &str, addr: SocketAddr) -> anyhow::Result<TlsAcceptor> {
        self.acceptor_with(server, addr, &[b"h2", rollgate_proto::line::ALPN])
    }

    /// As [`TlsFactory::acceptor`], offering only the ALPN protocols `alpn` (`h2` alone: an
    /// agent from before the report line).
    pub fn acceptor_with(
        &self,
        server: &str,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> anyhow::Result<TlsAcceptor> {
        let issued = self.ca.issue(
            &Role::new(RoleKind::Agent, server),
            &[addr.ip().to_string()],
        )?;
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .map_err(|e| anyhow!("agent certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .map_err(|e| anyhow!("agent key: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::clone(&self.verifier))
            .with_single_cert(vec![cert, self.ca_der.clone()], key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Binds `addr` (port 0: any) with SO_REUSEADDR, so that a crashed agent can come back on its
/// port while old connections linger in TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `agent` on `listener` until `stop`: accepts while up, stops accepting while hung,
/// closes the listener when crashed and binds it again when restored.
pub async fn serve(
    agent: Arc<SimAgent>,
    listener: TcpListener,
    tls: TlsAcceptor,
    stop: CancellationToken,
) {
    let addr = agent.id.addr;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<GatedIo<_>>>(16);
    let incoming =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let grpc = tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentService(Arc::clone(&agent))))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::warn!(%addr, "simulated agent server ended: {e}");
        }
    });
    let mut listener = Some(listener);
    let mut mode = agent.mode.subscribe();
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Crashed => listener = None,
            Mode::Up if listener.is_none() => match bind(addr) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(%addr, "cannot listen again: {e}; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
            _ => {}
        }
        let accept = async {
            match (&listener, now) {
                (Some(l), Mode::Up) => l.accept().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => if changed.is_err() { return },
            accepted = accept => match accepted {
                Ok((tcp, _)) => {
                    let (tls, tx, gate) = (tls.clone(), tx.clone(), agent.mode.subscribe());
                    let (line_agent, line_stop) = (Arc::clone(&agent), stop.clone());
                    tokio::spawn(async move {
                        match handshake(&tls, tcp).await {
                            Ok(stream) if stream.get_ref().1.alpn_protocol() == Some(rollgate_proto::line::ALPN) => {
                                line_agent.serve_line(GatedIo::new(stream, gate), line_stop).await;
                            }
                            Ok(stream) => {
                                let _ = tx.send(Ok(GatedIo::new(stream, gate))).await;
                            }
                            Err(e) => tracing::debug!(%addr, "connection refused: {e:#}"),
                        }
                    });
                }
                // Out of descriptors or similar: wait a little rather than spin.
                Err(e) => {
                    tracing::warn!(%addr, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The TLS handshake, then the client's role: only coordinators talk to agents.
async fn handshake(
    tls: &TlsAcceptor,
    tcp: TcpStream,
) -> anyhow::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tcp.set_nodelay(true)?;
    let stream = tokio::time::timeout(HANDSHAKE_LIMIT, tls.accept(tcp))
        .await
        .context("tls handshake timed out")??;
    let roles = leaf_roles(stream.get_ref().1.peer_certificates());
    if roles.iter().any(|r| r.kind == RoleKind::Coordinator) {
        Ok(stream)
    } else {
        Err(anyhow!("client is not a coordinator: {roles:?}"))
    }
}
