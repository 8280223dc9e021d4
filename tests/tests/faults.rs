//! Faults under load: federation links (a partition that heals, a flapping link, a slow link),
//! a provider that hangs, and a broker whose disk fills. In every one, each accepted exchange
//! is answered (or reported expired or dead-lettered) and none is duplicated.

use anyhow::{bail, ensure, Result};
use govshare_broker::pki;
use govshare_client::proto::*;
use govshare_client::{Client, ClientConfig};
use govshare_tests::cascade::*;
use govshare_tests::faults::{Fault, FaultProxy, Tmpfs};
use govshare_tests::process::{hub_data_dir, with_log_on_failure, BrokerProcess};
use govshare_tests::provider::{text, Reply, TestProvider};
use govshare_tests::{expect_status, wait_until, TestBroker};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

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

/// Every result a consumer's Watch shows, gathered in the background.
struct Watched {
    shown: Arc<Mutex<Vec<ExchangeResult>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watched {
    async fn start(consumer: &Client) -> Result<Self> {
        let mut stream = consumer.watch("").await?;
        let shown = Arc::new(Mutex::new(Vec::new()));
        let sink = shown.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                if let Ok(mut s) = sink.lock() {
                    s.push(r);
                }
            }
        });
        Ok(Self { shown, task })
    }

    fn shown(&self) -> Vec<ExchangeResult> {
        self.shown.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until every exchange of `ids` has been shown, then checks that each was shown
    /// exactly once and nothing else was: the consumer never sees an exchange end twice.
    async fn exactly_once(&self, ids: &BTreeSet<String>) -> Result<()> {
        wait_until(WAIT, "every result shown on Watch", || {
            let shown: BTreeSet<String> = self.shown().into_iter().map(|r| r.exchange_id).collect();
            let all = ids.iter().all(|id| shown.contains(id));
            async move { Ok(all.then_some(())) }
        })
        .await?;
        let mut times = BTreeMap::new();
        for r in self.shown() {
            *times.entry(r.exchange_id).or_insert(0) += 1;
        }
        for (id, n) in &times {
            ensure!(
                ids.contains(id),
                "Watch showed exchange {id}, not one of ours"
            );
            ensure!(*n == 1, "Watch showed exchange {id} {n} times");
        }
        Ok(())
    }
}

/// The audit decisions that end an exchange.
const ENDS: [&str; 5] = [
    "exchange_answered",
    "exchange_failed",
    "exchange_denied",
    "exchange_expired",
    "exchange_dead_lettered",
];

/// The ends of each exchange in the broker's (durable) audit log: (seq, decision), in order.
async fn audited_ends(admin: &Client) -> Result<BTreeMap<String, Vec<(u64, String)>>> {
    let entries = admin
        .list_all_audit(ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?;
    let mut ends: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for e in entries {
        if ENDS.contains(&e.decision.as_str()) {
            ends.entry(e.exchange_id)
                .or_default()
                .push((e.seq, e.decision));
        }
    }
    Ok(ends)
}

/// Each of `ids` ended exactly once by the broker's own record.
async fn ended_once_in_audit(admin: &Client, ids: &BTreeSet<String>) -> Result<()> {
    let ends = audited_ends(admin).await?;
    for id in ids {
        let got = ends.get(id).cloned().unwrap_or_default();
        ensure!(
            got.len() == 1,
            "exchange {id} ended {got:?} in the audit log"
        );
    }
    Ok(())
}

/// Submits `n` exchanges for `dataset`, keys `prefix-0..n`, one after another.
async fn submit_many(
    consumer: Client,
    dataset: String,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let r = consumer
            .submit(ask(&dataset, &format!("{prefix}-{i}")))
            .await?;
        ids.push(r.exchange_id);
    }
    Ok(ids)
}

