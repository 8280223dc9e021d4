//! Federation links under faults: a partition that heals, a flapping link, a slow link. Under
//! load, every accepted exchange is answered (or reported expired) and none is duplicated.

use anyhow::{ensure, Result};
use govshare_client::proto::*;
use govshare_client::Client;
use govshare_tests::cascade::*;
use govshare_tests::faults::{Fault, FaultProxy};
use govshare_tests::provider::TestProvider;
use govshare_tests::TestBroker;
use std::collections::BTreeSet;
use std::time::Duration;

/// Zhejiang reaches the hub through a fault proxy; Guangdong directly.
struct Faulty {
    proxy: FaultProxy,
    pension: Client,
    ds: String,
    _brokers: (TestBroker, TestBroker, TestBroker),
    _provider: TestProvider,
}

async fn faulty() -> Result<Faulty> {
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let proxy = FaultProxy::start(hub.addr).await?;
    let zj = TestBroker::start_child_via("330000/hub", &hub, &proxy.url(), &[], quick).await?;
    let gd = TestBroker::start_child("440000/hub", &hub, &[], quick).await?;
    let civil = gd.client_for("440000/civil").await?;
    let pension = zj.client_for("330000/pension").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let provider = TestProvider::start(&civil, &[&ds], 16, "p", alive_rows()).await?;
    sees(&pension, &ds).await?;
    granted(&pension, &ds).await?;
    Ok(Faulty {
        proxy,
        pension,
        ds,
        _brokers: (hub, zj, gd),
        _provider: provider,
    })
}

/// Submits `n` exchanges, one every `every`, running `during` after the first half.
async fn load(
    f: &Faulty,
    n: usize,
    every: Duration,
    mid: impl std::future::Future<Output = ()>,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut mid = Some(Box::pin(mid));
    for i in 0..n {
        if i == n / 2 {
            if let Some(m) = mid.take() {
                m.await;
            }
        }
        ids.push(
            f.pension
                .submit(ask(&f.ds, &format!("id-{i}")))
                .await?
                .exchange_id,
        );
        tokio::time::sleep(every).await;
    }
    Ok(ids)
}

/// Every exchange ends answered, each once.
async fn all_answered(f: &Faulty, ids: &[String]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for id in ids {
        let r = outcome(&f.pension, id).await?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
        ensure!(seen.insert(r.exchange_id.clone()), "once each");
    }
    let acked = f.pension.ack(ids.to_vec()).await?;
    ensure!(acked.acked as usize == ids.len(), "{acked:?}");
    Ok(())
}

#[tokio::test]
async fn a_partitioned_link_heals_and_nothing_is_lost() -> Result<()> {
    let f = faulty().await?;
    let ids = load(&f, 40, Duration::from_millis(20), async {
        f.proxy.set(Fault::Blackhole);
        // Long enough for both ends to give the link up (three missed pings).
        tokio::time::sleep(Duration::from_secs(4)).await;
    })
    .await?;
    f.proxy.set(Fault::Pass);
    f.proxy.reset_all();
    all_answered(&f, &ids).await
}

#[tokio::test]
async fn a_flapping_link_loses_and_duplicates_nothing() -> Result<()> {
    let f = faulty().await?;
    let flaps = async {
        for _ in 0..6 {
            f.proxy.reset_all();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (ids, _) = tokio::join!(load(&f, 60, Duration::from_millis(25), async {}), flaps);
    let ids = ids?;
    all_answered(&f, &ids).await?;
    ensure!(f.proxy.connections() > 1, "the link did reconnect");
    Ok(())
}

#[tokio::test]
async fn a_slow_link_delays_but_delivers() -> Result<()> {
    let f = faulty().await?;
    f.proxy.set(Fault::Delay(Duration::from_millis(50)));
    let ids = load(&f, 20, Duration::from_millis(5), async {}).await?;
    all_answered(&f, &ids).await
}
