//! Helpers for federation tests: datasets, grants across brokers, and waiting for outcomes.

use crate::provider::{filter_value, row, Reply, TestProvider};
use crate::{wait_until, TestBroker};
use anyhow::{Context, Result};
use govshare_client::proto::*;
use govshare_client::Client;
use std::sync::Arc;
use std::time::Duration;

/// How long federation tests wait for something to cross the cascade.
pub const WAIT: Duration = Duration::from_secs(30);

/// A string information item.
pub fn item(name: &str) -> InfoItem {
    InfoItem {
        name: name.into(),
        r#type: "string".into(),
        ..Default::default()
    }
}

/// Publishes `code` at `provider` with items id_number, status, name.
pub async fn publish(provider: &Client, code: &str, share: ShareType) -> Result<String> {
    let d = provider
        .publish_dataset(Dataset {
            code: code.into(),
            name: format!("死亡登记 {code}"),
            share_type: share as i32,
            items: vec![item("id_number"), item("status"), item("name")],
            ..Default::default()
        })
        .await?
        .dataset
        .context("no dataset")?;
    Ok(d.id)
}

/// A provider handler answering one row: the asked id_number, status ALIVE, and a name.
pub fn alive_rows() -> Arc<dyn Fn(&ProviderRequest) -> Reply + Send + Sync> {
    answering("ALIVE")
}

/// A provider handler answering one row whose status is `marker` (to tell providers apart).
pub fn answering(marker: &str) -> Arc<dyn Fn(&ProviderRequest) -> Reply + Send + Sync> {
    let marker = marker.to_string();
    Arc::new(move |req: &ProviderRequest| {
        let id = filter_value(req);
        Reply::Rows(vec![row(&[
            ("id_number", id.as_str()),
            ("status", marker.as_str()),
            ("name", "张三"),
        ])])
    })
}

/// A query by id_number for id_number and status.
pub fn ask(dataset: &str, id_number: &str) -> ExchangeRequest {
    ExchangeRequest {
        dataset_id: dataset.into(),
        query: Some(Query {
            filters: vec![Filter {
                item: "id_number".into(),
                value: Some(Value {
                    kind: Some(value::Kind::StringValue(id_number.into())),
                }),
            }],
            fields: vec!["id_number".into(), "status".into()],
            limit: 0,
        }),
        ..Default::default()
    }
}

/// Waits until `client`'s broker has the dataset in its catalog.
pub async fn sees(client: &Client, dataset: &str) -> Result<()> {
    wait_until(WAIT, &format!("{dataset} cascaded"), || async {
        match client.get_dataset(dataset).await {
            Ok(_) => Ok(Some(())),
            Err(e) => {
                eprintln!("{e}");
                Ok(None)
            }
        }
    })
    .await
}

/// Files a demand and waits until its decision has come back with a grant.
pub async fn granted(consumer: &Client, dataset: &str) -> Result<Grant> {
    let d = consumer
        .file_demand(FileDemandRequest {
            dataset_id: dataset.into(),
            fields: vec!["id_number".into(), "status".into()],
            purpose: "check pension recipients are alive".into(),
            ..Default::default()
        })
        .await?
        .demand
        .context("no demand")?;
    let id = d.id.clone();
    let approved = wait_until(WAIT, "the decision to come back", || async {
        let d = consumer.get_demand(&id).await?;
        Ok((d.state() == DemandState::Approved).then_some(d))
    })
    .await?;
    Ok(consumer.get_grant(&approved.grant_id).await?)
}

/// Waits for an exchange's end.
pub async fn outcome(consumer: &Client, id: &str) -> Result<ExchangeResult> {
    wait_until(WAIT, "the exchange to end", || async {
        let r = consumer.get_exchange(id, false).await?;
        let done = !matches!(
            r.state(),
            ExchangeState::Queued | ExchangeState::InFlight | ExchangeState::Unspecified
        );
        Ok(done.then_some(r))
    })
    .await
}

/// The audit entries of a broker with this decision.
pub async fn audited(b: &TestBroker, decision: &str) -> Result<Vec<AuditEntry>> {
    let all = b
        .admin()
        .await?
        .list_audit(ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?;
    Ok(all
        .entries
        .into_iter()
        .filter(|e| e.decision == decision)
        .collect())
}

/// Children retry their parent quickly in tests.
pub fn quick(c: &mut govshare_broker::Config) {
    c.federation.max_backoff_secs = 1;
    c.federation.ping_secs = 1;
}

/// A hub with two provinces, a provider at Guangdong serving an UNCONDITIONAL dataset, and a
/// consumer at Zhejiang holding a grant on it.
#[derive(Debug)]
pub struct Cascade {
    /// The national hub.
    pub hub: TestBroker,
    /// Zhejiang, the consumer's broker.
    pub zj: TestBroker,
    /// Guangdong, the provider's broker.
    pub gd: TestBroker,
    /// The provider department at Guangdong.
    pub civil: Client,
    /// The consumer department at Zhejiang.
    pub pension: Client,
    /// The provider's dataset.
    pub ds: String,
    /// The consumer's grant on it.
    pub grant: Grant,
    /// The provider's serving instance.
    pub provider: TestProvider,
}

/// Starts the cascade and waits until the grant has come back to the consumer.
pub async fn cascade() -> Result<Cascade> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let zj = TestBroker::start_child("330000/hub", &hub, &[], quick).await?;
    let gd = TestBroker::start_child("440000/hub", &hub, &[], quick).await?;
    let civil = gd.client_for("440000/civil").await?;
    let pension = zj.client_for("330000/pension").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let provider = TestProvider::start(&civil, &[&ds], 8, "p1", alive_rows()).await?;
    sees(&pension, &ds).await?;
    let grant = granted(&pension, &ds).await?;
    Ok(Cascade {
        hub,
        zj,
        gd,
        civil,
        pension,
        ds,
        grant,
        provider,
    })
}
