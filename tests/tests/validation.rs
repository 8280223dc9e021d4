//! Bad input gets the right status and a message that names the problem.

use anyhow::Result;
use govshare_client::proto::*;
use govshare_client::ClientError;
use govshare_tests::TestBroker;
use tonic::Code;

use govshare_tests::expect_status as fails;

fn item(name: &str) -> InfoItem {
    InfoItem {
        name: name.into(),
        ..Default::default()
    }
}

fn good() -> Dataset {
    Dataset {
        code: "marriage".into(),
        name: "婚姻登记信息".into(),
        share_type: ShareType::Conditional as i32,
        items: vec![item("id_number"), item("status")],
        ..Default::default()
    }
}

#[tokio::test]
async fn malformed_ids_are_invalid_arguments() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let civil = broker.client_for("330100/civil").await?;
    for (id, needle) in [
        ("bad", "no '/'"),
        ("33000/x", "6-digit"),
        ("330000/UPPER", "a-z"),
        ("330000/", "a-z"),
    ] {
        fails(
            admin
                .register_node(RegisterNodeRequest {
                    id: id.into(),
                    name: "n".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            needle,
        )?;
    }
    fails(
        civil.get_dataset("330000/hrss").await,
        Code::InvalidArgument,
        "PROVIDER_NODE/CODE",
    )?;
    fails(
        civil.get_dataset("330000/hrss/Bad").await,
        Code::InvalidArgument,
        "dataset code",
    )?;
    fails(
        civil.get_dataset("nonsense").await,
        Code::InvalidArgument,
        "PROVIDER_NODE/CODE",
    )?;
    fails(
        civil.get_node("x/y").await,
        Code::InvalidArgument,
        "not a node id",
    )?;
    fails(
        civil.get_demand("").await,
        Code::InvalidArgument,
        "demand id",
    )?;
    fails(
        civil.get_grant(&"x".repeat(200)).await,
        Code::InvalidArgument,
        "grant id",
    )?;
    fails(
        civil
            .search_datasets(SearchDatasetsRequest {
                region_prefix: "33a".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "region prefix",
    )?;
    fails(
        civil
            .list_audit(ListAuditRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn registration_input_is_checked() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let reg = |id: &str, name: &str, code: &str, contact: &str| RegisterNodeRequest {
        id: id.into(),
        name: name.into(),
        credit_code: code.into(),
        contact: contact.into(),
        ..Default::default()
    };
    fails(
        admin.register_node(reg("330100/a", "", "", "")).await,
        Code::InvalidArgument,
        "name is required",
    )?;
    fails(
        admin
            .register_node(reg("330100/a", &"名".repeat(201), "", ""))
            .await,
        Code::InvalidArgument,
        "at most 200",
    )?;
    fails(
        admin
            .register_node(reg("330100/a", "a", "", &"c".repeat(501)))
            .await,
        Code::InvalidArgument,
        "contact",
    )?;
    fails(
        admin.register_node(reg("330100/a", "a", "123", "")).await,
        Code::InvalidArgument,
        "credit code",
    )?;
    admin.register_node(reg("330100/a", "a", "", "")).await?;
    fails(
        admin.register_node(reg("330100/a", "a", "", "")).await,
        Code::AlreadyExists,
        "already registered",
    )?;
    fails(
        admin.get_node("330100/zzz").await,
        Code::NotFound,
        "not registered",
    )?;
    fails(
        admin.suspend_node("330100/zzz", "").await,
        Code::NotFound,
        "not registered",
    )?;
    broker.shutdown().await
}

/// A change that makes a good dataset bad.
type Mutation = Box<dyn Fn(&mut Dataset)>;

#[tokio::test]
async fn catalog_input_is_checked() -> Result<()> {
    let broker = TestBroker::start().await?;
    let civil = broker.client_for("330100/civil").await?;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|d| d.code = "Bad Code".into()), "dataset code"),
        (Box::new(|d| d.name = String::new()), "name is required"),
        (Box::new(|d| d.name = "x".repeat(201)), "at most 200"),
        (
            Box::new(|d| d.description = "x".repeat(4001)),
            "description",
        ),
        (Box::new(|d| d.share_type = 0), "share_type is required"),
        (Box::new(|d| d.share_type = 99), "share_type 99"),
        (
            Box::new(|d| d.items.clear()),
            "at least one information item",
        ),
        (
            Box::new(|d| d.items = (0..257).map(|i| item(&format!("f{i}"))).collect()),
            "at most 256",
        ),
        (Box::new(|d| d.items.push(item("status"))), "appears twice"),
        (Box::new(|d| d.items.push(item("Bad-Name"))), "item name"),
        (
            Box::new(|d| d.items[0].mask = "scramble".into()),
            "not a masking rule",
        ),
        (
            Box::new(|d| d.tags = (0..33).map(|i| format!("t{i}")).collect()),
            "at most 32",
        ),
        (
            Box::new(|d| d.tags = vec![String::new()]),
            "tag is required",
        ),
    ];
    for (mutate, needle) in cases {
        let mut d = good();
        mutate(&mut d);
        fails(
            civil.publish_dataset(d).await,
            Code::InvalidArgument,
            needle,
        )?;
    }
    fails(
        civil
            .raw_catalog()
            .publish_dataset(PublishDatasetRequest { dataset: None })
            .await
            .map_err(ClientError::from),
        Code::InvalidArgument,
        "dataset is required",
    )?;
    fails(
        civil
            .search_datasets(SearchDatasetsRequest {
                text: "x".repeat(201),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "search text",
    )?;
    fails(
        civil.get_dataset("330100/civil/none").await,
        Code::NotFound,
        "not in the catalog",
    )?;
    fails(
        civil.withdraw_dataset("330100/civil/none", "").await,
        Code::NotFound,
        "not in the catalog",
    )?;
    broker.shutdown().await
}

#[tokio::test]
async fn demand_input_is_checked() -> Result<()> {
    let broker = TestBroker::start().await?;
    let civil = broker.client_for("330100/civil").await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let mut d = good();
    d.code = "pension".into();
    hrss.publish_dataset(d).await?;
    let demand = |fields: &[&str], purpose: &str, days: u32, ds: &str| FileDemandRequest {
        dataset_id: ds.into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
        purpose: purpose.into(),
        legal_basis: String::new(),
        period_days: days,
    };
    let ds = "330000/hrss/pension";
    fails(
        civil.file_demand(demand(&["salary"], "p", 0, ds)).await,
        Code::InvalidArgument,
        "\"salary\" is not an item",
    )?;
    fails(
        civil.file_demand(demand(&[], "p", 0, ds)).await,
        Code::InvalidArgument,
        "at least one",
    )?;
    fails(
        civil
            .file_demand(demand(&["status", "status"], "p", 0, ds))
            .await,
        Code::InvalidArgument,
        "twice",
    )?;
    fails(
        civil.file_demand(demand(&["status"], "", 0, ds)).await,
        Code::InvalidArgument,
        "purpose is required",
    )?;
    fails(
        civil.file_demand(demand(&["status"], "p", 4000, ds)).await,
        Code::InvalidArgument,
        "period_days",
    )?;
    fails(
        civil
            .file_demand(demand(&["status"], "p", 0, "330000/hrss/none"))
            .await,
        Code::NotFound,
        "not in the catalog",
    )?;
    let many: Vec<String> = (0..300).map(|i| format!("f{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    fails(
        civil.file_demand(demand(&refs, "p", 0, ds)).await,
        Code::InvalidArgument,
        "at most 256",
    )?;

    let d = civil
        .file_demand(demand(&["status"], "p", 10, ds))
        .await?
        .demand
        .unwrap_or_default();
    fails(
        hrss.approve_demand(ApproveDemandRequest {
            id: d.id.clone(),
            fields: vec!["id_number".into()],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "was not asked for",
    )?;
    fails(
        hrss.approve_demand(ApproveDemandRequest {
            id: d.id.clone(),
            period_days: 11,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "only shorten",
    )?;
    fails(
        hrss.reject_demand(&d.id, " ").await,
        Code::InvalidArgument,
        "reason is required",
    )?;
    fails(
        hrss.reject_demand("no-such-demand", "x").await,
        Code::NotFound,
        "does not exist",
    )?;
    fails(
        hrss.revoke_grant("no-such-grant", "x").await,
        Code::NotFound,
        "does not exist",
    )?;
    broker.shutdown().await
}
