//! The broker's mutual-TLS listener.
//!
//! tonic's own TLS takes one fixed configuration, so the broker terminates TLS itself. That is
//! what lets it swap its identity and trust bundle while serving (SIGHUP, or the files
//! changing), bound a handshake's time, close connections left idle, and cap connections per
//! node. The streams it hands to the serving loop ([`crate::serve`]) are tokio-rustls streams
//! over plain TCP, whose TLS info each call carries, so `Request::peer_certs` still works.

use crate::config::Config;
use crate::error::{BrokerError, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// The server's TLS configuration, rebuilt from its files on reload; connections already open
/// keep the configuration they were accepted with.
#[derive(Debug)]
pub struct Reloader {
    files: Files,
    current: RwLock<Current>,
}

#[derive(Debug)]
struct Current {
    config: Arc<rustls::ServerConfig>,
    /// What the files held when `config` was built, to tell a real change from a touch.
    contents: Vec<u8>,
}

/// Where the identity and the trust bundle live.
#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Reloader {
    /// Loads `[tls] cert`, `key` and `client_ca`; fails if they do not make a server config.
    pub fn load(cfg: &Config) -> Result<Self> {
        let files = Files {
            cert: cfg.path(&cfg.tls.cert),
            key: cfg.path(&cfg.tls.key),
            client_ca: cfg.path(&cfg.tls.client_ca),
        };
        let (parts, contents) = files.read()?;
        let config = Arc::new(files.build(&parts)?);
        Ok(Self {
            files,
            current: RwLock::new(Current { config, contents }),
        })
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(c) => c.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Reads the files again. `Ok(true)`: a new configuration is in force; `Ok(false)`: the
    /// files did not change; `Err`: they do not make a valid configuration, and the one in
    /// force stays (a half-copied certificate never takes the broker down).
    pub fn reload(&self) -> Result<bool> {
        let (parts, contents) = self.files.read()?;
        if self
            .current
            .read()
            .map(|c| c.contents == contents)
            .unwrap_or(false)
        {
            return Ok(false);
        }
        let config = Arc::new(self.files.build(&parts)?);
        let mut cur = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *cur = Current { config, contents };
        Ok(true)
    }
    /// Reloads and reports the outcome in the log and `govshare_tls_reloads_total`.
    pub fn reload_logged(&self, why: &str) -> Result<bool> {
        let r = self.reload();
        match &r {
            Ok(true) => {
                tracing::info!(trigger = why, "TLS identity and trust bundle reloaded");
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "ok").increment(1);
            }
            Ok(false) => tracing::debug!(trigger = why, "TLS files unchanged"),
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "TLS reload failed; still serving with the previous identity and trust bundle");
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "error").increment(1);
            }
        }
        r
    }
}

