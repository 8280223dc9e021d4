//! The whole control-plane flow through the SDK: register, publish, search, demand, decide,
//! grant, revoke, audit; and a restart that keeps all of it.

use anyhow::{ensure, Result};
use govshare_client::proto::*;
use govshare_tests::TestBroker;

fn item(name: &str, mask: &str, share: ShareType) -> InfoItem {
    InfoItem {
        name: name.into(),
        r#type: "string".into(),
        description: format!("{name} item"),
        share_type: share as i32,
        sensitive: !mask.is_empty(),
        mask: mask.into(),
    }
}

/// A pension dataset as the README's example describes it.
pub fn pension(share: ShareType) -> Dataset {
    Dataset {
        code: "pension-status".into(),
        name: "城乡居民养老保险待遇发放".into(),
        description: "monthly pension payment status".into(),
        share_type: share as i32,
        open_type: OpenType::NotOpen as i32,
        update_cycle: UpdateCycle::Daily as i32,
        tags: vec!["social-security".into()],
        items: vec![
            item("id_number", "keep:6,4", ShareType::Unspecified),
            item("name", "name", ShareType::Unspecified),
            item("status", "", ShareType::Unspecified),
            item("bank_account", "bank_card", ShareType::NotShared),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn full_flow_through_the_sdk() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let who = admin.whoami().await?;
    ensure!(who.node_id == "330000/admin" && who.role == NodeRole::Admin as i32);

    // Registration with a credit code: a good one verifies, a bad check digit only warns.
    let hrss_dir = broker.issue("330000/hrss", NodeRole::Department)?;
    let reg = admin
        .register_node(RegisterNodeRequest {
            id: "330000/hrss".into(),
            name: "浙江省人力资源和社会保障厅".into(),
            credit_code: "91350100M000100Y43".into(),
            contact: "data office".into(),
            ..Default::default()
        })
        .await?;
    ensure!(reg.warnings.is_empty(), "{:?}", reg.warnings);
    ensure!(reg.node.as_ref().is_some_and(|n| n.credit_code_valid));
    let civil_dir = broker.issue("330100/civil", NodeRole::Department)?;
    let reg = admin
        .register_node(RegisterNodeRequest {
            id: "330100/civil".into(),
            name: "杭州市民政局".into(),
            credit_code: "91350100M000100Y44".into(),
            ..Default::default()
        })
        .await?;
    ensure!(reg.warnings.len() == 1 && reg.warnings[0].contains("check digit"));
    let hrss = broker.connect(&hrss_dir).await?;
    let civil = broker.connect(&civil_dir).await?;

    let nodes = admin.list_all_nodes("3301").await?;
    ensure!(nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>() == ["330100/civil"]);

    // Publish, then republish as a new version.
    let p = hrss
        .publish_dataset(pension(ShareType::Conditional))
        .await?;
    ensure!(p.created);
    let d = p.dataset.unwrap_or_default();
    ensure!(d.id == "330000/hrss/pension-status" && d.version == 1 && d.provider == "330000/hrss");
    let mut v2 = pension(ShareType::Conditional);
    v2.description = "monthly pension payment status, by month".into();
    v2.provider = "330100/civil".into(); // ignored: the provider is always the caller
    let p2 = hrss.publish_dataset(v2).await?;
    ensure!(!p2.created);
    ensure!(p2
        .dataset
        .as_ref()
        .is_some_and(|d| d.version == 2 && d.provider == "330000/hrss"));

    // Search by any run of characters, and by filters.
    for q in ["养老", "养老保险待遇", "PENSION", "by month", "险"] {
        let r = civil
            .search_datasets(SearchDatasetsRequest {
                text: q.into(),
                ..Default::default()
            })
            .await?;
        ensure!(
            r.datasets.len() == 1,
            "query {q:?} found {}",
            r.datasets.len()
        );
    }
    for q in ["养老金", "保养", "zzz"] {
        let r = civil
            .search_datasets(SearchDatasetsRequest {
                text: q.into(),
                ..Default::default()
            })
            .await?;
        ensure!(r.datasets.is_empty(), "query {q:?} should find nothing");
    }
    let by_filters = civil
        .search_datasets(SearchDatasetsRequest {
            region_prefix: "33".into(),
            tag: "social-security".into(),
            share_type: ShareType::Conditional as i32,
            provider: "330000/hrss".into(),
            ..Default::default()
        })
        .await?;
    ensure!(by_filters.datasets.len() == 1);
    let none = civil
        .search_datasets(SearchDatasetsRequest {
            region_prefix: "3301".into(),
            ..Default::default()
        })
        .await?;
    ensure!(none.datasets.is_empty());

    // A CONDITIONAL demand waits; the provider approves it, narrowing fields and period.
    let filed = civil
        .file_demand(FileDemandRequest {
            dataset_id: d.id.clone(),
            fields: vec!["id_number".into(), "status".into(), "name".into()],
            purpose: "verify pension recipients are alive".into(),
            legal_basis: "社会保险法".into(),
            period_days: 90,
        })
        .await?;
    let demand = filed.demand.unwrap_or_default();
    ensure!(demand.state() == DemandState::Pending && filed.grant.is_none());
    ensure!(demand.consumer == "330100/civil" && demand.provider == "330000/hrss");
    let incoming = hrss
        .list_demands(ListDemandsRequest {
            view: DemandView::Incoming as i32,
            ..Default::default()
        })
        .await?;
    ensure!(incoming.demands.len() == 1 && incoming.demands[0].id == demand.id);
    let mine = civil.list_demands(ListDemandsRequest::default()).await?;
    ensure!(mine.demands.len() == 1);
    let overdue = hrss
        .list_demands(ListDemandsRequest {
            view: DemandView::Incoming as i32,
            overdue_only: true,
            ..Default::default()
        })
        .await?;
    ensure!(overdue.demands.is_empty(), "a fresh demand is not overdue");

    let approved = hrss
        .approve_demand(ApproveDemandRequest {
            id: demand.id.clone(),
            fields: vec!["id_number".into(), "status".into()],
            period_days: 30,
            daily_quota: 1000,
            note: "ok".into(),
        })
        .await?;
    let grant = approved.grant.unwrap_or_default();
    ensure!(approved
        .demand
        .is_some_and(|d| d.state() == DemandState::Approved && d.grant_id == grant.id));
    ensure!(grant.fields == ["id_number", "status"] && grant.daily_quota == 1000);
    ensure!(grant.issuer == "330000/hub" && grant.consumer == "330100/civil");
    let days = (grant.valid_until.unwrap_or_default().seconds
        - grant.valid_from.unwrap_or_default().seconds)
        / 86400;
    ensure!(days == 30, "validity {days} days");

    let held = civil.list_all_grants(ListGrantsRequest::default()).await?;
    ensure!(held.len() == 1 && held[0].id == grant.id);
    let issued = hrss
        .list_all_grants(ListGrantsRequest {
            view: GrantView::Issued as i32,
            ..Default::default()
        })
        .await?;
    ensure!(issued.len() == 1);

    // A second demand rejected with a reason; a third withdrawn by its consumer.
    let d2 = civil
        .file_demand(FileDemandRequest {
            dataset_id: d.id.clone(),
            fields: vec!["status".into()],
            purpose: "statistics".into(),
            ..Default::default()
        })
        .await?
        .demand
        .unwrap_or_default();
    let rejected = hrss
        .reject_demand(&d2.id, "use the published statistics instead")
        .await?;
    ensure!(rejected.state() == DemandState::Rejected && rejected.reason.contains("statistics"));
    let d3 = civil
        .file_demand(FileDemandRequest {
            dataset_id: d.id.clone(),
            fields: vec!["status".into()],
            purpose: "later".into(),
            ..Default::default()
        })
        .await?
        .demand
        .unwrap_or_default();
    ensure!(civil.withdraw_demand(&d3.id).await?.state() == DemandState::Withdrawn);

    // Revocation by the provider.
    let revoked = hrss.revoke_grant(&grant.id, "purpose fulfilled").await?;
    ensure!(revoked.state() == GrantState::Revoked && revoked.revoked_by == "330000/hrss");
    ensure!(civil
        .list_all_grants(ListGrantsRequest::default())
        .await?
        .is_empty());
    let all = civil
        .list_all_grants(ListGrantsRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await?;
    ensure!(all.len() == 1 && all[0].state() == GrantState::Revoked);

    // The audit log holds each decision; a department sees only its own entries.
    let audit = admin.list_all_audit(ListAuditRequest::default()).await?;
    let decisions: Vec<&str> = audit.iter().map(|e| e.decision.as_str()).collect();
    for want in [
        "node_registered",
        "dataset_published",
        "demand_filed",
        "demand_approved",
        "grant_issued",
        "demand_rejected",
        "demand_withdrawn",
        "grant_revoked",
    ] {
        ensure!(
            decisions.contains(&want),
            "audit lacks {want}: {decisions:?}"
        );
    }
    let by_grant = civil
        .list_all_audit(ListAuditRequest {
            grant_id: grant.id.clone(),
            ..Default::default()
        })
        .await?;
    ensure!(by_grant.len() >= 2 && by_grant.iter().all(|e| e.grant_id == grant.id));
    let civil_view = civil.list_all_audit(ListAuditRequest::default()).await?;
    ensure!(civil_view.iter().all(|e| e.consumer == "330100/civil"
        || e.provider == "330100/civil"
        || e.actor == "330100/civil"
        || e.subject == "330100/civil"));
    ensure!(civil_view.len() < audit.len());

    // Withdrawal: no new demands, gone from search, still shown by id.
    let w = hrss.withdraw_dataset(&d.id, "replaced").await?;
    ensure!(w.state() == DatasetState::Withdrawn);
    let err = civil
        .file_demand(FileDemandRequest {
            dataset_id: d.id.clone(),
            fields: vec!["status".into()],
            purpose: "x".into(),
            ..Default::default()
        })
        .await
        .err()
        .and_then(|e| e.code());
    ensure!(err == Some(tonic::Code::FailedPrecondition), "{err:?}");
    let r = civil
        .search_datasets(SearchDatasetsRequest {
            text: "养老".into(),
            ..Default::default()
        })
        .await?;
    ensure!(r.datasets.is_empty());
    ensure!(civil.get_dataset(&d.id).await?.state() == DatasetState::Withdrawn);

    broker.shutdown().await
}

#[tokio::test]
async fn unconditional_is_granted_and_not_shared_is_refused_at_once() -> Result<()> {
    let broker = TestBroker::start().await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    let mut open = pension(ShareType::Unconditional);
    open.code = "open-status".into();
    hrss.publish_dataset(open).await?;
    let mut closed = pension(ShareType::NotShared);
    closed.code = "closed".into();
    closed.share_condition = "contains tax secrets".into();
    hrss.publish_dataset(closed).await?;

    let r = civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/open-status".into(),
            fields: vec!["status".into()],
            purpose: "check".into(),
            ..Default::default()
        })
        .await?;
    let d = r.demand.unwrap_or_default();
    let g = r.grant.unwrap_or_default();
    ensure!(d.state() == DemandState::Approved && d.grant_id == g.id && g.fields == ["status"]);

    let r = civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/closed".into(),
            fields: vec!["status".into()],
            purpose: "check".into(),
            ..Default::default()
        })
        .await?;
    let d = r.demand.unwrap_or_default();
    ensure!(
        d.state() == DemandState::Rejected && d.reason.contains("tax secrets"),
        "{}",
        d.reason
    );
    ensure!(r.grant.is_none());

    // An item that is itself NOT_SHARED is refused, naming the item.
    let r = civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/open-status".into(),
            fields: vec!["status".into(), "bank_account".into()],
            purpose: "check".into(),
            ..Default::default()
        })
        .await?;
    let d = r.demand.unwrap_or_default();
    ensure!(
        d.state() == DemandState::Rejected && d.reason.contains("bank_account"),
        "{}",
        d.reason
    );
    broker.shutdown().await
}

