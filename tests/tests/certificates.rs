//! Certificates on a running broker: its identity and trust bundle reload without a restart
//! (changed files, SIGHUP, `renew-tls`) while calls keep flowing, a bad file never replaces a
//! good one, and a node's re-issued identity replaces the old certificate without touching
//! its grants.

use anyhow::{ensure, Context, Result};
use govshare_broker::pki::{self, InitOptions};
use govshare_client::proto::*;
use govshare_client::{Client, ClientConfig};
use govshare_tests::cascade::*;
use govshare_tests::process::BrokerProcess;
use govshare_tests::provider::TestProvider;
use govshare_tests::tlsprobe::{pem_file_der, Probe};
use govshare_tests::{expect_status, govshare_cli, register, wait_until, TestBroker};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// A CA the broker does not trust (yet), and an identity `node` signed by it that trusts the
/// broker's own CA (so only the broker's side of the handshake can fail).
struct ForeignCa {
    _dir: tempfile::TempDir,
    ca_pem: String,
    identity: PathBuf,
}

fn foreign_ca(broker_data: &Path, node: &str) -> Result<ForeignCa> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("other");
    pki::init_data_dir(&InitOptions {
        data_dir: data.clone(),
        broker_id: "440000/hub".into(),
        ..Default::default()
    })?;
    let identity = dir.path().join("visitor");
    pki::issue_identity(&data, node, NodeRole::Department, &identity, &[])?;
    std::fs::copy(broker_data.join("ca/ca.pem"), identity.join("ca.pem"))?;
    Ok(ForeignCa {
        ca_pem: std::fs::read_to_string(data.join("ca/ca.pem"))?,
        identity,
        _dir: dir,
    })
}

