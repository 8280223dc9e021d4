//! The development PKI: a CA, the broker's identity, and node identities signed by the CA.
//!
//! A node's identity is its certificate's subject: CN is the node id, OU its role. The broker
//! trusts nothing else about the caller, except, for a child broker's link identity, the scope
//! written into the certificate as SAN URIs `urn:govshare:scope:<prefix>`: the node-id prefixes
//! the child may claim (a `[[federation.children]]` override in the parent's config wins).

use crate::config::{check_parent_url, check_scope_prefix, Config, CONFIG_FILE};
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

/// The SAN URI prefix of a scope entry in a broker certificate: `urn:govshare:scope:33`.
pub const SCOPE_URI_PREFIX: &str = "urn:govshare:scope:";

/// The scope a broker gets when none is given: its region code without trailing "00" pairs
/// (`330000/hub` → `33`, `330100/hub` → `3301`, `330102/x` → `330102`).
///
/// A national-level broker (region `000000`, e.g. a ministry's `000000/mca`) has no region
/// prefix to claim, so its default is its own node id as a prefix: `000000/mca` claims
/// `000000/mca` and also `000000/mca-death` and the like. Ministries should be issued an
/// explicit `--scope` listing the nodes they serve.
pub fn default_scope(node: &NodeId) -> Vec<String> {
    let mut region = node.region();
    while let Some(shorter) = region.strip_suffix("00") {
        region = shorter;
    }
    if region.is_empty() {
        vec![node.as_str().to_string()]
    } else {
        vec![region.to_string()]
    }
}

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
#[derive(Debug, Clone, Default)]
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
    /// The parent broker's URL (`https://HOST:PORT`); None makes a root broker. Requires
    /// `parent_identity`.
    pub parent: Option<String>,
    /// The directory with the link identity the parent issued for this broker
    /// (`issue --role broker`); copied into `DATA_DIR/link`. Requires `parent`.
    pub parent_identity: Option<PathBuf>,
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
    /// Where the parent link identity was copied, when `init` was given a parent.
    pub link_dir: Option<PathBuf>,
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
    // Check the parent link before writing anything, so a mistake leaves no half-made dir.
    let link = match (&opts.parent, &opts.parent_identity) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(BrokerError::invalid(
                "--parent needs --parent-identity DIR: the identity the parent issued for this broker with `govshare-broker issue --role broker`",
            ))
        }
        (None, Some(_)) => {
            return Err(BrokerError::invalid(
                "--parent-identity needs --parent URL: the parent broker's address, e.g. https://10.0.0.1:7443",
            ))
        }
        (Some(parent), Some(dir)) => {
            check_parent_url(parent, "--parent")?;
            Some((parent.clone(), read_link_identity(dir, &broker_id)?))
        }
    };
    let mut cfg = Config {
        data_dir: opts.data_dir.clone(),
        ..Config::default()
    };
    cfg.broker.id = broker_id.to_string();
    let mut link_dir = None;
    if let Some((parent, files)) = &link {
        cfg.federation.parent = parent.clone();
        let dir = cfg.path(&cfg.federation.identity);
        write_identity(&dir, &files.cert, &files.key, &files.ca)?;
        link_dir = Some(dir);
    }
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
    let (cert, key) = make_leaf(&issuer, &broker_id, NodeRole::Broker, &sans, &[])?;
    write_file(&cfg.path(&cfg.tls.cert), &cert, false)?;
    write_file(&cfg.path(&cfg.tls.key), &key, true)?;

    // The admin identity.
    let admin_dir = opts.data_dir.join("admin");
    let (cert, key) = make_leaf(&issuer, &admin_id, NodeRole::Admin, &[], &[])?;
    write_identity(&admin_dir, &cert, &key, &ca_pem)?;

    write_file(&config_path, &cfg.render_template(), false)?;
    Ok(InitReport {
        config_path,
        admin_dir,
        admin_id: admin_id.to_string(),
        link_dir,
    })
}

/// The three files of an identity directory, read and checked.
#[derive(Debug)]
struct IdentityFiles {
    cert: String,
    key: String,
    ca: String,
}

