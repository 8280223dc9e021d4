//! Federation: brokers linked into a cascade, each checking grants on every hop.

use anyhow::{ensure, Context, Result};
use govshare_client::proto::*;
use govshare_client::Client;
use govshare_tests::cascade::*;
use govshare_tests::provider::{text, TestProvider};
use govshare_tests::{wait_until, TestBroker};

#[tokio::test]
async fn a_department_in_one_province_gets_data_from_another_through_the_hub() -> Result<()> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let zj = TestBroker::start_child("330000/hub", &hub, &[], |_| {}).await?;
    let gd = TestBroker::start_child("440000/hub", &hub, &[], |_| {}).await?;
    let civil = gd.client_for("440000/civil").await?;
    let pension = zj.client_for("330000/pension").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let _p = TestProvider::start(&civil, &[&ds], 4, "p1", alive_rows()).await?;
    sees(&pension, &ds).await?;
    let found = pension
        .search_datasets(SearchDatasetsRequest {
            text: "死亡登记".into(),
            ..Default::default()
        })
        .await?;
    ensure!(
        found.datasets.iter().any(|d| d.id == ds),
        "search at the province finds the other province's dataset"
    );
    let grant = granted(&pension, &ds).await?;
    ensure!(
        grant.issuer == "440000/hub",
        "issued at the provider's home broker"
    );
    // Async and sync, both across three brokers.
    let sub = pension.submit(ask(&ds, "440101199001011234")).await?;
    let r = outcome(&pension, &sub.exchange_id).await?;
    ensure!(r.state() == ExchangeState::Answered, "answered: {r:?}");
    ensure!(
        text(&r.rows[0], "status").as_deref() == Some("ALIVE"),
        "rows came back"
    );
    ensure!(
        text(&r.rows[0], "name").is_none(),
        "rows are cut to the grant"
    );
    let brokers: Vec<&str> = r.trail.iter().map(|h| h.broker.as_str()).collect();
    ensure!(
        brokers
            == [
                "330000/hub",
                "000000/hub",
                "440000/hub",
                "440000/hub",
                "330000/hub"
            ],
        "the trail names every hop in order: {brokers:?}"
    );
    pension
        .verify_trail(&r)
        .await
        .context("the SDK verifies every hop's signature")?;
    let r = pension.request(ask(&ds, "440101199001011235")).await?;
    ensure!(r.state() == ExchangeState::Answered, "sync answered: {r:?}");
    // Each hop audited its own grant check.
    let audit = hub
        .admin()
        .await?
        .list_audit(ListAuditRequest {
            exchange_id: sub.exchange_id.clone(),
            ..Default::default()
        })
        .await?;
    ensure!(
        audit
            .entries
            .iter()
            .any(|e| e.decision == "exchange_forwarded" && e.reason.contains("checked")),
        "the hub audited its grant check: {:?}",
        audit.entries
    );
    Ok(())
}

#[tokio::test]
async fn a_link_down_queues_exchanges_and_a_restart_mid_path_loses_none() -> Result<()> {
    let mut c = cascade().await?;
    // The hub, in the middle of every path, goes away: exchanges wait at Zhejiang.
    c.hub.stop_now().await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        let s = c
            .pension
            .submit(ask(&c.ds, &format!("44010119900101{i:04}")))
            .await?;
        ids.push(s.exchange_id);
    }
    let sync = c.pension.request(ask(&c.ds, "440101199001019999")).await;
    ensure!(
        matches!(&sync, Err(e) if e.status().map(|s| s.code()) == Some(tonic::Code::Unavailable)),
        "a sync request while the link is down answers UNAVAILABLE: {sync:?}"
    );
    let short = c
        .pension
        .submit(ExchangeRequest {
            deadline: Some(prost_types::Timestamp {
                seconds: (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
                    + 1) as i64,
                nanos: 0,
            }),
            ..ask(&c.ds, "440101199001010000")
        })
        .await?;
    let expired = outcome(&c.pension, &short.exchange_id).await?;
    ensure!(
        expired.state() == ExchangeState::Expired,
        "past its deadline while the link is down, it expires and is reported: {expired:?}"
    );
    ensure!(
        c.provider.received() == 0,
        "nothing reached the provider yet"
    );
    c.hub.start_again().await?;
    let mut seen = std::collections::BTreeSet::new();
    for id in &ids {
        let r = outcome(&c.pension, id).await?;
        ensure!(
            r.state() == ExchangeState::Answered,
            "answered after the restart: {r:?}"
        );
        ensure!(seen.insert(r.exchange_id.clone()), "each exchange once");
    }
    // Watch shows each result once, and nothing more after the acks.
    c.pension.ack(ids.clone()).await?;
    let _ = (&c.zj, &c.gd, &c.civil, &c.grant);
    Ok(())
}

