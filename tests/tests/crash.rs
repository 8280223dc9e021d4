//! Crash safety with the real binary: thousands of async exchanges while the broker is
//! killed with SIGKILL at random moments and restarted. Every accepted exchange must get a
//! response, none may be lost, and none may be shown again once acknowledged.

use anyhow::{bail, ensure, Context, Result};
use govshare_broker::pki;
use govshare_client::proto::*;
use govshare_client::{Client, ClientConfig};
use govshare_tests::process::{hub_data_dir, with_log_on_failure, BrokerProcess};
use govshare_tests::provider::{filter_value, row, text, Reply, TestProvider};
use govshare_tests::wait_until;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const DS: &str = "330000/hrss/alive";
/// Exchanges submitted in all.
const TOTAL: usize = 4000;
/// Concurrent submitters.
const SUBMITTERS: usize = 16;
/// SIGKILL cycles while the load runs.
const CYCLES: usize = 5;

fn cfg(url: &str, dir: &Path) -> ClientConfig {
    ClientConfig {
        retries: 0,
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::new(dir).with_broker_url(url)
    }
}

/// Connects to whatever broker is current, waiting for the next one if this one is gone.
async fn connect(urls: &mut watch::Receiver<String>, dir: &Path) -> Client {
    loop {
        let url = urls.borrow_and_update().clone();
        if let Ok(c) = Client::connect(cfg(&url, dir)).await {
            return c;
        }
        // Nothing listens there any more: wait for the restarted broker's address.
        let _ = tokio::time::timeout(Duration::from_secs(2), urls.changed()).await;
    }
}

#[derive(Debug, Default)]
struct Ledger {
    /// Idempotency key number → exchange id, once Submit answered Accepted.
    accepted: HashMap<usize, String>,
    /// Exchange id → the id_number its response carried, each time it was shown.
    shown: HashMap<String, Vec<String>>,
    /// Exchange ids whose Ack succeeded.
    acked: HashSet<String>,
    /// Exchange ids whose Ack failed because the broker died under it: the release may still
    /// have reached the disk before the reply was lost, so they may never be shown again.
    ack_failed: HashSet<String>,
    /// Results shown after their Ack had succeeded: must stay empty.
    reshown_after_ack: Vec<String>,
    /// Results that were not ANSWERED, or answered someone else's query.
    wrong: Vec<String>,
    /// Submits that failed (the broker died under them) and were retried with the same key.
    retries: Vec<String>,
}

fn lock(l: &Arc<Mutex<Ledger>>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_exchange_survives_sigkill_exactly_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (data, log) = hub_data_dir(tmp.path())?;
    let mut config = govshare_broker::Config::load(&data)?;
    config.exchange.ack_wait_secs = 2;
    config.exchange.max_deliveries = 1000;
    config.exchange.default_deadline_secs = 3600;
    std::fs::write(data.join("config.toml"), config.render_template())?;
    let ids = |n: &str| -> Result<PathBuf> {
        let out = tmp.path().join(n.replace('/', "-"));
        pki::issue_identity(&data, n, NodeRole::Department, &out, &[])?;
        Ok(out)
    };
    let (hrss_dir, civil_dir) = (ids("330000/hrss")?, ids("330100/civil")?);

    let mut slot = Some(BrokerProcess::start(&data, &log).await?);
    let outcome = run(&mut slot, &data, &log, &hrss_dir, &civil_dir).await;
    let result = with_log_on_failure(outcome, &log)?;
    let broker = slot.context("no broker running at the end")?;
    let code = broker.term().await?;
    ensure!(code == Some(0), "graceful stop exited {code:?}");
    let verify = tokio::process::Command::new(govshare_tests::bin_path("govshare-broker")?)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&verify.stdout);
    ensure!(
        verify.status.success() && text.contains("audit chain OK"),
        "{text}"
    );
    eprintln!("{result}");
    for l in std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("recovered"))
    {
        eprintln!("{l}");
    }
    Ok(())
}