/// Reads the link identity a parent issued for `broker_id` and checks it is really for it:
/// CN is the broker id, OU is `broker`, the key matches the certificate and `ca.pem` is the
/// certificate's issuer.
fn read_link_identity(dir: &Path, broker_id: &NodeId) -> Result<IdentityFiles, BrokerError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read {}: {e} (--parent-identity must be a directory with {NODE_CERT}, {NODE_KEY} and {CA_CERT}, written by `govshare-broker issue --role broker` on the parent)",
                p.display()
            ))
        })
    };
    let files = IdentityFiles {
        cert: read(NODE_CERT)?,
        key: read(NODE_KEY)?,
        ca: read(CA_CERT)?,
    };
    let bad = |why: String| {
        BrokerError::invalid(format!("the link identity in {}: {why}", dir.display()))
    };
    let cert_der = pem_der(&files.cert).map_err(|e| bad(format!("{NODE_CERT}: {e}")))?;
    let ca_der = pem_der(&files.ca).map_err(|e| bad(format!("{CA_CERT}: {e}")))?;
    let identity = identity_from_der(&cert_der).map_err(|e| bad(e.to_string()))?;
    if identity.node_id != *broker_id || identity.role != NodeRole::Broker {
        return Err(BrokerError::invalid(format!(
            "the link identity in {dir} is for {node} (role {role}); issue one with `govshare-broker issue --data-dir PARENT --node {broker_id} --role broker --out {dir}`",
            dir = dir.display(),
            node = identity.node_id,
            role = role_name(identity.role),
        )));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| bad(format!("{NODE_CERT} does not parse: {e}")))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| bad(format!("{CA_CERT} does not parse: {e}")))?;
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Err(bad(format!(
            "{NODE_CERT} was not issued by the CA in {CA_CERT}"
        )));
    }
    let key = KeyPair::from_pem(&files.key)
        .map_err(|e| bad(format!("{NODE_KEY} does not parse: {e}")))?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(bad(format!("{NODE_KEY} is not the key of {NODE_CERT}")));
    }
    Ok(files)
}

/// The DER of the first PEM block of a file.
fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, p)| p.contents)
        .map_err(|e| format!("not a PEM certificate: {e}"))
}

/// Writes `node.pem`, `node.key` and `ca.pem` into an identity directory.
fn write_identity(dir: &Path, cert: &str, key: &str, ca: &str) -> Result<(), BrokerError> {
    write_file(&dir.join(NODE_CERT), cert, false)?;
    write_file(&dir.join(NODE_KEY), key, true)?;
    write_file(&dir.join(CA_CERT), ca, false)
}

/// Signs a leaf certificate for a node; returns (certificate PEM, key PEM). Each `scope`
/// prefix becomes a SAN URI `urn:govshare:scope:<prefix>`.
fn make_leaf(
    issuer: &Issuer<'_, KeyPair>,
    node: &NodeId,
    role: NodeRole,
    sans: &[String],
    scope: &[String],
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
    for prefix in scope {
        let uri = format!("{SCOPE_URI_PREFIX}{prefix}");
        let uri = uri
            .clone()
            .try_into()
            .map_err(|_| BrokerError::invalid(format!("scope URI {uri:?} is not ASCII")))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
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
///
/// For a broker (a child's link identity), `scope` lists the node-id prefixes the child may
/// claim, written as SAN URIs `urn:govshare:scope:<prefix>`; empty means [`default_scope`].
/// Other roles take no scope.
pub fn issue_identity(
    data_dir: &Path,
    node: &str,
    role: NodeRole,
    out: &Path,
    scope: &[String],
) -> Result<(), BrokerError> {
    let node = NodeId::parse(node, "--node")?;
    let scope = if role == NodeRole::Broker {
        if scope.is_empty() {
            default_scope(&node)
        } else {
            for prefix in scope {
                check_scope_prefix(prefix)
                    .map_err(|e| BrokerError::invalid(format!("--scope: {e}")))?;
            }
            let mut unique: Vec<String> = Vec::with_capacity(scope.len());
            for prefix in scope {
                if !unique.contains(prefix) {
                    unique.push(prefix.clone());
                }
            }
            unique
        }
    } else if scope.is_empty() {
        Vec::new()
    } else {
        return Err(BrokerError::invalid(
            "--scope is only for --role broker (the node-id prefixes a child broker may claim)",
        ));
    };
    let cfg = Config::load(data_dir)?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read {}: {e} (issue needs the CA of the data dir)",
                p.display()
            ))
        })
    };
    let issuer = data_dir_issuer(&cfg, &read)?;
    let sans = if role == NodeRole::Broker {
        vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()]
    } else {
        Vec::new()
    };
    let (cert, key) = make_leaf(&issuer, &node, role, &sans, &scope)?;
    let trust = read(cfg.path(&cfg.tls.client_ca))?;
    write_identity(out, &cert, &key, &trust)
}

