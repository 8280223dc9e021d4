//! Exchanges on one broker: sync and async, enforcement, cut and masking, provider failover,
//! idempotency, expiry, dead letters, queue bounds, quota, recovery and group commit.

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::*;
use govshare_client::{Client, ClientError};
use govshare_tests::provider::{row, text, Reply, TestProvider};
use govshare_tests::{wait_until, TestBroker};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const DS: &str = "330000/hrss/pension-status";

fn item(name: &str, mask: &str) -> InfoItem {
    InfoItem {
        name: name.into(),
        r#type: "string".into(),
        mask: mask.into(),
        ..Default::default()
    }
}

/// Two departments, a pension dataset, and a grant on id_number and status.
struct Setup {
    broker: TestBroker,
    hrss: Client,
    civil: Client,
    grant: Grant,
}

async fn setup_with(tune: impl FnOnce(&mut govshare_broker::Config), quota: u64) -> Result<Setup> {
    let broker = TestBroker::start_with("330000/hub", tune).await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    hrss.publish_dataset(Dataset {
        code: "pension-status".into(),
        name: "城乡居民养老保险待遇发放".into(),
        share_type: ShareType::Conditional as i32,
        items: vec![
            item("id_number", "id_number"),
            item("name", "name"),
            item("status", ""),
            item("month", ""),
        ],
        ..Default::default()
    })
    .await?;
    let d = civil
        .file_demand(FileDemandRequest {
            dataset_id: DS.into(),
            fields: vec!["id_number".into(), "status".into(), "name".into()],
            purpose: "check recipients are alive".into(),
            ..Default::default()
        })
        .await?
        .demand
        .unwrap_or_default();
    let grant = hrss
        .approve_demand(ApproveDemandRequest {
            id: d.id,
            fields: vec!["id_number".into(), "status".into()],
            daily_quota: quota,
            ..Default::default()
        })
        .await?
        .grant
        .unwrap_or_default();
    Ok(Setup {
        broker,
        hrss,
        civil,
        grant,
    })
}

async fn setup() -> Result<Setup> {
    setup_with(|_| {}, 0).await
}

fn ask(id_number: &str) -> ExchangeRequest {
    ExchangeRequest {
        dataset_id: DS.into(),
        query: Some(Query {
            filters: vec![Filter {
                item: "id_number".into(),
                value: Some(Value {
                    kind: Some(value::Kind::StringValue(id_number.into())),
                }),
            }],
            fields: vec![],
            limit: 0,
        }),
        ..Default::default()
    }
}

/// A provider that answers every request with a row carrying more than it should.
fn generous() -> Arc<dyn Fn(&ProviderRequest) -> Reply + Send + Sync> {
    Arc::new(|_req: &ProviderRequest| {
        Reply::Rows(vec![row(&[
            ("id_number", "330102199001011234"),
            ("name", "张三"),
            ("status", "PAID"),
            ("salary", "9000"),
        ])])
    })
}

/// A deadline `secs` seconds from now, in whole seconds.
fn deadline_in(secs: u64) -> Result<prost_types::Timestamp> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(now.as_secs() + secs)?,
        nanos: 0,
    })
}

fn code_of<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> Option<(Code, String)> {
    r.as_ref()
        .err()
        .and_then(|e| e.status())
        .map(|s| (s.code(), s.message().to_string()))
}

#[tokio::test]
async fn sync_request_is_cut_and_masked() -> Result<()> {
    let s = setup().await?;
    let p = TestProvider::start(&s.hrss, &[DS], 4, "p1", generous()).await?;
    let r = s.civil.request(ask("330102199001011234")).await?;
    ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    ensure!(r.rows.len() == 1 && r.grant_id == s.grant.id);
    let row = &r.rows[0];
    ensure!(
        text(row, "id_number").as_deref() == Some("330102********1234"),
        "{row:?}"
    );
    ensure!(text(row, "status").as_deref() == Some("PAID"));
    ensure!(
        !row.fields.contains_key("name"),
        "name is outside the grant"
    );
    ensure!(
        !row.fields.contains_key("salary"),
        "salary is not even in the dataset"
    );
    ensure!(
        r.masked_fields == ["id_number"] && r.dropped_fields == ["name", "salary"],
        "{r:?}"
    );
    // The provider saw the query with the grant's items filled in, and the purpose.
    let seen = p.seen.lock().map(|s| s.clone()).unwrap_or_default();
    ensure!(
        seen.len() == 1 && seen[0].consumer == "330100/civil" && seen[0].purpose.contains("alive")
    );
    ensure!(seen[0]
        .query
        .as_ref()
        .is_some_and(|q| q.fields == ["id_number", "status"]));
    // Asking for only one granted item returns only that one.
    let mut one = ask("x");
    if let Some(q) = one.query.as_mut() {
        q.fields = vec!["status".into()];
    }
    let r = s.civil.request(one).await?;
    ensure!(r.rows[0].fields.len() == 1 && r.rows[0].fields.contains_key("status"));
    s.broker.shutdown().await
}