/// The delivery attempts a provider instance was handed, per exchange.
fn attempts(p: &TestProvider) -> Vec<(String, u32)> {
    p.seen
        .lock()
        .map(|s| {
            s.iter()
                .map(|r| (r.exchange_id.clone(), r.attempt))
                .collect()
        })
        .unwrap_or_default()
}

/// Which instance answered: the `status` its handler writes.
fn answered_by(r: &ExchangeResult) -> Option<String> {
    r.rows.first().and_then(|row| text(row, "status"))
}

#[tokio::test]
async fn a_hung_provider_is_redelivered_around_and_starves_no_one() -> Result<()> {
    const MAX_DELIVERIES: u32 = 4;
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.exchange.ack_wait_secs = 1;
        c.exchange.max_deliveries = MAX_DELIVERIES;
    })
    .await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let tax = broker.client_for("330000/tax").await?;
    let civil = broker.client_for("330100/civil").await?;
    let pension = publish(&hrss, "pension", ShareType::Unconditional).await?;
    let never = publish(&hrss, "never-answered", ShareType::Unconditional).await?;
    let taxes = publish(&tax, "tax", ShareType::Unconditional).await?;
    for ds in [&pension, &never, &taxes] {
        granted(&civil, ds).await?;
    }
    let watched = Watched::start(&civil).await?;
    let _tax = TestProvider::start(&tax, &[&taxes], 8, "tax", answering("TAX")).await?;
    // The instance whose connection goes dark reaches the broker through a proxy; its credit
    // is ample, so the broker keeps it (as hung, it would be dropped once all its slots are
    // stale) and it can be seen to recover.
    let proxy = FaultProxy::start(broker.addr).await?;
    let hrss_via_proxy = Client::connect(
        broker
            .client_config(&broker.scratch("id-330000-hrss"))
            .with_broker_url(proxy.url()),
    )
    .await?;
    let flaky = TestProvider::start(
        &hrss_via_proxy,
        &[&pension],
        500,
        "flaky",
        answering("FLAKY"),
    )
    .await?;
    // Mid-stream: the instance has served already when its connection goes dark.
    let warm_up = civil.submit(ask(&pension, "warm-up")).await?.exchange_id;
    let r = outcome(&civil, &warm_up).await?;
    ensure!(answered_by(&r).as_deref() == Some("FLAKY"), "{r:?}");
    proxy.set(Fault::Blackhole);
    // A second instance whose handler never answers (its whole credit goes stale, then the
    // broker drops it), and one for a dataset nobody else serves.
    let hung = TestProvider::start(
        &hrss,
        &[&pension],
        2,
        "hung",
        Arc::new(|_: &ProviderRequest| Reply::Hang),
    )
    .await?;
    let silent = TestProvider::start(
        &hrss,
        &[&never],
        64,
        "silent",
        Arc::new(|_: &ProviderRequest| Reply::Hang),
    )
    .await?;

    let (a, b, c) = tokio::join!(
        tokio::spawn(submit_many(civil.clone(), pension.clone(), "a", 24)),
        tokio::spawn(submit_many(civil.clone(), taxes.clone(), "b", 24)),
        tokio::spawn(submit_many(civil.clone(), never.clone(), "c", 4)),
    );
    let (a, b, c) = (a??, b??, c??);

    // The other provider is served meanwhile; nothing on the hung dataset can be answered.
    for id in &b {
        let r = outcome(&civil, id).await?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    }
    for id in &a {
        let r = civil.get_exchange(id, false).await?;
        ensure!(
            r.state() != ExchangeState::Answered,
            "answered with no one to answer: {r:?}"
        );
    }
    // The broker takes requests back from the dark instance after the ack wait and hands them
    // out again, to the same instance too.
    let admin = broker.admin().await?;
    wait_until(WAIT, "a redelivery to the dark instance", || {
        let admin = admin.clone();
        let pension = pension.clone();
        async move {
            let audit = admin
                .list_all_audit(ListAuditRequest {
                    dataset_id: pension,
                    page_size: 1000,
                    ..Default::default()
                })
                .await?;
            Ok(audit
                .iter()
                .any(|e| {
                    e.decision == "exchange_delivered"
                        && e.reason.starts_with("attempt 2 to instance flaky")
                })
                .then_some(()))
        }
    })
    .await?;
    // Recovery: the dark instance comes back. Its answers to deliveries the broker has taken
    // back are ignored; it answers the current ones, its own and the hung instance's.
    proxy.set(Fault::Pass);
    let mut all: BTreeSet<String> = [warm_up].into();
    let mut ends = BTreeMap::<String, ExchangeResult>::new();
    for id in &a {
        let r = outcome(&civil, id).await?;
        match r.state() {
            ExchangeState::Answered => {
                ensure!(answered_by(&r).as_deref() == Some("FLAKY"), "{r:?}")
            }
            ExchangeState::DeadLettered | ExchangeState::Expired => {}
            _ => bail!("{r:?}"),
        }
        ends.insert(id.clone(), r);
    }
    let answered = ends
        .values()
        .filter(|r| r.state() == ExchangeState::Answered)
        .count();
    ensure!(
        answered > 0,
        "nothing answered after the recovery: {ends:?}"
    );
    let taken = attempts(&hung);
    ensure!(!taken.is_empty(), "the hung instance got nothing");
    for (id, _) in &taken {
        let r = &ends[id];
        ensure!(
            r.state() != ExchangeState::Answered
                || attempts(&flaky).iter().any(|(x, n)| x == id && *n >= 2),
            "{id}, taken by the hung instance, was answered without a redelivery: {r:?}"
        );
    }
    ensure!(
        attempts(&flaky).iter().any(|(_, n)| *n >= 2),
        "no redelivery reached the recovered instance: {:?}",
        attempts(&flaky)
    );
    for id in &c {
        let r = outcome(&civil, id).await?;
        ensure!(r.state() == ExchangeState::DeadLettered, "{r:?}");
    }
    let expected = c.len() * MAX_DELIVERIES as usize;
    wait_until(WAIT, "every delivery to the silent instance", || {
        let n = silent.received();
        async move { Ok((n >= expected).then_some(())) }
    })
    .await?;
    ensure!(
        silent.received() == expected,
        "delivered {} times, max {expected}",
        silent.received()
    );
    let dlq = admin.list_all_dead_letters("").await?;
    for id in ends
        .iter()
        .filter(|(_, r)| r.state() != ExchangeState::Answered)
        .map(|(id, _)| id)
        .chain(&c)
    {
        let d = dlq
            .iter()
            .find(|d| d.exchange.as_ref().is_some_and(|e| &e.exchange_id == id));
        ensure!(
            d.is_some_and(|d| d.deliveries <= MAX_DELIVERIES),
            "{id} ended without an answer but is not in the dead-letter queue: {d:?}"
        );
    }
    for id in &c {
        let d = dlq
            .iter()
            .find(|d| d.exchange.as_ref().is_some_and(|e| &e.exchange_id == id));
        ensure!(
            d.is_some_and(|d| d.deliveries == MAX_DELIVERIES && d.reason.contains("max deliveries")),
            "{id} not dead-lettered after {MAX_DELIVERIES} deliveries: {d:?}"
        );
    }
    eprintln!(
        "{answered} of {} answered after the recovery; the hung instance took {taken:?}",
        a.len()
    );
    all.extend(a.iter().chain(&b).chain(&c).cloned());
    watched.exactly_once(&all).await?;
    ended_once_in_audit(&admin, &all).await?;
    let acked = civil.ack(all.iter().cloned()).await?;
    ensure!(acked.acked as usize == all.len(), "{acked:?}");
    broker.shutdown().await
}

