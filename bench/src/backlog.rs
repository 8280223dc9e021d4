//! `backlog`: the provider is offline while `--count` exchanges (default 1,000,000) queue;
//! then the broker is stopped and started again on the same data dir (recovery time: the
//! start, which reloads every queued exchange); then the provider comes back and the queue is
//! drained through `Watch` and `Ack` (drain rate, resident memory).

use crate::cli::LoadArgs;
use crate::driver::{drive, Finish, OpFn, Phase, Progress};
use crate::exchange::{base_request, fixture};
use crate::report::ScenarioResult;
use crate::sys;
use crate::target::Provider;
use anyhow::{bail, Context, Result};
use govshare_client::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exchanges queued when `--count` is not given.
const DEFAULT_COUNT: u64 = 1_000_000;
/// How long queued exchanges may wait: longer than any fill and drain here.
const DEADLINE: Duration = Duration::from_secs(6 * 3600);
/// Slowest drain tolerated before giving up (exchanges per second), with a floor of 2 minutes.
const MIN_DRAIN_RATE: u64 = 200;

/// Runs `backlog`.
pub(crate) async fn run(load: &LoadArgs) -> Result<ScenarioResult> {
    let count = load.count.unwrap_or(DEFAULT_COUNT);
    if load.provider_nodes > 1 {
        bail!(
            "backlog queues for one provider node; drop --provider-nodes {}",
            load.provider_nodes
        );
    }
    let external = load.broker.is_some();
    let mut fx = if external {
        fixture(load, 1).await?
    } else {
        // Room for the whole backlog, whatever the defaults.
        crate::target::Fixture::in_process(1, 1, !load.plain_listener, |cfg| {
            load.tune_storage(cfg);
            cfg.exchange.queue_max_count = cfg.exchange.queue_max_count.max(count + 1000);
            cfg.exchange.queue_max_bytes = cfg
                .exchange
                .queue_max_bytes
                .max((count + 1000).saturating_mul(4096));
            cfg.exchange.max_deadline_secs =
                cfg.exchange.max_deadline_secs.max(DEADLINE.as_secs() + 60);
        })
        .await?
    };
    let c_start = sys::cpu_seconds(None);

    // 1. Fill: Submit with nobody serving.
    let client = fx.consumers[0].client.clone();
    let dataset = fx.providers[0].dataset.clone();
    let req = base_request(&dataset, &fx.grants[0][0]);
    let op: OpFn = {
        let (client, req) = (client.clone(), req.clone());
        Arc::new(move |_w, _seq| {
            let (c, mut req) = (client.clone(), req.clone());
            Box::pin(async move {
                let deadline = std::time::SystemTime::now() + DEADLINE;
                let d = deadline
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("clock before 1970")?;
                req.deadline = Some(prost_types::Timestamp {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                });
                let s = c.submit(req).await?;
                if s.duplicate {
                    bail!("submit {} came back as a duplicate", s.exchange_id);
                }
                Ok(())
            })
        })
    };
    let f0 = fx.flushes().await;
    let fill = drive(
        &Phase {
            label: "backlog fill".into(),
            concurrency: load.concurrency,
            rate: load.rate,
            finish: Finish::Count(count),
            progress: !load.quiet,
            first_seq: 0,
        },
        op,
    )
    .await?;
    let f1 = fx.flushes().await;
    let c_filled = sys::cpu_seconds(None);
    let rss_filled = sys::rss(None);
    let peak_fill = sys::peak_rss(None);
    if fill.errors > 0 {
        bail!(
            "{} of {count} submits failed while filling; first: {}",
            fill.errors,
            fill.first_error.clone().unwrap_or_default()
        );
    }

    // 2. Restart (in-process only): stop gracefully, start again, time the recovery.
    let mut notes = Vec::new();
    let restart = if external {
        notes.push("restart skipped: the harness cannot restart an external broker".to_string());
        None
    } else {
        sys::reset_peak_rss();
        if load.unclean_restart {
            notes.push(
                "restart as after a crash: the start checked every stored exchange".to_string(),
            );
        }
        Some(fx.restart(load.unclean_restart).await?)
    };
    let rss_recovered = sys::rss(None);
    // The recovery's own peak, then the drain's, apart: which of the two sets the peak.
    let peak_recovery = restart.and(sys::peak_rss(None));
    if restart.is_some() {
        sys::reset_peak_rss();
    }

    // 3. Drain: the provider comes back; results are watched and acknowledged.
    let consumer = fx.consumers[0].client.clone();
    let results = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(65_536);
    let acker = tokio::spawn(ack_all(consumer.clone(), rx, acked.clone()));
    let mut stream = consumer
        .watch(dataset.clone())
        .await
        .context("opening the Watch stream")?;
    let watcher = {
        let (results, answered) = (results.clone(), answered.clone());
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                results.fetch_add(1, Ordering::Relaxed);
                if r.state() == govshare_client::proto::ExchangeState::Answered {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(r.exchange_id).await.is_err() {
                    break;
                }
            }
        })
    };
    let f2 = fx.flushes().await;
    let t_drain = Instant::now();
    let providers =
        Provider::start_many(&fx, load.providers, load.max_in_flight, load.row_bytes).await?;
    let limit = Duration::from_secs((count / MIN_DRAIN_RATE).max(120));
    let progress = Progress::new(!load.quiet, "backlog drain", count, "ops");
    let mut last = (Instant::now(), 0u64);
    loop {
        let n = results.load(Ordering::Relaxed);
        if n >= fill.ok {
            break;
        }
        if t_drain.elapsed() > limit {
            progress.finish();
            bail!("drain stalled: {n} of {} results after {limit:?}", fill.ok);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last.0.elapsed() >= Duration::from_secs(1) {
            let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
            progress.update(n, t_drain.elapsed(), &format!("{n} results, {rate:.0}/s"));
            last = (Instant::now(), n);
        }
    }
    let drain = t_drain.elapsed();
    progress.finish();
    let f3 = fx.flushes().await;
    let peak_drain = sys::peak_rss(None);
    let rss_drained = sys::rss(None);
    watcher.abort();
    let _ = watcher.await;
    let _ = acker.await;
    for p in providers {
        p.stop();
    }
    let c_end = sys::cpu_seconds(None);

    let drain_rate = fill.ok as f64 / drain.as_secs_f64().max(1e-9);
    let mut r = ScenarioResult::from_phase("backlog", load, fx.target.clone(), &fill, &[&fill]);
    r.throughput_per_s = drain_rate;
    r.answered = answered.load(Ordering::Relaxed);
    r.exchanges = fill.ok;
    r.elapsed_s = drain.as_secs_f64();
    r.cpu_s_per_1k = c_start.zip(c_end).and_then(|(a, b)| r.per_1k(b - a));
    r.peak_rss_mib = peak_fill.max(peak_drain).max(peak_recovery).map(sys::mib);
    let flushes = [(f0, f1), (f2, f3)]
        .iter()
        .map(|(a, b)| a.zip(*b).map(|(a, b)| b.0.saturating_sub(a.0)))
        .sum::<Option<u64>>();
    r.fsyncs_per_1k = flushes.and_then(|f| r.per_1k(f as f64));
    let ex = &mut r.extra;
    ex.insert("queued".into(), fill.ok.into());
    ex.insert("fill_per_s".into(), fill.throughput().into());
    ex.insert(
        "fill_cpu_s_per_1k".into(),
        c_start
            .zip(c_filled)
            .map(|(a, b)| (b - a) * 1000.0 / fill.ok.max(1) as f64)
            .into(),
    );
    if let Some((down, up)) = restart {
        ex.insert("shutdown_s".into(), down.as_secs_f64().into());
        ex.insert("recovery_s".into(), up.as_secs_f64().into());
    }
    ex.insert("drain_s".into(), drain.as_secs_f64().into());
    ex.insert("drain_per_s".into(), drain_rate.into());
    ex.insert("acked".into(), acked.load(Ordering::Relaxed).into());
    ex.insert("rss_after_fill_mib".into(), rss_filled.map(sys::mib).into());
    ex.insert("peak_rss_fill_mib".into(), peak_fill.map(sys::mib).into());
    ex.insert(
        "rss_after_recovery_mib".into(),
        rss_recovered.map(sys::mib).into(),
    );
    ex.insert(
        "peak_rss_recovery_drain_mib".into(),
        peak_drain.max(peak_recovery).map(sys::mib).into(),
    );
    ex.insert(
        "peak_rss_recovery_mib".into(),
        peak_recovery.map(sys::mib).into(),
    );
    ex.insert("peak_rss_drain_mib".into(), peak_drain.map(sys::mib).into());
    ex.insert(
        "rss_after_drain_mib".into(),
        rss_drained.map(sys::mib).into(),
    );
    notes.push("throughput = drain rate; latency = Submit while filling (provider offline)".into());
    notes.push("RSS: this process, load generator and broker together".into());
    r.notes = notes;
    fx.shutdown().await?;
    Ok(r)
}

/// Acknowledges every id received, 1000 per call, until the channel closes.
async fn ack_all(
    client: Client,
    mut rx: tokio::sync::mpsc::Receiver<String>,
    acked: Arc<AtomicU64>,
) {
    let mut buf = Vec::with_capacity(1000);
    let mut calls = tokio::task::JoinSet::new();
    while rx.recv_many(&mut buf, 1000).await > 0 {
        let ids = std::mem::take(&mut buf);
        let (c, acked) = (client.clone(), acked.clone());
        calls.spawn(async move {
            if let Ok(r) = c.ack(ids).await {
                acked.fetch_add(u64::from(r.acked), Ordering::Relaxed);
            }
        });
        while calls.len() >= 4 {
            let _ = calls.join_next().await;
        }
    }
    while calls.join_next().await.is_some() {}
}
