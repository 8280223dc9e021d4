//! Who is calling: the identity from the client certificate, checked against the registry.

use crate::error::{BrokerError, Result};
use crate::ids::NodeId;
use crate::pki;
use govshare_proto::v1::NodeRole;

/// An authenticated, registered, active caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node id from the certificate.
    pub id: NodeId,
    /// The role from the certificate (equal to the registered role).
    pub role: NodeRole,
}

impl Caller {
    /// True for the admin role.
    pub fn is_admin(&self) -> bool {
        self.role == NodeRole::Admin
    }

    /// Refuses callers without the admin role; `what` says what they tried.
    pub fn require_admin(&self, what: &str) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(BrokerError::denied(format!(
                "only admins may {what}; {} is a {}",
                self.id,
                pki::role_name(self.role)
            )))
        }
    }

    /// Refuses callers that are not departments (brokers and admins do not own data).
    pub fn require_department(&self, what: &str) -> Result<()> {
        if self.role == NodeRole::Department {
            Ok(())
        } else {
            Err(BrokerError::denied(format!(
                "only department nodes may {what}; {} is a {}",
                self.id,
                pki::role_name(self.role)
            )))
        }
    }
}

/// Reads the certificate identity from a tonic request's TLS peer certificates.
pub fn cert_identity<B>(req: &tonic::Request<B>) -> Result<pki::CertIdentity> {
    let certs = req.peer_certs().ok_or_else(|| {
        BrokerError::Unauthenticated("no client certificate; govshare needs mutual TLS".into())
    })?;
    let leaf = certs.first().ok_or_else(|| {
        BrokerError::Unauthenticated("no client certificate; govshare needs mutual TLS".into())
    })?;
    let conn = req
        .extensions()
        .get::<std::sync::Arc<crate::tls::ConnIdentity>>();
    identity_of(leaf.as_ref(), conn.map(|c| &**c))
}

/// The identity `leaf` asserts: the one its connection parsed at the handshake when that was
/// parsed from these very bytes, else parsed now.
pub(crate) fn identity_of(
    leaf: &[u8],
    conn: Option<&crate::tls::ConnIdentity>,
) -> Result<pki::CertIdentity> {
    match conn {
        Some(c) if c.der == leaf => Ok(c.identity.clone()),
        _ => pki::identity_from_der(leaf),
    }
}