/// The data dir's CA as an rcgen issuer; `read` reads a file (and says what needs it).
fn data_dir_issuer(
    cfg: &Config,
    read: &dyn Fn(PathBuf) -> Result<String, BrokerError>,
) -> Result<Issuer<'static, KeyPair>, BrokerError> {
    let ca_pem = read(cfg.path(&cfg.tls.ca_cert))?;
    let ca_key = KeyPair::from_pem(&read(cfg.path(&cfg.tls.ca_key))?)
        .map_err(|e| BrokerError::invalid(format!("CA key does not parse: {e}")))?;
    Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| BrokerError::invalid(format!("CA certificate does not parse: {e}")))
}

/// Re-issues the broker's own TLS certificate and key (`[tls] cert`, `key`) from the data
/// dir's CA, keeping the DNS names and addresses the current certificate has and adding
/// `extra_sans`. Each file is replaced by a rename, so a running broker's reload reads either
/// the old file or the new one, never half of one. Returns the names in the new certificate.
pub fn renew_server_identity(
    data_dir: &Path,
    extra_sans: &[String],
) -> Result<Vec<String>, BrokerError> {
    let cfg = Config::load(data_dir)?;
    let broker_id = NodeId::parse(&cfg.broker.id, "[broker] id")?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read {}: {e} (renewing needs the data dir's CA and certificate)",
                p.display()
            ))
        })
    };
    let cert_path = cfg.path(&cfg.tls.cert);
    let current = pem_der(&read(cert_path.clone())?)
        .map_err(|e| BrokerError::invalid(format!("{}: {e}", cert_path.display())))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&current)
        .map_err(|e| BrokerError::invalid(format!("{}: {e}", cert_path.display())))?;
    let mut sans: Vec<String> = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    sans.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    for s in extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let issuer = data_dir_issuer(&cfg, &read)?;
    let (cert, key) = make_leaf(&issuer, &broker_id, NodeRole::Broker, &sans, &[])?;
    let key_path = cfg.path(&cfg.tls.key);
    for (path, contents, secret) in [(&key_path, &key, true), (&cert_path, &cert, false)] {
        let tmp = path.with_extension("renewing");
        write_file(&tmp, contents, secret)?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("replace", path, e))?;
    }
    Ok(sans)
}

/// Seconds from now until the first certificate in a PEM file expires (negative once expired).
pub fn seconds_to_expiry(pem: &[u8]) -> Result<i64, BrokerError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| BrokerError::invalid(format!("certificate PEM does not parse: {e}")))?;
    let cert = p
        .parse_x509()
        .map_err(|e| BrokerError::invalid(format!("certificate does not parse: {e}")))?;
    let not_after = cert.validity().not_after.timestamp();
    Ok(not_after - OffsetDateTime::now_utc().unix_timestamp())
}

/// The identity a certificate asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The node id (subject CN).
    pub node_id: NodeId,
    /// The role (subject OU).
    pub role: NodeRole,
    /// The node-id prefixes a broker certificate lets its holder claim, from SAN URIs
    /// `urn:govshare:scope:<prefix>`; empty when there are none (always, for non-brokers
    /// issued by this tool).
    pub scope: Vec<String>,
    /// SHA-256 of the certificate's DER, lowercase hex: what a pinned node must present.
    pub sha256: String,
}

/// Checks that a PEM certificate (leaf first, then any intermediates) is one the TLS layer
/// would accept from a client now, against the PEM CA bundle `client_ca`; returns the leaf's DER.
pub fn verify_client_pem(pem: &[u8], client_ca: &[u8]) -> Result<Vec<u8>, BrokerError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, UnixTime};
    let bad = |why: String| BrokerError::invalid(format!("certificate_pem: {why}"));
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| bad("no certificate in it".into()))?;
    client_verifier(client_ca)
        .map_err(|e| BrokerError::internal(format!("client CA bundle: {e}")))?
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map_err(|e| bad(format!("not a client certificate this broker trusts: {e}")))?;
    Ok(leaf.as_ref().to_vec())
}

/// The verifier of client certificates for a PEM CA bundle, as the TLS listener uses it (so
/// that `verify_client_pem` accepts exactly what a handshake would).
pub fn client_verifier(
    client_ca: &[u8],
) -> Result<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CA certificate in the bundle".into());
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())
}

