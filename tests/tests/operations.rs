//! The operators' HTTP port: Prometheus metrics that move with the load, `/status` JSON, and
//! the embedded console page.

use anyhow::{bail, ensure, Context, Result};
use govshare_tests::TestBroker;

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
    let load = govshare_tests::load::AliveLoad::start(&broker).await?;
    let (civil, ask) = (&load.civil, govshare_tests::load::AliveLoad::ask);
    for _ in 0..5 {
        civil.request(ask(vec![])).await?;
    }
    if civil.request(ask(vec!["salary".into()])).await.is_ok() {
        bail!("an item outside the grant was allowed");
    }

    let (code, m) = govshare_tests::http_get(&base, "/metrics").await?;
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
    // Link series exist once a broker has a link; the dashboard tests run a linked child.
    let per_link = [
        govshare_broker::metrics::LINK_UP,
        govshare_broker::metrics::LINK_FRAMES,
        govshare_broker::metrics::LINK_OUTBOX,
        govshare_broker::metrics::LINK_RECONNECTS,
        govshare_broker::metrics::LINK_RTT,
    ];
    for name in govshare_broker::metrics::ALL {
        if per_link.contains(name) {
            continue;
        }
        ensure!(
            m.contains(&format!("# HELP {name} ")),
            "{name} is not described"
        );
        ensure!(
            m.lines().any(|l| l.starts_with(name)),
            "{name} has no sample"
        );
    }
    // A standalone broker holds two certificates, fresh from `init` (valid for years); the link
    // ones (`link`, `link_ca`) exist only on a broker with a parent.
    let cert = govshare_broker::metrics::CERT_EXPIRY;
    for which in ["server", "client_ca"] {
        let secs = sample(&m, &format!("{cert}{{certificate=\"{which}\"}}"))
            .with_context(|| format!("no {which} certificate expiry in\n{m}"))?;
        ensure!(
            secs > 365.0 * 86400.0,
            "{which} certificate expires in {secs} s"
        );
    }
    ensure!(
        !m.contains(&format!("{cert}{{certificate=\"link")),
        "link certificates on a broker without a parent:\n{m}"
    );
    // The counters move with more load.
    for _ in 0..3 {
        civil.request(ask(vec![])).await?;
    }
    let (_, m2) = govshare_tests::http_get(&base, "/metrics").await?;
    let after = sample(&m2, "govshare_exchanges_total{outcome=\"answered\"}").unwrap_or(0.0);
    ensure!(after >= answered + 3.0, "{answered} then {after}");

    let (code, body) = govshare_tests::http_get(&base, "/status").await?;
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

    let (code, html) = govshare_tests::http_get(&base, "/").await?;
    ensure!(
        code == 200 && html.contains("govshare broker") && html.contains("/status"),
        "console page"
    );
    let (code, _) = govshare_tests::http_get(&base, "/nope").await?;
    ensure!(code == 404);
    broker.shutdown().await
}