#[tokio::test]
async fn each_enforcement_rule_denies_with_its_name() -> Result<()> {
    let s = setup_with(|_| {}, 2).await?;
    let _p = TestProvider::start(&s.hrss, &[DS], 4, "p1", generous()).await?;
    // Outside the grant: a wanted item, and a filter item.
    let mut r = ask("x");
    if let Some(q) = r.query.as_mut() {
        q.fields = vec!["name".into()];
    }
    let c = code_of(&s.civil.request(r).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("field_outside_grant")),
        "{c:?}"
    );
    let mut r = ask("x");
    if let Some(q) = r.query.as_mut() {
        q.filters[0].item = "name".into();
    }
    let c = code_of(&s.civil.submit(r).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("filter_outside_grant")),
        "{c:?}"
    );
    // No grant at all.
    let other = s.broker.client_for("330200/other").await?;
    let c = code_of(&other.request(ask("x")).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("grant_missing")),
        "{c:?}"
    );
    // Someone else's grant.
    let mut r = ask("x");
    r.grant_id = s.grant.id.clone();
    let c = code_of(&other.request(r).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("grant_consumer")),
        "{c:?}"
    );
    // Quota: two a day, the third is refused.
    s.civil.request(ask("a")).await?;
    s.civil.request(ask("b")).await?;
    let c = code_of(&s.civil.request(ask("c")).await);
    ensure!(
        matches!(&c, Some((Code::ResourceExhausted, m)) if m.contains("quota_exhausted")),
        "{c:?}"
    );
    // Revoked.
    s.hrss.revoke_grant(&s.grant.id, "done").await?;
    let c = code_of(&s.civil.request(ask("d")).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("grant")),
        "{c:?}"
    );
    // Each denial is audited with its rule.
    let audit = s
        .broker
        .admin()
        .await?
        .list_all_audit(ListAuditRequest::default())
        .await?;
    let denials: Vec<&str> = audit
        .iter()
        .filter(|e| e.decision == "exchange_denied")
        .map(|e| e.reason.as_str())
        .collect();
    for rule in [
        "field_outside_grant",
        "filter_outside_grant",
        "grant_missing",
        "grant_consumer",
        "quota_exhausted",
    ] {
        ensure!(
            denials.iter().any(|d| d.starts_with(rule)),
            "no audited denial for {rule}: {denials:?}"
        );
    }
    s.broker.shutdown().await
}

