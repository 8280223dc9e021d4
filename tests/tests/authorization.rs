//! One negative test per authorization rule: identity comes only from the certificate, and a
//! node acts only as itself, in its own role.

use anyhow::{bail, ensure, Result};
use govshare_client::proto::*;
use govshare_tests::TestBroker;
use tonic::Code;

use govshare_tests::expect_status as denied;

fn dataset(code: &str) -> Dataset {
    Dataset {
        code: code.into(),
        name: "死亡登记信息".into(),
        share_type: ShareType::Conditional as i32,
        items: vec![InfoItem {
            name: "id_number".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn an_unregistered_certificate_is_refused_everything() -> Result<()> {
    let broker = TestBroker::start().await?;
    let dir = broker.issue("330000/ghost", NodeRole::Department)?;
    let ghost = broker.connect(&dir).await?;
    denied(
        ghost.whoami().await,
        Code::PermissionDenied,
        "not registered",
    )?;
    denied(
        ghost.publish_dataset(dataset("x")).await,
        Code::PermissionDenied,
        "not registered",
    )?;
    denied(
        ghost
            .search_datasets(SearchDatasetsRequest::default())
            .await,
        Code::PermissionDenied,
        "not registered",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_suspended_node_is_refused_until_resumed() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let civil = broker.client_for("330100/civil").await?;
    civil.whoami().await?;
    admin
        .suspend_node("330100/civil", "certificate reported stolen")
        .await?;
    denied(civil.whoami().await, Code::PermissionDenied, "suspended")?;
    denied(
        civil.list_demands(ListDemandsRequest::default()).await,
        Code::PermissionDenied,
        "suspended",
    )?;
    admin.resume_node("330100/civil").await?;
    civil.whoami().await?;
    // An admin cannot lock itself out.
    denied(
        admin.suspend_node("330000/admin", "").await,
        Code::FailedPrecondition,
        "own node",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() -> Result<()> {
    let broker = TestBroker::start().await?;
    let other = TestBroker::start_with_id("440000/hub").await?;
    // Registered on `broker` under the same node id, but signed by `other`'s CA.
    broker.client_for("330100/civil").await?;
    let foreign_dir = other.issue("330100/civil", NodeRole::Department)?;
    // Trust `broker`'s CA for the server side, so only the client certificate is foreign.
    std::fs::copy(
        broker.admin_dir().join("ca.pem"),
        foreign_dir.join("ca.pem"),
    )?;
    let outcome = match broker.connect(&foreign_dir).await {
        Err(e) => Err(e.to_string()),
        Ok(c) => c.whoami().await.map_err(|e| e.to_string()),
    };
    match outcome {
        Ok(_) => bail!("a foreign-CA certificate was accepted"),
        Err(msg) => ensure!(
            !msg.contains("not registered"),
            "refused after TLS, not in it: {msg}"
        ),
    }
    other.shutdown().await?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_department_cannot_call_admin_rpcs() -> Result<()> {
    let broker = TestBroker::start().await?;
    let civil = broker.client_for("330100/civil").await?;
    denied(
        civil
            .register_node(RegisterNodeRequest {
                id: "330100/evil".into(),
                name: "evil".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil.list_nodes(ListNodesRequest::default()).await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil.suspend_node("330000/admin", "").await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil.resume_node("330100/civil").await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil.broker_status().await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil.list_queues().await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil
            .list_demands(ListDemandsRequest {
                view: DemandView::All as i32,
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "only admins",
    )?;
    denied(
        civil
            .list_grants(ListGrantsRequest {
                view: GrantView::All as i32,
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "only admins",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_certificate_role_must_match_the_registration() -> Result<()> {
    let broker = TestBroker::start().await?;
    // Registered as a department, but holding a certificate that claims admin.
    broker.client_for("330100/civil").await?;
    let forged_role = broker.issue("330100/civil", NodeRole::Admin)?;
    let c = broker.connect(&forged_role).await?;
    denied(
        c.list_nodes(ListNodesRequest::default()).await,
        Code::PermissionDenied,
        "registered as department",
    )?;
    // A broker certificate cannot act as a department, nor a department open a link.
    let b = broker
        .client_for_role("330100/city", NodeRole::Broker)
        .await?;
    denied(
        b.publish_dataset(dataset("x")).await,
        Code::PermissionDenied,
        "only department",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_node_publishes_and_withdraws_only_its_own_datasets() -> Result<()> {
    let broker = TestBroker::start().await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    // Whatever the request says, the provider is the caller.
    let mut d = dataset("death");
    d.provider = "330000/hrss".into();
    d.id = "330000/hrss/death".into();
    let out = civil.publish_dataset(d).await?.dataset.unwrap_or_default();
    ensure!(out.provider == "330100/civil" && out.id == "330100/civil/death");
    ensure!(hrss.get_dataset("330000/hrss/death").await.is_err());
    denied(
        hrss.withdraw_dataset("330100/civil/death", "").await,
        Code::PermissionDenied,
        "only its provider",
    )?;
    // The admin is not a provider either.
    let admin = broker.admin().await?;
    denied(
        admin.publish_dataset(dataset("y")).await,
        Code::PermissionDenied,
        "only department",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn only_the_provider_decides_and_only_provider_or_admin_revokes() -> Result<()> {
    let broker = TestBroker::start().await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    let other = broker.client_for("330200/other").await?;
    hrss.publish_dataset(dataset("pension")).await?;
    let file = |c: &govshare_client::Client| {
        let c = c.clone();
        async move {
            c.file_demand(FileDemandRequest {
                dataset_id: "330000/hrss/pension".into(),
                fields: vec!["id_number".into()],
                purpose: "p".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.demand.unwrap_or_default())
        }
    };
    let d = file(&civil).await?;
    for who in [&civil, &other] {
        denied(
            who.approve_demand(ApproveDemandRequest {
                id: d.id.clone(),
                ..Default::default()
            })
            .await,
            Code::PermissionDenied,
            "only that provider may decide",
        )?;
        denied(
            who.reject_demand(&d.id, "no").await,
            Code::PermissionDenied,
            "only that provider may decide",
        )?;
    }
    denied(
        other.get_demand(&d.id).await,
        Code::PermissionDenied,
        "may not see",
    )?;
    denied(
        hrss.withdraw_demand(&d.id).await,
        Code::PermissionDenied,
        "only it may withdraw",
    )?;

    let g = hrss
        .approve_demand(ApproveDemandRequest {
            id: d.id.clone(),
            ..Default::default()
        })
        .await?
        .grant
        .unwrap_or_default();
    denied(
        hrss.approve_demand(ApproveDemandRequest {
            id: d.id.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "not PENDING",
    )?;
    denied(
        other.get_grant(&g.id).await,
        Code::PermissionDenied,
        "may not see",
    )?;
    for who in [&civil, &other] {
        denied(
            who.revoke_grant(&g.id, "").await,
            Code::PermissionDenied,
            "only that provider or an admin",
        )?;
    }
    let admin = broker.admin().await?;
    ensure!(admin.revoke_grant(&g.id, "by order").await?.state() == GrantState::Revoked);
    denied(
        hrss.revoke_grant(&g.id, "").await,
        Code::FailedPrecondition,
        "already revoked",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn a_department_cannot_open_a_federation_link() -> Result<()> {
    use govshare_client::proto::federation_service_client::FederationServiceClient;
    let broker = TestBroker::start().await?;
    let civil = broker.client_for("330100/civil").await?;
    let mut raw = FederationServiceClient::new(civil.channel());
    let (_tx, rx) = tokio::sync::mpsc::channel::<LinkFrame>(1);
    let r = raw
        .link(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match r {
        Ok(_) => bail!("a department opened a link"),
        Err(s) => ensure!(
            s.code() == Code::PermissionDenied && s.message().contains("only broker"),
            "{s:?}"
        ),
    }
    broker.shutdown().await
}
