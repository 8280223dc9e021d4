//! The development PKI: a CA, the broker's identity, and node identities signed by the CA.
//!
//! A node's identity is its certificate's subject: CN is the node id, OU its role. The broker
//! trusts nothing else about the caller.

use crate::config::{Config, CONFIG_FILE};
use crate::error::BrokerError;
use crate::ids::NodeId;
use govshare_proto::v1::NodeRole;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Identity files in an identity directory.
pub const NODE_CERT: &str = "node.pem";
/// The identity's private key file.
pub const NODE_KEY: &str = "node.key";
/// The CA certificate file, to verify the broker with.
pub const CA_CERT: &str = "ca.pem";

/// The role names used in certificates and on the command line.
pub fn role_name(role: NodeRole) -> &'static str {
    match role {
        NodeRole::Department | NodeRole::Unspecified => "department",
        NodeRole::Broker => "broker",
        NodeRole::Admin => "admin",
    }
}

/// Parses a role name.
pub fn parse_role(s: &str) -> Result<NodeRole, BrokerError> {
    match s {
        "department" => Ok(NodeRole::Department),
        "broker" => Ok(NodeRole::Broker),
        "admin" => Ok(NodeRole::Admin),
        other => Err(BrokerError::invalid(format!(
            "role {other:?} must be department, admin or broker"
        ))),
    }
}

/// What `init` is asked to make.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The data directory to create.
    pub data_dir: PathBuf,
    /// The broker's node id.
    pub broker_id: String,
    /// Extra DNS names or IP addresses for the broker's certificate.
    pub sans: Vec<String>,
    /// The listen address to write into the config; None keeps the default.
    pub listen: Option<std::net::SocketAddr>,
    /// The admin node id; None means REGION/admin of the broker's region.
    pub admin_id: Option<String>,
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The config file written.
    pub config_path: PathBuf,
    /// The admin identity directory.
    pub admin_dir: PathBuf,
    /// The admin node id.
    pub admin_id: String,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::invalid(format!("cannot {what} {}: {e}", path.display()))
}

fn pki_err(e: rcgen::Error) -> BrokerError {
    BrokerError::internal(format!("certificate generation: {e}"))
}

/// Writes a file, creating its directory; keys are written readable by the owner only.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), BrokerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| io_err("write", path, e))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("protect", path, e))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

/// Creates a data directory: config, CA, broker identity and admin identity.
pub fn init_data_dir(opts: &InitOptions) -> Result<InitReport, BrokerError> {
    let broker_id = NodeId::parse(&opts.broker_id, "--id")?;
    let admin_id = match &opts.admin_id {
        Some(a) => NodeId::parse(a, "admin id")?,
        None => NodeId::parse(&format!("{}/admin", broker_id.region()), "admin id")?,
    };
    let config_path = opts.data_dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Err(BrokerError::AlreadyExists(format!(
            "{} exists already; this data dir is initialised",
            config_path.display()
        )));
    }
    let mut cfg = Config {
        data_dir: opts.data_dir.clone(),
        ..Config::default()
    };
    cfg.broker.id = broker_id.to_string();
    cfg.broker.admin_id = admin_id.to_string();
    if let Some(listen) = opts.listen {
        cfg.broker.listen = listen;
    }

    // The CA.
    let ca_key = KeyPair::generate().map_err(pki_err)?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("govshare development CA ({broker_id})"),
    );
    dn.push(DnType::OrganizationName, "govshare");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    ca_params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(pki_err)?;
    let ca_pem = ca_cert.pem();
    write_file(&cfg.path(&cfg.tls.ca_cert), &ca_pem, false)?;
    write_file(&cfg.path(&cfg.tls.ca_key), &ca_key.serialize_pem(), true)?;
    write_file(&cfg.path(&cfg.tls.client_ca), &ca_pem, false)?;
    let issuer = Issuer::new(ca_params, ca_key);

    // The broker's server (and link client) identity.
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for s in &opts.sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let (cert, key) = make_leaf(&issuer, &broker_id, NodeRole::Broker, &sans)?;
    write_file(&cfg.path(&cfg.tls.cert), &cert, false)?;
    write_file(&cfg.path(&cfg.tls.key), &key, true)?;

    // The admin identity.
    let admin_dir = opts.data_dir.join("admin");
    let (cert, key) = make_leaf(&issuer, &admin_id, NodeRole::Admin, &[])?;
    write_identity(&admin_dir, &cert, &key, &ca_pem)?;

    write_file(&config_path, &cfg.render_template(), false)?;
    Ok(InitReport {
        config_path,
        admin_dir,
        admin_id: admin_id.to_string(),
    })
}