/// A request of about 32 KiB (its filter value, which the provider echoes back), with an
/// idempotency key, so that a retry returns the first exchange.
fn big(dataset: &str, key: &str) -> ExchangeRequest {
    let mut r = ask(dataset, &format!("{key}:{}", "x".repeat(32 * 1024)));
    r.idempotency_key = key.to_string();
    r
}

/// The broker's overall health status, asked as `admin`.
async fn health(admin: &Client) -> Result<ServingStatus> {
    let mut h = HealthClient::new(admin.channel());
    Ok(h.check(HealthCheckRequest {
        service: String::new(),
    })
    .await?
    .into_inner()
    .status())
}

/// A client of the broker process at `url`, acting as the identity in `dir`.
async fn client_at(url: &str, dir: &Path) -> Result<Client> {
    Ok(Client::connect(ClientConfig {
        retries: 0,
        timeout: Duration::from_secs(10),
        ..ClientConfig::new(dir).with_broker_url(url)
    })
    .await?)
}

/// Submits large requests from four tasks until the first refusal; returns what was accepted
/// (key → exchange id) and what was refused (key, status, text).
async fn fill(civil: &Client, ds: &str) -> Result<(BTreeMap<String, String>, Vec<Refusal>)> {
    let full = Arc::new(AtomicBool::new(false));
    let mut submitters = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (civil, ds, full) = (civil.clone(), ds.to_string(), full.clone());
        submitters.spawn(async move {
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            for i in (w..MAX_SUBMITS).step_by(4) {
                if full.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("k-{i}");
                match civil.submit(big(&ds, &key)).await {
                    Ok(r) => accepted.push((key, r.exchange_id)),
                    Err(e) => {
                        full.store(true, Ordering::Relaxed);
                        refused.push((key, e.status().cloned(), e.to_string()));
                    }
                }
            }
            (accepted, refused)
        });
    }
    let (mut accepted, mut refused) = (BTreeMap::new(), Vec::new());
    while let Some(r) = submitters.join_next().await {
        let (a, f) = r?;
        accepted.extend(a);
        refused.extend(f);
    }
    Ok((accepted, refused))
}

