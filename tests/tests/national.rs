//! A small national topology in one process: the national hub, 32 provincial brokers, 3
//! ministry brokers beside them and 2 city brokers under Zhejiang, a department on each.
//!
//! Grants are issued across the cascade, exchanges flow between pairs of departments and are
//! all answered by the right provider, every hop audits its grant check, a revocation stops
//! further exchanges at every broker, and a provincial broker stopped under load and started
//! again from its data dir loses and duplicates nothing.
//!
//! The default run uses 6 pairs and a few exchanges each; `national_topology_large` (ignored)
//! runs every province against another under more load:
//! `cargo test -p govshare-tests --test national -- --ignored`.

use anyhow::{ensure, Context, Result};
use govshare_client::proto::*;
use govshare_client::Client;
use govshare_tests::cascade::*;
use govshare_tests::provider::{text, TestProvider};
use govshare_tests::{wait_until, TestBroker};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// The 31 provinces and the Xinjiang Production and Construction Corps: 32 provincial brokers.
const PROVINCES: [&str; 32] = [
    "110000", "120000", "130000", "140000", "150000", "210000", "220000", "230000", "310000",
    "320000", "330000", "340000", "350000", "360000", "370000", "410000", "420000", "430000",
    "440000", "450000", "460000", "500000", "510000", "520000", "530000", "540000", "610000",
    "620000", "630000", "640000", "650000", "660000",
];
/// Ministries beside the provinces, each with an explicit scope.
const MINISTRIES: [&str; 3] = ["mca", "mps", "nhsa"];
/// Cities under Zhejiang.
const CITIES: [&str; 2] = ["330100", "330200"];

/// One broker of the topology with its department, dataset and provider.
struct Site {
    broker: TestBroker,
    dept: Client,
    dept_id: String,
    dataset: String,
    provider: Option<TestProvider>,
}

struct Nation {
    hub: TestBroker,
    /// By broker id.
    sites: BTreeMap<String, Site>,
}

async fn site(broker: TestBroker, dept_id: &str) -> Result<Site> {
    let dept = broker.client_for(dept_id).await?;
    let dataset = publish(&dept, "records", ShareType::Unconditional).await?;
    let provider = TestProvider::start(&dept, &[&dataset], 8, "p", answering(dept_id)).await?;
    Ok(Site {
        broker,
        dept,
        dept_id: dept_id.to_string(),
        dataset,
        provider: Some(provider),
    })
}

async fn nation() -> Result<Nation> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let mut sites = BTreeMap::new();
    for p in PROVINCES {
        let b = TestBroker::start_child(&format!("{p}/hub"), &hub, &[], quick).await?;
        sites.insert(b.id.clone(), site(b, &format!("{p}/civil")).await?);
    }
    for m in MINISTRIES {
        let id = format!("000000/{m}");
        let b = TestBroker::start_child(&id, &hub, &[&id], quick).await?;
        sites.insert(id.clone(), site(b, &format!("000000/{m}-data")).await?);
    }
    for c in CITIES {
        let parent = &sites.get("330000/hub").context("Zhejiang's broker")?.broker;
        let b = TestBroker::start_child(&format!("{c}/hub"), parent, &[], quick).await?;
        sites.insert(b.id.clone(), site(b, &format!("{c}/civil")).await?);
    }
    Ok(Nation { hub, sites })
}

impl Nation {
    fn site(&self, broker: &str) -> Result<&Site> {
        self.sites
            .get(broker)
            .with_context(|| format!("no site {broker}"))
    }
}

/// Deterministic pairs (consumer broker, provider broker) covering every kind of path:
/// province to province, city to another province, city to city under one province, province
/// to ministry, ministry to city.
fn pairs(n: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        ("330100/hub".into(), "440000/hub".into()),
        ("330100/hub".into(), "330200/hub".into()),
        ("110000/hub".into(), "000000/mca".into()),
        ("000000/nhsa".into(), "330200/hub".into()),
        ("650000/hub".into(), "310000/hub".into()),
        ("440000/hub".into(), "330000/hub".into()),
    ];
    // A simple LCG: the same "random" pairs on every run.
    let mut x: u64 = 0x2026_1127;
    let all: Vec<String> = PROVINCES.iter().map(|p| format!("{p}/hub")).collect();
    while out.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = &all[(x >> 33) as usize % all.len()];
        let b = &all[(x >> 13) as usize % all.len()];
        if a != b && !out.contains(&(a.clone(), b.clone())) {
            out.push((a.clone(), b.clone()));
        }
    }
    out
}