/// Writes `node.pem`, `node.key` and `ca.pem` into an identity directory.
fn write_identity(dir: &Path, cert: &str, key: &str, ca: &str) -> Result<(), BrokerError> {
    write_file(&dir.join(NODE_CERT), cert, false)?;
    write_file(&dir.join(NODE_KEY), key, true)?;
    write_file(&dir.join(CA_CERT), ca, false)
}

/// Signs a leaf certificate for a node; returns (certificate PEM, key PEM).
fn make_leaf(
    issuer: &Issuer<'_, KeyPair>,
    node: &NodeId,
    role: NodeRole,
    sans: &[String],
) -> Result<(String, String), BrokerError> {
    let key = KeyPair::generate().map_err(pki_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node.as_str());
    dn.push(DnType::OrganizationalUnitName, role_name(role));
    dn.push(DnType::OrganizationName, "govshare");
    params.distinguished_name = dn;
    params.subject_alt_names =
        sans.iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName).map_err(|_| {
                    BrokerError::invalid(format!("--san {s:?} is not a DNS name or IP"))
                }),
            })
            .collect::<Result<_, _>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(825);
    let cert = params.signed_by(&key, issuer).map_err(pki_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a new identity signed by the data dir's CA into `out`. Does not open the database,
/// so it works while the broker runs.
pub fn issue_identity(
    data_dir: &Path,
    node: &str,
    role: NodeRole,
    out: &Path,
) -> Result<(), BrokerError> {
    let node = NodeId::parse(node, "--node")?;
    let cfg = Config::load(data_dir)?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read {}: {e} (issue needs the CA of the data dir)",
                p.display()
            ))
        })
    };
    let ca_pem = read(cfg.path(&cfg.tls.ca_cert))?;
    let ca_key = KeyPair::from_pem(&read(cfg.path(&cfg.tls.ca_key))?)
        .map_err(|e| BrokerError::invalid(format!("CA key does not parse: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| BrokerError::invalid(format!("CA certificate does not parse: {e}")))?;
    let sans = if role == NodeRole::Broker {
        vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()]
    } else {
        Vec::new()
    };
    let (cert, key) = make_leaf(&issuer, &node, role, &sans)?;
    let trust = read(cfg.path(&cfg.tls.client_ca))?;
    write_identity(out, &cert, &key, &trust)
}

/// The identity a certificate asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The node id (subject CN).
    pub node_id: NodeId,
    /// The role (subject OU).
    pub role: NodeRole,
}

/// Reads node id and role from a DER certificate the TLS layer has already verified.
pub fn identity_from_der(der: &[u8]) -> Result<CertIdentity, BrokerError> {
    let unauth = |why: String| BrokerError::Unauthenticated(why);
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| unauth(format!("client certificate does not parse: {e}")))?;
    let subject = cert.subject();
    let first = |attr: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| -> Option<String> {
        attr.and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let cn = first(subject.iter_common_name().next())
        .ok_or_else(|| unauth("client certificate has no subject CN (node id)".into()))?;
    let ou = first(subject.iter_organizational_unit().next())
        .ok_or_else(|| unauth("client certificate has no subject OU (role)".into()))?;
    let node_id = NodeId::parse(&cn, "certificate CN")
        .map_err(|e| unauth(format!("client certificate: {e}")))?;
    let role = parse_role(&ou).map_err(|e| unauth(format!("client certificate: {e}")))?;
    Ok(CertIdentity { node_id, role })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_then_read_identity() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let report = init_data_dir(&InitOptions {
            data_dir: data.clone(),
            broker_id: "330000/hub".into(),
            sans: vec!["broker.example".into()],
            listen: None,
            admin_id: None,
        })?;
        assert_eq!(report.admin_id, "330000/admin");
        assert!(init_data_dir(&InitOptions {
            data_dir: data.clone(),
            broker_id: "330000/hub".into(),
            sans: vec![],
            listen: None,
            admin_id: None,
        })
        .is_err());
        let out = dir.path().join("hrss");
        issue_identity(&data, "330000/hrss", NodeRole::Department, &out)?;
        let pem = std::fs::read(out.join(NODE_CERT))?;
        let der = rustls_pemfile_der(&pem)?;
        let id = identity_from_der(&der)?;
        assert_eq!(id.node_id.as_str(), "330000/hrss");
        assert_eq!(id.role, NodeRole::Department);
        Ok(())
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem)?;
        Ok(p.contents)
    }
}