#[tokio::test]
async fn a_restart_keeps_all_state() -> Result<()> {
    let mut broker = TestBroker::start().await?;
    let hrss_dir = broker.issue("330000/hrss", NodeRole::Department)?;
    let civil_dir = broker.issue("330100/civil", NodeRole::Department)?;
    let admin = broker.admin().await?;
    for id in ["330000/hrss", "330100/civil"] {
        admin
            .register_node(RegisterNodeRequest {
                id: id.into(),
                name: id.into(),
                ..Default::default()
            })
            .await?;
    }
    let hrss = broker.connect(&hrss_dir).await?;
    let civil = broker.connect(&civil_dir).await?;
    hrss.publish_dataset(pension(ShareType::Conditional))
        .await?;
    let demand = civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/pension-status".into(),
            fields: vec!["status".into()],
            purpose: "p".into(),
            ..Default::default()
        })
        .await?
        .demand
        .unwrap_or_default();
    let grant = hrss
        .approve_demand(ApproveDemandRequest {
            id: demand.id.clone(),
            ..Default::default()
        })
        .await?
        .grant
        .unwrap_or_default();
    admin.suspend_node("330100/civil", "audit").await?;
    let audit_before = admin
        .list_all_audit(ListAuditRequest::default())
        .await?
        .len();

    broker.restart().await?;

    let admin = broker.admin().await?;
    let hrss = broker.connect(&hrss_dir).await?;
    ensure!(
        admin.list_all_nodes("").await?.len() == 4,
        "hub, admin, hrss, civil"
    );
    let node = admin.get_node("330100/civil").await?;
    ensure!(node.state() == NodeState::Suspended);
    ensure!(
        hrss.get_dataset("330000/hrss/pension-status")
            .await?
            .version
            == 1
    );
    let hits = hrss
        .search_datasets(SearchDatasetsRequest {
            text: "居民养老".into(),
            ..Default::default()
        })
        .await?;
    ensure!(
        hits.datasets.len() == 1,
        "the search index survives a restart"
    );
    ensure!(hrss.get_demand(&demand.id).await?.state() == DemandState::Approved);
    ensure!(hrss.get_grant(&grant.id).await?.state() == GrantState::Active);
    let audit_after = admin.list_all_audit(ListAuditRequest::default()).await?;
    ensure!(audit_after.len() == audit_before);
    // The chain continues across the restart.
    admin.resume_node("330100/civil").await?;
    let civil = broker.connect(&civil_dir).await?;
    ensure!(civil.whoami().await?.node_id == "330100/civil");
    let chain = admin.list_all_audit(ListAuditRequest::default()).await?;
    for w in chain.windows(2) {
        ensure!(w[1].prev_hash == w[0].hash && w[1].seq == w[0].seq + 1);
    }
    broker.shutdown().await
}