#[tokio::test]
async fn a_revocation_reaches_every_broker_and_stops_exchanges_queued_on_the_way() -> Result<()> {
    let mut c = cascade().await?;
    let first = c.pension.request(ask(&c.ds, "440101199001011111")).await?;
    ensure!(
        first.state() == ExchangeState::Answered,
        "works before: {first:?}"
    );
    let before = c.provider.received();
    // Exchanges wait at Zhejiang while the hub is down; the provider revokes meanwhile.
    c.hub.stop_now().await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            c.pension
                .submit(ask(&c.ds, &format!("44010119900102{i:04}")))
                .await?
                .exchange_id,
        );
    }
    c.civil
        .revoke_grant(&c.grant.id, "no longer needed")
        .await?;
    c.hub.start_again().await?;
    for id in &ids {
        let r = outcome(&c.pension, id).await?;
        ensure!(
            r.state() == ExchangeState::Denied,
            "queued under a revoked grant: refused, never delivered: {r:?}"
        );
    }
    ensure!(
        c.provider.received() == before,
        "the provider saw none of them"
    );
    // The revocation reached every broker.
    for b in [&c.hub, &c.zj] {
        wait_until(WAIT, "the revocation audited", || async {
            Ok((!audited(b, "grant_revoked").await?.is_empty()).then_some(()))
        })
        .await?;
    }
    let g = c.pension.get_grant(&c.grant.id).await?;
    ensure!(
        g.state() == GrantState::Revoked,
        "the consumer's copy is revoked"
    );
    let after = c.pension.request(ask(&c.ds, "440101199001012222")).await;
    ensure!(
        after.is_err(),
        "a new exchange is refused at once: {after:?}"
    );
    let _ = &c.gd;
    Ok(())
}

/// A hand-driven link to a broker, as a child broker (or an impostor) would open it.
struct RawLink {
    tx: tokio::sync::mpsc::Sender<LinkFrame>,
    inbound: tonic::Streaming<LinkFrame>,
}

impl RawLink {
    /// Opens a link to `broker` as its child broker `id`, with an identity issued by its CA.
    async fn as_child(broker: &TestBroker, id: &str) -> Result<RawLink> {
        let dir = broker.scratch(&format!("link-{}", id.replace('/', "-")));
        govshare_broker::pki::issue_identity(&broker.data_dir, id, NodeRole::Broker, &dir, &[])?;
        Ok(RawLink::open(broker, &dir, id).await?)
    }

    /// Opens a link with the identity in `dir` and says hello as `id`.
    async fn open(
        broker: &TestBroker,
        dir: &std::path::Path,
        id: &str,
    ) -> Result<RawLink, tonic::Status> {
        govshare_client::install_crypto_provider();
        let ident = govshare_client::Identity::load(dir)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ident.tls_ca())
            .identity(ident.tls_identity())
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(broker.url())
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = federation_service_client::FederationServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let hello = LinkFrame {
            seq: 0,
            body: Some(link_frame::Body::Hello(LinkHello {
                broker_id: id.into(),
                protocol: "govshare.v1".into(),
                scope: vec![],
                ping_secs: 0,
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| tonic::Status::internal("closed"))?;
        let inbound = client
            .link(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawLink { tx, inbound })
    }

    async fn send(&self, seq: u64, body: link_frame::Body) -> Result<()> {
        self.tx
            .send(LinkFrame {
                seq,
                body: Some(body),
            })
            .await
            .map_err(|_| anyhow::anyhow!("link closed"))
    }

    /// The next result the broker sends back over the link.
    async fn next_result(&mut self) -> Result<ExchangeResult> {
        self.next(|b| match b {
            link_frame::Body::Result(r) => r.result,
            _ => None,
        })
        .await
    }

    /// The next frame the broker sends that `pick` accepts (others are skipped).
    async fn next<T>(&mut self, mut pick: impl FnMut(link_frame::Body) -> Option<T>) -> Result<T> {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(f) = self.inbound.message().await? {
                if let Some(t) = f.body.and_then(&mut pick) {
                    return Ok::<_, anyhow::Error>(Some(t));
                }
            }
            Ok(None)
        })
        .await??;
        found.context("the link ended")
    }
}

