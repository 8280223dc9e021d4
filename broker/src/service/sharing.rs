//! `govshare.v1.SharingService`.

use super::{caller, read, write, App};
use govshare_proto::v1::sharing_service_server::SharingService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The demands and grants service.
#[derive(Debug, Clone)]
pub struct SharingSvc(pub Arc<App>);

#[tonic::async_trait]
impl SharingService for SharingSvc {
    async fn file_demand(
        &self,
        req: Request<FileDemandRequest>,
    ) -> Result<Response<FileDemandResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            write(&self.0, move |a| a.sharing.file(&c, r)).await?,
        ))
    }

    async fn get_demand(&self, req: Request<GetDemandRequest>) -> Result<Response<Demand>, Status> {
        let c = caller(&self.0, &req).await?;
        let id = req.into_inner().id;
        Ok(Response::new(
            read(&self.0, move |a| a.sharing.get_demand(&c, &id)).await?,
        ))
    }

    async fn list_demands(
        &self,
        req: Request<ListDemandsRequest>,
    ) -> Result<Response<ListDemandsResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            read(&self.0, move |a| a.sharing.list_demands(&c, &r)).await?,
        ))
    }

    async fn approve_demand(
        &self,
        req: Request<ApproveDemandRequest>,
    ) -> Result<Response<ApproveDemandResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            write(&self.0, move |a| a.sharing.approve(&c, &r)).await?,
        ))
    }

    async fn reject_demand(
        &self,
        req: Request<RejectDemandRequest>,
    ) -> Result<Response<Demand>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            write(&self.0, move |a| a.sharing.reject(&c, &r.id, &r.reason)).await?,
        ))
    }

    async fn withdraw_demand(
        &self,
        req: Request<WithdrawDemandRequest>,
    ) -> Result<Response<Demand>, Status> {
        let c = caller(&self.0, &req).await?;
        let id = req.into_inner().id;
        Ok(Response::new(
            write(&self.0, move |a| a.sharing.withdraw(&c, &id)).await?,
        ))
    }

    async fn get_grant(&self, req: Request<GetGrantRequest>) -> Result<Response<Grant>, Status> {
        let c = caller(&self.0, &req).await?;
        let id = req.into_inner().id;
        Ok(Response::new(
            read(&self.0, move |a| a.sharing.get_grant(&c, &id)).await?,
        ))
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            read(&self.0, move |a| a.sharing.list_grants(&c, &r)).await?,
        ))
    }

    async fn revoke_grant(
        &self,
        req: Request<RevokeGrantRequest>,
    ) -> Result<Response<Grant>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let grant = write(&self.0, move |a| a.sharing.revoke(&c, &r.id, &r.reason)).await?;
        // Exchanges queued under it end now, as denied, instead of waiting for a provider.
        self.0.engine.grant_revoked(grant.id.clone()).await;
        let gid = grant.id.clone();
        let issuer = grant.issuer.clone();
        let signed = read(&self.0, move |a| {
            a.store.get::<GrantRevocation>(
                crate::store::T::Revoked,
                &crate::federation::revoked_key(&issuer, &gid),
            )
        })
        .await?;
        if let Some(r) = signed {
            // Every broker in the cascade refuses the grant from now on.
            self.0.fed.broadcast(&link_frame::Body::Revocation(r), "");
        }
        Ok(Response::new(grant))
    }
}