#[tokio::test]
async fn async_submit_get_watch_ack() -> Result<()> {
    let s = setup().await?;
    // Submitted before any provider: accepted durably, queued.
    let sub = s.civil.submit(ask("1")).await?;
    ensure!(!sub.duplicate && sub.state() == ExchangeState::Queued && sub.trace_id.len() == 32);
    let g = s.civil.get_exchange(&sub.exchange_id, false).await?;
    ensure!(g.state() == ExchangeState::Queued);
    let _p = TestProvider::start(&s.hrss, &[DS], 4, "p1", generous()).await?;
    let done = s.civil.get_exchange(&sub.exchange_id, true).await?;
    ensure!(
        done.state() == ExchangeState::Answered && done.rows.len() == 1,
        "{done:?}"
    );
    // Watch shows it (unacknowledged), and the next one as it ends.
    let mut w = s.civil.watch("").await?;
    let first = w.message().await?.unwrap_or_default();
    ensure!(first.exchange_id == sub.exchange_id);
    let sub2 = s.civil.submit(ask("2")).await?;
    let second = w.message().await?.unwrap_or_default();
    ensure!(second.exchange_id == sub2.exchange_id && second.state() == ExchangeState::Answered);
    // Ack releases; a second ack counts nothing; Get then says unknown.
    ensure!(
        s.civil
            .ack([sub.exchange_id.clone(), sub2.exchange_id.clone()])
            .await?
            .acked
            == 2
    );
    ensure!(s.civil.ack([sub.exchange_id.clone()]).await?.acked == 0);
    let c = code_of(&s.civil.get_exchange(&sub.exchange_id, false).await);
    ensure!(matches!(c, Some((Code::NotFound, _))), "{c:?}");
    // Another node cannot read or ack it.
    let sub3 = s.civil.submit(ask("3")).await?;
    let other = s.broker.client_for("330200/other").await?;
    // Not even its existence is revealed.
    let c = code_of(&other.get_exchange(&sub3.exchange_id, false).await);
    ensure!(matches!(c, Some((Code::NotFound, _))), "{c:?}");
    let c = code_of(&other.ack([sub3.exchange_id.clone()]).await);
    ensure!(matches!(c, Some((Code::NotFound, _))), "{c:?}");
    s.broker.shutdown().await
}

#[tokio::test]
async fn idempotency_key_returns_the_first_exchange() -> Result<()> {
    let s = setup().await?;
    let mut r = ask("1");
    r.idempotency_key = "order-42".into();
    let a = s.civil.submit(r.clone()).await?;
    let b = s.civil.submit(r.clone()).await?;
    ensure!(!a.duplicate && b.duplicate && a.exchange_id == b.exchange_id);
    let mut other_key = r.clone();
    other_key.idempotency_key = "order-43".into();
    ensure!(s.civil.submit(other_key).await?.exchange_id != a.exchange_id);
    // The same key from another consumer is its own.
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_disconnected_instance_hands_its_request_to_another() -> Result<()> {
    let s = setup().await?;
    let hung = TestProvider::start(
        &s.hrss,
        &[DS],
        1,
        "hung",
        Arc::new(|_: &ProviderRequest| Reply::Hang),
    )
    .await?;
    let sub = s.civil.submit(ask("1")).await?;
    wait_until(
        Duration::from_secs(10),
        "the hung instance to get the request",
        || {
            let n = hung.received();
            async move { Ok((n == 1).then_some(())) }
        },
    )
    .await?;
    let q = s.broker.admin().await?.list_queues().await?;
    ensure!(
        q.queues.len() == 1 && q.queues[0].in_flight == 1 && q.queues[0].depth == 0,
        "{q:?}"
    );
    let good = TestProvider::start(&s.hrss, &[DS], 1, "good", generous()).await?;
    hung.kill();
    let done = s.civil.get_exchange(&sub.exchange_id, true).await?;
    ensure!(done.state() == ExchangeState::Answered, "{done:?}");
    ensure!(good.received() == 1);
    let seen = good.seen.lock().map(|s| s.clone()).unwrap_or_default();
    ensure!(seen[0].attempt == 2 && seen[0].exchange_id == sub.exchange_id);
    s.broker.shutdown().await
}

#[tokio::test]
async fn several_instances_share_the_load() -> Result<()> {
    let s = setup().await?;
    let a = TestProvider::start(&s.hrss, &[DS], 2, "a", generous()).await?;
    let b = TestProvider::start(&s.hrss, &[], 2, "b", generous()).await?;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(s.civil.submit(ask(&i.to_string())).await?.exchange_id);
    }
    for id in &ids {
        ensure!(s.civil.get_exchange(id, true).await?.state() == ExchangeState::Answered);
    }
    ensure!(
        a.received() > 0 && b.received() > 0,
        "a {} b {}",
        a.received(),
        b.received()
    );
    ensure!(a.received() + b.received() == 40);
    s.broker.shutdown().await
}