#[tokio::test]
async fn overdue_demands_are_listed_and_counted() -> Result<()> {
    let broker =
        TestBroker::start_with("330000/hub", |c| c.sharing.demand_response_seconds = 1).await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    let admin = broker.admin().await?;
    hrss.publish_dataset(pension(ShareType::Conditional))
        .await?;
    let d = civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/pension-status".into(),
            fields: vec!["status".into()],
            purpose: "p".into(),
            ..Default::default()
        })
        .await?
        .demand
        .unwrap_or_default();
    ensure!(!d.overdue);
    let overdue = govshare_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the demand to be overdue",
        || {
            let hrss = hrss.clone();
            async move {
                let r = hrss
                    .list_demands(ListDemandsRequest {
                        view: DemandView::Incoming as i32,
                        overdue_only: true,
                        ..Default::default()
                    })
                    .await?;
                Ok((!r.demands.is_empty()).then_some(r.demands))
            }
        },
    )
    .await?;
    ensure!(overdue.len() == 1 && overdue[0].id == d.id && overdue[0].overdue);
    let status = admin.broker_status().await?;
    ensure!(
        status.pending_demands == 1 && status.overdue_demands == 1,
        "{status:?}"
    );
    // Deciding it ends the overdue state.
    hrss.reject_demand(&d.id, "too late, sorry").await?;
    let status = admin.broker_status().await?;
    ensure!(status.pending_demands == 0 && status.overdue_demands == 0);
    broker.shutdown().await
}