/// Whether a fresh connection with this identity gets through a call.
async fn can_call(url: &str, identity: &Path) -> bool {
    let cfg = ClientConfig {
        retries: 0,
        timeout: Duration::from_secs(5),
        ..ClientConfig::new(identity).with_broker_url(url)
    };
    match Client::connect(cfg).await {
        Ok(c) => c.whoami().await.is_ok(),
        Err(_) => false,
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut all = std::fs::read_to_string(path)?;
    if !all.ends_with('\n') {
        all.push('\n');
    }
    all.push_str(text);
    std::fs::write(path, all)?;
    Ok(())
}

/// Calls from one client in a loop until stopped; counts failures.
struct Steady {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Option<String>>,
}

impl Steady {
    fn start(client: Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut first_error = None;
            while !s.load(Ordering::Relaxed) {
                match client.whoami().await {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.get_or_insert(e.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::task::yield_now().await;
            }
            first_error
        });
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Stops and checks that every call succeeded (and that there were some).
    async fn all_ok(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let first_error = self.task.await?;
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        ensure!(
            failed == 0 && ok > 0,
            "calls kept working through the reload: {ok} ok, {failed} failed (first: {first_error:?})"
        );
        Ok(ok)
    }
}

#[tokio::test]
async fn the_identity_and_trust_bundle_reload_from_changed_files_while_calls_continue() -> Result<()>
{
    let broker = TestBroker::start_with("330000/hub", |c| c.tls.reload_check_secs = 1).await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let admin = broker.admin().await?;
    let foreign = foreign_ca(&broker.data_dir, "330000/visitor")?;
    register(&admin, "330000/visitor", NodeRole::Department).await?;
    let url = broker.url();
    ensure!(
        !can_call(&url, &foreign.identity).await,
        "a certificate from an untrusted CA is refused before the bundle changes"
    );
    let steady = Steady::start(hrss.clone());

    // Trust the other CA: new connections from it get in, without a restart.
    let client_ca = broker.data_dir.join("tls/ca.pem");
    let original_bundle = std::fs::read_to_string(&client_ca)?;
    append(&client_ca, &foreign.ca_pem)?;
    wait_until(WAIT, "the extended trust bundle to be loaded", || async {
        Ok(can_call(&url, &foreign.identity).await.then_some(()))
    })
    .await?;

    // A new server certificate (renew-tls's code): fresh handshakes see it.
    let addr = broker.addr;
    let admin_dir = broker.admin_dir();
    let served = |dir: PathBuf| async move {
        tokio::task::spawn_blocking(move || Probe::connect(addr, &dir)?.server_cert()).await?
    };
    let before = served(admin_dir.clone()).await?;
    pki::renew_server_identity(&broker.data_dir, &[])?;
    let renewed = pem_file_der(&broker.data_dir.join("tls/broker.pem"))?;
    ensure!(renewed != before, "renewing made a new certificate");
    wait_until(WAIT, "the renewed certificate to be served", || {
        let (dir, renewed) = (admin_dir.clone(), renewed.clone());
        async move { Ok((served(dir).await? == renewed).then_some(())) }
    })
    .await?;

    // Dropping the CA from the bundle shuts its certificates out again.
    std::fs::write(&client_ca, &original_bundle)?;
    wait_until(WAIT, "the reduced trust bundle to be loaded", || async {
        Ok((!can_call(&url, &foreign.identity).await).then_some(()))
    })
    .await?;

    // A broken certificate file is refused, and the broker keeps serving with what it had.
    let cert_path = broker.data_dir.join("tls/broker.pem");
    let good = std::fs::read(&cert_path)?;
    std::fs::write(&cert_path, b"-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    let running = broker.running().context("broker running")?;
    ensure!(
        running.reload_tls().is_err(),
        "a broken certificate file does not load"
    );
    ensure!(
        served(admin_dir.clone()).await? == renewed,
        "after a failed reload the previous certificate is still served"
    );
    std::fs::write(&cert_path, good)?;

    let calls = steady.all_ok().await?;
    ensure!(
        calls > 10,
        "the steady client made calls throughout: {calls}"
    );
    let (code, metrics) =
        govshare_tests::http_get(&broker.metrics_url().context("metrics")?, "/metrics").await?;
    ensure!(code == 200, "metrics answer");
    for (result, at_least) in [("ok", 2.0), ("error", 1.0)] {
        let line = format!("govshare_tls_reloads_total{{result=\"{result}\"}}");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("{line} in /metrics"))?;
        ensure!(
            value >= at_least,
            "{line} = {value}, expected >= {at_least}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sighup_reloads_the_trust_bundle_of_the_running_binary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pki::init_data_dir(&InitOptions {
        data_dir: data.clone(),
        broker_id: "330000/hub".into(),
        ..Default::default()
    })?;
    // Only the signal can reload: file checks are off.
    let cfg_path = data.join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path)?;
    ensure!(
        cfg.contains("reload_check_secs = 10"),
        "template has the key"
    );
    std::fs::write(
        &cfg_path,
        cfg.replace("reload_check_secs = 10", "reload_check_secs = 0"),
    )?;
    let broker = BrokerProcess::start(&data, &dir.path().join("broker.log")).await?;
    let url = broker.url();
    let admin =
        Client::connect(ClientConfig::new(data.join("admin")).with_broker_url(&url)).await?;
    let foreign = foreign_ca(&data, "330000/visitor")?;
    register(&admin, "330000/visitor", NodeRole::Department).await?;
    append(&data.join("tls/ca.pem"), &foreign.ca_pem)?;
    ensure!(
        !can_call(&url, &foreign.identity).await,
        "without SIGHUP (and with file checks off) the new CA is not trusted yet"
    );
    let steady = Steady::start(admin.clone());
    broker.hangup().await?;
    wait_until(WAIT, "SIGHUP to load the new trust bundle", || async {
        Ok(can_call(&url, &foreign.identity).await.then_some(()))
    })
    .await?;
    steady.all_ok().await?;
    ensure!(
        admin.whoami().await.is_ok(),
        "the broker is still serving after SIGHUP:\n{}",
        broker.log()
    );
    let code = broker.term().await?;
    ensure!(
        code == Some(0),
        "clean exit after SIGHUP and SIGTERM: {code:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_reissued_identity_replaces_the_old_certificate_and_keeps_its_grants() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin().await?;
    let civil = broker.client_for("330000/civil").await?;
    let pension = broker.client_for("330000/pension").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let _provider = TestProvider::start(&civil, &[&ds], 4, "p", alive_rows()).await?;
    let grant = granted(&pension, &ds).await?;
    let first = pension.submit(ask(&ds, "id-1")).await?;
    ensure!(
        outcome(&pension, &first.exchange_id).await?.state() == ExchangeState::Answered,
        "answered with the first certificate"
    );

    // The new identity: same node, new key and certificate.
    let renewed = broker.scratch("pension-renewed");
    pki::issue_identity(
        &broker.data_dir,
        "330000/pension",
        NodeRole::Department,
        &renewed,
        &[],
    )?;
    let out = govshare_cli(
        &broker,
        &broker.admin_dir(),
        &[
            "--json",
            "node",
            "pin-cert",
            "330000/pension",
            "--cert",
            &renewed.join("node.pem").to_string_lossy(),
            "--reason",
            "laptop stolen",
        ],
    )
    .await?
    .ok()?;
    let pinned = out.json()?["certificate_sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let expected = pki::certificate_sha256(&pem_file_der(&renewed.join("node.pem"))?);
    ensure!(pinned == expected, "pinned {pinned}, expected {expected}");

    // The old certificate is refused, with a reason; the new one acts with the same grant.
    expect_status(
        pension.whoami().await,
        tonic::Code::Unauthenticated,
        "replaced",
    )?;
    let pension2 = broker.connect(&renewed).await?;
    let grants = pension2
        .list_grants(ListGrantsRequest {
            dataset_id: ds.clone(),
            ..Default::default()
        })
        .await?;
    ensure!(
        grants.grants.iter().any(|g| g.id == grant.id),
        "the grant survives the re-issue: {:?}",
        grants.grants
    );
    let second = pension2.submit(ask(&ds, "id-2")).await?;
    ensure!(
        outcome(&pension2, &second.exchange_id).await?.state() == ExchangeState::Answered,
        "answered with the new certificate"
    );
    let audit = audited(&broker, "certificate_pinned").await?;
    ensure!(
        audit
            .iter()
            .any(|e| e.subject == "330000/pension" && e.reason.contains("laptop stolen")),
        "the pin is audited: {audit:?}"
    );

    // Rejections: each names what is wrong.
    let pem = |dir: &Path| std::fs::read_to_string(dir.join("node.pem"));
    expect_status(
        admin
            .pin_certificate("330000/civil", pem(&renewed)?, "")
            .await,
        tonic::Code::InvalidArgument,
        "names 330000/pension",
    )?;
    let foreign = foreign_ca(&broker.data_dir, "330000/civil")?;
    expect_status(
        admin
            .pin_certificate("330000/civil", pem(&foreign.identity)?, "")
            .await,
        tonic::Code::InvalidArgument,
        "not a client certificate this broker trusts",
    )?;
    expect_status(
        admin.pin_certificate("330000/civil", "not a pem", "").await,
        tonic::Code::InvalidArgument,
        "no certificate",
    )?;
    let as_admin = broker.issue("330000/pension", NodeRole::Admin)?;
    expect_status(
        admin
            .pin_certificate("330000/pension", pem(&as_admin)?, "")
            .await,
        tonic::Code::InvalidArgument,
        "registered as department",
    )?;
    let ghost = broker.issue("330000/ghost", NodeRole::Department)?;
    expect_status(
        admin
            .pin_certificate("330000/ghost", pem(&ghost)?, "")
            .await,
        tonic::Code::NotFound,
        "not registered",
    )?;
    expect_status(
        civil
            .pin_certificate("330000/pension", pem(&renewed)?, "")
            .await,
        tonic::Code::PermissionDenied,
        "only admins",
    )?;
    // The refused attempts changed nothing.
    ensure!(
        pension2.whoami().await.is_ok() && civil.whoami().await.is_ok(),
        "failed pins leave nodes as they were"
    );
    Ok(())
}

#[tokio::test]
async fn a_registered_child_broker_is_suspended_and_re_pinned_like_a_node() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let hub = TestBroker::start_with_id("000000/hub").await?;
    let zj = TestBroker::start_child("330000/hub", &hub, &[], quick).await?;
    let health = HealthClient::new(zj.admin().await?.channel());
    let link_is = |want: ServingStatus| {
        let mut h = health.clone();
        async move {
            let got = h
                .check(HealthCheckRequest {
                    service: "govshare.v1.FederationService".into(),
                })
                .await?
                .into_inner()
                .status();
            Ok::<_, anyhow::Error>((got == want).then_some(()))
        }
    };
    wait_until(WAIT, "the link to come up", || {
        link_is(ServingStatus::Serving)
    })
    .await?;
    let admin = hub.admin().await?;
    register(&admin, "330000/hub", NodeRole::Broker).await?;
    admin.suspend_node("330000/hub", "link key leaked").await?;
    wait_until(WAIT, "the suspended child's link to drop", || {
        link_is(ServingStatus::NotServing)
    })
    .await?;

    // A new link identity, pinned; the old one is refused even once the child is resumed.
    let renewed = hub.scratch("zj-link-2");
    pki::issue_identity(&hub.data_dir, "330000/hub", NodeRole::Broker, &renewed, &[])?;
    let pem = std::fs::read_to_string(renewed.join("node.pem"))?;
    admin
        .pin_certificate("330000/hub", pem, "link key leaked")
        .await?;
    admin.resume_node("330000/hub").await?;
    let old_link = zj.data_dir.join("link");
    let old = hub.connect(&old_link).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(LinkFrame {
        seq: 0,
        body: Some(link_frame::Body::Hello(LinkHello {
            broker_id: "330000/hub".into(),
            protocol: "govshare.v1".into(),
            scope: vec![],
            ping_secs: 0,
        })),
    })
    .await?;
    let refused = federation_service_client::FederationServiceClient::new(old.channel())
        .link(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match refused {
        Err(s) => ensure!(
            s.code() == tonic::Code::Unauthenticated && s.message().contains("replaced"),
            "the old link certificate is refused as replaced: {s:?}"
        ),
        Ok(_) => anyhow::bail!("the old link certificate opened a link after the re-pin"),
    }

    // The child gets the new identity (its link files are read at every dial) and is back.
    for f in ["node.pem", "node.key", "ca.pem"] {
        std::fs::copy(renewed.join(f), old_link.join(f))?;
    }
    wait_until(WAIT, "the link to come back with the new identity", || {
        link_is(ServingStatus::Serving)
    })
    .await?;
    Ok(())
}