/// SHA-256 of a DER certificate, lowercase hex (the form `Node.certificate_sha256` holds).
pub fn certificate_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
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
    let mut scope = Vec::new();
    let san = cert.subject_alternative_name().map_err(|e| {
        unauth(format!(
            "client certificate's subject alternative names: {e}"
        ))
    })?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(prefix) = uri.strip_prefix(SCOPE_URI_PREFIX) {
                // An empty or odd prefix would claim too much: refuse the certificate.
                check_scope_prefix(prefix)
                    .map_err(|e| unauth(format!("client certificate scope: {e}")))?;
                if !scope.iter().any(|p| p == prefix) {
                    scope.push(prefix.to_string());
                }
            }
        }
    }
    Ok(CertIdentity {
        node_id,
        role,
        scope,
        sha256: certificate_sha256(der),
    })
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
            ..InitOptions::default()
        })?;
        assert_eq!(report.admin_id, "330000/admin");
        assert_eq!(report.link_dir, None);
        assert!(init_data_dir(&InitOptions {
            data_dir: data.clone(),
            broker_id: "330000/hub".into(),
            ..InitOptions::default()
        })
        .is_err());
        let out = dir.path().join("hrss");
        issue_identity(&data, "330000/hrss", NodeRole::Department, &out, &[])?;
        let pem = std::fs::read(out.join(NODE_CERT))?;
        let der = rustls_pemfile_der(&pem)?;
        let id = identity_from_der(&der)?;
        assert_eq!(id.node_id.as_str(), "330000/hrss");
        assert_eq!(id.role, NodeRole::Department);
        assert!(id.scope.is_empty());
        // A root broker's config has no parent.
        let cfg = Config::load(&data)?;
        assert!(!cfg.federation.has_parent());
        Ok(())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn read_identity(dir: &Path) -> Result<CertIdentity, Box<dyn std::error::Error>> {
        let pem = std::fs::read(dir.join(NODE_CERT))?;
        Ok(identity_from_der(&rustls_pemfile_der(&pem)?)?)
    }

    fn national(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let data = dir.join("national");
        init_data_dir(&InitOptions {
            data_dir: data.clone(),
            broker_id: "000000/hub".into(),
            ..InitOptions::default()
        })?;
        Ok(data)
    }

    /// A call's identity comes from its connection's handshake only for the same certificate.
    #[test]
    fn a_connections_identity_serves_only_calls_with_its_certificate(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let data = national(dir.path())?;
        let der = |node: &str, role| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let out = dir.path().join(node.replace('/', "-"));
            issue_identity(&data, node, role, &out, &[])?;
            rustls_pemfile_der(&std::fs::read(out.join(NODE_CERT))?)
        };
        let a = der("110000/mca", NodeRole::Department)?;
        let b = der("120000/mca", NodeRole::Department)?;
        let conn = crate::tls::ConnIdentity {
            der: a.clone(),
            identity: identity_from_der(&a)?,
        };
        // Marked, so that an identity taken from the connection can be told from a parsed one.
        let mut marked = conn.identity.clone();
        marked.sha256 = "from-the-handshake".into();
        let conn = crate::tls::ConnIdentity {
            identity: marked,
            ..conn
        };
        assert_eq!(
            crate::auth::identity_of(&a, Some(&conn))?.sha256,
            "from-the-handshake"
        );
        let other = crate::auth::identity_of(&b, Some(&conn))?;
        assert_eq!(other.node_id.as_str(), "120000/mca");
        assert_eq!(other.sha256, certificate_sha256(&b));
        assert_eq!(
            crate::auth::identity_of(&a, None)?.sha256,
            certificate_sha256(&a)
        );
        assert!(crate::auth::identity_of(b"not a certificate", Some(&conn)).is_err());
        Ok(())
    }

    #[test]
    fn default_scopes() -> Result<(), Box<dyn std::error::Error>> {
        let scope = |id: &str| NodeId::parse(id, "test").map(|n| default_scope(&n));
        assert_eq!(scope("330000/hub")?, strings(&["33"]));
        assert_eq!(scope("330100/hub")?, strings(&["3301"]));
        assert_eq!(scope("330102/x")?, strings(&["330102"]));
        assert_eq!(scope("100000/hub")?, strings(&["10"]));
        assert_eq!(scope("330010/x")?, strings(&["330010"]));
        assert_eq!(scope("000000/mca")?, strings(&["000000/mca"]));
        Ok(())
    }

    #[test]
    fn broker_identity_carries_scope() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let data = national(dir.path())?;

        let out = dir.path().join("zj");
        issue_identity(&data, "330000/hub", NodeRole::Broker, &out, &[])?;
        let id = read_identity(&out)?;
        assert_eq!(id.node_id.as_str(), "330000/hub");
        assert_eq!(id.role, NodeRole::Broker);
        assert_eq!(id.scope, strings(&["33"]));

        let out = dir.path().join("mca");
        let explicit = strings(&["000000/mca", "000000/mca-death", "000000/mca"]);
        issue_identity(&data, "000000/mca", NodeRole::Broker, &out, &explicit)?;
        let id = read_identity(&out)?;
        assert_eq!(id.scope, strings(&["000000/mca", "000000/mca-death"]));

        let out = dir.path().join("bad");
        for bad in ["", "33 01", "ABC", "33_01", &"3".repeat(71)] {
            let r = issue_identity(
                &data,
                "330000/hub",
                NodeRole::Broker,
                &out,
                &strings(&[bad]),
            );
            assert!(r.is_err(), "{bad:?} accepted");
        }
        let r = issue_identity(
            &data,
            "330000/hrss",
            NodeRole::Department,
            &out,
            &strings(&["33"]),
        );
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("--scope is only for --role broker"))
        );
        assert!(!out.join(NODE_CERT).exists());
        Ok(())
    }

    #[test]
    fn init_with_parent_identity() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let parent = national(dir.path())?;
        let link = dir.path().join("link-zj");
        issue_identity(&parent, "330000/hub", NodeRole::Broker, &link, &[])?;
        let child = |data: &str, id: &str, url: Option<&str>, ident: Option<&Path>| {
            init_data_dir(&InitOptions {
                data_dir: dir.path().join(data),
                broker_id: id.into(),
                parent: url.map(str::to_string),
                parent_identity: ident.map(Path::to_path_buf),
                ..InitOptions::default()
            })
        };
        let url = "https://127.0.0.1:7443";

        // Each needs the other, and only https.
        assert!(child("c1", "330000/hub", Some(url), None).is_err());
        assert!(child("c1", "330000/hub", None, Some(&link)).is_err());
        assert!(child(
            "c1",
            "330000/hub",
            Some("http://127.0.0.1:7443"),
            Some(&link)
        )
        .is_err());
        // Wrong CN is refused, naming the remedy.
        let r = child("c1", "330100/hub", Some(url), Some(&link));
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("is for 330000/hub (role broker)")
                && e.to_string().contains("--node 330100/hub --role broker")),
            "{r:?}"
        );
        // A department identity is no link identity.
        let dept = dir.path().join("dept");
        issue_identity(&parent, "330000/hub", NodeRole::Department, &dept, &[])?;
        let r = child("c1", "330000/hub", Some(url), Some(&dept));
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("role department")),
            "{r:?}"
        );
        // A missing directory is refused.
        assert!(child(
            "c1",
            "330000/hub",
            Some(url),
            Some(&dir.path().join("none"))
        )
        .is_err());
        // Nothing was written by the refusals.
        assert!(!dir.path().join("c1").exists());

        // The matching identity is accepted and copied; the config names the parent.
        let report = child("c1", "330000/hub", Some(url), Some(&link))?;
        let data = dir.path().join("c1");
        assert_eq!(report.link_dir, Some(data.join("link")));
        for f in [NODE_CERT, NODE_KEY, CA_CERT] {
            assert_eq!(
                std::fs::read(link.join(f))?,
                std::fs::read(data.join("link").join(f))?
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.join("link").join(NODE_KEY))?
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let cfg = Config::load(&data)?;
        assert_eq!(cfg.federation.parent, url);
        assert_eq!(cfg.federation.identity, PathBuf::from("link"));
        assert_eq!(read_identity(&data.join("link"))?.scope, strings(&["33"]));

        // A key that is not the certificate's is refused.
        let mixed = dir.path().join("mixed");
        issue_identity(&parent, "330000/hub", NodeRole::Broker, &mixed, &[])?;
        std::fs::copy(dept.join(NODE_KEY), mixed.join(NODE_KEY))?;
        let r = child("c2", "330000/hub", Some(url), Some(&mixed));
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("is not the key")),
            "{r:?}"
        );
        Ok(())
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem)?;
        Ok(p.contents)
    }
}
