//! `govshare.v1.FederationService`: the link a child broker keeps open to its parent.

use super::App;
use crate::error::BrokerError;
use govshare_proto::v1::federation_service_server::FederationService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tokio_stream::StreamExt;
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
        // A child broker's certificate, signed by this broker's CA with the broker role, is
        // what admits it (and its scope); registering the child as a node adds suspension
        // and certificate pinning.
        let cert = crate::auth::cert_identity(&req)?;
        if cert.role != NodeRole::Broker {
            return Err(BrokerError::denied(format!(
                "only broker certificates may open a federation link; {} is a {}",
                cert.node_id,
                crate::pki::role_name(cert.role)
            ))
            .into());
        }
        let registry = self.0.registry.clone();
        let checked = cert.clone();
        crate::store::blocking(move || registry.check_link(&checked)).await?;
        let out =
            crate::federation::link::accept_child(self.0.clone(), cert, req.into_inner()).await?;
        Ok(Response::new(Box::pin(out.map(Ok))))
    }
}
