//! `govshare.v1.AdminService` and `govshare.v1.AuditService`.

use super::{caller, read, App};
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
                parent: a.cfg.federation.parent.clone(),
                started_at: Some(ts(a.started_ms)),
                nodes: a.registry.count() as u64,
                datasets: a.catalog.count() as u64,
                pending_demands: pending,
                overdue_demands: overdue,
                active_grants: active,
                links: a
                    .fed
                    .status()
                    .into_iter()
                    .map(|l| LinkStatus {
                        peer: if l.peer_id.is_empty() {
                            crate::federation::peer_label(&l.peer)
                        } else {
                            l.peer_id
                        },
                        direction: if l.peer == crate::federation::PARENT {
                            "parent".into()
                        } else {
                            "child".into()
                        },
                        state: if l.up { "up".into() } else { "down".into() },
                        since: (l.since_ms > 0).then(|| ts(l.since_ms)),
                        rtt_ms: l.rtt_ms,
                    })
                    .collect(),
                queued: a.engine.depths().iter().map(|(_, n, _)| n).sum(),
                dead_letters: a.engine.dead_letter_count() as u64,
                version: env!("CARGO_PKG_VERSION").to_string(),
                flushes: a
                    .store
                    .flush_stats()
                    .flushes
                    .load(std::sync::atomic::Ordering::Relaxed),
                durable_writes: a
                    .store
                    .flush_stats()
                    .requests
                    .load(std::sync::atomic::Ordering::Relaxed),
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
        let queues = read(&self.0, |a| {
            let in_flight = a.engine.in_flight()?;
            Ok(a.engine
                .depths()
                .into_iter()
                .filter(|(_, open, _)| *open > 0)
                .map(|(destination, open, bytes)| {
                    // The reservation counts every exchange not yet ended; split off those
                    // a provider holds now.
                    let held = in_flight.get(&destination).copied().unwrap_or(0);
                    QueueInfo {
                        in_flight: held,
                        depth: open.saturating_sub(held),
                        destination,
                        bytes,
                    }
                })
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(Response::new(ListQueuesResponse { queues }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        caller(&self.0, &req)
            .await?
            .require_admin("list dead letters")?;
        let r = req.into_inner();
        let out = read(&self.0, move |a| {
            a.engine
                .dead_letters(&r.dataset_id, r.page_size, &r.page_token)
        })
        .await?;
        Ok(Response::new(out))
    }

    async fn replay_dead_letter(
        &self,
        req: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        c.require_admin("replay dead letters")?;
        let id = req.into_inner().exchange_id;
        self.0.engine.replay(&c, id.clone()).await?;
        Ok(Response::new(ReplayDeadLetterResponse { exchange_id: id }))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        c.require_admin("purge dead letters")?;
        let purged = self.0.engine.purge(&c, req.into_inner().dataset_id).await?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
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