#[tokio::test]
async fn provider_errors_fail_the_exchange() -> Result<()> {
    let s = setup().await?;
    let _p = TestProvider::start(
        &s.hrss,
        &[DS],
        2,
        "p",
        Arc::new(|_: &ProviderRequest| {
            Reply::Error(Code::NotFound as i32, "no such resident".into())
        }),
    )
    .await?;
    let c = code_of(&s.civil.request(ask("1")).await);
    ensure!(
        matches!(&c, Some((Code::NotFound, m)) if m.contains("no such resident")),
        "{c:?}"
    );
    let sub = s.civil.submit(ask("2")).await?;
    let r = s.civil.get_exchange(&sub.exchange_id, true).await?;
    ensure!(
        r.state() == ExchangeState::Failed
            && r.error.is_some_and(|e| e.code == Code::NotFound as i32)
    );
    s.broker.shutdown().await
}

#[tokio::test]
async fn expiry_and_dead_letters_and_replay() -> Result<()> {
    let s = setup_with(
        |c| {
            c.exchange.ack_wait_secs = 1;
            c.exchange.max_deliveries = 2;
        },
        0,
    )
    .await?;
    let admin = s.broker.admin().await?;
    // Expiry while queued (no provider).
    let mut r = ask("1");
    r.deadline = Some(deadline_in(1)?);
    let sub = s.civil.submit(r).await?;
    let expired = s
        .civil
        .with_timeout(Duration::from_secs(8))
        .get_exchange(&sub.exchange_id, true)
        .await?;
    ensure!(expired.state() == ExchangeState::Expired, "{expired:?}");
    ensure!(expired
        .error
        .is_some_and(|e| e.code == Code::DeadlineExceeded as i32));
    // Max deliveries: a hung provider never answers; after two deliveries it is dead-lettered.
    let hung = TestProvider::start(
        &s.hrss,
        &[DS],
        4,
        "hung",
        Arc::new(|_: &ProviderRequest| Reply::Hang),
    )
    .await?;
    let sub2 = s.civil.submit(ask("2")).await?;
    let dead = s
        .civil
        .with_timeout(Duration::from_secs(15))
        .get_exchange(&sub2.exchange_id, true)
        .await?;
    ensure!(dead.state() == ExchangeState::DeadLettered, "{dead:?}");
    ensure!(hung.received() == 2, "delivered {} times", hung.received());
    let dlq = admin.list_all_dead_letters("").await?;
    ensure!(dlq.len() == 2, "{dlq:?}");
    ensure!(dlq.iter().any(|d| d.reason.contains("max deliveries")));
    ensure!(dlq.iter().any(|d| d.reason.contains("expired")));
    // Replay with a working provider: answered this time.
    hung.kill();
    let _good = TestProvider::start(&s.hrss, &[DS], 4, "good", generous()).await?;
    admin.replay_dead_letter(&sub2.exchange_id).await?;
    let again = s.civil.get_exchange(&sub2.exchange_id, true).await?;
    ensure!(again.state() == ExchangeState::Answered, "{again:?}");
    ensure!(admin.list_all_dead_letters("").await?.len() == 1);
    let c = code_of(&admin.replay_dead_letter(&sub2.exchange_id).await);
    ensure!(matches!(c, Some((Code::NotFound, _))), "{c:?}");
    ensure!(admin.purge_dead_letters("").await?.purged == 1);
    ensure!(admin.list_all_dead_letters("").await?.is_empty());
    // Departments cannot touch the DLQ.
    let c = code_of(
        &s.civil
            .list_dead_letters(ListDeadLettersRequest::default())
            .await,
    );
    ensure!(matches!(c, Some((Code::PermissionDenied, _))), "{c:?}");
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_full_queue_refuses_submits() -> Result<()> {
    let s = setup_with(|c| c.exchange.queue_max_count = 3, 0).await?;
    for i in 0..3 {
        s.civil.submit(ask(&i.to_string())).await?;
    }
    let c = code_of(&s.civil.submit(ask("x")).await);
    ensure!(
        matches!(&c, Some((Code::ResourceExhausted, m)) if m.contains("queue for 330000/hrss is full")),
        "{c:?}"
    );
    let q = s.broker.admin().await?.list_queues().await?;
    ensure!(q.queues.len() == 1 && q.queues[0].depth == 3, "{q:?}");
    // Draining makes room again.
    let _p = TestProvider::start(&s.hrss, &[DS], 8, "p", generous()).await?;
    wait_until(Duration::from_secs(10), "the queue to drain", || {
        let admin = s.broker.admin();
        async move {
            let q = admin.await?.list_queues().await?;
            Ok(q.queues.is_empty().then_some(()))
        }
    })
    .await?;
    s.civil.submit(ask("y")).await?;
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_revocation_ends_queued_exchanges_at_once_even_with_no_provider() -> Result<()> {
    let s = setup().await?;
    let sub = s.civil.submit(ask("1")).await?;
    s.hrss.revoke_grant(&s.grant.id, "withdrawn").await?;
    // No provider ever connects: the revocation alone ends it, as denied (not expired).
    let r = s.civil.get_exchange(&sub.exchange_id, true).await?;
    ensure!(r.state() == ExchangeState::Denied, "{r:?}");
    ensure!(r.error.is_some_and(|e| e.message.contains("grant_revoked")));
    s.broker.shutdown().await
}

#[tokio::test]
async fn an_acknowledged_dead_letter_cannot_be_replayed() -> Result<()> {
    let s = setup().await?;
    let mut r = ask("1");
    r.deadline = Some(deadline_in(1)?);
    let sub = s.civil.submit(r).await?;
    let expired = s
        .civil
        .with_timeout(Duration::from_secs(8))
        .get_exchange(&sub.exchange_id, true)
        .await?;
    ensure!(expired.state() == ExchangeState::Expired);
    s.civil.ack([sub.exchange_id.clone()]).await?;
    let admin = s.broker.admin().await?;
    let c = code_of(&admin.replay_dead_letter(&sub.exchange_id).await);
    ensure!(
        matches!(&c, Some((Code::FailedPrecondition, m)) if m.contains("acknowledged")),
        "{c:?}"
    );
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_sync_request_past_its_deadline_is_released() -> Result<()> {
    let s = setup().await?;
    // A provider that never answers: the call times out, the exchange expires, and its result
    // is released rather than kept for a caller who is gone.
    let _hung = TestProvider::start(
        &s.hrss,
        &[DS],
        4,
        "hung",
        Arc::new(|_: &ProviderRequest| Reply::Hang),
    )
    .await?;
    let c = code_of(
        &s.civil
            .with_timeout(Duration::from_secs(1))
            .request(ask("1"))
            .await,
    );
    ensure!(matches!(&c, Some((Code::DeadlineExceeded, _))), "{c:?}");
    let admin = s.broker.admin().await?;
    wait_until(
        Duration::from_secs(10),
        "the abandoned result to be released",
        || {
            let civil = s.civil.clone();
            async move {
                let mut w = civil.watch("").await?;
                // Anything left for civil would be shown at once; nothing means released.
                let got = tokio::time::timeout(Duration::from_millis(200), w.message()).await;
                Ok(got.is_err().then_some(()))
            }
        },
    )
    .await?;
    ensure!(
        admin.list_all_dead_letters("").await?.len() == 1,
        "its expiry is still on record"
    );
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_grant_revoked_while_queued_is_refused_not_delivered() -> Result<()> {
    let s = setup().await?;
    let sub = s.civil.submit(ask("1")).await?;
    s.hrss.revoke_grant(&s.grant.id, "no longer needed").await?;
    let p = TestProvider::start(&s.hrss, &[DS], 4, "p", generous()).await?;
    let r = s.civil.get_exchange(&sub.exchange_id, true).await?;
    ensure!(r.state() == ExchangeState::Denied, "{r:?}");
    ensure!(r.error.is_some_and(|e| e.message.contains("grant_revoked")));
    ensure!(p.received() == 0, "the provider must never see it");
    s.broker.shutdown().await
}

#[tokio::test]
async fn queued_exchanges_survive_a_restart() -> Result<()> {
    let mut s = setup().await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.civil.submit(ask(&i.to_string())).await?.exchange_id);
    }
    // One with a deadline a few seconds out: the restarted broker must still end it then.
    let mut short = ask("short");
    short.deadline = Some(deadline_in(3)?);
    let short = s.civil.submit(short).await?.exchange_id;
    s.broker.restart().await?;
    let hrss = s
        .broker
        .connect(&s.broker.scratch("id-330000-hrss"))
        .await?;
    let civil = s
        .broker
        .connect(&s.broker.scratch("id-330100-civil"))
        .await?;
    let expired = civil
        .with_timeout(Duration::from_secs(10))
        .get_exchange(&short, true)
        .await?;
    ensure!(expired.state() == ExchangeState::Expired, "{expired:?}");
    let _p = TestProvider::start(&hrss, &[DS], 4, "p", generous()).await?;
    for id in &ids {
        let r = civil.get_exchange(id, true).await?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    }
    s.broker.shutdown().await
}

#[tokio::test]
async fn flushes_are_grouped_under_concurrent_load() -> Result<()> {
    let s = setup().await?;
    let (f0, r0) = s.broker.flush_counts();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let c = s.civil.clone();
        tasks.push(tokio::spawn(
            async move { c.submit(ask(&i.to_string())).await },
        ));
    }
    for t in tasks {
        if let Err(e) = t.await? {
            bail!("submit failed: {e}");
        }
    }
    let (f1, r1) = s.broker.flush_counts();
    let (flushes, requests) = (f1 - f0, r1 - r0);
    ensure!(
        requests >= 400,
        "every submit waited for durability ({requests})"
    );
    ensure!(
        flushes * 2 < requests,
        "{flushes} flushes for {requests} durable writes: not grouped"
    );
    s.broker.shutdown().await
}

/// While a provider answers without a break, the dispatcher always has work waiting. Ended
/// exchanges must still reach the consumer batch by batch, as they become durable, and not
/// once the provider stops (they used to wait until the dispatcher's thread ran out of work,
/// seconds under a steady load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_consumer_while_the_provider_is_still_answering() -> Result<()> {
    const QUEUED: usize = 3000;
    let s = setup().await?;
    // Queued with no provider, so that the provider has a long run of work when it comes.
    for chunk in 0..QUEUED / 100 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let c = s.civil.clone();
            let n = chunk * 100 + i;
            tasks.push(tokio::spawn(
                async move { c.submit(ask(&n.to_string())).await },
            ));
        }
        for t in tasks {
            if let Err(e) = t.await? {
                bail!("submit failed: {e}");
            }
        }
    }
    let mut w = s.civil.watch("").await?;
    let p = TestProvider::start(&s.hrss, &[DS], 512, "p", generous()).await?;
    let wait = Duration::from_secs(60);
    let first = tokio::time::timeout(wait, w.message())
        .await
        .context("no result within a minute")??
        .context("watch ended")?;
    let received = p.received();
    ensure!(first.state() == ExchangeState::Answered, "{first:?}");
    ensure!(
        received < QUEUED,
        "the first result reached the consumer only after the provider had received all \
         {received} requests"
    );
    // And every one of them comes through, once.
    let mut seen = std::collections::HashSet::from([first.exchange_id]);
    while seen.len() < QUEUED {
        let r = tokio::time::timeout(wait, w.message())
            .await
            .with_context(|| {
                format!("{} of {QUEUED} results, then none for a minute", seen.len())
            })??
            .context("watch ended")?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
        ensure!(seen.insert(r.exchange_id.clone()), "shown twice: {r:?}");
    }
    s.broker.shutdown().await
}

