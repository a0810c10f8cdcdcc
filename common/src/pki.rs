//! Making a deployment's CA and its role certificates with rcgen: for tests, local setups and
//! `rollgate certs`. Keys are made fresh every time; none is ever committed.

use crate::tls::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written or read.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A certificate authority that can issue role certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// How long a certificate is valid, relative to now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Valid from `now - not_before_ago`.
    pub not_before_ago: Duration,
    /// Valid until `now + not_after_in`; a `None` here makes a certificate that has already
    /// expired (an hour ago), for tests of expired certificates.
    pub not_after_in: Option<Duration>,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            not_before_ago: Duration::from_secs(3600),
            not_after_in: Some(Duration::from_secs(365 * 24 * 3600)),
        }
    }
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(
            &mut params,
            Validity {
                not_before_ago: Duration::from_secs(3600),
                not_after_in: Some(Duration::from_secs(10 * 365 * 24 * 3600)),
            },
        );
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate (what every daemon trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, to store next to its certificate.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `role`, valid for client and server use, naming `hosts` (DNS names or
    /// IP addresses) as the places it serves.
    pub fn issue(&self, role: &Role, hosts: &[String]) -> Result<Issued, PkiError> {
        self.issue_with(role, hosts, Validity::default())
    }

    /// [`Ca::issue`] with an explicit validity window.
    pub fn issue_with(
        &self,
        role: &Role,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = dn(&role.to_string());
        params
            .subject_alt_names
            .push(SanType::URI(role.uri().try_into()?));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (the key readable by its owner only).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, 0o644)?;
        write_file(&key, &self.key_pem, 0o600)?;
        Ok((cert, key))
    }
}

/// Writes a file with the given Unix mode.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rollgate");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let now = SystemTime::now();
    let from = now.checked_sub(v.not_before_ago).unwrap_or(now);
    let until = match v.not_after_in {
        Some(d) => now + d,
        None => now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
    };
    params.not_before = from.into();
    params.not_after = until.into();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{roles_in_der, RoleKind};

    #[test]
    fn issued_certificates_carry_their_role() -> Result<(), Box<dyn std::error::Error>> {
        let ca = Ca::generate("test ca")?;
        let role = Role::new(RoleKind::Agent, "fe-07");
        let issued = ca.issue(&role, &["localhost".into(), "127.0.0.1".into()])?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes())?;
        assert_eq!(roles_in_der(&pem.contents), vec![role]);
        let reloaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem())?;
        let again = reloaded.issue(&Role::new(RoleKind::Operator, "bob"), &[])?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(again.cert_pem.as_bytes())?;
        assert_eq!(roles_in_der(&pem.contents)[0].kind, RoleKind::Operator);
        Ok(())
    }
}
