//! A small standing load for tests of what operators see: a provider department with an
//! UNCONDITIONAL dataset, a consumer granted on it, and a provider instance that answers.

use crate::provider::{row, Reply, TestProvider};
use crate::TestBroker;
use anyhow::Result;
use govshare_client::proto::{
    Dataset, ExchangeRequest, FileDemandRequest, InfoItem, ProviderRequest, Query, ShareType,
};
use govshare_client::Client;
use std::sync::Arc;

/// The dataset the load asks for.
pub const ALIVE: &str = "330000/hrss/alive";

/// `330000/hrss` serving `ALIVE`, and `330100/civil` holding a grant on its `status`.
#[derive(Debug)]
pub struct AliveLoad {
    /// The provider department.
    pub hrss: Client,
    /// The consumer department.
    pub civil: Client,
    /// The provider instance, answering every request with `status = ALIVE`.
    pub provider: TestProvider,
}

impl AliveLoad {
    /// Registers both departments, publishes, grants and starts the provider instance.
    pub async fn start(broker: &TestBroker) -> Result<Self> {
        let hrss = broker.client_for("330000/hrss").await?;
        let civil = broker.client_for("330100/civil").await?;
        hrss.publish_dataset(Dataset {
            code: "alive".into(),
            name: "人员生存状态".into(),
            share_type: ShareType::Unconditional as i32,
            items: vec![InfoItem {
                name: "status".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
        civil
            .file_demand(FileDemandRequest {
                dataset_id: ALIVE.into(),
                fields: vec!["status".into()],
                purpose: "operations test".into(),
                ..Default::default()
            })
            .await?;
        let provider = TestProvider::start(
            &hrss,
            &[ALIVE],
            8,
            "p",
            Arc::new(|_: &ProviderRequest| Reply::Rows(vec![row(&[("status", "ALIVE")])])),
        )
        .await?;
        Ok(Self {
            hrss,
            civil,
            provider,
        })
    }

    /// A request for `ALIVE` wanting `fields` (none: every granted item; `salary`: a denial).
    pub fn ask(fields: Vec<String>) -> ExchangeRequest {
        ExchangeRequest {
            dataset_id: ALIVE.into(),
            query: Some(Query {
                fields,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