#[tokio::test]
async fn the_queue_is_bounded_by_bytes_too() -> Result<()> {
    let s = setup_with(|c| c.exchange.queue_max_bytes = 1500, 0).await?;
    let mut accepted = 0;
    let refused = loop {
        match s.civil.submit(ask(&"x".repeat(200))).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        ensure!(accepted < 100, "the byte bound never applied");
    };
    ensure!(accepted >= 1, "a single small exchange fits");
    let st = refused.status().cloned();
    ensure!(
        st.as_ref()
            .is_some_and(|s| s.code() == Code::ResourceExhausted && s.message().contains("bytes")),
        "{st:?}"
    );
    s.broker.shutdown().await
}

#[tokio::test]
async fn a_w3c_traceparent_sets_the_trace_id() -> Result<()> {
    let s = setup().await?;
    let mut raw = s.civil.raw_exchange();
    let mut req = tonic::Request::new(ask("1"));
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?,
    );
    let sub = raw.submit(req).await?.into_inner();
    ensure!(
        sub.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736",
        "{sub:?}"
    );
    // A malformed header is ignored: the broker assigns a fresh id.
    let mut req = tonic::Request::new(ask("2"));
    req.metadata_mut()
        .insert("traceparent", "00-zz-00f067aa0ba902b7-01".parse()?);
    let sub = raw.submit(req).await?.into_inner();
    ensure!(sub.trace_id.len() == 32 && sub.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736");
    s.broker.shutdown().await
}