async fn run(
    slot: &mut Option<BrokerProcess>,
    data: &Path,
    log: &Path,
    hrss_dir: &Path,
    civil_dir: &Path,
) -> Result<String> {
    let url = slot
        .as_ref()
        .map(BrokerProcess::url)
        .context("broker not started")?;
    // Control plane: register, publish an UNCONDITIONAL dataset, get a grant.
    let admin = Client::connect(cfg(&url, &data.join("admin"))).await?;
    for id in ["330000/hrss", "330100/civil"] {
        admin
            .register_node(RegisterNodeRequest {
                id: id.into(),
                name: id.into(),
                ..Default::default()
            })
            .await?;
    }
    let hrss = Client::connect(cfg(&url, hrss_dir)).await?;
    hrss.publish_dataset(Dataset {
        code: "alive".into(),
        name: "人员生存状态".into(),
        share_type: ShareType::Unconditional as i32,
        items: ["id_number", "status"]
            .iter()
            .map(|n| InfoItem {
                name: n.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await?;
    let civil = Client::connect(cfg(&url, civil_dir)).await?;
    civil
        .file_demand(FileDemandRequest {
            dataset_id: DS.into(),
            fields: vec!["id_number".into(), "status".into()],
            purpose: "pension eligibility".into(),
            ..Default::default()
        })
        .await?;

    let (url_tx, url_rx) = watch::channel(url.clone());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The provider: answers each request with the id it was asked about; reconnects after each
    // crash, except while the gate is shut, so that accepted exchanges also pile up with
    // nothing else flushing them (a Submit that answered before its flush would then be lost).
    let (gate_tx, gate_rx) = watch::channel(true);
    let provider = {
        let (mut urls, dir, stop, mut gate) = (
            url_rx.clone(),
            hrss_dir.to_path_buf(),
            stop.clone(),
            gate_rx.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let c = connect(&mut urls, &dir).await;
                let handler = Arc::new(|r: &ProviderRequest| {
                    let asked = filter_value(r);
                    Reply::Rows(vec![row(&[("id_number", &asked), ("status", "ALIVE")])])
                });
                match TestProvider::start(&c, &[DS], 64, "crash-provider", handler).await {
                    Ok(p) => p.closed().await,
                    Err(_) => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), urls.changed()).await;
                    }
                }
            }
        })
    };

    // The consumer's collector: Watch, record, Ack in batches; reconnects after each crash.
    let watcher = {
        let (mut urls, dir, ledger, stop) = (
            url_rx.clone(),
            civil_dir.to_path_buf(),
            ledger.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = connect(&mut urls, &dir).await;
                let Ok(mut stream) = c.watch("").await else {
                    continue;
                };
                let mut batch: Vec<String> = Vec::new();
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(50), stream.message()).await;
                    match next {
                        Ok(Ok(Some(r))) => {
                            let mut l = lock(&ledger);
                            if l.acked.contains(&r.exchange_id) {
                                l.reshown_after_ack.push(r.exchange_id.clone());
                            }
                            let got = r
                                .rows
                                .first()
                                .and_then(|row| text(row, "id_number"))
                                .unwrap_or_default();
                            if r.state() != ExchangeState::Answered {
                                l.wrong
                                    .push(format!("{} ended {:?}", r.exchange_id, r.state()));
                            }
                            l.shown.entry(r.exchange_id.clone()).or_default().push(got);
                            drop(l);
                            batch.push(r.exchange_id);
                            if batch.len() < 64 {
                                continue;
                            }
                        }
                        Ok(Ok(None)) | Ok(Err(_)) => break,
                        Err(_) => {} // idle: ack what we have
                    }
                    if !batch.is_empty() {
                        match c.ack(batch.clone()).await {
                            Ok(_) => {
                                let mut l = lock(&ledger);
                                for id in batch.drain(..) {
                                    l.acked.insert(id);
                                }
                            }
                            Err(_) => {
                                // Not acked, as far as we know: these may be shown again,
                                // which is allowed, or may have been released.
                                lock(&ledger).ack_failed.extend(batch.drain(..));
                                break;
                            }
                        }
                    }
                }
            }
        })
    };

    // Submitters: each key is retried with the same idempotency key until Submit answers.
    let mut submitters = Vec::new();
    for s in 0..SUBMITTERS {
        let (mut urls, dir, ledger) = (url_rx.clone(), civil_dir.to_path_buf(), ledger.clone());
        submitters.push(tokio::spawn(async move {
            let mut c = connect(&mut urls, &dir).await;
            for i in (s..TOTAL).step_by(SUBMITTERS) {
                loop {
                    let req = ExchangeRequest {
                        dataset_id: DS.into(),
                        idempotency_key: format!("crash-{i}"),
                        query: Some(Query {
                            filters: vec![Filter {
                                item: "id_number".into(),
                                value: Some(Value {
                                    kind: Some(value::Kind::StringValue(format!("id-{i}"))),
                                }),
                            }],
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    match c.submit(req).await {
                        Ok(r) => {
                            lock(&ledger).accepted.insert(i, r.exchange_id);
                            break;
                        }
                        Err(e) => {
                            lock(&ledger).retries.push(format!("{i}: {e}"));
                            c = connect(&mut urls, &dir).await
                        }
                    }
                }
            }
        }));
    }

    // The killer: SIGKILL at a random moment after each fifth of the load, then restart.
    for cycle in 1..=CYCLES {
        let target = TOTAL * cycle / (CYCLES + 1);
        let l2 = ledger.clone();
        wait_until(Duration::from_secs(120), "submit progress", || {
            let n = lock(&l2).accepted.len();
            async move { Ok((n >= target).then_some(())) }
        })
        .await?;
        let jitter = rand::random::<u64>() % 150;
        tokio::time::sleep(Duration::from_millis(jitter)).await; // a random moment, on purpose
        if let Some(old) = slot.take() {
            old.kill9().await?;
        }
        gate_tx.send(cycle % 2 == 0)?;
        let fresh = BrokerProcess::start(data, log).await?;
        url_tx.send(fresh.url())?;
        *slot = Some(fresh);
    }
    for s in submitters {
        s.await?;
    }
    gate_tx.send(true)?;
    let l2 = ledger.clone();
    let mut urls = url_rx.clone();
    let checker = connect(&mut urls, civil_dir).await;
    wait_until(
        Duration::from_secs(120),
        "every accepted exchange to be answered and acked",
        || {
            let (pending, unsure): (Vec<String>, bool) = {
                let l = lock(&l2);
                let pending: Vec<String> = l
                    .accepted
                    .values()
                    .filter(|id| !l.acked.contains(*id))
                    .cloned()
                    .collect();
                let unsure = pending
                    .iter()
                    .all(|id| l.ack_failed.contains(id) && l.shown.contains_key(id));
                (pending, unsure)
            };
            let c = &checker;
            async move {
                if pending.is_empty() {
                    return Ok(Some(()));
                }
                if !unsure {
                    return Ok(None);
                }
                // Each one left was shown, and its Ack was cut off by a kill: done if the
                // broker no longer holds it (the release was written before the kill).
                for id in &pending {
                    match c.get_exchange(id.clone(), false).await {
                        Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
                        _ => return Ok(None),
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await
    .context("exchanges lost")?;
    // Every key again, as a client that never saw its answers would: the idempotency records
    // survived the crashes, so each returns its first exchange and creates nothing new.
    let mut again = Vec::new();
    for s in 0..SUBMITTERS {
        let (mut urls, dir, ledger) = (url_rx.clone(), civil_dir.to_path_buf(), ledger.clone());
        again.push(tokio::spawn(async move {
            let c = connect(&mut urls, &dir).await;
            let mut bad = Vec::new();
            for i in (s..TOTAL).step_by(SUBMITTERS) {
                let req = ExchangeRequest {
                    dataset_id: DS.into(),
                    idempotency_key: format!("crash-{i}"),
                    query: Some(Query {
                        filters: vec![Filter {
                            item: "id_number".into(),
                            value: Some(Value {
                                kind: Some(value::Kind::StringValue(format!("id-{i}"))),
                            }),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let first = lock(&ledger).accepted.get(&i).cloned();
                match c.submit(req).await {
                    Ok(r) if r.duplicate && Some(&r.exchange_id) == first.as_ref() => {}
                    other => bad.push(format!("key {i}: {other:?}")),
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for a in again {
        bad.extend(a.await?);
    }
    ensure!(
        bad.is_empty(),
        "resubmits not deduplicated: {:?}",
        &bad[..bad.len().min(5)]
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    provider.abort();
    watcher.abort();

    let l = lock(&ledger);
    ensure!(
        l.accepted.len() == TOTAL,
        "{} of {TOTAL} accepted",
        l.accepted.len()
    );
    ensure!(
        l.reshown_after_ack.is_empty(),
        "shown again after ack: {:?}",
        l.reshown_after_ack
    );
    ensure!(l.wrong.is_empty(), "{:?}", l.wrong);
    let accepted_ids: HashSet<&String> = l.accepted.values().collect();
    ensure!(
        accepted_ids.len() == TOTAL,
        "two keys got the same exchange"
    );
    for (i, id) in &l.accepted {
        let shown = l.shown.get(id).context("accepted but never shown")?;
        let want = format!("id-{i}");
        if shown.iter().any(|g| *g != want) {
            bail!("exchange {id} for key {i} was shown {shown:?}");
        }
    }
    for id in l.shown.keys() {
        ensure!(
            accepted_ids.contains(id),
            "a result for an exchange never accepted: {id}"
        );
    }
    let reshown = l.shown.values().filter(|v| v.len() > 1).count();
    Ok(format!(
        "{TOTAL} exchanges, {CYCLES} SIGKILL cycles, {} submits retried after a crash: all answered once acked; {reshown} shown again before their ack became durable; retries: {:?}",
        l.retries.len(), l.retries.iter().take(5).collect::<Vec<_>>()
    ))
}