#[tokio::test]
async fn search_pages_through_a_larger_catalog() -> Result<()> {
    let broker = TestBroker::start().await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    for i in 0..120 {
        let mut d = pension(ShareType::Conditional);
        d.code = format!("ds-{i:03}");
        d.name = if i % 3 == 0 {
            format!("第{i}批养老金发放名单")
        } else {
            format!("第{i}批医保结算")
        };
        hrss.publish_dataset(d).await?;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = civil
            .search_datasets(SearchDatasetsRequest {
                text: "养老金".into(),
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?;
        ensure!(page.datasets.len() <= 7);
        seen.extend(page.datasets.into_iter().map(|d| d.code));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let want: Vec<String> = (0..120)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("ds-{i:03}"))
        .collect();
    ensure!(seen == want, "paged search returned {seen:?}");
    let all = civil
        .search_all_datasets(SearchDatasetsRequest::default(), None)
        .await?;
    ensure!(all.len() == 120);
    broker.shutdown().await
}

#[tokio::test]
async fn search_by_provider_or_region_alone_pages_correctly() -> Result<()> {
    let broker = TestBroker::start().await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    for i in 0..5 {
        let mut d = pension(ShareType::Conditional);
        d.code = format!("h-{i}");
        hrss.publish_dataset(d.clone()).await?;
        d.code = format!("c-{i}");
        civil.publish_dataset(d).await?;
    }
    let by = |provider: &str, region: &str| SearchDatasetsRequest {
        provider: provider.into(),
        region_prefix: region.into(),
        page_size: 2,
        ..Default::default()
    };
    let h = civil
        .search_all_datasets(by("330000/hrss", ""), None)
        .await?;
    ensure!(
        h.len() == 5 && h.iter().all(|d| d.provider == "330000/hrss"),
        "{}",
        h.len()
    );
    let c = civil.search_all_datasets(by("", "3301"), None).await?;
    ensure!(
        c.len() == 5 && c.iter().all(|d| d.provider == "330100/civil"),
        "{}",
        c.len()
    );
    let all = civil.search_all_datasets(by("", "33"), None).await?;
    ensure!(all.len() == 10);
    let none = civil.search_all_datasets(by("", "44"), None).await?;
    ensure!(none.is_empty());
    broker.shutdown().await
}