#[tokio::test]
async fn grants_are_signed_and_an_altered_grant_is_refused() -> Result<()> {
    let s = setup().await?;
    let token = s.grant.token.clone().unwrap_or_default();
    ensure!(
        !token.signature.is_empty() && !token.key_id.is_empty(),
        "grant is signed: {:?}",
        s.grant
    );
    // Widen the stored grant behind the broker's back (someone with disk access): the
    // signature no longer matches its terms, and the exchange is refused.
    let data = s.broker.data_dir.clone();
    let grant_id = s.grant.id.clone();
    let mut broker = s.broker;
    broker
        .restart_with(move || {
            use govshare_broker::store;
            use prost::Message;
            let db = store::open_offline(&data.join("db"))?;
            let grants = db.tree(store::T::Grants as usize);
            let raw = grants.get(grant_id.as_bytes())?.context("grant missing")?;
            let mut g = Grant::decode(raw.as_ref())?;
            g.fields.push("name".into());
            grants.insert(grant_id.as_bytes(), g.encode_to_vec())?;
            db.flush()?;
            Ok(())
        })
        .await?;
    let civil = broker.connect(&broker.scratch("id-330100-civil")).await?;
    let c = code_of(&civil.request(ask("1")).await);
    ensure!(
        matches!(&c, Some((Code::PermissionDenied, m)) if m.contains("grant_forged")),
        "{c:?}"
    );
    broker.shutdown().await
}

