//! A real Prometheus server scrapes a broker under a small exchange load; through Prometheus's
//! HTTP query API the key series exist and move as the load says, every query of the Grafana
//! dashboard runs and returns data, and the alert rules evaluate without error. `promtool`
//! checks the deploy files (config, rules, and the rules' unit tests).
//!
//! Needs the Debian package `prometheus` (binaries `prometheus` and `promtool`). Without it the
//! tests are skipped with a loud message, unless `GOVSHARE_REQUIRE_EXTERNAL=1` (as in CI), where
//! a missing tool is a failure.

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{ExchangeState, ShareType};
use govshare_tests::provider::TestProvider;
use govshare_tests::{cascade, wait_until, TestBroker};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Metrics still to come (see `FUTURE` in tests/tests/dashboards.rs): queries that use them
/// return nothing yet. Empty today: the certificate-expiry gauge is exported now.
const FUTURE: &[&str] = &[];

/// A query, what it shows, and what its value must satisfy.
type Check<'a> = (&'a str, &'a str, &'a dyn Fn(f64) -> bool);

/// How long a condition on Prometheus may take. It scrapes every second here, but its first
/// scrape comes about five seconds after start (service discovery sends target updates at most
/// every five seconds).
const PATIENCE: Duration = Duration::from_secs(60);

/// Runs a command to completion (killed if it takes longer than a minute); returns its output
/// or fails with both streams shown.
async fn run_ok(program: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("{} {args:?} took over a minute", program.display()))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{text}",
        program.display(),
        out.status
    );
    Ok(text)
}