impl Files {
    /// The three files, and all of them together (to compare with what was loaded).
    fn read(&self) -> Result<([Vec<u8>; 3], Vec<u8>)> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| BrokerError::invalid(format!("cannot read {}: {e}", p.display())))
        };
        let parts = [read(&self.cert)?, read(&self.key)?, read(&self.client_ca)?];
        let mut contents = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in &parts {
            contents.extend_from_slice(p);
            contents.push(0);
        }
        Ok((parts, contents))
    }

    fn build(&self, parts: &[Vec<u8>; 3]) -> Result<rustls::ServerConfig> {
        let [cert, key, ca] = parts;
        let bad = |what: &PathBuf, e: &dyn std::fmt::Display| {
            BrokerError::invalid(format!("{}: {e}", what.display()))
        };
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(&self.cert, &e))?;
        if chain.is_empty() {
            return Err(bad(&self.cert, &"no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(&self.key, &e))?;
        let verifier = crate::pki::client_verifier(ca).map_err(|e| bad(&self.client_ca, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| BrokerError::internal(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad(&self.cert, &format!("certificate and key: {e}")))?;
        // gRPC is HTTP/2 only; clients that insist on ALPN need to see it offered.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// Connection limits, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a connection with no call open may stay silent; zero for never.
    pub idle_timeout: Duration,
    /// Connections one node may hold open; 0 for no cap.
    pub per_node: usize,
}

impl ConnLimits {
    /// The limits `[limits]` sets.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            handshake_timeout: Duration::from_secs(cfg.limits.tls_handshake_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.limits.idle_timeout_secs),
            per_node: usize::try_from(cfg.limits.max_connections_per_node).unwrap_or(usize::MAX),
        }
    }
}

/// How long a connection refused for the per-node cap lives: long enough to answer its first
/// call with the reason, short enough that refused connections cannot pile up.
const REFUSED_LINGER: Duration = Duration::from_secs(2);

/// Handshaken connections waiting for the serving loop to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// The connections of each node: open now (for the cap) and opened since start.
#[derive(Debug, Default)]
pub struct Conns {
    per_node: Mutex<HashMap<String, NodeConns>>,
}

/// One node's connections. Kept when none is open, so that `opened` only grows: one small
/// entry per node that ever connected.
#[derive(Debug, Default, Clone, Copy)]
struct NodeConns {
    /// Open now, within the cap.
    open: usize,
    /// Admitted since the broker started.
    opened: u64,
}

/// One connection as calls on it see it.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Calls open on it now (a stream counts until its response ends).
    active: AtomicUsize,
    /// Why its calls are refused, when it is over its node's cap.
    refused: Option<String>,
    /// The identity its client certificate asserts, parsed once at the handshake.
    identity: Option<Arc<ConnIdentity>>,
}

/// A connection's client certificate and the identity parsed from it at the handshake, put
/// in each call's extensions so that a call need not parse and hash the certificate again.
/// The certificate is kept to compare: the identity is used only for a call presenting the
/// same bytes.
#[derive(Debug)]
pub struct ConnIdentity {
    /// The leaf certificate, DER.
    pub der: Vec<u8>,
    /// What it asserts.
    pub identity: crate::pki::CertIdentity,
}

impl Conns {
    /// Open connections of `node` (for tests and `/status`).
    pub fn of_node(&self, node: &str) -> usize {
        lock(&self.per_node).get(node).map_or(0, |n| n.open)
    }

    /// Connections `node` has opened since the broker started (refused ones not counted): a
    /// client that reconnects at once after a GOAWAY never shows zero open, but this grows.
    pub fn opened_by(&self, node: &str) -> u64 {
        lock(&self.per_node).get(node).map_or(0, |n| n.opened)
    }

    /// Counts a new connection of `node`; the state says whether it is over the cap.
    fn admit(self: &Arc<Self>, identity: Option<Arc<ConnIdentity>>, cap: usize) -> Registration {
        let node = identity
            .as_ref()
            .map(|i| i.identity.node_id.to_string())
            .unwrap_or_default();
        let refused = {
            let mut per_node = lock(&self.per_node);
            let n = per_node.entry(node.clone()).or_default();
            if cap > 0 && n.open >= cap {
                Some(format!(
                    "{node} already holds {} connections to this broker, the most [limits] max_connections_per_node allows; reuse a connection (one channel carries many calls)",
                    n.open
                ))
            } else {
                n.open += 1;
                n.opened += 1;
                None
            }
        };
        let counted = refused.is_none();
        let state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            refused,
            identity,
        });
        Registration {
            conns: self.clone(),
            node: counted.then_some(node),
            state,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A connection's place in [`Conns`], given back when the connection closes.
#[derive(Debug)]
struct Registration {
    conns: Arc<Conns>,
    node: Option<String>,
    state: Arc<ConnState>,
}

impl Registration {
    /// The node id of the connection's certificate, or "" when it asserts none.
    fn node_id(&self) -> String {
        self.state
            .identity
            .as_ref()
            .map(|i| i.identity.node_id.to_string())
            .unwrap_or_default()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            let mut per_node = lock(&self.conns.per_node);
            if let Some(n) = per_node.get_mut(node) {
                n.open = n.open.saturating_sub(1);
            }
        }
    }
}

/// Longest a connection told to go away for being idle has to close by itself (the client
/// answers the GOAWAY's ping) before it is cut; shorter when the idle timeout is.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// A TCP stream that watches for idleness: no bytes read for the idle timeout while no call is
/// open on it. Once idle it asks its server to send GOAWAY (see [`Tracked::idle_notice`]), and
/// closes itself if the connection has not ended some seconds later ([`IDLE_CLOSE_GRACE`]).
#[derive(Debug)]
pub struct Tracked {
    io: TcpStream,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    last_read: Instant,
    reg: Option<Registration>,
    /// Told once, when the connection falls idle.
    idle_notice: Arc<Notify>,
    /// Whether `idle_notice` has been told: the grace to close is running.
    noticed: bool,
    /// Whether the grace ran out and reads fail now (counted once, however often polled).
    cut: bool,
}

impl Tracked {
    fn new(io: TcpStream, idle: Duration) -> Self {
        Self {
            io,
            idle,
            timer: (!idle.is_zero()).then(|| Box::pin(tokio::time::sleep(idle))),
            last_read: Instant::now(),
            reg: None,
            idle_notice: Arc::new(Notify::new()),
            noticed: false,
            cut: false,
        }
    }

    /// What the server waits on to end the connection gracefully (GOAWAY) once it is idle: a
    /// client then opens a new connection for its next call, instead of racing an abrupt close
    /// with a call the closing connection would never answer.
    pub fn idle_notice(&self) -> Arc<Notify> {
        self.idle_notice.clone()
    }

    /// The connection's state as its calls see it (open calls, cap refusal, identity).
    pub fn state(&self) -> Option<Arc<ConnState>> {
        self.reg.as_ref().map(|r| r.state.clone())
    }

    fn attach(&mut self, reg: Registration) {
        if reg.state.refused.is_some() {
            self.idle = REFUSED_LINGER;
            self.timer = Some(Box::pin(tokio::time::sleep(REFUSED_LINGER)));
        }
        self.reg = Some(reg);
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let refused = self.reg.as_ref().is_some_and(|r| r.state.refused.is_some());
            let busy = self
                .reg
                .as_ref()
                .is_some_and(|r| r.state.active.load(Ordering::Relaxed) > 0);
            if refused || (self.noticed && !busy) {
                if !refused && !self.cut {
                    self.cut = true;
                    metrics::counter!(crate::metrics::CONNECTIONS_IDLE_CLOSED, "how" => "cut")
                        .increment(1);
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle",
                )));
            }
            let grace_ends = Instant::now() + self.idle.min(IDLE_CLOSE_GRACE);
            if self.noticed {
                // A call that came in before the client saw the GOAWAY is still open: it
                // finishes first.
                timer.as_mut().reset(grace_ends);
                continue;
            }
            let quiet_until = self.last_read + self.idle;
            if !busy && quiet_until <= Instant::now() {
                self.noticed = true;
                self.idle_notice.notify_one();
                metrics::counter!(crate::metrics::CONNECTIONS_IDLE_CLOSED, "how" => "goaway")
                    .increment(1);
                timer.as_mut().reset(grace_ends);
                continue;
            }
            let next = if busy {
                Instant::now() + self.idle
            } else {
                quiet_until
            };
            timer.as_mut().reset(next);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before && this.timer.is_some() {
                    this.last_read = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx),
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Tracked {
    // The TCP info type is what `Request::peer_certs` looks for inside the TLS info.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts TCP connections and handshakes each on its own task (a slow client holds up only
/// itself), yielding the ones that finish in time.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloader>,
    limits: ConnLimits,
    conns: Arc<Conns>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<Tracked>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stopping) => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let (tx, conns) = (tx.clone(), conns.clone());
            tokio::spawn(async move {
                let hs = tokio::time::timeout(
                    limits.handshake_timeout,
                    acceptor.accept(Tracked::new(tcp, limits.idle_timeout)),
                )
                .await;
                let mut stream = match hs {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        refused("handshake_failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, timeout_secs = limits.handshake_timeout.as_secs(), "TLS handshake timed out");
                        refused("handshake_timeout");
                        return;
                    }
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| {
                        let identity = crate::pki::identity_from_der(leaf.as_ref()).ok()?;
                        Some(Arc::new(ConnIdentity {
                            der: leaf.as_ref().to_vec(),
                            identity,
                        }))
                    });
                let reg = conns.admit(identity, limits.per_node);
                if reg.state.refused.is_some() {
                    let node = reg.node_id();
                    tracing::info!(%peer, node = %node, "connection over the per-node cap");
                    refused("node_connection_cap");
                }
                stream.get_mut().0.attach(reg);
                // Full backlog means the serving loop is not taking connections (shutting down).
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Resolves once shutdown starts (without holding the watch's guard across an await).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

fn refused(reason: &'static str) {
    metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// One connection's calls, as the serving loop hands them to the broker's routes: each is
/// counted open on its connection (so idle means no call open), answered `RESOURCE_EXHAUSTED`
/// when the connection is over its node's cap, given the connection's TLS info and parsed
/// identity, held to its `grpc-timeout`, and its status message capped.
#[derive(Debug, Clone)]
pub struct ConnSvc<S> {
    inner: S,
    state: Option<Arc<ConnState>>,
    info: TlsConnectInfo<TcpConnectInfo>,
}

impl<S> ConnSvc<S> {
    /// The service for the calls of connection `io`.
    pub fn new(inner: S, io: &TlsStream<Tracked>) -> Self {
        Self {
            inner,
            state: io.get_ref().0.state(),
            info: io.connect_info(),
        }
    }
}

/// A request as the broker's routes take it.
pub(crate) type HttpRequest = http::Request<tonic::body::Body>;
/// A response as the broker's routes give it.
pub(crate) type HttpResponse = http::Response<tonic::body::Body>;

impl<S> hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnSvc<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<HttpResponse, Self::Error>> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let mut req = req.map(tonic::body::Body::new);
        if let Some(why) = self.state.as_ref().and_then(|s| s.refused.clone()) {
            return Box::pin(async move { Ok(tonic::Status::resource_exhausted(why).into_http()) });
        }
        // Where `Request::peer_certs` and `remote_addr` look.
        req.extensions_mut().insert(self.info.clone());
        if let Some(id) = self.state.as_ref().and_then(|s| s.identity.clone()) {
            req.extensions_mut().insert(id);
        }
        let open = self.state.clone().map(OpenCall::new);
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let call = async move {
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                inner.call(req).await
            };
            // As tonic's own server does: the handler is dropped when the caller's deadline
            // passes (a streamed response's body is not held to it).
            let mut resp = match timeout {
                Some(d) => match tokio::time::timeout(d, call).await {
                    Ok(r) => r?,
                    Err(_) => tonic::Status::cancelled("Timeout expired").into_http(),
                },
                None => call.await?,
            };
            cap_status_message(resp.headers_mut());
            Ok(resp.map(|body| tonic::body::Body::new(CallBody { body, _open: open })))
        })
    }
}

/// A `grpc-timeout` header's value as a duration: a positive integer of at most 8 digits,
/// then its unit (the gRPC spec); `None` when malformed.
pub fn grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call counted open on its connection until its response ends.
#[derive(Debug)]
struct OpenCall(Arc<ConnState>);

impl OpenCall {
    fn new(state: Arc<ConnState>) -> Self {
        state.active.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Longest status message sent, in bytes before percent-encoding.
const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// Cuts a long `grpc-message`. Messages quote what the caller sent, and a header list over the
/// peer's limit (16 KiB in tonic, 8 KiB in grpc-java) fails the call with a protocol error,
/// or makes the client drop the whole connection and every call on it.
fn cap_status_message(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get("grpc-message") else {
        return;
    };
    // Percent-encoding at most triples a byte: shorter values are short enough decoded.
    if value.len() <= 3 * MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    let message = percent_encoding::percent_decode(value.as_bytes())
        .decode_utf8_lossy()
        .into_owned();
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    let mut cut = MAX_STATUS_MESSAGE_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let code = headers
        .get("grpc-status")
        .map(|c| tonic::Code::from_bytes(c.as_bytes()))
        .unwrap_or(tonic::Code::Unknown);
    let short = format!(
        "{}… (cut to {cut} of {} bytes)",
        &message[..cut],
        message.len()
    );
    // Replaces grpc-status (the same) and grpc-message; the shortened text always encodes.
    if tonic::Status::new(code, short).add_header(headers).is_err() {
        headers.remove("grpc-message");
    }
}

/// A response body that keeps its call counted open, and caps the status in its trailers.
struct CallBody {
    body: tonic::body::Body,
    _open: Option<OpenCall>,
}

impl http_body::Body for CallBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.get_mut().body).poll_frame(cx);
        match frame {
            Poll::Ready(Some(Ok(mut f))) => {
                if let Some(t) = f.trailers_mut() {
                    cap_status_message(t);
                }
                Poll::Ready(Some(Ok(f)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    #[test]
    fn a_grpc_timeout_is_read_in_each_unit_and_a_malformed_one_is_none() {
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout("4S"), Some(Duration::from_secs(4)));
        assert_eq!(grpc_timeout("5m"), Some(Duration::from_millis(5)));
        assert_eq!(grpc_timeout("6u"), Some(Duration::from_micros(6)));
        assert_eq!(
            grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            "",
            "S",
            "1",
            "123456789S",
            "-1S",
            "1.5S",
            "1s",
            "1 S",
            "１S",
            "1é",
        ] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
