//! `relay`: the ceiling for anything in the middle. The shape of `sync` with none of the
//! broker's work: a consumer's unary call to an in-process server, which hands the payload
//! to a provider over the provider's own long-lived bidirectional stream, waits for the
//! provider's answer on that stream and returns it. Two mutually authenticated TLS
//! connections (consumer's and provider's, the broker's TLS settings), two HTTP/2 message
//! pairs per call, nothing stored, signed or checked.
//!
//! `echo` is one TLS message pair per call; a broker between a consumer and a provider cannot
//! do with fewer than two, so `relay`'s ratio to `echo` is the most any such broker can reach on
//! the same machine, and `sync` against `relay` is what the broker's own work costs.

use crate::cli::LoadArgs;
use crate::driver::OpFn;
use crate::echo::{measure, TlsFixture};
use crate::exchange::lock;
use crate::report::ScenarioResult;
use anyhow::{anyhow, ensure, Context, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::transport::Server;
use tonic_prost::ProstCodec;

/// The relay service's gRPC name.
const SERVICE: &str = "govshare.bench.Relay";
/// The consumer's unary method.
const CALL: &str = "/govshare.bench.Relay/Call";
/// The provider's bidirectional stream: requests out, answers in.
const SERVE: &str = "/govshare.bench.Relay/Serve";
/// Requests queued for the provider's stream at most (the broker's credit is 512 by default).
const STREAM_QUEUE: usize = 1024;

/// A relayed message: on the provider's stream, the id pairs an answer with its call.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RelayMsg {
    /// Which call (0 on the consumer's side, where the call itself pairs them).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The payload, returned as sent.
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

/// What the server keeps: the provider's stream and the calls waiting for their answers.
#[derive(Default)]
struct Hub {
    /// The provider's stream, once it has opened it.
    provider: Mutex<Option<mpsc::Sender<Result<RelayMsg, tonic::Status>>>>,
    /// Calls waiting, by id. A std Mutex: held only to insert or take one entry.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    /// The next call's id.
    next: AtomicU64,
}

impl Hub {
    /// Hands a call's payload to the provider and waits for its answer.
    async fn relay(&self, payload: Bytes) -> Result<Bytes, tonic::Status> {
        let Some(provider) = lock(&self.provider).clone() else {
            return Err(tonic::Status::unavailable("no provider stream is open"));
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        if provider.send(Ok(RelayMsg { id, payload })).await.is_err() {
            lock(&self.waiting).remove(&id);
            return Err(tonic::Status::unavailable("the provider stream closed"));
        }
        rx.await
            .map_err(|_| tonic::Status::unavailable("the provider stream closed unanswered"))
    }

    /// Completes the call an answer is for.
    fn answer(&self, m: RelayMsg) {
        if let Some(w) = lock(&self.waiting).remove(&m.id) {
            let _ = w.send(m.payload);
        }
    }
}

/// The consumer's unary handler.
struct CallSvc(Arc<Hub>);

impl tonic::server::UnaryService<RelayMsg> for CallSvc {
    type Response = RelayMsg;
    type Future = BoxFuture<tonic::Response<RelayMsg>, tonic::Status>;

    fn call(&mut self, req: tonic::Request<RelayMsg>) -> Self::Future {
        let hub = self.0.clone();
        Box::pin(async move {
            let payload = hub.relay(req.into_inner().payload).await?;
            Ok(tonic::Response::new(RelayMsg { id: 0, payload }))
        })
    }
}

/// The stream of requests the server sends to the provider.
type Requests = Pin<Box<dyn Stream<Item = Result<RelayMsg, tonic::Status>> + Send>>;

/// The provider's stream handler: registers the stream, reads answers until it ends.
struct ServeSvc(Arc<Hub>);

impl tonic::server::StreamingService<RelayMsg> for ServeSvc {
    type Response = RelayMsg;
    type ResponseStream = Requests;
    type Future = BoxFuture<tonic::Response<Requests>, tonic::Status>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<RelayMsg>>) -> Self::Future {
        let hub = self.0.clone();
        Box::pin(async move {
            // The harness opens one provider stream; a later one takes over from it.
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            *lock(&hub.provider) = Some(tx.clone());
            let mut answers = req.into_inner();
            tokio::spawn(async move {
                while let Ok(Some(m)) = answers.message().await {
                    hub.answer(m);
                }
                // The calls still waiting fail at once rather than hang (unless another
                // stream took over, whose calls these may be).
                let mut provider = lock(&hub.provider);
                if provider.as_ref().is_some_and(|p| p.same_channel(&tx)) {
                    provider.take();
                    drop(provider);
                    lock(&hub.waiting).clear();
                }
            });
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(rx)) as Requests
            ))
        })
    }
}

/// The relay service as tonic's router wants it.
#[derive(Clone)]
struct RelayServer(Arc<Hub>);