#[tokio::test]
async fn a_department_certificate_cannot_open_a_link_nor_a_broker_certificate_act_as_a_department(
) -> Result<()> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    // A registered department trying to act as a broker.
    let _dept = hub.client_for("000000/mca-death").await?;
    let dept_dir = hub.scratch("id-000000-mca-death");
    let refused = RawLink::open(&hub, &dept_dir, "000000/mca-death").await;
    ensure!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::PermissionDenied),
        "a department certificate cannot open a link: {:?}",
        refused.as_ref().err()
    );
    // A broker certificate (a child's link identity) calling a department's services.
    let link_dir = hub.scratch("link-330000");
    govshare_broker::pki::issue_identity(
        &hub.data_dir,
        "330000/hub",
        NodeRole::Broker,
        &link_dir,
        &[],
    )?;
    let as_broker = hub.connect(&link_dir).await?;
    let r = as_broker.submit(ask("000000/mca-death/x", "1")).await;
    let code = r.as_ref().err().and_then(|e| e.status()).map(|s| s.code());
    ensure!(
        matches!(
            code,
            Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
        ),
        "a broker certificate cannot act as a department: {r:?}"
    );
    // The hello must name the certificate's own id.
    let lying = RawLink::open(&hub, &link_dir, "440000/hub").await;
    let lying = match lying {
        Err(s) => Err(s),
        Ok(mut l) => l.inbound.message().await.map(|_| ()),
    };
    ensure!(
        matches!(&lying, Err(s) if s.code() == tonic::Code::PermissionDenied),
        "a broker links only as itself: {lying:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_advertisement_outside_the_scope_and_a_forged_grant_are_refused_and_audited(
) -> Result<()> {
    let c = cascade().await?;
    // A city broker under the hub whose identity allows only 3301….
    let dir = c.hub.scratch("link-330100");
    govshare_broker::pki::issue_identity(
        &c.hub.data_dir,
        "330100/hub",
        NodeRole::Broker,
        &dir,
        &["3301".to_string()],
    )?;
    let mut link = RawLink::open(&c.hub, &dir, "330100/hub").await?;
    let hello = link
        .next(|b| match b {
            link_frame::Body::Hello(h) => Some(h),
            _ => None,
        })
        .await?;
    ensure!(
        hello.scope == ["3301"],
        "the parent states the scope: {hello:?}"
    );
    link.send(
        0,
        link_frame::Body::Advertise(RouteAdvertisement {
            node_ids: vec!["330100/tax".into(), "440000/civil".into()],
            home_brokers: vec!["330100/hub".into(), "330100/hub".into()],
            distances: vec![0, 0],
            full: true,
        }),
    )
    .await?;
    let refused = wait_until(WAIT, "the advertisement refused", || async {
        let r = audited(&c.hub, "route_refused").await?;
        Ok((!r.is_empty()).then_some(r))
    })
    .await?;
    ensure!(
        refused[0].reason.contains("440000/civil") && !refused[0].reason.contains("330100/tax"),
        "only the node outside the scope is refused: {:?}",
        refused[0]
    );
    // Exchanges for Guangdong still go to Guangdong, not to the impostor.
    let r = c.pension.request(ask(&c.ds, "440101199001013333")).await?;
    ensure!(
        r.state() == ExchangeState::Answered,
        "routing unharmed: {r:?}"
    );

    // A grant token altered on the way (wider fields, same signature).
    let token = c.grant.token.clone().context("the grant is signed")?;
    let mut claims = <GrantClaims as prost::Message>::decode(token.claims.as_slice())?;
    claims.fields.push("name".into());
    claims.consumer = "330100/tax".into();
    let forged = GrantToken {
        claims: prost::Message::encode_to_vec(&claims),
        ..token
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let later = prost_types::Timestamp {
        seconds: now.as_secs() as i64 + 60,
        nanos: 0,
    };
    let received = c.provider.received();
    link.send(
        7,
        link_frame::Body::Exchange(ExchangeEnvelope {
            exchange_id: "01a21e00-0000-7000-8000-000000000001".into(),
            consumer: "330100/tax".into(),
            provider: "440000/civil".into(),
            request: Some(ExchangeRequest {
                grant_id: c.grant.id.clone(),
                query: Some(Query {
                    fields: vec!["name".into()],
                    ..Default::default()
                }),
                ..ask(&c.ds, "1")
            }),
            grant: Some(forged),
            trail: vec![],
            hops_left: 8,
            accepted_at: Some(prost_types::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: 0,
            }),
            deadline: Some(later),
            origin_broker: "330100/hub".into(),
        }),
    )
    .await?;
    let result = link.next_result().await?;
    ensure!(
        result.state() == ExchangeState::Denied
            && result
                .error
                .as_ref()
                .is_some_and(|e| e.message.contains("grant_forged")),
        "the first hop refuses a forged grant: {result:?}"
    );
    let denied = audited(&c.hub, "exchange_denied").await?;
    ensure!(
        denied.iter().any(|e| e.reason.contains("grant_forged")),
        "and audits it: {denied:?}"
    );
    ensure!(
        c.provider.received() == received,
        "nothing reached the provider"
    );
    Ok(())
}

