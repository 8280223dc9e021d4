//! Raw TLS connections to a broker, below gRPC: to see which certificate it serves, and to
//! watch it close connections that never finish a handshake or fall silent.

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
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
                Err(e) if still_open(&e) => {
                    bail!("the broker kept the connection open for {CLOSE_WAIT:?}")
                }
                Err(_) => return Ok(start.elapsed()),
            }
        }
    }
}

/// How an HTTP/2 connection the probe kept open without calls ended.
#[derive(Debug)]
pub struct H2Close {
    /// The error code of each GOAWAY the broker sent, in order (0 is `NO_ERROR`).
    pub goaways: Vec<u32>,
    /// Whether the broker ended TLS properly (`close_notify`) rather than cutting the socket.
    pub clean: bool,
    /// How long after the probe's preface the connection ended.
    pub elapsed: Duration,
}

/// HTTP/2 frame types the probe answers or records.
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;
const H2_ACK: u8 = 0x1;

impl Probe {
    /// Speaks HTTP/2 without making a call: sends the client preface and settings, acknowledges
    /// the broker's settings and (when `answer_pings`) its pings, and records its GOAWAYs until
    /// it closes the connection; fails if it is still open after [`CLOSE_WAIT`].
    pub fn h2_until_closed(mut self, answer_pings: bool) -> Result<H2Close> {
        let start = Instant::now();
        let mut frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame.extend(h2_frame(H2_SETTINGS, 0, &[]));
        self.send(&frame)?;
        let (mut buf, mut goaways) = (Vec::new(), Vec::new());
        loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if still_open(&e) => {
                    bail!("the broker kept the connection open for {CLOSE_WAIT:?}")
                }
                Err(_) => break,
            }
            let state = self
                .conn
                .process_new_packets()
                .context("TLS from the broker")?;
            let mut chunk = vec![0u8; state.plaintext_bytes_to_read()];
            self.conn.reader().read_exact(&mut chunk)?;
            buf.extend(chunk);
            // Whole frames: a 9-byte header (length, type, flags, stream), then the payload.
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let payload: Vec<u8> = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                match kind {
                    H2_SETTINGS if flags & H2_ACK == 0 => {
                        self.send(&h2_frame(H2_SETTINGS, H2_ACK, &[]))?
                    }
                    H2_PING if flags & H2_ACK == 0 && answer_pings => {
                        self.send(&h2_frame(H2_PING, H2_ACK, &payload))?
                    }
                    H2_GOAWAY if payload.len() >= 8 => goaways.push(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ])),
                    _ => {}
                }
            }
            if state.peer_has_closed() {
                return Ok(H2Close {
                    goaways,
                    clean: true,
                    elapsed: start.elapsed(),
                });
            }
        }
        Ok(H2Close {
            goaways,
            clean: false,
            elapsed: start.elapsed(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.conn.writer().write_all(bytes)?;
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

/// Whether a read failed only because nothing came within the socket's timeout.
fn still_open(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// An HTTP/2 frame on stream 0.
fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
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
            Err(e) if still_open(&e) => {
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