impl tonic::server::NamedService for RelayServer {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for RelayServer
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
        let hub = self.0.clone();
        let codec = ProstCodec::<RelayMsg, RelayMsg>::default;
        match req.uri().path() {
            CALL => Box::pin(async move {
                Ok(tonic::server::Grpc::new(codec())
                    .unary(CallSvc(hub), req)
                    .await)
            }),
            SERVE => Box::pin(async move {
                Ok(tonic::server::Grpc::new(codec())
                    .streaming(ServeSvc(hub), req)
                    .await)
            }),
            other => {
                let status = tonic::Status::unimplemented(format!("no method {other}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The provider: opens its stream and answers every request with its payload, counting them.
async fn provider(
    channel: tonic::transport::Channel,
    answered: Arc<AtomicU64>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| anyhow!("provider channel not ready: {e}"))?;
    let (tx, rx) = mpsc::channel::<RelayMsg>(STREAM_QUEUE);
    let resp = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(SERVE),
            ProstCodec::<RelayMsg, RelayMsg>::default(),
        )
        .await
        .context("opening the provider's stream")?;
    let mut requests = resp.into_inner();
    Ok(tokio::spawn(async move {
        while let Some(Ok(m)) = requests.next().await {
            // Counted before it is sent, so a call cannot come back uncounted.
            answered.fetch_add(1, Ordering::Relaxed);
            if tx.send(m).await.is_err() {
                break;
            }
        }
    }))
}

/// One consumer call.
async fn call(channel: tonic::transport::Channel, payload: Bytes) -> Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| anyhow!("channel not ready: {e}"))?;
    let sent = payload.len();
    let resp = grpc
        .unary(
            tonic::Request::new(RelayMsg { id: 0, payload }),
            http::uri::PathAndQuery::from_static(CALL),
            ProstCodec::<RelayMsg, RelayMsg>::default(),
        )
        .await?;
    ensure!(
        resp.get_ref().payload.len() == sent,
        "relay returned another payload"
    );
    Ok(())
}

/// Runs `relay`.
pub(crate) async fn run(load: &LoadArgs) -> Result<ScenarioResult> {
    let fx = TlsFixture::new("330100/bench-relay")?;
    let hub = Arc::new(Hub::default());
    let server = fx.serve(
        load,
        Server::builder()
            .tls_config(fx.tls.clone())?
            .add_service(RelayServer(hub.clone())),
    )?;
    // Each its own connection, as a consumer and a provider of a broker have.
    let provider_client = fx.client(server.addr).await?;
    let answered = Arc::new(AtomicU64::new(0));
    let served = provider(provider_client.channel(), answered.clone()).await?;
    let consumer = fx.client(server.addr).await?;
    let channel = consumer.channel();
    let payload = Bytes::from(vec![b'x'; load.row_bytes]);
    let op: OpFn = Arc::new(move |_w, _seq| Box::pin(call(channel.clone(), payload.clone())));
    let mut r = measure("relay", load, op).await?;
    r.notes.push(format!(
        "unary call relayed over a provider's bidirectional stream and back, {} bytes each way, \
         two mutual-TLS connections; nothing stored, signed or checked: the ceiling of a broker in the middle",
        load.row_bytes
    ));
    r.extra.insert(
        "provider_answered".into(),
        answered.load(Ordering::Relaxed).into(),
    );
    served.abort();
    server.stop().await;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_without_a_provider_is_refused() {
        let hub = Hub::default();
        let e = hub.relay(Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("no provider"), "{e}");
    }

    /// A hub with a provider stream, one call of `payload` on its way, and what the provider
    /// received for it.
    async fn one_call(
        payload: &'static [u8],
    ) -> (
        Arc<Hub>,
        tokio::task::JoinHandle<Result<Bytes, tonic::Status>>,
        RelayMsg,
    ) {
        let hub = Arc::new(Hub::default());
        let (tx, mut rx) = mpsc::channel(4);
        *lock(&hub.provider) = Some(tx);
        let call = tokio::spawn({
            let hub = hub.clone();
            async move { hub.relay(Bytes::from_static(payload)).await }
        });
        let sent = rx.recv().await.unwrap().unwrap();
        (hub, call, sent)
    }

    #[tokio::test]
    async fn a_stray_answer_changes_nothing_and_a_cleared_wait_fails_the_call() {
        let (hub, call, sent) = one_call(b"x").await;
        // An answer for another call changes nothing; clearing the waits (what the end of
        // the provider's stream does) fails the call rather than leave it hanging.
        hub.answer(RelayMsg {
            id: sent.id + 1,
            payload: Bytes::new(),
        });
        assert!(lock(&hub.waiting).contains_key(&sent.id), "still waiting");
        lock(&hub.waiting).clear();
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }

    #[tokio::test]
    async fn an_answer_completes_its_own_call() {
        let (hub, call, sent) = one_call(b"payload").await;
        hub.answer(sent);
        assert_eq!(call.await.unwrap().unwrap(), Bytes::from_static(b"payload"));
    }
}