#[tokio::test]
async fn demands_decisions_and_catalog_changes_cross_brokers() -> Result<()> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    // Demands filed at Zhejiang are due within a second, to see them overdue on both sides.
    let zj = TestBroker::start_child("330000/hub", &hub, &[], |c| {
        quick(c);
        c.sharing.demand_response_seconds = 1;
    })
    .await?;
    let gd = TestBroker::start_child("440000/hub", &hub, &[], quick).await?;
    let civil = gd.client_for("440000/civil").await?;
    let pension = zj.client_for("330000/pension").await?;
    let ds = publish(&civil, "household", ShareType::Conditional).await?;
    sees(&pension, &ds).await?;
    let file = |purpose: &str| FileDemandRequest {
        dataset_id: ds.clone(),
        fields: vec!["id_number".into(), "status".into(), "name".into()],
        purpose: purpose.into(),
        ..Default::default()
    };
    let a = pension
        .file_demand(file("pension audit"))
        .await?
        .demand
        .context("a")?;
    let b = pension
        .file_demand(file("second look"))
        .await?
        .demand
        .context("b")?;
    let w = pension
        .file_demand(file("filed by mistake"))
        .await?
        .demand
        .context("w")?;
    // The provider sees them at its own broker, pending and (after a second) overdue.
    let incoming = |only_overdue: bool| {
        let civil = civil.clone();
        async move {
            Ok::<_, anyhow::Error>(
                civil
                    .list_demands(ListDemandsRequest {
                        view: DemandView::Incoming as i32,
                        overdue_only: only_overdue,
                        ..Default::default()
                    })
                    .await?
                    .demands,
            )
        }
    };
    wait_until(WAIT, "the demands at the provider's broker", || async {
        Ok((incoming(false).await?.len() == 3).then_some(()))
    })
    .await?;
    wait_until(WAIT, "overdue at both brokers", || async {
        let mine = pension
            .list_demands(ListDemandsRequest {
                view: DemandView::Outgoing as i32,
                overdue_only: true,
                ..Default::default()
            })
            .await?
            .demands;
        Ok((incoming(true).await?.len() == 3 && mine.len() == 3).then_some(()))
    })
    .await?;
    // Withdrawn by the consumer: the provider's copy follows, and it can no longer decide it.
    pension.withdraw_demand(&w.id).await?;
    wait_until(WAIT, "the withdrawal at the provider", || async {
        let d = civil.get_demand(&w.id).await?;
        Ok((d.state() == DemandState::Withdrawn).then_some(()))
    })
    .await?;
    ensure!(
        civil.reject_demand(&w.id, "late").await.is_err(),
        "a withdrawn demand cannot be decided"
    );
    // Approved with fewer fields, and rejected with a reason: both decisions come back.
    civil
        .approve_demand(ApproveDemandRequest {
            id: a.id.clone(),
            fields: vec!["id_number".into(), "status".into()],
            ..Default::default()
        })
        .await?;
    civil.reject_demand(&b.id, "no legal basis given").await?;
    let a = wait_until(WAIT, "the approval at the consumer", || async {
        let d = pension.get_demand(&a.id).await?;
        Ok((d.state() == DemandState::Approved).then_some(d))
    })
    .await?;
    let g = pension.get_grant(&a.grant_id).await?;
    ensure!(
        g.fields == ["id_number", "status"] && g.issuer == "440000/hub",
        "the grant as the provider narrowed it: {g:?}"
    );
    let b = wait_until(WAIT, "the rejection at the consumer", || async {
        let d = pension.get_demand(&b.id).await?;
        Ok((d.state() == DemandState::Rejected).then_some(d))
    })
    .await?;
    ensure!(b.reason == "no legal basis given", "with its reason: {b:?}");
    // A new version and a withdrawal of the dataset follow to every broker.
    civil
        .publish_dataset(Dataset {
            code: "household".into(),
            name: "户籍 household v2".into(),
            share_type: ShareType::Conditional as i32,
            items: vec![
                item("id_number"),
                item("status"),
                item("name"),
                item("address"),
            ],
            ..Default::default()
        })
        .await?;
    wait_until(WAIT, "version 2 at Zhejiang", || async {
        let d = pension.get_dataset(&ds).await?;
        Ok((d.version == 2 && d.items.len() == 4).then_some(()))
    })
    .await?;
    civil.withdraw_dataset(&ds, "replaced").await?;
    for c in [&pension, &hub.client_for("000000/ndrc").await?] {
        wait_until(WAIT, "the withdrawal cascaded", || async {
            let d = c.get_dataset(&ds).await?;
            Ok((d.state() == DatasetState::Withdrawn).then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_exchange_with_no_hops_left_or_for_an_unknown_node_is_refused() -> Result<()> {
    let c = cascade().await?;
    let mut link = RawLink::as_child(&c.hub, "330100/hub").await?;
    link.send(
        0,
        link_frame::Body::Advertise(RouteAdvertisement {
            node_ids: vec!["330100/tax".into()],
            home_brokers: vec!["330100/hub".into()],
            distances: vec![0],
            full: true,
        }),
    )
    .await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let envelope = |id: &str, provider: &str, hops: u32| ExchangeEnvelope {
        exchange_id: id.into(),
        consumer: "330100/tax".into(),
        provider: provider.into(),
        request: Some(ExchangeRequest {
            grant_id: c.grant.id.clone(),
            ..ask(&c.ds, "1")
        }),
        grant: c.grant.token.clone(),
        hops_left: hops,
        accepted_at: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: 0,
        }),
        deadline: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64 + 60,
            nanos: 0,
        }),
        origin_broker: "330100/hub".into(),
        trail: vec![],
    };
    link.send(
        1,
        link_frame::Body::Exchange(envelope(
            "01a21e00-0000-7000-8000-000000000011",
            "440000/civil",
            0,
        )),
    )
    .await?;
    let r = link.next_result().await?;
    ensure!(
        r.state() == ExchangeState::Denied
            && r.error
                .as_ref()
                .is_some_and(|e| e.message.contains("hop_limit")),
        "no hops left: {r:?}"
    );
    // A provider that leaves (suspended at its broker) is withdrawn from the routes: the
    // root can no longer place exchanges for it and answers NOT_FOUND.
    c.gd.admin()
        .await?
        .suspend_node("440000/civil", "test")
        .await?;
    let r = wait_until(WAIT, "the withdrawal to reach the root", || async {
        let s = c.pension.submit(ask(&c.ds, "1")).await?;
        let r = outcome(&c.pension, &s.exchange_id).await?;
        Ok((r.state() == ExchangeState::Denied).then_some(r))
    })
    .await?;
    ensure!(
        r.error.as_ref().is_some_and(
            |e| e.message.contains("no_route") && e.code == tonic::Code::NotFound as i32
        ),
        "unknown at the root: NOT_FOUND: {r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn health_reports_the_parent_link() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut hub = TestBroker::start_with_id("000000/hub").await?;
    let zj = TestBroker::start_child("330000/hub", &hub, &[], quick).await?;
    let health = HealthClient::new(zj.admin().await?.channel());
    let status = |h: &HealthClient<tonic::transport::Channel>, service: &str| {
        let mut h = h.clone();
        let service = service.to_string();
        async move {
            Ok::<_, anyhow::Error>(
                h.check(HealthCheckRequest { service })
                    .await?
                    .into_inner()
                    .status(),
            )
        }
    };
    let link = "govshare.v1.FederationService";
    wait_until(WAIT, "the link reported up", || async {
        Ok((status(&health, link).await? == ServingStatus::Serving).then_some(()))
    })
    .await?;
    hub.stop_now().await?;
    wait_until(WAIT, "the link reported down", || async {
        Ok((status(&health, link).await? == ServingStatus::NotServing).then_some(()))
    })
    .await?;
    ensure!(
        status(&health, "").await? == ServingStatus::Serving,
        "the broker itself still serves its own departments"
    );
    hub.start_again().await?;
    wait_until(WAIT, "the link reported up again", || async {
        Ok((status(&health, link).await? == ServingStatus::Serving).then_some(()))
    })
    .await?;
    Ok(())
}

/// Exchange `id` of `consumer` under `grant`, for the cascade's provider, as the broker
/// `origin` sends it over a link: eight hops left, a minute to run.
fn sent_by(
    origin: &str,
    consumer: &str,
    id: &str,
    ds: &str,
    grant: &Grant,
) -> Result<ExchangeEnvelope> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let at = |secs: u64| prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    };
    Ok(ExchangeEnvelope {
        exchange_id: id.into(),
        consumer: consumer.into(),
        provider: "440000/civil".into(),
        request: Some(ExchangeRequest {
            grant_id: grant.id.clone(),
            ..ask(ds, "1")
        }),
        grant: grant.token.clone(),
        hops_left: 8,
        accepted_at: Some(at(now.as_secs())),
        deadline: Some(at(now.as_secs() + 60)),
        origin_broker: origin.into(),
        trail: vec![],
    })
}