#[tokio::test]
async fn the_hop_trail_is_signed_and_verifies() -> Result<()> {
    let s = setup().await?;
    let _p = TestProvider::start(&s.hrss, &[DS], 4, "p", generous()).await?;
    let sub = s.civil.submit(ask("1")).await?;
    let r = s.civil.get_exchange(&sub.exchange_id, true).await?;
    let decisions: Vec<&str> = r.trail.iter().map(|h| h.decision.as_str()).collect();
    ensure!(decisions == ["accepted", "answered"], "{decisions:?}");
    ensure!(r
        .trail
        .iter()
        .all(|h| h.broker == "330000/hub" && !h.signature.is_empty()));
    ensure!(s.civil.verify_trail(&r).await? == 2);
    // Any change to a receipt, or a receipt claimed for another exchange, fails verification.
    let keys = s.civil.broker_keys().await?;
    let mut altered = r.clone();
    altered.trail[1].decision = "denied".into();
    ensure!(govshare_client::trail::verify(&altered.exchange_id, &altered.trail, &keys).is_err());
    ensure!(govshare_client::trail::verify("another-exchange", &r.trail, &keys).is_err());
    let mut unknown = r.clone();
    unknown.trail[0].key_id = "0000000000000000".into();
    ensure!(govshare_client::trail::verify(&unknown.exchange_id, &unknown.trail, &keys).is_err());
    s.broker.shutdown().await
}

/// Every flush of `broker` now waits its whole linger (a write said to be on its way never
/// comes), so that an end stays written but not yet on disk for that long.
fn hold_flushes(broker: &TestBroker) -> Result<govshare_broker::store::Intent> {
    let store = broker
        .running()
        .and_then(|r| r.store())
        .context("a running broker")?;
    Ok(store.durable_intent())
}

/// Lingering flushes: an end waits about this long for its flush.
const LINGER_US: u64 = 1_500_000;