/// Percent-encodes a query-string value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server run by the test; killed when dropped.
struct Prometheus {
    child: tokio::process::Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` with `config`, on a free loopback port, and waits until it is ready.
    async fn start(bin: &Path, config: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut p = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let ready = wait_until(PATIENCE, "Prometheus to be ready", || {
            let exited = p.child.try_wait();
            let base = p.base.clone();
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("prometheus exited: {status}");
                }
                Ok(match govshare_tests::http_get(&base, "/-/ready").await {
                    Ok((200, _)) => Some(()),
                    _ => None,
                })
            }
        })
        .await;
        if let Err(e) = ready {
            bail!("{e:#}\n--- prometheus log ---\n{}", p.log_text());
        }
        Ok(p)
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `GET /api/v1/...`; the `data` of a successful answer.
    async fn api(&self, path: &str) -> Result<Json> {
        let (code, body) = govshare_tests::http_get(&self.base, path).await?;
        let v: Json = serde_json::from_str(&body)
            .with_context(|| format!("{path}: HTTP {code}, not JSON: {body}"))?;
        ensure!(
            code == 200 && v["status"] == "success",
            "{path}: HTTP {code}: {}",
            v
        );
        Ok(v["data"].clone())
    }

    /// An instant query; the result vector as (labels, value).
    async fn query(&self, promql: &str) -> Result<Vec<(Json, f64)>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", urlencode(promql)))
            .await
            .with_context(|| format!("query {promql}"))?;
        let mut out = Vec::new();
        match data["resultType"].as_str() {
            Some("vector") => {
                for r in data["result"].as_array().into_iter().flatten() {
                    let v = r["value"][1]
                        .as_str()
                        .context("sample without value")?
                        .parse::<f64>()?;
                    out.push((r["metric"].clone(), v));
                }
            }
            Some("scalar") => {
                let v = data["result"][1]
                    .as_str()
                    .context("scalar without value")?
                    .parse::<f64>()?;
                out.push((Json::Null, v));
            }
            other => bail!("query {promql}: unexpected result type {other:?}"),
        }
        Ok(out)
    }

    /// Waits until `promql` has a first value for which `ok` holds; returns that value.
    async fn wait_for(&self, promql: &str, what: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
        let last = std::sync::Mutex::new(None);
        let (last_ref, ok) = (&last, &ok);
        let got = wait_until(PATIENCE, what, || async move {
            let r = self.query(promql).await?;
            if let Ok(mut l) = last_ref.lock() {
                *l = Some(r.clone());
            }
            Ok(r.first().map(|(_, v)| *v).filter(|v| ok(*v)))
        })
        .await;
        let last = last.lock().map(|l| l.clone()).unwrap_or_default();
        got.with_context(|| format!("`{promql}`: last result {last:?}"))
    }

    async fn stop(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

#[tokio::test]
async fn promtool_accepts_the_deploy_files() -> Result<()> {
    let Some(promtool) = govshare_tests::external(
        "promtool",
        "prometheus",
        "promtool_accepts_the_deploy_files",
    )?
    else {
        return Ok(());
    };
    let config = govshare_tests::deploy("prometheus/prometheus.yml");
    let out = run_ok(&promtool, &["check", "config", &config.to_string_lossy()]).await?;
    ensure!(out.contains("SUCCESS"), "{out}");
    let mut files: Vec<String> = std::fs::read_dir(govshare_tests::deploy("prometheus"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("alerts") && n.ends_with(".yml"))
        })
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    ensure!(
        files.iter().any(|f| f.ends_with("/alerts.yml")),
        "alert files: {files:?}"
    );
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    let out = run_ok(&promtool, &args).await?;
    ensure!(out.matches("SUCCESS").count() == files.len(), "{out}");
    // The alert rules' unit tests: each alert fires when it should, and only then.
    let tests = govshare_tests::deploy("prometheus/tests/alerts-test.yml");
    let out = run_ok(&promtool, &["test", "rules", &tests.to_string_lossy()]).await?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[tokio::test]
async fn prometheus_scrapes_a_broker_under_load() -> Result<()> {
    let Some(bin) = govshare_tests::external(
        "prometheus",
        "prometheus",
        "prometheus_scrapes_a_broker_under_load",
    )?
    else {
        return Ok(());
    };
    let mut broker = TestBroker::start_with("330000/hub", |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.per_dataset = true;
    })
    .await?;
    // A child broker linked to it, so that the federation row's link metrics have data (brokers
    // in one process share one recorder: the broker's /metrics shows both ends of the link). It
    // pings every second, so that the link round-trip time appears soon, and retries within a
    // second.
    let child = TestBroker::start_child("330100/hub", &broker, &[], |c| {
        c.federation.ping_secs = 1;
        c.federation.max_backoff_secs = 1;
    })
    .await?;
    // The reconnect counter appears only after a reconnect: the parent stops and starts again
    // (before Prometheus starts, since its metrics port is picked again), and the child opens
    // its link again.
    wait_for_metric(&broker, "govshare_link_up{peer=\"parent\"} 1").await?;
    broker.stop_now().await?;
    broker.start_again().await?;
    wait_for_metric(&broker, "govshare_link_reconnects_total{peer=\"parent\"}").await?;
    let metrics = broker.metrics_url().context("metrics port")?;
    let target = metrics.trim_start_matches("http://");
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {alerts}
scrape_configs:
  - job_name: govshare
    static_configs:
      - targets: ["{target}"]
        labels:
          broker: "330000/hub"
"#,
        alerts = govshare_tests::deploy("prometheus/alerts.yml").display(),
    );
    let prom = Prometheus::start(&bin, &config).await?;
    let result = scrape_under_load(&broker, &child, &prom).await;
    let log = prom.log_text();
    prom.stop().await?;
    child.shutdown().await?;
    broker.shutdown().await?;
    if let Err(e) = result {
        bail!("{e:?}\n--- prometheus log (tail) ---\n{log}");
    }
    Ok(())
}

/// Waits until a line of the broker's `/metrics` starts with `prefix`.
async fn wait_for_metric(broker: &TestBroker, prefix: &str) -> Result<()> {
    let base = broker.metrics_url().context("metrics port")?;
    wait_until(PATIENCE, &format!("{prefix} in /metrics"), || {
        let base = base.clone();
        async move {
            let (_, text) = govshare_tests::http_get(&base, "/metrics").await?;
            Ok(text.lines().any(|l| l.starts_with(prefix)).then_some(()))
        }
    })
    .await
}

async fn scrape_under_load(
    broker: &TestBroker,
    child: &TestBroker,
    prom: &Prometheus,
) -> Result<()> {
    prom.wait_for(
        r#"up{job="govshare", broker="330000/hub"}"#,
        "the broker to be scraped",
        |v| v == 1.0,
    )
    .await?;
    prom.wait_for(
        r#"min(govshare_link_up{broker="330000/hub", peer=~"parent|330100/hub"}) * count(govshare_link_up{broker="330000/hub", peer=~"parent|330100/hub"})"#,
        "the link to the child up at both ends",
        |v| v == 2.0,
    )
    .await?;
    prom.wait_for(
        r#"sum(govshare_link_reconnects_total{broker="330000/hub", peer="parent"})"#,
        "the child's reconnect after the parent's restart",
        |v| v >= 1.0,
    )
    .await?;
    prom.wait_for(
        r#"count(govshare_link_rtt_seconds{broker="330000/hub"} >= 0)"#,
        "a link round-trip time (the child pings every second)",
        |v| v >= 1.0,
    )
    .await?;
    // The broker's own certificates, fresh from `init`: valid for far more than 30 days.
    prom.wait_for(
        r#"count(govshare_certificate_expiry_seconds{broker="330000/hub", certificate=~"server|client_ca"} > 30 * 86400)"#,
        "the server and client CA certificates' expiry",
        |v| v == 2.0,
    )
    .await?;

    // A department that supplies a dataset, one that consumes it, a provider instance.
    let load = govshare_tests::load::AliveLoad::start(broker).await?;
    let (civil, ask) = (&load.civil, govshare_tests::load::AliveLoad::ask);
    let provider = &load.provider;

    // Phase 1: 10 answered exchanges and one denial.
    const FIRST: usize = 10;
    for _ in 0..FIRST {
        civil.request(ask(vec![])).await?;
    }
    ensure!(
        civil.request(ask(vec!["salary".into()])).await.is_err(),
        "an item outside the grant was allowed"
    );
    let n = FIRST as f64;
    let answered = r#"sum(govshare_exchanges_total{outcome="answered", broker="330000/hub"})"#;
    prom.wait_for(answered, "answered exchanges", |v| v >= n)
        .await?;
    let checks: &[Check] = &[
        (
            r#"sum(govshare_exchanges_total{outcome="denied"})"#,
            "a denied exchange",
            &|v| v >= 1.0,
        ),
        (
            r#"sum(govshare_denials_total{rule="field_outside_grant"})"#,
            "the denial's rule",
            &|v| v >= 1.0,
        ),
        (
            r#"sum(govshare_exchanges_by_dataset_total{dataset="330000/hrss/alive", outcome="answered"})"#,
            "answered exchanges of the dataset",
            &|v| v >= n,
        ),
        (
            r#"sum(govshare_exchange_stage_seconds_bucket{stage="end_to_end", le="+Inf"})"#,
            "end-to-end latencies observed",
            &|v| v >= n,
        ),
        (
            r#"count(govshare_exchange_stage_seconds_bucket{stage="end_to_end"})"#,
            "the end-to-end latency buckets",
            &|v| v >= 10.0,
        ),
        (
            "sum(govshare_storage_flushes_total)",
            "storage flushes",
            &|v| v > 0.0,
        ),
        (
            "sum(govshare_storage_durable_writes_total) - sum(govshare_storage_flushes_total)",
            "no more flushes than durable writes",
            &|v| v >= 0.0,
        ),
        (
            "sum(govshare_storage_flush_seconds_count)",
            "flush latencies observed",
            &|v| v > 0.0,
        ),
        (
            r#"count(govshare_queue_depth{destination="330000/hrss"})"#,
            "the queue of the provider",
            &|v| v == 1.0,
        ),
        (
            "sum(govshare_provider_streams)",
            "the provider stream",
            &|v| v >= 1.0,
        ),
        ("sum(govshare_grants_active)", "the grant", &|v| v >= 1.0),
        ("sum(govshare_audit_appends_total)", "audit appends", &|v| {
            v >= n
        }),
        (
            r#"count(govshare_uptime_seconds{broker="330000/hub"})"#,
            "the broker label from the scrape config",
            &|v| v == 1.0,
        ),
        (
            "sum(process_resident_memory_bytes)",
            "resident memory",
            &|v| v > 0.0,
        ),
    ];
    for (q, what, ok) in checks {
        prom.wait_for(q, what, ok).await?;
    }
    let brokers = prom.api("/api/v1/label/broker/values").await?;
    ensure!(
        brokers
            .as_array()
            .is_some_and(|b| b.iter().any(|v| v == "330000/hub")),
        "label_values(broker): {brokers}"
    );

    // Phase 2: 15 more; the counters and histograms follow.
    const SECOND: usize = 15;
    for _ in 0..SECOND {
        civil.request(ask(vec![])).await?;
    }
    ensure!(provider.received() >= FIRST + SECOND);
    let total = (FIRST + SECOND) as f64;
    prom.wait_for(answered, "all answered exchanges", |v| v >= total)
        .await?;
    prom.wait_for(
        r#"sum(govshare_exchange_stage_seconds_count{stage="end_to_end"})"#,
        "all end-to-end latencies",
        |v| v >= total,
    )
    .await?;
    prom.wait_for(
        r#"sum(increase(govshare_exchanges_total{outcome="answered"}[1m]))"#,
        "the answered rate",
        |v| v > 0.0,
    )
    .await?;
    prom.wait_for(
        r#"histogram_quantile(0.99, sum by (le) (rate(govshare_exchange_stage_seconds_bucket{stage="end_to_end"}[1m])))"#,
        "a p99 end-to-end latency",
        |v| v.is_finite() && v >= 0.0,
    )
    .await?;

    // Phase 3: one exchange over the link, from a consumer at the parent to a provider at the
    // child, so that the child records the `hop` stage (shown on the dashboard).
    let mca = child.client_for("330100/mca").await?;
    let pension = broker.client_for("330000/pension").await?;
    let ds = cascade::publish(&mca, "death-registration", ShareType::Unconditional).await?;
    let _remote = TestProvider::start(&mca, &[&ds], 4, "p1", cascade::alive_rows()).await?;
    cascade::sees(&pension, &ds).await?;
    cascade::granted(&pension, &ds).await?;
    let r = pension
        .request(cascade::ask(&ds, "330101199001011234"))
        .await?;
    ensure!(
        r.state() == ExchangeState::Answered,
        "the exchange over the link: {r:?}"
    );
    prom.wait_for(
        r#"sum(govshare_exchange_stage_seconds_count{stage="hop"})"#,
        "the hop stage of the exchange over the link",
        |v| v >= 1.0,
    )
    .await?;

    dashboard_queries_return_data(prom).await?;
    alert_rules_evaluate(prom).await
}

/// Every dashboard query, with Grafana's variables filled in, is valid PromQL and (except those
/// of `FUTURE` metrics) returns data from the live broker.
async fn dashboard_queries_return_data(prom: &Prometheus) -> Result<()> {
    let path = govshare_tests::deploy("grafana/govshare.json");
    let dash: Json = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut exprs = Vec::new();
    let mut stack: Vec<&Json> = dash["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((p["title"].as_str().unwrap_or("?").to_string(), e));
            }
        }
    }
    ensure!(exprs.len() >= 30, "only {} dashboard queries", exprs.len());
    for (title, expr) in exprs {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$__interval", "15s")
            .replace("$broker", ".*");
        ensure!(!q.contains('$'), "{title}: unknown variable in {expr}");
        let future = FUTURE.iter().any(|f| q.contains(f));
        let what = format!("panel {title:?}: {q}");
        let (q, title) = (&q, &title);
        let result = wait_until(PATIENCE, &what, || async move {
            let r = prom
                .query(q)
                .await
                .with_context(|| format!("panel {title:?}"))?;
            Ok((future || !r.is_empty()).then_some(r))
        })
        .await?;
        if future {
            ensure!(result.is_empty(), "{what}: a FUTURE metric has data now");
        }
    }
    Ok(())
}

/// The alert rules of deploy/prometheus, loaded into this Prometheus, evaluate without error.
async fn alert_rules_evaluate(prom: &Prometheus) -> Result<()> {
    let rules = wait_until(
        PATIENCE,
        "every alert rule to be evaluated",
        || async move {
            let data = prom.api("/api/v1/rules").await?;
            let rules: Vec<Json> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            for r in &rules {
                if r["health"] == "err" {
                    bail!("rule {} fails: {}", r["name"], r["lastError"]);
                }
            }
            Ok((rules.len() >= 10 && rules.iter().all(|r| r["health"] == "ok")).then_some(rules))
        },
    )
    .await?;
    // A healthy broker under a light load raises nothing.
    let firing: Vec<&Json> = rules
        .iter()
        .flat_map(|r| r["alerts"].as_array().into_iter().flatten())
        .filter(|a| a["state"] == "firing")
        .collect();
    ensure!(firing.is_empty(), "alerts firing: {firing:?}");
    Ok(())
}