// A child that resends frames (its ack was lost) may put the same exchange twice in one
// batch; the hop writes a batch's exchanges in one grouped transaction, and must still take
// and forward the exchange once.
#[tokio::test]
async fn an_exchange_sent_twice_in_one_batch_is_forwarded_once() -> Result<()> {
    let c = cascade().await?;
    // The link of the consumer's broker, opened again by hand: it replaces the real one.
    let mut link = RawLink::as_child(&c.hub, "330000/hub").await?;
    let id = "01a21e00-0000-7000-8000-000000000021";
    let env = sent_by("330000/hub", "330000/pension", id, &c.ds, &c.grant)?;
    // Queued together, so that the hub reads them in one batch.
    for seq in 1..=3 {
        link.send(seq, link_frame::Body::Exchange(env.clone()))
            .await?;
    }
    let r = link.next_result().await?;
    ensure!(
        r.exchange_id == id && r.state() == ExchangeState::Answered,
        "{r:?}"
    );
    let decisions = |entries: Vec<AuditEntry>| {
        entries
            .into_iter()
            .filter(|e| e.exchange_id == id)
            .map(|e| e.decision)
            .collect::<Vec<_>>()
    };
    let by_id = ListAuditRequest {
        exchange_id: id.into(),
        page_size: 1000,
        ..Default::default()
    };
    let at_hub = decisions(c.hub.admin().await?.list_all_audit(by_id.clone()).await?);
    let forwarded = at_hub.iter().filter(|d| *d == "exchange_forwarded").count();
    ensure!(forwarded == 1, "forwarded {forwarded} times: {at_hub:?}");
    let at_gd = decisions(c.gd.admin().await?.list_all_audit(by_id).await?);
    let accepted = at_gd.iter().filter(|d| *d == "exchange_accepted").count();
    ensure!(
        accepted == 1,
        "accepted {accepted} times at the provider's broker: {at_gd:?}"
    );
    Ok(())
}

