//! Limits: one greedy node cannot starve a polite one.

use anyhow::{ensure, Context, Result};
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

#[tokio::test]
async fn a_node_over_its_connection_cap_is_refused_and_others_are_not() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.max_connections_per_node = 2;
    })
    .await?;
    let dir = broker.issue("330000/greedy", NodeRole::Department)?;
    govshare_tests::register(
        &broker.admin().await?,
        "330000/greedy",
        NodeRole::Department,
    )
    .await?;
    // Each SDK client is its own connection.
    let first = broker.connect(&dir).await?;
    let second = broker.connect(&dir).await?;
    first.whoami().await?;
    second.whoami().await?;
    let third = broker.connect(&dir).await?;
    govshare_tests::expect_status(
        third.whoami().await,
        tonic::Code::ResourceExhausted,
        "max_connections_per_node",
    )?;
    let running = broker.running().context("running")?;
    ensure!(
        running.connections_of("330000/greedy") == 2,
        "the refused connection is not counted: {}",
        running.connections_of("330000/greedy")
    );
    // Another node is not held to the greedy one's count.
    let polite = broker.client_for("330000/polite").await?;
    polite.whoami().await?;
    // The two admitted connections keep working; closing one frees its place.
    first.whoami().await?;
    drop(first);
    govshare_tests::wait_until(
        Duration::from_secs(10),
        "the closed connection's place to be free",
        || {
            let (broker, dir) = (&broker, &dir);
            async move {
                let c = broker.connect(dir).await?;
                Ok(c.whoami().await.is_ok().then_some(()))
            }
        },
    )
    .await?;
    second.whoami().await?;
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_cut_off() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.tls_handshake_timeout_secs = 1;
    })
    .await?;
    let polite = broker.client_for("330000/polite").await?;
    let addr = broker.addr;
    // Several silent sockets at once: each is closed, and none holds up the polite node.
    let silent: Vec<_> = (0..8)
        .map(|_| tokio::task::spawn_blocking(move || govshare_tests::tlsprobe::silent_tcp(addr)))
        .collect();
    for _ in 0..5 {
        polite.whoami().await?;
    }
    for s in silent {
        s.await??;
    }
    polite.whoami().await?;
    Ok(())
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_one_with_an_open_call_is_not() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.idle_timeout_secs = 1;
        c.exchange.ack_wait_secs = 60;
    })
    .await?;
    let civil = broker.client_for("330000/civil").await?;
    let pension = broker.client_for("330000/pension").await?;
    let ds =
        govshare_tests::cascade::publish(&civil, "death-registration", ShareType::Unconditional)
            .await?;
    // The provider's stream is an open call: its connection must outlive the idle timeout.
    let _provider = govshare_tests::provider::TestProvider::start(
        &civil,
        &[&ds],
        4,
        "p",
        govshare_tests::cascade::alive_rows(),
    )
    .await?;
    govshare_tests::cascade::granted(&pension, &ds).await?;
    // A connection that handshakes and then says nothing is closed once idle; by the time it
    // is, the provider's connection has been quiet longer than the timeout too.
    let (addr, admin) = (broker.addr, broker.admin_dir());
    tokio::task::spawn_blocking(move || {
        govshare_tests::tlsprobe::Probe::connect(addr, &admin)?.wait_closed()
    })
    .await??;
    // Pension's own connection has been idle as long, and may close just as it calls: the SDK
    // sends a call that closing connection never sent once more (this test caught that race).
    let r = pension
        .request(govshare_tests::cascade::ask(&ds, "id-1"))
        .await?;
    ensure!(
        r.state() == ExchangeState::Answered,
        "the provider's stream survived the idle timeout: {:?}",
        r.state()
    );
    Ok(())
}

#[tokio::test]
async fn an_idle_connection_is_told_to_go_away_before_it_closes() -> Result<()> {
    // A client that speaks HTTP/2 and answers pings, as every gRPC library does: told to go
    // away (so that it opens a new connection for its next call), and then closed properly.
    let (broker, closed) = idle_h2_probe(true).await?;
    ensure!(
        !closed.goaways.is_empty() && closed.goaways.iter().all(|&code| code == 0),
        "an idle connection gets GOAWAY without error before it closes: {closed:?}"
    );
    ensure!(
        closed.clean,
        "the broker ends TLS properly once the client has seen the GOAWAY: {closed:?}"
    );
    ensure!(
        idle_closed(&broker, "goaway").await? >= 1.0,
        "the idle close is counted"
    );
    Ok(())
}

/// A broker with a 1 s idle timeout, and how an HTTP/2 connection to it that makes no call
/// ended (answering the broker's pings or not).
async fn idle_h2_probe(
    answer_pings: bool,
) -> Result<(TestBroker, govshare_tests::tlsprobe::H2Close)> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.idle_timeout_secs = 1;
    })
    .await?;
    let (addr, admin) = (broker.addr, broker.admin_dir());
    let closed = tokio::task::spawn_blocking(move || {
        govshare_tests::tlsprobe::Probe::connect(addr, &admin)?.h2_until_closed(answer_pings)
    })
    .await??;
    Ok((broker, closed))
}

