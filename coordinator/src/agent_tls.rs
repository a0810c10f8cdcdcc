//! mTLS to agents, with the agent's identity checked on every connection.
//!
//! rustls checks that the agent's certificate chains to the deployment's CA and names the
//! address dialled (DNS or IP SAN). That alone lets any agent of the fleet answer at another
//! server's address: every agent's certificate is signed by the same CA. So after the
//! handshake the connector also requires the certificate's role to be
//! `rollgate://agent/<the server this connection is for>`, and refuses the connection
//! otherwise: nothing is sent to an agent that cannot prove it is the server meant.
//!
//! One rustls client configuration serves every agent connection (it holds the CA roots and
//! our identity, parsed once), rather than one per agent.

use rollgate_common::tls::{roles_in_der, Role, RoleKind, TlsFiles};
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
pub enum AgentTlsError {
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

/// The client side of mTLS to agents, shared by every agent connection.
#[derive(Clone)]
pub struct AgentTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentTls")
    }
}

fn file_err(what: &'static str, path: &std::path::Path, message: impl ToString) -> AgentTlsError {
    AgentTlsError::File {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

impl AgentTls {
    /// Reads the CA, our certificate chain and key.
    pub fn from_files(files: &TlsFiles) -> Result<AgentTls, AgentTlsError> {
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&files.ca)
            .map_err(|e| file_err("ca", &files.ca, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("ca", &files.ca, e))?;
        if cas.is_empty() {
            return Err(file_err("ca", &files.ca, "no certificate in the file"));
        }
        for ca in cas {
            roots.add(ca).map_err(|e| file_err("ca", &files.ca, e))?;
        }
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| file_err("cert", &files.cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("cert", &files.cert, e))?;
        if chain.is_empty() {
            return Err(file_err("cert", &files.cert, "no certificate in the file"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err("key", &files.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AgentTlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| AgentTlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(AgentTls {
            config: Arc::new(config),
        })
    }

    /// A connector for `server`'s agent. A refused identity is also written to `refusal`, so
    /// that readiness and step failures can say why the agent is unreachable.
    pub fn connector(&self, server: &str, refusal: Refusal) -> AgentConnector {
        AgentConnector {
            tls: TlsConnector::from(Arc::clone(&self.config)),
            expected: Role::new(RoleKind::Agent, server),
            refusal,
        }
    }
}

/// The last identity refusal of one agent's connections (None once a connection proves the
/// right identity).
pub type Refusal = Arc<Mutex<Option<String>>>;

/// Dials an agent over TCP, runs the TLS handshake and checks the agent's role. For
/// `tonic::transport::Endpoint::connect_with_connector_lazy`.
#[derive(Clone)]
pub struct AgentConnector {
    tls: TlsConnector,
    expected: Role,
    refusal: Refusal,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for AgentConnector {
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

impl AgentConnector {
    async fn connect(self, uri: tonic::codegen::http::Uri) -> Result<Io, std::io::Error> {
        let host = uri
            .host()
            .ok_or_else(|| invalid(format!("agent address {uri} has no host")))?;
        let port = uri
            .port_u16()
            .ok_or_else(|| invalid(format!("agent address {uri} has no port")))?;
        // An IPv6 literal comes bracketed in a URI; the certificate names it bare.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| invalid(format!("agent address {uri}: {e}")))?;
        let tcp = TcpStream::connect((bare, port)).await?;
        tcp.set_nodelay(true)?;
        let stream = self.tls.connect(name, tcp).await?;
        let roles = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| roles_in_der(leaf.as_ref()))
            .unwrap_or_default();
        let mut refusal = self.refusal.lock().unwrap_or_else(|p| p.into_inner());
        if roles.contains(&self.expected) {
            *refusal = None;
            return Ok(hyper_util::rt::TokioIo::new(stream));
        }
        let had = if roles.is_empty() {
            "no rollgate role".to_owned()
        } else {
            roles
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let message = format!(
            "the agent answering at {host}:{port} presents a certificate for {had}, not {}: refused (a miswired address or an impostor)",
            self.expected.uri()
        );
        if refusal.as_deref() != Some(message.as_str()) {
            tracing::error!(server = %self.expected.name, %message, "agent identity refused");
        }
        *refusal = Some(message.clone());
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            message,
        ))
    }
}
