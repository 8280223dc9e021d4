//! The operators' HTTP port: Prometheus metrics that move with the load, `/status` JSON, and
//! the embedded console page.

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::*;
use govshare_tests::provider::{row, Reply, TestProvider};
use govshare_tests::TestBroker;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET; returns (status code, body).
async fn get(base: &str, path: &str) -> Result<(u16, String)> {
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    // Bodies may be chunked; the assertions below look for substrings, which survive chunking
    // except across chunk boundaries, so de-chunk when needed.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16)?;
            if n == 0 {
                break;
            }
            out.push_str(tail.get(..n).context("short chunk")?);
            rest = tail.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// The value of the first sample line that starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_status_and_console_follow_the_load() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.per_dataset = true;
    })
    .await?;
    let base = broker.metrics_url().context("metrics port")?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    hrss.publish_dataset(Dataset {
        code: "alive".into(),
        name: "人员生存状态".into(),
        share_type: ShareType::Unconditional as i32,
        items: vec![InfoItem {
            name: "status".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await?;
    civil
        .file_demand(FileDemandRequest {
            dataset_id: "330000/hrss/alive".into(),
            fields: vec!["status".into()],
            purpose: "p".into(),
            ..Default::default()
        })
        .await?;
    let _p = TestProvider::start(
        &hrss,
        &["330000/hrss/alive"],
        8,
        "p",
        Arc::new(|_: &ProviderRequest| Reply::Rows(vec![row(&[("status", "ALIVE")])])),
    )
    .await?;
    let ask = |fields: Vec<String>| ExchangeRequest {
        dataset_id: "330000/hrss/alive".into(),
        query: Some(Query {
            fields,
            ..Default::default()
        }),
        ..Default::default()
    };
    for _ in 0..5 {
        civil.request(ask(vec![])).await?;
    }
    if civil.request(ask(vec!["salary".into()])).await.is_ok() {
        bail!("an item outside the grant was allowed");
    }

    let (code, m) = get(&base, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let answered =
        sample(&m, "govshare_exchanges_total{outcome=\"answered\"}").context("answered series")?;
    ensure!(answered >= 5.0, "answered = {answered}");
    ensure!(
        sample(&m, "govshare_denials_total{rule=\"field_outside_grant\"}")
            .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    ensure!(
        m.contains("govshare_exchanges_by_dataset_total{dataset=\"330000/hrss/alive\""),
        "per-dataset series"
    );
    ensure!(sample(&m, "govshare_provider_streams").is_some_and(|v| v >= 1.0));
    let flushes = sample(&m, "govshare_storage_flushes_total").context("flushes")?;
    let writes = sample(&m, "govshare_storage_durable_writes_total").context("durable writes")?;
    ensure!(
        flushes > 0.0 && writes >= flushes,
        "flushes {flushes} writes {writes}"
    );
    for name in govshare_broker::metrics::ALL {
        ensure!(
            m.contains(&format!("# HELP {name} ")),
            "{name} is not described"
        );
        ensure!(
            m.lines().any(|l| l.starts_with(name)),
            "{name} has no sample"
        );
    }
    // The counters move with more load.
    for _ in 0..3 {
        civil.request(ask(vec![])).await?;
    }
    let (_, m2) = get(&base, "/metrics").await?;
    let after = sample(&m2, "govshare_exchanges_total{outcome=\"answered\"}").unwrap_or(0.0);
    ensure!(after >= answered + 3.0, "{answered} then {after}");

    let (code, body) = get(&base, "/status").await?;
    ensure!(code == 200);
    let st: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        st["broker_id"] == "330000/hub" && st["providers"].as_u64() >= Some(1),
        "{st}"
    );
    ensure!(st["exchanges"]["answered"].as_u64() >= Some(8), "{st}");
    ensure!(st["latency_ms"]["count"].as_u64() >= Some(8), "{st}");
    ensure!(
        st["recent_denials"][0]["rule"] == "field_outside_grant",
        "{st}"
    );

    let (code, html) = get(&base, "/").await?;
    ensure!(
        code == 200 && html.contains("govshare broker") && html.contains("/status"),
        "console page"
    );
    let (code, _) = get(&base, "/nope").await?;
    ensure!(code == 404);
    broker.shutdown().await
}
