//! `govshare.v1.ExchangeService`: designed in the API; the data path arrives in the next release.

use super::{caller, not_yet, App};
use govshare_proto::v1::exchange_service_server::ExchangeService;
use govshare_proto::v1::*;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The exchange service.
#[derive(Debug, Clone)]
pub struct ExchangeSvc(pub Arc<App>);

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ExchangeService for ExchangeSvc {
    async fn request(
        &self,
        req: Request<ExchangeRequest>,
    ) -> Result<Response<ExchangeResult>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Request"))
    }

    async fn submit(
        &self,
        req: Request<ExchangeRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Submit"))
    }

    async fn get(
        &self,
        req: Request<GetExchangeRequest>,
    ) -> Result<Response<ExchangeResult>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Get"))
    }

    type WatchStream = BoxStream<ExchangeResult>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Watch"))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Ack"))
    }

    type ServeStream = BoxStream<BrokerMessage>;

    async fn serve(
        &self,
        req: Request<Streaming<ProviderMessage>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        caller(&self.0, &req).await?;
        Err(not_yet("Exchange.Serve"))
    }
}