/// A refused submit: its key, its gRPC status, and the error's text.
type Refusal = (String, Option<tonic::Status>, String);

// The real binary, in a process of its own: after a failed write or flush the broker stops
// for good (what reached the disk is no longer known; see `store::Failure` in the broker), so
// only a new process recovers, as under a supervisor (systemd, Kubernetes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_stop_and_a_restart_loses_nothing() -> Result<()> {
    const TEST: &str = "a_full_disk_fails_stop_and_a_restart_loses_nothing";
    let tmp = tempfile::tempdir()?;
    let (data, log) = hub_data_dir(tmp.path())?;
    let mut config = govshare_broker::Config::load(&data)?;
    // No reserve: this test drives the storage itself into ENOSPC, the case the reserve exists to
    // avoid (`a_disk_below_its_reserve_refuses_new_work_and_recovers_without_restart`).
    config.storage.min_free_bytes = 0;
    std::fs::write(data.join("config.toml"), config.render_template())?;
    // The database on a small disk of its own, as an operator would mount one.
    let Some(disk) = Tmpfs::mount_at(&data.join("db"), DISK_MIB, TEST)? else {
        return Ok(());
    };
    with_log_on_failure(full_disk(&data, &log, &disk, tmp.path()).await, &log)
}

/// Registers the provider `330000/hrss` and the consumer `330100/civil` on the broker
/// process serving `data`; answers their identity dirs (made under `scratch`).
async fn departments(
    broker: &BrokerProcess,
    data: &Path,
    scratch: &Path,
) -> Result<BTreeMap<&'static str, std::path::PathBuf>> {
    let admin = client_at(&broker.url(), &data.join("admin")).await?;
    let mut dirs = BTreeMap::new();
    for node in ["330000/hrss", "330100/civil"] {
        let dir = scratch.join(node.replace('/', "-"));
        pki::issue_identity(data, node, NodeRole::Department, &dir, &[])?;
        admin
            .register_node(RegisterNodeRequest {
                id: node.into(),
                name: format!("test node {node}"),
                role: NodeRole::Department as i32,
                ..Default::default()
            })
            .await?;
        dirs.insert(node, dir);
    }
    Ok(dirs)
}

