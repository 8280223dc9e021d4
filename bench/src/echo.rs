//! `echo`: the loopback ceiling. A raw tonic unary echo — a hand-rolled service, no `.proto`
//! file: one prost message carrying the payload, served by a `tower::Service` that hands the
//! call to `tonic::server::Grpc::unary` — over the broker's TLS settings: the same
//! `ServerTlsConfig` (the certificate and key made by `govshare_broker::pki::init_data_dir`,
//! client certificates required and checked against the same CA), and on the client side the
//! SDK's own channel (`govshare_client::Client::connect`: mutual TLS, TCP_NODELAY, keep-alive).

use crate::cli::LoadArgs;
use crate::driver::{OpFn, PhaseStats};
use crate::exchange::warm_and_measure;
use crate::report::ScenarioResult;
use crate::sys;
use anyhow::{Context, Result};
use bytes::Bytes;
use govshare_broker::pki::{self, InitOptions};
use govshare_broker::Config;
use govshare_client::proto::NodeRole;
use govshare_client::{Client, ClientConfig};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_prost::ProstCodec;

/// The echo service's gRPC name.
const SERVICE: &str = "govshare.bench.Echo";
/// The one method's path.
const PATH: &str = "/govshare.bench.Echo/Echo";

/// The message echoed: just bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EchoMsg {
    /// The payload, returned as sent.
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: Bytes,
}

/// The unary handler: answers with the request.
struct EchoUnary;

impl tonic::server::UnaryService<EchoMsg> for EchoUnary {
    type Response = EchoMsg;
    type Future = std::future::Ready<Result<tonic::Response<EchoMsg>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<EchoMsg>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(req.into_inner())))
    }
}

/// The echo service as tonic's router wants it.
#[derive(Debug, Clone, Default)]
pub(crate) struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == PATH {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoMsg, EchoMsg>::default());
                Ok(grpc.unary(EchoUnary, req).await)
            })
        } else {
            Box::pin(async move {
                Ok(
                    tonic::Status::unimplemented(format!("no method {}", req.uri().path()))
                        .into_http(),
                )
            })
        }
    }
}

/// One echo call on a channel.
async fn call(channel: tonic::transport::Channel, payload: Bytes) -> Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| anyhow::anyhow!("channel not ready: {e}"))?;
    let path = http::uri::PathAndQuery::from_static(PATH);
    let sent = payload.len();
    let resp = grpc
        .unary(
            tonic::Request::new(EchoMsg { payload }),
            path,
            ProstCodec::<EchoMsg, EchoMsg>::default(),
        )
        .await?;
    anyhow::ensure!(
        resp.get_ref().payload.len() == sent,
        "echo returned another payload"
    );
    Ok(())
}

/// A temp dir with a development PKI: the broker's server TLS settings and one client
/// identity, shared by `echo` and `relay` so that both run over exactly the broker's TLS.
pub(crate) struct TlsFixture {
    /// Holds the PKI; removed on drop.
    _dir: tempfile::TempDir,
    /// The server side, exactly as `govshare-broker` configures it (broker/src/server.rs).
    pub tls: ServerTlsConfig,
    /// A department identity issued by the same CA.
    pub ident: std::path::PathBuf,
}

impl TlsFixture {
    /// Makes the PKI and issues the client identity `node`.
    pub(crate) fn new(node: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        pki::init_data_dir(&InitOptions {
            data_dir: data.clone(),
            broker_id: "330000/echo".into(),
            sans: Vec::new(),
            listen: None,
            admin_id: None,
            parent: None,
            parent_identity: None,
        })?;
        let cfg = Config::load(&data)?;
        let read = |p: &std::path::Path| {
            let path = cfg.path(p);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&cfg.tls.cert)?,
                read(&cfg.tls.key)?,
            ))
            .client_ca_root(Certificate::from_pem(read(&cfg.tls.client_ca)?));
        let ident = dir.path().join("client");
        pki::issue_identity(&data, node, NodeRole::Department, &ident, &[])?;
        Ok(Self {
            _dir: dir,
            tls,
            ident,
        })
    }

    /// Serves `router` on a loopback listener with the broker's TLS until stopped.
    pub(crate) fn serve(
        &self,
        load: &LoadArgs,
        router: tonic::transport::server::Router,
    ) -> Result<Serving> {
        let listener = crate::target::loopback_listener(!load.plain_listener)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
        Ok(Serving {
            addr,
            stop,
            task: tokio::spawn(server),
        })
    }

    /// A client of the server at `addr`, on a connection of its own (mutual TLS, the SDK's
    /// channel settings).
    pub(crate) async fn client(&self, addr: std::net::SocketAddr) -> Result<Client> {
        Client::connect(ClientConfig::new(&self.ident).with_broker_url(format!("https://{addr}")))
            .await
            .with_context(|| format!("connecting to the in-process server at {addr}"))
    }
}

/// A server started by [`TlsFixture::serve`].
pub(crate) struct Serving {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Serving {
    /// Stops the server and waits for it to finish.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Warms up and measures `op` (no broker, so no fsyncs); the result with CPU and peak RSS.
pub(crate) async fn measure(name: &str, load: &LoadArgs, op: OpFn) -> Result<ScenarioResult> {
    let no_flushes = || Box::pin(async { None }) as futures::future::BoxFuture<'static, _>;
    let (warm, measured, cpu, _) = warm_and_measure(name, load, op, no_flushes).await?;
    let peak = sys::peak_rss(None);
    let mut all: Vec<&PhaseStats> = warm.iter().collect();
    all.push(&measured);
    let mut r = ScenarioResult::from_phase(name, load, "in-process".into(), &measured, &all);
    r.cpu_s_per_1k = cpu.and_then(|c| r.per_1k(c));
    r.peak_rss_mib = peak.map(sys::mib);
    if load.broker.is_some() {
        r.notes.push(format!(
            "{name} always runs in-process; --broker does not apply"
        ));
    }
    Ok(r)
}

/// Runs `echo`.
pub(crate) async fn run(load: &LoadArgs) -> Result<ScenarioResult> {
    let fx = TlsFixture::new("330100/bench-echo")?;
    let server = fx.serve(
        load,
        Server::builder()
            .tls_config(fx.tls.clone())?
            .add_service(EchoServer),
    )?;
    let client = fx.client(server.addr).await?;
    let channel = client.channel();
    let payload = Bytes::from(vec![b'x'; load.row_bytes]);
    let op: OpFn = Arc::new(move |_w, _seq| Box::pin(call(channel.clone(), payload.clone())));
    let mut r = measure("echo", load, op).await?;
    r.notes.push(format!(
        "raw tonic unary echo of {} bytes each way over the broker's mutual TLS; nothing stored (no fsync)",
        load.row_bytes
    ));
    server.stop().await;
    Ok(r)
}
