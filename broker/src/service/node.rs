//! `govshare.v1.NodeService`.

use super::{caller, read, write, App};
use govshare_proto::v1::node_service_server::NodeService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The node registry service.
#[derive(Debug, Clone)]
pub struct NodeSvc(pub Arc<App>);

#[tonic::async_trait]
impl NodeService for NodeSvc {
    async fn list_broker_keys(
        &self,
        req: Request<ListBrokerKeysRequest>,
    ) -> Result<Response<ListBrokerKeysResponse>, Status> {
        caller(&self.0, &req).await?;
        let keys = read(&self.0, |a| a.store.keys()).await?;
        Ok(Response::new(ListBrokerKeysResponse {
            keys: keys.as_ref().clone(),
        }))
    }

    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = write(&self.0, move |a| a.registry.register(&c, r)).await?;
        if let Some(n) = &out.node {
            self.0.fed.advertise_local(n);
        }
        Ok(Response::new(out))
    }

    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        caller(&self.0, &req).await?;
        let id = req.into_inner().id;
        Ok(Response::new(
            read(&self.0, move |a| a.registry.get(&id)).await?,
        ))
    }

    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = read(&self.0, move |a| {
            a.registry
                .list(&c, &r.region_prefix, r.page_size, &r.page_token)
        })
        .await?;
        Ok(Response::new(out))
    }

    async fn suspend_node(
        &self,
        req: Request<SuspendNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = write(&self.0, move |a| {
            a.registry
                .set_state(&c, &r.id, NodeState::Suspended, &r.reason)
        })
        .await?;
        self.0.fed.advertise_local(&out);
        if out.role() == NodeRole::Broker {
            self.0.fed.close_child(&out.id);
        }
        Ok(Response::new(out))
    }

    async fn resume_node(&self, req: Request<ResumeNodeRequest>) -> Result<Response<Node>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = write(&self.0, move |a| {
            a.registry.set_state(&c, &r.id, NodeState::Active, "")
        })
        .await?;
        self.0.fed.advertise_local(&out);
        Ok(Response::new(out))
    }

    async fn pin_certificate(
        &self,
        req: Request<PinCertificateRequest>,
    ) -> Result<Response<Node>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = write(&self.0, move |a| {
            // The trust bundle as it is now, so a CA added by a reload counts.
            let ca_path = a.cfg.path(&a.cfg.tls.client_ca);
            let ca = std::fs::read(&ca_path).map_err(|e| {
                crate::error::BrokerError::Unavailable(format!(
                    "cannot read the client CA bundle {}: {e}",
                    ca_path.display()
                ))
            })?;
            a.registry
                .pin_certificate(&c, &r.id, &r.certificate_pem, &ca, &r.reason)
        })
        .await?;
        if out.role() == NodeRole::Broker {
            self.0.fed.close_child(&out.id);
        }
        Ok(Response::new(out))
    }

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let id = c.id.to_string();
        let node = read(&self.0, move |a| a.registry.get(&id)).await?;
        Ok(Response::new(WhoAmIResponse {
            node_id: c.id.to_string(),
            role: c.role as i32,
            node: Some(node),
            broker_id: self.0.cfg.broker.id.clone(),
        }))
    }
}