async fn full_disk(data: &Path, log: &Path, disk: &Tmpfs, scratch: &Path) -> Result<()> {
    let broker = BrokerProcess::start(data, log).await?;
    let dirs = departments(&broker, data, scratch).await?;
    let hrss = client_at(&broker.url(), &dirs["330000/hrss"]).await?;
    let civil = client_at(&broker.url(), &dirs["330100/civil"]).await?;
    let ds = publish(&hrss, "pension", ShareType::Unconditional).await?;
    granted(&civil, &ds).await?;
    let provider = TestProvider::start(&hrss, &[&ds], 16, "p", alive_rows()).await?;

    let (accepted, refused) = fill(&civil, &ds).await?;
    ensure!(
        !refused.is_empty(),
        "{MAX_SUBMITS} submits never filled a {DISK_MIB} MiB disk"
    );
    // Refused as a full disk: UNAVAILABLE naming it, never INTERNAL, and never a wait for the
    // deadline: the writes caught in the failed commit or flush get its error, and what comes
    // after is refused at once (`store::Failure`). (With sled, the storage before 2026-11-29,
    // a writer could stay blocked for good and time out.)
    let mut named = 0;
    for (key, status, text) in &refused {
        let Some(s) = status else {
            bail!("{key}: no gRPC status: {text}")
        };
        match s.code() {
            Code::Unavailable | Code::ResourceExhausted
                if s.message().contains("storage failed") =>
            {
                named += 1
            }
            _ => bail!("{key}: {:?}: {}", s.code(), s.message()),
        }
    }
    ensure!(named > 0, "no refusal named the disk: {refused:?}");
    eprintln!(
        "{} accepted, then {} refused ({named} naming the disk): {:?}",
        accepted.len(),
        refused.len(),
        refused[0].2
    );

    // Fail-stop: the process exits with 1 by itself, naming the disk, for its supervisor
    // (systemd `Restart=on-failure`, Kubernetes) to start it again; until it has exited,
    // anything asked gets UNAVAILABLE (not INTERNAL, not a hang).
    let (key, _, _) = &refused[0];
    if let Err(e) = civil.submit(big(&ds, key)).await {
        let code = e.status().map(tonic::Status::code);
        ensure!(
            matches!(code, Some(Code::Unavailable) | None),
            "after the failure: {e}"
        );
    }
    let log_path = broker.log.clone();
    let code = broker.exited(WAIT).await?;
    let text = std::fs::read_to_string(&log_path)?;
    ensure!(code == Some(1), "exit code {code:?}; log:\n{text}");
    ensure!(
        text.contains("no space left on the disk holding"),
        "the log names the disk:\n{text}"
    );
    // The supervisor's restart, once space is back.
    provider.kill();
    disk.resize(DISK_MIB * 16)?;
    // Offline, the database opens and its audit chain verifies with no entry missing: a
    // transaction is one frame of the log, appended in order, and replay stops at the first
    // frame the failure cut short, so no later write is kept without an earlier one. (sled,
    // before 2026-11-29, could keep a later write and lose an earlier one.)
    let text = audit_verify(data).await?;
    ensure!(
        !text.contains("not recorded yet") && !text.contains("recorded at entry"),
        "entries missing after the failure: {text}"
    );
    let broker = BrokerProcess::start(data, log).await?;
    let admin = client_at(&broker.url(), &data.join("admin")).await?;
    ensure!(health(&admin).await? == ServingStatus::Serving);
    let hrss = client_at(&broker.url(), &dirs["330000/hrss"]).await?;
    let civil = client_at(&broker.url(), &dirs["330100/civil"]).await?;
    let watched = Watched::start(&civil).await?;
    let _provider = TestProvider::start(&hrss, &[&ds], 16, "p-again", alive_rows()).await?;

    // Every accepted exchange is still known under its key; each refused one is submitted
    // again with its key (the first attempt may or may not have reached the disk).
    for (key, id) in &accepted {
        let r = civil.submit(big(&ds, key)).await?;
        ensure!(
            r.duplicate && &r.exchange_id == id,
            "{key}: {id} lost: {r:?}"
        );
    }
    let mut all: BTreeSet<String> = accepted.values().cloned().collect();
    for (key, _, _) in &refused {
        all.insert(civil.submit(big(&ds, key)).await?.exchange_id);
    }
    ensure!(
        all.len() == accepted.len() + refused.len(),
        "one exchange per key"
    );
    for id in &all {
        let r = outcome(&civil, id).await?;
        ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    }
    watched.exactly_once(&all).await?;
    // Each exchange ended exactly once over both processes: an end is written with its audit
    // entry in one transaction, so the failed process kept both or neither. (sled applied a
    // transaction tree by tree, and a write failing half-way could leave an audited end whose
    // exchange was delivered and ended again.)
    let ends = audited_ends(&admin).await?;
    for id in &all {
        let got = ends.get(id).cloned().unwrap_or_default();
        ensure!(
            got.len() == 1,
            "exchange {id} ended {got:?} in the audit log"
        );
    }
    let acked = civil.ack(all.iter().cloned()).await?;
    ensure!(acked.acked as usize == all.len(), "{acked:?}");
    let code = broker.term().await?;
    ensure!(code == Some(0), "graceful stop exited {code:?}");
    // Still nothing missing after the second run.
    let text = audit_verify(data).await?;
    ensure!(
        !text.contains("not recorded yet") && !text.contains("recorded at entry"),
        "after the restart: {text}"
    );
    Ok(())
}

