//! `govshare.v1.ExchangeService`: thin over the exchange engine.

use super::{caller, read, App};
use crate::error::BrokerError;
use crate::exchange::dispatcher::{Cmd, InstanceSpec};
use crate::ids::DatasetId;
use crate::time::now_ms;
use govshare_proto::v1::exchange_service_server::ExchangeService;
use govshare_proto::v1::*;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The exchange service.
#[derive(Debug, Clone)]
pub struct ExchangeSvc(pub Arc<App>);

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Most requests one serving stream may hold in flight.
const MAX_IN_FLIGHT: u32 = 10_000;
/// How long a new serving stream has to say hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// The call's deadline from its `grpc-timeout` header, as Unix ms.
pub fn call_deadline_ms<B>(req: &Request<B>) -> Option<i64> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let ms = i64::try_from(crate::tls::grpc_timeout(v)?.as_millis()).unwrap_or(i64::MAX);
    Some(now_ms().saturating_add(ms))
}

/// The trace id of a W3C `traceparent` header (`00-TRACEID-SPANID-FLAGS`), if well-formed.
pub fn traceparent_trace_id<B>(req: &Request<B>) -> Option<String> {
    let v = req.metadata().get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(version, 2)
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0');
    ok.then(|| trace.to_ascii_lowercase())
}

/// Takes the trace id from `traceparent` when the request itself names none, so that the
/// logs of every hop (and of the caller's own systems) join on one id.
fn with_trace(req: Request<ExchangeRequest>) -> ExchangeRequest {
    let from_header = if req.get_ref().trace_id.is_empty() {
        traceparent_trace_id(&req)
    } else {
        None
    };
    let mut r = req.into_inner();
    if let Some(t) = from_header {
        r.trace_id = t;
    }
    r
}

#[tonic::async_trait]
impl ExchangeService for ExchangeSvc {
    async fn request(
        &self,
        req: Request<ExchangeRequest>,
    ) -> Result<Response<ExchangeResult>, Status> {
        let c = caller(&self.0, &req).await?;
        c.require_department("exchange data")?;
        let deadline = call_deadline_ms(&req);
        let inner = with_trace(req);
        let r = self.0.engine.request(c, inner, deadline).await?;
        Ok(Response::new(r))
    }

    async fn submit(
        &self,
        req: Request<ExchangeRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        c.require_department("exchange data")?;
        let inner = with_trace(req);
        Ok(Response::new(self.0.engine.submit(c, inner).await?))
    }

    async fn get(
        &self,
        req: Request<GetExchangeRequest>,
    ) -> Result<Response<ExchangeResult>, Status> {
        let c = caller(&self.0, &req).await?;
        let deadline = call_deadline_ms(&req).unwrap_or_else(|| now_ms() + 30_000);
        let r = req.into_inner();
        // Answer a little before the caller gives up, so it gets the state rather than a timeout.
        let r = self
            .0
            .engine
            .get(c, r.exchange_id, r.wait, deadline - 200)
            .await?;
        Ok(Response::new(r))
    }

    type WatchStream = BoxStream<ExchangeResult>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let c = caller(&self.0, &req).await?;
        let rx = self
            .0
            .engine
            .watch(c, req.into_inner().dataset_id, self.0.stopping.clone())?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let acked = self
            .0
            .engine
            .ack(c.id.to_string(), req.into_inner().exchange_ids)
            .await?;
        Ok(Response::new(AckResponse { acked }))
    }

    type ServeStream = BoxStream<BrokerMessage>;

    async fn serve(
        &self,
        req: Request<Streaming<ProviderMessage>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        let c = caller(&self.0, &req).await?;
        c.require_department("serve datasets")?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_WAIT, inbound.message())
            .await
            .map_err(|_| {
                BrokerError::DeadlineExceeded("send ServeHello first, within 10 s".into())
            })??;
        let hello = match first.and_then(|m| m.body) {
            Some(provider_message::Body::Hello(h)) => h,
            _ => {
                return Err(
                    BrokerError::invalid("the first message on Serve must be ServeHello").into(),
                )
            }
        };
        if hello.max_in_flight == 0 || hello.max_in_flight > MAX_IN_FLIGHT {
            return Err(BrokerError::invalid(format!(
                "max_in_flight must be 1 to {MAX_IN_FLIGHT}, not {}",
                hello.max_in_flight
            ))
            .into());
        }
        crate::ids::check_text("instance", &hello.instance, false, 128)?;
        for ds in &hello.dataset_ids {
            let did = DatasetId::parse(ds)?;
            if did.provider != c.id {
                return Err(BrokerError::denied(format!(
                    "dataset {ds} belongs to {}; {} may serve only its own",
                    did.provider, c.id
                ))
                .into());
            }
        }
        let wanted = hello.dataset_ids.clone();
        read(&self.0, move |a| {
            for ds in &wanted {
                a.catalog.get(ds)?;
            }
            Ok(())
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(hello.max_in_flight as usize + 16);
        let label = if hello.instance.is_empty() {
            format!("{}#{}", c.id, now_ms())
        } else {
            hello.instance.clone()
        };
        let engine = self.0.engine.clone();
        let instance = engine
            .connect_provider(InstanceSpec {
                node: c.id.to_string(),
                datasets: hello.dataset_ids,
                max_in_flight: hello.max_in_flight,
                label,
                tx: tx.clone(),
            })
            .await?;
        let mut stopping = self.0.stopping.clone();
        // Only the dispatcher holds the stream's sender: when it drops this instance (hung,
        // broken), the stream ends and the provider knows to reconnect.
        let weak = tx.downgrade();
        drop(tx);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(ProviderMessage { body: Some(provider_message::Body::Credit(cr)) })) => {
                            if engine.send(Cmd::Credit { instance, add: cr.add }).await.is_err() { break }
                        }
                        Ok(Some(ProviderMessage { body: Some(provider_message::Body::Answer(answer)) })) => {
                            // From here until the dispatcher asks for its flush, a flush may wait for it.
                            let intent = engine.store().durable_intent();
                            if engine.send(Cmd::Answer { instance, answer, intent }).await.is_err() { break }
                        }
                        Ok(Some(_)) => {
                            if let Some(tx) = weak.upgrade() {
                                let _ = tx.try_send(Err(Status::invalid_argument(
                                    "after ServeHello, send only ServeCredit and ProviderAnswer",
                                )));
                            }
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = stopping.changed() => break,
                }
            }
            let _ = engine.send(Cmd::Disconnect { instance }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