/// `govshare_connections_idle_closed_total{how}` from the broker's `/metrics` (the recorder is
/// the process's, so it counts the other tests' brokers too: only a lower bound means anything).
async fn idle_closed(broker: &TestBroker, how: &str) -> Result<f64> {
    let (code, metrics) =
        govshare_tests::http_get(&broker.metrics_url().context("metrics")?, "/metrics").await?;
    ensure!(code == 200, "metrics answer");
    let line = format!("govshare_connections_idle_closed_total{{how=\"{how}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{line} in /metrics"))
}

#[tokio::test]
async fn an_idle_client_that_ignores_the_goaway_is_cut_off() -> Result<()> {
    // The GOAWAY's ping goes unanswered, so the broker never learns the client saw it: after
    // a grace (as long as the idle timeout here) it cuts the connection.
    let (broker, closed) = idle_h2_probe(false).await?;
    ensure!(
        closed.goaways == [0] && !closed.clean,
        "one GOAWAY, then the connection cut: {closed:?}"
    );
    ensure!(
        idle_closed(&broker, "cut").await? >= 1.0,
        "the cut is counted"
    );
    // The broker still serves everyone else.
    broker.client_for("330000/polite").await?.whoami().await?;
    Ok(())
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.max_message_bytes = 64 * 1024;
    })
    .await?;
    let civil = broker.client_for("330000/civil").await?;
    let big =
        govshare_tests::cascade::ask("330000/civil/death-registration", &"x".repeat(100 * 1024));
    let r = civil.request(big).await;
    let status = r.err().and_then(|e| e.status().cloned());
    ensure!(
        status
            .as_ref()
            .is_some_and(|s| s.code() == tonic::Code::OutOfRange
                || s.code() == tonic::Code::ResourceExhausted),
        "a 100 KiB message over a 64 KiB limit is refused by size: {status:?}"
    );
    // Under the limit, the same call gets past the size check (and fails for its own reasons).
    civil.whoami().await?;
    Ok(())
}

#[tokio::test]
async fn catalog_and_demand_sizes_follow_the_configured_limits_here_and_over_links() -> Result<()> {
    use govshare_tests::cascade::{item, publish, sees, WAIT};
    // The hub takes at most 2 items per dataset; its child keeps the defaults.
    let hub = TestBroker::start_with("000000/hub", |c| {
        c.limits.max_dataset_items = 2;
        c.limits.max_dataset_tags = 1;
        c.limits.max_demand_fields = 1;
    })
    .await?;
    let zj =
        TestBroker::start_child("330000/hub", &hub, &[], govshare_tests::cascade::quick).await?;
    let local = hub.client_for("000000/mca").await?;
    let dataset = |items: &[&str], tags: &[&str]| Dataset {
        code: "records".into(),
        name: "records".into(),
        share_type: ShareType::Unconditional as i32,
        items: items.iter().map(|n| item(n)).collect(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    govshare_tests::expect_status(
        local.publish_dataset(dataset(&["a", "b", "c"], &[])).await,
        tonic::Code::InvalidArgument,
        "max_dataset_items",
    )?;
    govshare_tests::expect_status(
        local.publish_dataset(dataset(&["a"], &["x", "y"])).await,
        tonic::Code::InvalidArgument,
        "max_dataset_tags",
    )?;
    let ok = local
        .publish_dataset(dataset(&["a", "b"], &["x"]))
        .await?
        .dataset
        .context("dataset")?;
    let asker = hub.client_for("000000/asker").await?;
    govshare_tests::expect_status(
        asker
            .file_demand(FileDemandRequest {
                dataset_id: ok.id.clone(),
                fields: vec!["a".into(), "b".into()],
                purpose: "checking".into(),
                ..Default::default()
            })
            .await,
        tonic::Code::InvalidArgument,
        "max_demand_fields",
    )?;

    // Over the link: the child's three-item entry is refused (and audited) at the hub, its
    // two-item entry is taken.
    let civil = zj.client_for("330000/civil").await?;
    let big = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let small = civil
        .publish_dataset(Dataset {
            code: "small".into(),
            name: "small".into(),
            share_type: ShareType::Unconditional as i32,
            items: vec![item("id_number"), item("status")],
            ..Default::default()
        })
        .await?
        .dataset
        .context("dataset")?;
    sees(&asker, &small.id).await?;
    let refused = govshare_tests::wait_until(WAIT, "the big entry to be refused", || async {
        let all = govshare_tests::cascade::audited(&hub, "catalog_refused").await?;
        Ok(all
            .into_iter()
            .find(|e| e.reason.contains(&big) && e.reason.contains("larger than")))
    })
    .await?;
    ensure!(refused.reason.contains("at most 2"), "{refused:?}");
    govshare_tests::expect_status(asker.get_dataset(&big).await, tonic::Code::NotFound, "")?;
    Ok(())
}
