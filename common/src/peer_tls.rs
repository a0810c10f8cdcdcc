//! mTLS to a peer daemon, with the peer's role checked on every connection.
//!
//! rustls checks that the peer's certificate chains to the deployment's CA and names the
//! address dialled (DNS or IP SAN). That alone lets any holder of a certificate of the
//! deployment answer at an address its certificate names: every agent's and coordinator's is
//! signed by the same CA. So after the handshake the connector also requires the role the
//! caller expects, and refuses the connection otherwise, before anything is sent:
//!
//! - a coordinator dialling an agent expects `rollgate://agent/<the server meant>`: no other
//!   agent may answer at its address;
//! - an agent dialling a coordinator (joining or leaving) expects a coordinator, whatever its
//!   name: no agent or operator certificate may take its membership request.
//!
//! One rustls client configuration serves every connection of a process (it holds the CA
//! roots and our identity, parsed once), rather than one per peer.

use crate::tls::{leaf_roles, Role, RoleKind, TlsFiles};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("tls.{what} {path}: {message}")]
    File {
        /// Which setting (ca, cert, key).
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate/key pair or the roots.
    #[error("tls: {0}")]
    Config(String),
}

/// The client side of mTLS to peers, shared by every connection of a process.
#[derive(Clone)]
pub struct PeerTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

fn file_err(what: &'static str, path: &std::path::Path, message: impl ToString) -> PeerTlsError {
    PeerTlsError::File {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Every certificate in the PEM file at `path` (the setting `what`); at least one.
fn pem_certificates(
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, PeerTlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The CA roots, our certificate chain and key, read from `files`.
fn read_identity(
    files: &TlsFiles,
) -> Result<
    (
        rustls::RootCertStore,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ),
    PeerTlsError,
> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certificates("ca", &files.ca)? {
        roots.add(ca).map_err(|e| file_err("ca", &files.ca, e))?;
    }
    let chain = pem_certificates("cert", &files.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err("key", &files.key, e))?;
    Ok((roots, chain, key))
}

/// The server side of mTLS from `files`: clients must present a certificate of the CA, and
/// may choose one of `alpn` (the first they offer that is listed).
pub fn server_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, PeerTlsError> {
    let (roots, chain, key) = read_identity(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| PeerTlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PeerTlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| PeerTlsError::Config(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// True when the peer refused the handshake because it speaks none of the ALPN protocols
/// offered (an older peer, for a protocol it does not know).
pub fn protocol_refused(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            )
        })
}

impl PeerTls {
    /// Reads the CA, our certificate chain and key.
    pub fn from_files(files: &TlsFiles) -> Result<PeerTls, PeerTlsError> {
        let (roots, chain, key) = read_identity(files)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PeerTlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| PeerTlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(PeerTls {
            config: Arc::new(config),
        })
    }

    /// The same identity and roots, offering `alpn` instead of `h2` (made once, then shared).
    pub fn with_alpn(&self, alpn: &[u8]) -> PeerTls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        PeerTls {
            config: Arc::new(config),
        }
    }

    /// A connector that accepts only a peer proving `expected`. A refused identity is also
    /// written to `refusal`, so that whoever reports on the peer can say why it is unreachable.
    pub fn connector(&self, expected: Expected, refusal: Refusal) -> PeerConnector {
        PeerConnector {
            tls: TlsConnector::from(Arc::clone(&self.config)),
            expected,
            refusal,
        }
    }

    /// Dials `address` (`host:port`), runs the handshake and checks that the peer proves
    /// `expected`, as [`PeerConnector`] does for gRPC.
    pub async fn dial(
        &self,
        address: &str,
        expected: Expected,
        refusal: Refusal,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let uri: tonic::codegen::http::Uri = format!("http://{address}")
            .parse()
            .map_err(|e| invalid(format!("address {address}: {e}")))?;
        self.connector(expected, refusal).handshake(uri).await
    }
}

/// The role a peer must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// This role and name (an agent: the server meant).
    Exactly(Role),
    /// Any name of this kind (a coordinator: any of the deployment's).
    Kind(RoleKind),
}

impl Expected {
    fn met_by(&self, roles: &[Role]) -> bool {
        match self {
            Expected::Exactly(role) => roles.contains(role),
            Expected::Kind(kind) => roles.iter().any(|r| r.kind == *kind),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Exactly(role) => f.write_str(&role.uri()),
            Expected::Kind(kind) => write!(f, "a {kind} (rollgate://{kind}/...)"),
        }
    }
}

/// The last identity refusal of one peer's connections (None once a connection proves the
/// right identity).
pub type Refusal = Arc<Mutex<Option<String>>>;

/// Dials a peer over TCP, runs the TLS handshake and checks the peer's role. For
/// `tonic::transport::Endpoint::connect_with_connector` (or `_lazy`).
#[derive(Clone)]
pub struct PeerConnector {
    tls: TlsConnector,
    expected: Expected,
    refusal: Refusal,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for PeerConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move { me.connect(uri).await })
    }
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

impl PeerConnector {
    async fn connect(self, uri: tonic::codegen::http::Uri) -> Result<Io, std::io::Error> {
        self.handshake(uri).await.map(hyper_util::rt::TokioIo::new)
    }

    async fn handshake(
        self,
        uri: tonic::codegen::http::Uri,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let host = uri
            .host()
            .ok_or_else(|| invalid(format!("address {uri} has no host")))?;
        let port = uri
            .port_u16()
            .ok_or_else(|| invalid(format!("address {uri} has no port")))?;
        // An IPv6 literal comes bracketed in a URI; the certificate names it bare.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| invalid(format!("address {uri}: {e}")))?;
        let tcp = TcpStream::connect((bare, port)).await?;
        tcp.set_nodelay(true)?;
        let stream = self.tls.connect(name, tcp).await?;
        let roles = leaf_roles(stream.get_ref().1.peer_certificates());
        let mut refusal = self.refusal.lock().unwrap_or_else(|p| p.into_inner());
        if self.expected.met_by(&roles) {
            *refusal = None;
            return Ok(stream);
        }
        let had = if roles.is_empty() {
            "no rollgate role".to_owned()
        } else {
            roles.iter().map(Role::uri).collect::<Vec<_>>().join(", ")
        };
        let message = format!(
            "the peer answering at {host}:{port} presents a certificate for {had}, not {}: refused (a miswired address or an impostor)",
            self.expected
        );
        if refusal.as_deref() != Some(message.as_str()) {
            let kind = match &self.expected {
                Expected::Exactly(role) => role.kind,
                Expected::Kind(kind) => *kind,
            };
            tracing::error!(expected = %self.expected, %message, "{kind} identity refused");
        }
        *refusal = Some(message.clone());
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            message,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_role_needs_its_name_and_a_kind_any_name_of_it() {
        let fe1 = Role::new(RoleKind::Agent, "fe-1");
        let fe2 = Role::new(RoleKind::Agent, "fe-2");
        let c1 = Role::new(RoleKind::Coordinator, "c1");
        let agent_fe1 = Expected::Exactly(fe1.clone());
        assert!(agent_fe1.met_by(std::slice::from_ref(&fe1)));
        assert!(!agent_fe1.met_by(std::slice::from_ref(&fe2)));
        assert!(!agent_fe1.met_by(&[]));
        let coordinator = Expected::Kind(RoleKind::Coordinator);
        assert!(coordinator.met_by(&[fe1.clone(), c1]));
        assert!(!coordinator.met_by(&[fe1, fe2]));
        assert_eq!(agent_fe1.to_string(), "rollgate://agent/fe-1");
        assert!(coordinator.to_string().contains("a coordinator"));
    }
}
