//! Limits: one greedy node cannot starve a polite one.

use anyhow::{ensure, Result};
use govshare_client::proto::*;
use govshare_tests::TestBroker;
use std::time::Duration;

#[tokio::test]
async fn a_greedy_node_is_slowed_and_a_polite_one_is_served() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.requests_per_second = 20;
        c.limits.burst = 20;
    })
    .await?;
    let greedy = broker.client_for("330000/greedy").await?;
    let polite = broker.client_for("330000/polite").await?;
    // The greedy node fires 200 calls at once.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let g = greedy.clone();
        calls.spawn(async move { g.search_datasets(SearchDatasetsRequest::default()).await });
    }
    let results = calls.join_all().await;
    let limited: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter_map(|e| e.status())
        .filter(|s| s.code() == tonic::Code::ResourceExhausted)
        .collect();
    ensure!(
        limited.len() >= 150,
        "most of the greedy burst is refused: {} of 200",
        limited.len()
    );
    ensure!(
        limited[0].message().contains("retry in")
            && limited[0].metadata().get("retry-after-ms").is_some(),
        "the refusal says when to retry: {:?}",
        limited[0]
    );
    // Meanwhile the polite node, at a few calls a second, is served every time.
    for _ in 0..5 {
        polite
            .search_datasets(SearchDatasetsRequest::default())
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the greedy node is served again once it slows down.
    tokio::time::sleep(Duration::from_millis(200)).await;
    greedy
        .search_datasets(SearchDatasetsRequest::default())
        .await?;
    Ok(())
}
