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

/// Runs `echo`.
pub(crate) async fn run(load: &LoadArgs) -> Result<ScenarioResult> {
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
    // Exactly the broker's server TLS (broker/src/server.rs).
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&cfg.tls.cert)?,
            read(&cfg.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&cfg.tls.client_ca)?));
    let ident = dir.path().join("consumer");
    pki::issue_identity(
        &data,
        "330100/bench-echo",
        NodeRole::Department,
        &ident,
        &[],
    )?;

    let listener = crate::target::loopback_listener(!load.plain_listener)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)?
        .add_service(EchoServer)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);

    let client =
        Client::connect(ClientConfig::new(&ident).with_broker_url(format!("https://{addr}")))
            .await
            .context("connecting to the echo server")?;
    let channel = client.channel();
    let payload = Bytes::from(vec![b'x'; load.row_bytes]);
    let op: OpFn = Arc::new(move |_w, _seq| Box::pin(call(channel.clone(), payload.clone())));
    let no_flushes = || Box::pin(async { None }) as futures::future::BoxFuture<'static, _>;
    let (warm, measured, cpu, _) = warm_and_measure("echo", load, op, no_flushes).await?;
    let peak = sys::peak_rss(None);
    let mut all: Vec<&PhaseStats> = warm.iter().collect();
    all.push(&measured);
    let mut r = ScenarioResult::from_phase("echo", load, "in-process".into(), &measured, &all);
    r.cpu_s_per_1k = cpu.and_then(|c| r.per_1k(c));
    r.peak_rss_mib = peak.map(sys::mib);
    r.notes.push(format!(
        "raw tonic unary echo of {} bytes each way over the broker's mutual TLS; nothing stored (no fsync)",
        load.row_bytes
    ));
    if load.broker.is_some() {
        r.notes
            .push("echo always runs in-process; --broker does not apply".into());
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(r)
}
