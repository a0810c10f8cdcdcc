//! mTLS for every rollgate connection, and the role a peer's certificate carries.
//!
//! Roles live in the certificates as SAN URIs: `rollgate://agent/<server>`,
//! `rollgate://coordinator/<id>`, `rollgate://operator/<name>`. rustls verifies the chain
//! against the deployment's CA; this module only reads the role from a verified leaf.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Where a daemon finds its CA, certificate and key (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The deployment's CA certificate: peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This daemon's certificate.
    pub cert: PathBuf,
    /// This daemon's private key.
    pub key: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file this is (CA, certificate, key).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A certificate could not be parsed.
    #[error("invalid certificate {path}: {message}")]
    BadCertificate {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The kind of a role, for access rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleKind {
    /// An agent on a server.
    Agent,
    /// A coordinator (leader or follower).
    Coordinator,
    /// A person or program using the operator API.
    Operator,
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Agent => "agent",
            RoleKind::Coordinator => "coordinator",
            RoleKind::Operator => "operator",
        })
    }
}

/// A role with the name it was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Role {
    /// What the peer may do.
    pub kind: RoleKind,
    /// The server id, coordinator id or operator name.
    pub name: String,
}

impl Role {
    /// The URI prefix every role SAN starts with.
    pub const SCHEME: &'static str = "rollgate://";

    /// A role of `kind` named `name`.
    pub fn new(kind: RoleKind, name: impl Into<String>) -> Self {
        Role {
            kind,
            name: name.into(),
        }
    }

    /// The SAN URI for this role, e.g. `rollgate://agent/fe-01`.
    pub fn uri(&self) -> String {
        format!("{}{}/{}", Self::SCHEME, self.kind, self.name)
    }

    /// Parses a SAN URI; `None` for anything that is not a well-formed rollgate role.
    pub fn parse_uri(uri: &str) -> Option<Role> {
        let rest = uri.strip_prefix(Self::SCHEME)?;
        let (kind, name) = rest.split_once('/')?;
        let kind = match kind {
            "agent" => RoleKind::Agent,
            "coordinator" => RoleKind::Coordinator,
            "operator" => RoleKind::Operator,
            _ => return None,
        };
        let valid_name = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        valid_name.then(|| Role::new(kind, name))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// Who is calling: a verified role, or nobody in particular because TLS is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A peer whose verified certificate carries this role.
    Authenticated(Role),
    /// TLS is disabled (explicit insecure mode): every caller is let through.
    Insecure,
}

/// The roles in a DER certificate's SAN URIs. Unparseable certificates have none.
pub fn roles_in_der(der: &[u8]) -> Vec<Role> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Role::parse_uri(uri),
            _ => None,
        })
        .collect()
}

/// The roles of a TLS peer's leaf certificate (the first of its verified chain), as
/// rustls reports the chain; none without one.
pub fn leaf_roles(chain: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Vec<Role> {
    chain
        .and_then(|c| c.first())
        .map(|leaf| roles_in_der(leaf.as_ref()))
        .unwrap_or_default()
}

/// The roles a PEM certificate file carries (to check a daemon's own certificate at start-up).
pub fn roles_in_pem_file(path: &Path) -> Result<Vec<Role>, TlsError> {
    let pem = read(path, "certificate")?;
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(&pem).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    Ok(roles_in_der(&parsed.contents))
}

/// Finds the caller of a request. With TLS, the first verified leaf certificate's role whose
/// kind is in `allowed`; otherwise `PERMISSION_DENIED` naming what was required.
#[allow(clippy::result_large_err)]
pub fn authorize<T>(
    request: &tonic::Request<T>,
    insecure: bool,
    allowed: &[RoleKind],
) -> Result<Caller, tonic::Status> {
    if insecure {
        return Ok(Caller::Insecure);
    }
    let certs = request.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated("no client certificate: rollgate requires mutual TLS")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        tonic::Status::unauthenticated("no client certificate: rollgate requires mutual TLS")
    })?;
    authorize_roles(&roles_in_der(leaf.as_ref()), allowed)
}

/// The caller among `roles` (a verified client certificate's) whose kind is in `allowed`;
/// otherwise `PERMISSION_DENIED` naming what was required and what the certificate carries.
#[allow(clippy::result_large_err)]
pub fn authorize_roles(roles: &[Role], allowed: &[RoleKind]) -> Result<Caller, tonic::Status> {
    if let Some(role) = roles.iter().find(|r| allowed.contains(&r.kind)) {
        return Ok(Caller::Authenticated(role.clone()));
    }
    let wanted = allowed
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ");
    let had = if roles.is_empty() {
        "no rollgate role".to_owned()
    } else {
        roles
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(tonic::Status::permission_denied(format!(
        "this call needs the {wanted} role; the client certificate carries {had}"
    )))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl TlsFiles {
    /// The server side: our identity, and client certificates required and checked against the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity =
            Identity::from_pem(read(&self.cert, "certificate")?, read(&self.key, "key")?);
        let ca = Certificate::from_pem(read(&self.ca, "CA certificate")?);
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// The client side: our identity, and the server checked against the CA.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let identity =
            Identity::from_pem(read(&self.cert, "certificate")?, read(&self.key, "key")?);
        let ca = Certificate::from_pem(read(&self.ca, "CA certificate")?);
        Ok(ClientTlsConfig::new().identity(identity).ca_certificate(ca))
    }

    /// Checks that every file exists and that the certificate carries `expected`.
    pub fn check_role(&self, expected: &Role) -> Result<(), String> {
        for (what, p) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if !p.is_file() {
                return Err(format!("tls.{what}: no such file {}", p.display()));
            }
        }
        let roles = roles_in_pem_file(&self.cert).map_err(|e| e.to_string())?;
        if roles.contains(expected) {
            Ok(())
        } else {
            Err(format!(
                "tls.cert {} does not carry the role {} (SAN URI {}); it carries [{}]",
                self.cert.display(),
                expected,
                expected.uri(),
                roles
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_uris_round_trip() {
        for r in [
            Role::new(RoleKind::Agent, "fe-01"),
            Role::new(RoleKind::Coordinator, "c1"),
            Role::new(RoleKind::Operator, "alice.ops"),
        ] {
            assert_eq!(Role::parse_uri(&r.uri()), Some(r));
        }
    }

    #[test]
    fn malformed_role_uris_are_rejected() {
        for bad in [
            "rollgate://agent/",
            "rollgate://admin/x",
            "https://agent/x",
            "rollgate://agent/a/b",
            "rollgate://agent/a b",
            "rollgate://agent",
        ] {
            assert_eq!(Role::parse_uri(bad), None, "{bad}");
        }
    }
}
