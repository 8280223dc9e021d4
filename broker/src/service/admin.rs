//! `govshare.v1.AdminService` and `govshare.v1.AuditService`.

use super::{caller, not_yet, read, App};
use crate::time::ts;
use govshare_proto::v1::admin_service_server::AdminService;
use govshare_proto::v1::audit_service_server::AuditService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminSvc(pub Arc<App>);

/// The audit service.
#[derive(Debug, Clone)]
pub struct AuditSvc(pub Arc<App>);

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn get_broker_status(
        &self,
        req: Request<GetBrokerStatusRequest>,
    ) -> Result<Response<BrokerStatus>, Status> {
        caller(&self.0, &req)
            .await?
            .require_admin("read the broker status")?;
        let status = read(&self.0, |a| {
            let (pending, overdue, active) = a.sharing.counts()?;
            Ok(BrokerStatus {
                broker_id: a.cfg.broker.id.clone(),
                parent: String::new(),
                started_at: Some(ts(a.started_ms)),
                nodes: a.registry.count() as u64,
                datasets: a.catalog.count() as u64,
                pending_demands: pending,
                overdue_demands: overdue,
                active_grants: active,
                links: Vec::new(),
                queued: 0,
                dead_letters: 0,
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
        })
        .await?;
        Ok(Response::new(status))
    }

    async fn list_queues(
        &self,
        req: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        caller(&self.0, &req).await?.require_admin("list queues")?;
        Ok(Response::new(ListQueuesResponse { queues: Vec::new() }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        caller(&self.0, &req)
            .await?
            .require_admin("list dead letters")?;
        Err(not_yet("Admin.ListDeadLetters"))
    }

    async fn replay_dead_letter(
        &self,
        req: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        caller(&self.0, &req)
            .await?
            .require_admin("replay dead letters")?;
        Err(not_yet("Admin.ReplayDeadLetter"))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        caller(&self.0, &req)
            .await?
            .require_admin("purge dead letters")?;
        Err(not_yet("Admin.PurgeDeadLetters"))
    }
}

#[tonic::async_trait]
impl AuditService for AuditSvc {
    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = read(&self.0, move |a| crate::audit::list(&a.store, &c, &r)).await?;
        Ok(Response::new(out))
    }
}