/// A consumer is never shown an end a crash could still take back: `Get` of an exchange whose
/// end is written but not yet flushed answers only once it is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_shows_an_end_only_once_it_is_on_disk() -> Result<()> {
    let s = setup_with(|c| c.storage.flush_linger_us = LINGER_US, 0).await?;
    let _p = TestProvider::start(&s.hrss, &[DS], 4, "p", generous()).await?;
    let _held = hold_flushes(&s.broker)?;
    let sub = s.civil.submit(ask("1")).await?; // after its accept's flush
    let flushes_at_accept = s.broker.flush_counts().0;
    let shown = wait_until(Duration::from_secs(30), "the end to be shown", || {
        let c = s.civil.clone();
        let id = sub.exchange_id.clone();
        async move {
            let r = c.get_exchange(id, false).await?;
            Ok((r.state() == ExchangeState::Answered).then_some(r))
        }
    })
    .await?;
    let flushes = s.broker.flush_counts().0;
    ensure!(
        flushes > flushes_at_accept,
        "the end was shown before any flush after the accept's ({flushes} flushes): {shown:?}"
    );
    s.broker.shutdown().await
}

/// The same for `Watch`: an end written but not yet flushed is streamed once it is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_an_end_only_once_it_is_on_disk() -> Result<()> {
    let s = setup_with(|c| c.storage.flush_linger_us = LINGER_US, 0).await?;
    let _p = TestProvider::start(&s.hrss, &[DS], 4, "p", generous()).await?;
    let _held = hold_flushes(&s.broker)?;
    let sub = s.civil.submit(ask("1")).await?;
    // The end is written with its audit entry, in one transaction; the audit log reads what
    // is written, flushed or not.
    let admin = s.broker.admin().await?;
    wait_until(Duration::from_secs(10), "the end to be written", || {
        let (admin, id) = (admin.clone(), sub.exchange_id.clone());
        async move {
            let entries = admin
                .list_all_audit(ListAuditRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await?;
            let ended = entries
                .iter()
                .any(|e| e.exchange_id == id && e.decision == "exchange_answered");
            Ok(ended.then_some(()))
        }
    })
    .await?;
    let flushes_at_end = s.broker.flush_counts().0;
    let mut watch = s.civil.watch(DS).await?;
    let r = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .context("nothing streamed")??
        .context("the stream ended")?;
    ensure!(r.exchange_id == sub.exchange_id, "{r:?}");
    let flushes = s.broker.flush_counts().0;
    ensure!(
        flushes > flushes_at_end,
        "the end was streamed before its flush ({flushes} flushes)"
    );
    s.broker.shutdown().await
}

/// A consumer holding grants on several datasets asks without naming one: each exchange runs
/// under the grant on its own dataset (the broker's index of a consumer's grants names each
/// grant's dataset, and the others are skipped), and a dataset it holds no grant on is refused.
#[tokio::test]
async fn an_exchange_naming_no_grant_runs_under_the_grant_on_its_dataset() -> Result<()> {
    let s = setup().await?;
    let mut grants = vec![(DS.to_string(), s.grant.id.clone())];
    for code in ["death-record", "residence"] {
        s.hrss
            .publish_dataset(Dataset {
                code: code.into(),
                name: format!("dataset {code}"),
                share_type: ShareType::Unconditional as i32,
                items: vec![item("id_number", ""), item("status", "")],
                ..Default::default()
            })
            .await?;
        let dataset = format!("330000/hrss/{code}");
        let grant = govshare_tests::cascade::granted(&s.civil, &dataset).await?;
        grants.push((dataset, grant.id));
    }
    for (dataset, grant) in &grants {
        let sub = s
            .civil
            .submit(ExchangeRequest {
                dataset_id: dataset.clone(),
                ..ask("1")
            })
            .await?;
        let r = s.civil.get_exchange(&sub.exchange_id, false).await?;
        ensure!(
            &r.grant_id == grant,
            "{dataset}: ran under {}, not {grant}",
            r.grant_id
        );
    }
    s.hrss
        .publish_dataset(Dataset {
            code: "not-asked".into(),
            name: "a dataset civil holds no grant on".into(),
            share_type: ShareType::Unconditional as i32,
            items: vec![item("id_number", "")],
            ..Default::default()
        })
        .await?;
    let refused = s
        .civil
        .submit(ExchangeRequest {
            dataset_id: "330000/hrss/not-asked".into(),
            ..ask("1")
        })
        .await;
    let (code, msg) = code_of(&refused).unwrap_or((Code::Ok, String::new()));
    ensure!(
        code == Code::PermissionDenied && msg.contains("grant_missing"),
        "{code:?}: {msg}"
    );
    s.broker.shutdown().await
}
