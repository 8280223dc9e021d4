//! `govshare.v1.FederationService`: designed in the API; links arrive with federation.

use super::{caller, not_yet, App};
use crate::error::BrokerError;
use govshare_proto::v1::federation_service_server::FederationService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// The federation link service.
#[derive(Debug, Clone)]
pub struct FederationSvc(pub Arc<App>);

#[tonic::async_trait]
impl FederationService for FederationSvc {
    type LinkStream = super::exchange::BoxStream<LinkFrame>;

    async fn link(
        &self,
        req: Request<Streaming<LinkFrame>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let c = caller(&self.0, &req).await?;
        if c.role != NodeRole::Broker {
            return Err(BrokerError::denied(format!(
                "only broker certificates may open a federation link; {} is not a broker",
                c.id
            ))
            .into());
        }
        Err(not_yet("Federation.Link"))
    }
}
