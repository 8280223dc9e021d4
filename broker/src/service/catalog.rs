//! `govshare.v1.CatalogService`.

use super::{caller, read, write, App};
use govshare_proto::v1::catalog_service_server::CatalogService;
use govshare_proto::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The catalog service.
#[derive(Debug, Clone)]
pub struct CatalogSvc(pub Arc<App>);

#[tonic::async_trait]
impl CatalogService for CatalogSvc {
    async fn publish_dataset(
        &self,
        req: Request<PublishDatasetRequest>,
    ) -> Result<Response<PublishDatasetResponse>, Status> {
        let c = caller(&self.0, &req).await?;
        let d = req.into_inner().dataset;
        let out = write(&self.0, move |a| a.catalog.publish(&c, d)).await?;
        if let Some(d) = &out.dataset {
            self.0.fed.advertise_own(&d.provider);
            self.0.fed.broadcast(
                &link_frame::Body::Catalog(CatalogUpdate {
                    dataset: Some(d.clone()),
                }),
                "",
            );
        }
        Ok(Response::new(out))
    }

    async fn withdraw_dataset(
        &self,
        req: Request<WithdrawDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        let c = caller(&self.0, &req).await?;
        let r = req.into_inner();
        let out = write(&self.0, move |a| a.catalog.withdraw(&c, &r.id, &r.reason)).await?;
        self.0.fed.advertise_own(&out.provider);
        self.0.fed.broadcast(
            &link_frame::Body::Catalog(CatalogUpdate {
                dataset: Some(out.clone()),
            }),
            "",
        );
        Ok(Response::new(out))
    }

    async fn get_dataset(
        &self,
        req: Request<GetDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        caller(&self.0, &req).await?;
        let id = req.into_inner().id;
        Ok(Response::new(
            read(&self.0, move |a| a.catalog.get(&id)).await?,
        ))
    }

    async fn search_datasets(
        &self,
        req: Request<SearchDatasetsRequest>,
    ) -> Result<Response<SearchDatasetsResponse>, Status> {
        caller(&self.0, &req).await?;
        let r = req.into_inner();
        Ok(Response::new(
            read(&self.0, move |a| a.catalog.search(&r)).await?,
        ))
    }
}