// The same at the provider's home broker: an exchange from a child link, three times in one
// batch, is accepted and queued for the provider once.
#[tokio::test]
async fn an_exchange_sent_twice_in_one_batch_is_accepted_once_at_the_provider_broker() -> Result<()>
{
    let c = cascade().await?;
    // A consumer below Guangdong, granted there.
    let tax = c.gd.client_for("440100/tax").await?;
    let grant = granted(&tax, &c.ds).await?;
    let link = RawLink::as_child(&c.gd, "440100/hub").await?;
    let id = "01a21e00-0000-7000-8000-000000000031";
    let env = sent_by("440100/hub", "440100/tax", id, &c.ds, &grant)?;
    for seq in 1..=3 {
        link.send(seq, link_frame::Body::Exchange(env.clone()))
            .await?;
    }
    let admin = c.gd.admin().await?;
    let by_id = ListAuditRequest {
        exchange_id: id.into(),
        page_size: 1000,
        ..Default::default()
    };
    let decisions = wait_until(WAIT, "the exchange to be answered", || async {
        let d: Vec<String> = admin
            .list_all_audit(by_id.clone())
            .await?
            .into_iter()
            .map(|e| e.decision)
            .collect();
        Ok(d.iter().any(|d| d == "exchange_answered").then_some(d))
    })
    .await?;
    let accepted = decisions
        .iter()
        .filter(|d| *d == "exchange_accepted")
        .count();
    ensure!(accepted == 1, "accepted {accepted} times: {decisions:?}");
    Ok(())
}

