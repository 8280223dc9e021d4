//! Raw TLS connections to a broker, below gRPC: to see which certificate it serves, and to
//! watch it close connections that never finish a handshake or fall silent.

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a probe waits for the broker to close a connection before calling it open.
pub const CLOSE_WAIT: Duration = Duration::from_secs(20);

/// A mutual-TLS connection made with an identity dir, handshake finished, nothing sent yet.
#[derive(Debug)]
pub struct Probe {
    conn: rustls::ClientConnection,
    sock: TcpStream,
}

impl Probe {
    /// Connects to `addr` as the identity in `dir` and finishes the handshake (blocking).
    pub fn connect(addr: SocketAddr, dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<u8>> {
            let p: PathBuf = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read("ca.pem")?) {
            roots.add(c?)?;
        }
        let chain = CertificateDer::pem_slice_iter(&read("node.pem")?)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&read("node.key")?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost")?)?;
        let mut sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(CLOSE_WAIT))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Self { conn, sock })
    }

    /// The leaf certificate the broker served (DER).
    pub fn server_cert(&self) -> Result<Vec<u8>> {
        let certs = self
            .conn
            .peer_certificates()
            .context("no server certificate")?;
        Ok(certs.first().context("empty chain")?.as_ref().to_vec())
    }

    /// Reads (and discards) whatever the broker sends until it closes the connection; fails if
    /// it is still open after [`CLOSE_WAIT`]. Returns how long that took.
    pub fn wait_closed(mut self) -> Result<Duration> {
        let start = Instant::now();
        loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => return Ok(start.elapsed()),
                Ok(_) => {
                    if self.conn.process_new_packets().is_err() {
                        return Ok(start.elapsed());
                    }
                    let mut sink = [0u8; 4096];
                    while let Ok(n) = self.conn.reader().read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("the broker kept the connection open for {CLOSE_WAIT:?}")
                }
                Err(_) => return Ok(start.elapsed()),
            }
        }
    }
}

/// Opens a TCP connection and sends nothing; returns how long the broker took to close it
/// (fails if it is still open after [`CLOSE_WAIT`]).
pub fn silent_tcp(addr: SocketAddr) -> Result<Duration> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(CLOSE_WAIT))?;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("the broker kept a silent connection open for {CLOSE_WAIT:?}")
            }
            Err(_) => return Ok(start.elapsed()),
        }
    }
}

/// The DER of the first certificate in a PEM file.
pub fn pem_file_der(path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let first = CertificateDer::pem_slice_iter(&pem)
        .next()
        .context("no certificate in the file")??;
    Ok(first.as_ref().to_vec())
}