/// Runs `govshare-broker audit verify` on the stopped broker's `data`; answers its report,
/// an error unless it says the chain is OK.
async fn audit_verify(data: &Path) -> Result<String> {
    let verify = tokio::process::Command::new(govshare_tests::bin_path("govshare-broker")?)
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&verify.stdout).into_owned();
    ensure!(
        verify.status.success() && text.contains("audit chain OK"),
        "{text}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    Ok(text)
}

// A write that fails half-way (a full disk, above) can leave an exchange ended in its record
// but missing from the results a Watch reads, or a stale entry there. The broker writes a
// marker while it runs; found at start, it checks every exchange index against the records.
// The half-written state is made here by hand in the stopped broker's database, since a full
// disk leaves it only sometimes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclean_stop_is_followed_by_a_repair_of_half_written_ends() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (data, log) = hub_data_dir(tmp.path())?;
    with_log_on_failure(half_written(&data, &log, tmp.path()).await, &log)
}

async fn half_written(data: &Path, log: &Path, scratch: &Path) -> Result<()> {
    const UNCLEAN: &str = "did not stop cleanly";
    const REPAIRED: &str = "repaired exchange indexes";
    let broker = BrokerProcess::start(data, log).await?;
    let dirs = departments(&broker, data, scratch).await?;
    let hrss = client_at(&broker.url(), &dirs["330000/hrss"]).await?;
    let civil = client_at(&broker.url(), &dirs["330100/civil"]).await?;
    let ds = publish(&hrss, "pension", ShareType::Unconditional).await?;
    granted(&civil, &ds).await?;
    let provider = TestProvider::start(&hrss, &[&ds], 4, "p", alive_rows()).await?;
    let mut ids = BTreeSet::new();
    for n in 0..3 {
        ids.insert(
            civil
                .submit(ask(&ds, &format!("id-{n}")))
                .await?
                .exchange_id,
        );
    }
    for id in &ids {
        ensure!(outcome(&civil, id).await?.state() == ExchangeState::Answered);
    }
    provider.kill();
    ensure!(broker.term().await? == Some(0), "graceful stop");
    ensure!(!std::fs::read_to_string(log)?.contains(UNCLEAN));

    // One end half-written: its record says answered, its results entry is gone; and a
    // results entry of an exchange acknowledged long ago is left behind.
    let victim = ids.first().cloned().unwrap_or_default();
    {
        let store = govshare_broker::store::Store::open(&data.join("db"), 1 << 20, "330000/hub")?;
        let results = store.tree(govshare_broker::store::T::Results);
        let mut removed = 0;
        for kv in results.iter() {
            let (k, v) = kv?;
            if v.as_ref() == victim.as_bytes() {
                results.remove(k)?;
                removed += 1;
            }
        }
        ensure!(removed == 1, "{victim} had {removed} results entries");
        let stale = govshare_broker::store::seq_key("330100/civil", 1);
        results.insert(stale, &b"acknowledged-long-ago"[..])?;
        store.flush_blocking()?;
    }

    // After a clean stop nothing is checked: the entry stays missing. A kill comes next.
    let seen = std::fs::read_to_string(log)?.len();
    let broker = BrokerProcess::start(data, log).await?;
    let civil = client_at(&broker.url(), &dirs["330100/civil"]).await?;
    let text = std::fs::read_to_string(log)?;
    ensure!(
        !text[seen..].contains(UNCLEAN),
        "a clean stop was taken for an unclean one"
    );
    let got = civil.get_exchange(&victim, false).await?;
    ensure!(got.state() == ExchangeState::Answered, "{got:?}");
    broker.kill9().await?;

    // The restart after the kill repairs; Watch then shows every exchange, once.
    let seen = std::fs::read_to_string(log)?.len();
    let broker = BrokerProcess::start(data, log).await?;
    let text = std::fs::read_to_string(log)?;
    ensure!(text[seen..].contains(UNCLEAN) && text[seen..].contains(REPAIRED));
    ensure!(
        text[seen..].contains("results: 1") && text[seen..].contains("stale: 1"),
        "what was repaired: {}",
        &text[seen..]
    );
    let civil = client_at(&broker.url(), &dirs["330100/civil"]).await?;
    let watched = Watched::start(&civil).await?;
    watched.exactly_once(&ids).await?;
    let acked = civil.ack(ids.iter().cloned()).await?;
    ensure!(acked.acked as usize == ids.len(), "{acked:?}");
    ensure!(broker.term().await? == Some(0), "graceful stop");
    Ok(())
}