// Every frame a link carries is acknowledged and let go: once exchanges have crossed the
// cascade and come back, no broker holds a copy in any outbox. Many at once, so that frames,
// results and acks travel in batches (a batch's acks are taken together, and its results are
// all handed to the dispatcher before any is waited for).
#[tokio::test]
async fn acknowledged_frames_leave_every_outbox() -> Result<()> {
    let c = cascade().await?;
    let mut submitted = Vec::new();
    for i in 0..40 {
        let pension = c.pension.clone();
        let req = ask(&c.ds, &format!("44010119900101{i:04}"));
        submitted.push(tokio::spawn(async move { pension.submit(req).await }));
    }
    let mut ids = Vec::new();
    for s in submitted {
        ids.push(s.await??.exchange_id);
    }
    for id in &ids {
        let r = outcome(&c.pension, id).await?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    }
    c.pension.ack(ids).await?;
    for (name, broker, links) in [("zj", &c.zj, 1), ("hub", &c.hub, 2), ("gd", &c.gd, 1)] {
        let base = broker.metrics_url().context("the operators' HTTP port")?;
        wait_until(WAIT, &format!("every outbox at {name} empty"), || async {
            let (code, text) = govshare_tests::http_get(&base, "/status").await?;
            ensure!(code == 200, "/status answered {code}: {text}");
            let status: serde_json::Value = serde_json::from_str(&text)?;
            let list = status["links"].as_array().context("links")?;
            ensure!(list.len() == links, "{name}'s links: {list:?}");
            let waiting: u64 = list.iter().filter_map(|l| l["outbox"].as_u64()).sum();
            Ok((waiting == 0).then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// Publishes `n` datasets of about 14 KB each at `provider`, from 16 tasks; returns the last
/// one's id.
async fn publish_large(provider: &Client, prefix: &str, n: usize) -> Result<String> {
    publish_large_from(provider, prefix, 0, n).await
}

/// [`publish_large`], numbering them from `first`.
async fn publish_large_from(
    provider: &Client,
    prefix: &str,
    first: usize,
    n: usize,
) -> Result<String> {
    let me = provider.whoami().await?.node_id;
    const TASKS: usize = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let provider = provider.clone();
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            for i in (first + t..first + n).step_by(TASKS) {
                provider
                    .publish_dataset(Dataset {
                        code: format!("{prefix}{i:05}"),
                        name: format!("large {prefix} {i}"),
                        description: "d".repeat(4000),
                        share_type: ShareType::Unconditional as i32,
                        items: (0..10)
                            .map(|k| InfoItem {
                                description: "i".repeat(1000),
                                ..item(&format!("item_{k}"))
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(format!("{me}/{prefix}{:05}", first + n - 1))
}

/// When the hub's one link (to its child) last opened, once it is up.
async fn link_since(hub: &TestBroker) -> Result<prost_types::Timestamp> {
    let admin = hub.admin().await?;
    wait_until(WAIT, "the link up", || async {
        let s = admin.broker_status().await?;
        Ok(s.links
            .iter()
            .find(|l| l.state == "up")
            .and_then(|l| l.since))
    })
    .await
}

/// Both ends send their whole state when a link opens. With more state each way than the
/// link's buffers hold (over a thousand frames and tens of MB here), each end must read the
/// other's while it sends its own, or both wait for each other forever.
#[tokio::test]
async fn a_link_opens_with_more_state_each_way_than_its_buffers_hold() -> Result<()> {
    const EACH: usize = 2_500;
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let mut zj = TestBroker::start_child("330000/hub", &hub, &[], quick).await?;
    let ndrc = hub.client_for("000000/ndrc").await?;
    let civil = zj.client_for("330000/civil").await?;
    let opened = link_since(&hub).await?;
    let from_hub = publish_large(&ndrc, "h", EACH).await?;
    let from_zj = publish_large(&civil, "z", EACH).await?;
    sees(&civil, &from_hub).await?;
    sees(&ndrc, &from_zj).await?;
    // A receiver busy writing what it was sent still hears the peer's pings waiting behind
    // it: the link is not closed as silent.
    ensure!(
        link_since(&hub).await? == opened,
        "the link reopened while the catalogs were published"
    );
    // On restart both ends send everything they hold at once.
    zj.restart().await?;
    let down = publish(&ndrc, "after-restart-down", ShareType::Unconditional).await?;
    let up = publish(&civil, "after-restart-up", ShareType::Unconditional).await?;
    sees(&civil, &down).await?;
    sees(&ndrc, &up).await?;
    Ok(())
}

/// A peer that stops reading while state updates pile up toward it is closed once more than
/// `[federation] max_waiting_updates_mib` waits for it (it resyncs when it reopens), rather
/// than held in memory without bound.
#[tokio::test]
async fn a_link_too_far_behind_on_state_updates_is_closed() -> Result<()> {
    let hub = TestBroker::start_with("000000/hub", |c| {
        c.federation.max_waiting_updates_mib = 1;
    })
    .await?;
    let ndrc = hub.client_for("000000/ndrc").await?;
    // A child that says hello and keeps pinging, but never reads what it is sent.
    let link = RawLink::as_child(&hub, "330100/hub").await?;
    let tx = link.tx.clone();
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            let ping = LinkFrame {
                seq: 0,
                body: Some(link_frame::Body::Ping(LinkPing::default())),
            };
            if tx.send(ping).await.is_err() {
                return;
            }
        }
    });
    let admin = hub.admin().await?;
    let up = || async {
        Ok::<_, anyhow::Error>(
            admin
                .broker_status()
                .await?
                .links
                .iter()
                .any(|l| l.state == "up"),
        )
    };
    wait_until(WAIT, "the link up", || async {
        Ok(up().await?.then_some(()))
    })
    .await?;
    // The link's own queue and buffers take about 20 MB first (1,400 entries here), so publish
    // until it closes; with the default 64 MiB it would take over 5,000.
    let mut published = 0;
    while up().await? {
        ensure!(
            published < 3_000,
            "the link stayed open with {published} catalog entries (14 KB each) unread"
        );
        publish_large_from(&ndrc, "w", published, 200).await?;
        published += 200;
    }
    pinger.abort();
    Ok(())
}