async fn run(pair_count: usize, per_pair: usize) -> Result<()> {
    let mut n = nation().await?;
    // The root answers from the whole national catalog.
    let root = n.hub.client_for("000000/ndrc").await?;
    for s in n.sites.values() {
        sees(&root, &s.dataset).await?;
    }
    let pairs = pairs(pair_count);
    let mut grants = Vec::new();
    for (c, p) in &pairs {
        let consumer = n.site(c)?;
        let ds = n.site(p)?.dataset.clone();
        sees(&consumer.dept, &ds).await?;
        grants.push(
            granted(&consumer.dept, &ds)
                .await
                .with_context(|| format!("{c} → {p}"))?,
        );
    }
    // Exchanges between every pair, each answered by the right provider.
    let mut sample = None;
    for (c, p) in &pairs {
        let consumer = n.site(c)?;
        let provider = n.site(p)?;
        let mut ids = Vec::new();
        for i in 0..per_pair {
            let s = consumer
                .dept
                .submit(ask(&provider.dataset, &format!("id-{i}")))
                .await?;
            ids.push(s.exchange_id);
        }
        let sync = consumer
            .dept
            .request(ask(&provider.dataset, "id-sync"))
            .await?;
        ensure!(
            sync.state() == ExchangeState::Answered,
            "{c} → {p} sync: {sync:?}"
        );
        for id in &ids {
            let r = outcome(&consumer.dept, id).await?;
            ensure!(r.state() == ExchangeState::Answered, "{c} → {p}: {r:?}");
            ensure!(
                text(&r.rows[0], "status").as_deref() == Some(provider.dept_id.as_str()),
                "{c} → {p}: answered by the right provider: {r:?}"
            );
            consumer
                .dept
                .verify_trail(&r)
                .await
                .with_context(|| format!("{c} → {p}: trail"))?;
            if c == "330100/hub" && p == "440000/hub" {
                sample = Some(r);
            }
        }
    }
    // Every broker on a city-to-province path audited its own grant check.
    let r = sample.context("the city-to-province sample")?;
    let path: BTreeSet<&str> = r.trail.iter().map(|h| h.broker.as_str()).collect();
    ensure!(
        path == BTreeSet::from(["330100/hub", "330000/hub", "000000/hub", "440000/hub"]),
        "city → province → hub → province: {path:?}"
    );
    for b in &path {
        let broker = if *b == "000000/hub" {
            &n.hub
        } else {
            &n.site(b)?.broker
        };
        let entries = broker
            .admin()
            .await?
            .list_audit(ListAuditRequest {
                exchange_id: r.exchange_id.clone(),
                ..Default::default()
            })
            .await?
            .entries;
        ensure!(
            entries
                .iter()
                .any(|e| e.reason.contains("checked") || e.decision == "exchange_answered"),
            "{b} audited its grant check: {entries:?}"
        );
    }

    // A revocation at the provider's broker reaches every broker and stops the exchanges.
    let (c, p) = &pairs[0];
    let started = Instant::now();
    n.site(p)?
        .dept
        .revoke_grant(&grants[0].id, "test: revoked")
        .await?;
    let mut brokers: Vec<&TestBroker> = n.sites.values().map(|s| &s.broker).collect();
    brokers.push(&n.hub);
    for b in brokers {
        wait_until(WAIT, &format!("the revocation at {}", b.id), || async {
            let entries = b
                .admin()
                .await?
                .list_audit(ListAuditRequest {
                    grant_id: grants[0].id.clone(),
                    ..Default::default()
                })
                .await?
                .entries;
            Ok(entries
                .iter()
                .any(|e| e.decision == "grant_revoked")
                .then_some(()))
        })
        .await?;
    }
    eprintln!(
        "revocation reached all {} brokers in {:?}",
        n.sites.len() + 1,
        started.elapsed()
    );
    let after = n
        .site(c)?
        .dept
        .request(ask(&n.site(p)?.dataset, "id-after"))
        .await;
    ensure!(after.is_err(), "refused after the revocation: {after:?}");

    // Guangdong stops under load and starts again from its data dir.
    let (c, p) = ("330000/hub", "440000/hub");
    let ds = n.site(p)?.dataset.clone();
    granted(&n.site(c)?.dept, &ds).await?;
    let mut ids = Vec::new();
    for i in 0..per_pair * 2 {
        ids.push(
            n.site(c)?
                .dept
                .submit(ask(&ds, &format!("restart-{i}")))
                .await?
                .exchange_id,
        );
    }
    {
        let gd = n.sites.get_mut(p).context("Guangdong")?;
        if let Some(prov) = gd.provider.take() {
            prov.kill();
        }
        gd.broker.stop_now().await?;
    }
    // Traffic for the stopped broker keeps coming; it waits on the way.
    for i in per_pair * 2..per_pair * 4 {
        ids.push(
            n.site(c)?
                .dept
                .submit(ask(&ds, &format!("restart-{i}")))
                .await?
                .exchange_id,
        );
    }
    {
        let gd = n.sites.get_mut(p).context("Guangdong")?;
        gd.broker.start_again().await?;
        gd.dept = gd
            .broker
            .connect(&gd.broker.scratch("id-440000-civil"))
            .await?;
        gd.provider =
            Some(TestProvider::start(&gd.dept, &[&ds], 8, "p2", answering(&gd.dept_id)).await?);
    }
    let mut seen = BTreeSet::new();
    for id in &ids {
        let r = outcome(&n.site(c)?.dept, id).await?;
        ensure!(
            r.state() == ExchangeState::Answered,
            "after the restart: {r:?}"
        );
        ensure!(seen.insert(r.exchange_id.clone()), "once each");
    }
    let acked = n.site(c)?.dept.ack(ids.clone()).await?;
    ensure!(
        acked.acked as usize == ids.len(),
        "every exchange acknowledged once: {acked:?}"
    );
    for (_, s) in std::mem::take(&mut n.sites) {
        if let Some(p) = s.provider {
            p.kill();
        }
        s.broker.shutdown().await?;
    }
    n.hub.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn national_topology() -> Result<()> {
    run(8, 3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "larger: every province against another, more exchanges; run with --ignored"]
async fn national_topology_large() -> Result<()> {
    run(40, 25).await
}