/// The full-disk test's tmpfs, MiB: filled by a few dozen large exchanges.
const DISK_MIB: u64 = 8;
/// Submits before the full-disk test gives up waiting for the disk to fill.
const MAX_SUBMITS: usize = 4000;

/// With `[storage] min_free_bytes`, a filling disk never reaches the storage: below the reserve new
/// work is refused with RESOURCE_EXHAUSTED (the broker stays SERVING), what was accepted is
/// still delivered and answered into the reserve, and new work is taken again as soon as
/// space returns, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_below_its_reserve_refuses_new_work_and_recovers_without_restart() -> Result<()> {
    const TEST: &str = "a_disk_below_its_reserve_refuses_new_work_and_recovers_without_restart";
    const MIB: u64 = 1024 * 1024;
    let mounts = tempfile::tempdir()?;
    // The store writes every change anew to its log (a delivery and an end rewrite the
    // exchange with its request), and compacts nothing on a disk smaller than its segments,
    // so draining what queued takes about three times its size: the reserve is sized for
    // that. It holds only because the broker counts what it wrote since it last read the
    // disk's free space (every 200 ms); before it did, submits overshot the reserve.
    let Some(disk) = Tmpfs::mount_at(&mounts.path().join("db"), 80, TEST)? else {
        return Ok(());
    };
    let db = disk.path().to_path_buf();
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.storage.path = db.clone();
        c.storage.min_free_bytes = 64 * MIB;
    })
    .await?;
    let admin = broker.admin().await?;
    let civil = broker.client_for("330000/civil").await?;
    let pension = broker.client_for("330000/pension").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    granted(&pension, &ds).await?;

    // The provider is offline: submits queue until the disk nears its reserve.
    let mut accepted = Vec::new();
    let refusal = loop {
        ensure!(accepted.len() < 5000, "the reserve never took effect");
        match pension
            .submit(big(&ds, &format!("k{}", accepted.len())))
            .await
        {
            Ok(r) => accepted.push(r.exchange_id),
            Err(e) => break e,
        }
    };
    let status = refusal.status().cloned();
    ensure!(
        status.as_ref().is_some_and(
            |s| s.code() == Code::ResourceExhausted && s.message().contains("min_free_bytes")
        ),
        "refused for the reserve, after {} accepted: {refusal}",
        accepted.len()
    );
    ensure!(
        accepted.len() >= 10,
        "some work was taken first: {}",
        accepted.len()
    );
    ensure!(
        health(&admin).await? == ServingStatus::Serving,
        "below the reserve the broker still serves"
    );
    expect_status(
        civil
            .file_demand(FileDemandRequest {
                dataset_id: ds.clone(),
                fields: vec!["status".into()],
                purpose: "p".into(),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
        "min_free_bytes",
    )?;

    // Accepted work still completes, into the reserve.
    let _provider = TestProvider::start(&civil, &[&ds], 16, "p", alive_rows()).await?;
    for id in &accepted {
        let r = outcome(&pension, id).await?;
        ensure!(
            r.state() == ExchangeState::Answered,
            "{id}: {:?}",
            r.state()
        );
    }

    // Space returns: new work is taken again without a restart.
    disk.resize(256)?;
    let again = wait_until(WAIT, "new work to be taken once space returns", || async {
        match pension.submit(big(&ds, "after")).await {
            Ok(r) => Ok(Some(r.exchange_id)),
            Err(e)
                if e.status()
                    .is_some_and(|s| s.code() == Code::ResourceExhausted) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    ensure!(
        outcome(&pension, &again).await?.state() == ExchangeState::Answered,
        "answered after space returned"
    );
    broker.shutdown().await
}

/// A segment the log could not start on a full disk (its header not written) leaves no file
/// behind: with space back, the next write starts it and succeeds, where a file left over
/// would make every later start of a segment fail ("File exists") until a restart.
#[test]
fn a_segment_not_started_on_a_full_disk_is_started_once_space_is_back() -> Result<()> {
    const TEST: &str = "a_segment_not_started_on_a_full_disk_is_started_once_space_is_back";
    use govshare_broker::kv::{Db, Options};
    let mounts = tempfile::tempdir()?;
    let Some(disk) = Tmpfs::mount_at(&mounts.path().join("fs"), 1, TEST)? else {
        return Ok(());
    };
    let dir = disk.path().join("db");
    // A segment of one small frame: each write after the first starts a new segment, whose
    // 8-byte header needs a page of its own.
    let opts = Options {
        trees: 1,
        segment_bytes: 64,
        inline_bytes: 64,
        seq_trees: Vec::new(),
        memory_trees: Vec::new(),
    };
    let db = Db::open(&dir, opts.clone())?;
    let put = |k: &str| db.transaction(|tx| tx.insert(0, k.as_bytes(), vec![7u8; 40]));
    put("a")?;
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let page = vec![1u8; 4096];
        while f.write_all(&page).is_ok() {}
    }
    let full = put("b");
    ensure!(
        full.as_ref()
            .is_err_and(|e| e.to_string().contains("No space left")),
        "a write needing a new segment on a full disk: {full:?}"
    );
    std::fs::remove_file(&filler)?;
    put("c")?;
    db.flush()?;
    drop(db);
    let db = Db::open(&dir, opts)?;
    ensure!(db.get(0, b"a")?.is_some() && db.get(0, b"c")?.is_some());
    ensure!(db.get(0, b"b")?.is_none(), "the refused write is not there");
    Ok(())
}
