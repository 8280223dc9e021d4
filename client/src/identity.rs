//! A node's identity: its certificate and key, and the CA that signed the broker.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{ClientError, Result};

/// The certificate file in an identity directory.
pub const CERT_FILE: &str = "node.pem";
/// The private key file (PKCS#8 PEM) in an identity directory.
pub const KEY_FILE: &str = "node.key";
/// The CA certificate that signed the broker, in an identity directory.
pub const CA_FILE: &str = "ca.pem";

/// A node's mutual-TLS identity, checked when it is loaded so that mistakes show up before dialling.
#[derive(Clone)]
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    source: Option<PathBuf>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Identity")
            .field("source", &self.source)
            .field("cert_pem_len", &self.cert_pem.len())
            .field("ca_pem_len", &self.ca_pem.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `node.pem`, `node.key` and `ca.pem` from `dir`, naming the file at fault on any error.
    pub fn load(dir: &Path) -> Result<Identity> {
        if !dir.is_dir() {
            return Err(ClientError::Identity {
                path: dir.to_path_buf(),
                reason:
                    "not a directory; an identity directory holds node.pem, node.key and ca.pem"
                        .to_string(),
            });
        }
        let read = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok((path, bytes)),
                Err(e) => Err(ClientError::Identity {
                    reason: format!("cannot read: {e}"),
                    path,
                }),
            }
        };
        let (cert_path, cert_pem) = read(CERT_FILE)?;
        let (key_path, key_pem) = read(KEY_FILE)?;
        let (ca_path, ca_pem) = read(CA_FILE)?;
        let mut id = Identity::check(
            cert_pem,
            key_pem,
            ca_pem,
            [cert_path.as_path(), key_path.as_path(), ca_path.as_path()],
        )?;
        id.source = Some(dir.to_path_buf());
        Ok(id)
    }

    /// Builds an identity from PEM text already in memory (certificate chain, PKCS#8 key, CA).
    pub fn from_pem(
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
        ca_pem: impl Into<Vec<u8>>,
    ) -> Result<Identity> {
        Identity::check(
            cert_pem.into(),
            key_pem.into(),
            ca_pem.into(),
            [
                Path::new(CERT_FILE),
                Path::new(KEY_FILE),
                Path::new(CA_FILE),
            ],
        )
    }

    /// The directory the identity was loaded from, if it came from one.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The node certificate (chain) as PEM.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The CA certificate(s) trusted for the broker, as PEM.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The tonic TLS identity (certificate and key) presented to the broker.
    pub fn tls_identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The tonic certificate used to verify the broker.
    pub fn tls_ca(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.ca_pem)
    }

    fn check(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        ca_pem: Vec<u8>,
        [cert_path, key_path, ca_path]: [&Path; 3],
    ) -> Result<Identity> {
        let bad = |path: &Path, reason: String| ClientError::Identity {
            path: path.to_path_buf(),
            reason,
        };
        let certs = read_certs(&cert_pem).map_err(|r| bad(cert_path, r))?;
        let cas = read_certs(&ca_pem).map_err(|r| bad(ca_path, r))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            bad(
                key_path,
                format!("no private key found ({e}); expected a PEM \"PRIVATE KEY\" (PKCS#8)"),
            )
        })?;
        // Refuse a key that does not belong to the certificate now, rather than as an
        // obscure handshake failure later.
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(certs.clone(), key, &provider).map_err(|e| {
            bad(
                key_path,
                format!("unusable with {}: {e}", cert_path.display()),
            )
        })?;
        if let Some(leaf) = certs.first() {
            check_validity(leaf).map_err(|r| bad(cert_path, r))?;
        }
        for ca in &cas {
            check_validity(ca).map_err(|r| bad(ca_path, r))?;
        }
        Ok(Identity {
            cert_pem,
            key_pem,
            ca_pem,
            source: None,
        })
    }
}

fn read_certs(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no \"CERTIFICATE\" PEM block found".to_string());
    }
    Ok(certs)
}

/// Checks that a certificate parses and that now is inside its validity period.
fn check_validity(der: &CertificateDer<'_>) -> std::result::Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let validity = cert.validity();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if now > validity.not_after.timestamp() {
        return Err(format!(
            "certificate expired on {} (subject {})",
            validity.not_after,
            cert.subject()
        ));
    }
    if now < validity.not_before.timestamp() {
        return Err(format!(
            "certificate not valid before {} (subject {}); check the clock",
            validity.not_before,
            cert.subject()
        ));
    }
    Ok(())
}
