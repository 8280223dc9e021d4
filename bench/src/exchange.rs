//! `sync`, `async` and `fanin`: exchanges through one broker, end to end.
//!
//! - `sync`: the consumer calls `Request`; the broker makes the exchange durable, pushes it
//!   to the provider's `Serve` stream, cuts and masks the answer and returns it.
//! - `async`: the consumer calls `Submit` (answered once the exchange is durable), takes the
//!   result from its `Watch` stream and acknowledges it with `Ack` (batched, up to 1000 ids a
//!   call). Latency runs from the submit to the result arriving on the watch stream.
//! - `fanin`: `sync` from many consumer nodes (each its own connection and grant) to one
//!   provider.
//! - `cascade`: `sync` across three in-process brokers: the consumer at its province's broker
//!   (330000/hub) -> the national hub (000000/hub) -> the provider's province (440000/hub) ->
//!   the provider, and back. The catalog entry, the demand and its decision cross the brokers
//!   first, as in production; every hop checks the grant.

use crate::cli::LoadArgs;
use crate::driver::{drive, Finish, OpFn, Phase, PhaseStats};
use crate::report::ScenarioResult;
use crate::sys;
use crate::target::{Fixture, Provider, ID_NUMBER};
use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{
    value, ExchangeRequest, ExchangeResult, ExchangeState, Filter, Query, Value,
};
use govshare_client::Client;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// How long an async exchange may take from submit to result before it counts as failed.
const RESULT_WAIT: Duration = Duration::from_secs(120);
/// Most ids in one Ack (the broker's limit).
const ACK_BATCH: usize = 1000;
/// Ack calls in flight per consumer.
const ACKS_IN_FLIGHT: usize = 4;

/// Which exchange scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `Request`, one consumer by default.
    Sync,
    /// `Submit` + `Watch` + `Ack`.
    Async,
    /// `Request` from many consumers (16 by default).
    Fanin,
    /// `Request` across three brokers: province -> national hub -> province.
    Cascade,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Fanin => "fanin",
            Mode::Cascade => "cascade",
        }
    }
}

/// The request each exchange sends: one equality filter, the grant's items.
pub(crate) fn base_request(dataset: &str, grant: &str) -> ExchangeRequest {
    ExchangeRequest {
        dataset_id: dataset.to_string(),
        grant_id: grant.to_string(),
        query: Some(Query {
            filters: vec![Filter {
                item: "id_number".into(),
                value: Some(Value {
                    kind: Some(value::Kind::StringValue(ID_NUMBER.into())),
                }),
            }],
            fields: Vec::new(),
            limit: 0,
        }),
        ..Default::default()
    }
}

/// Builds the fixture the load arguments ask for.
pub(crate) async fn fixture(load: &LoadArgs, consumers: usize) -> Result<Fixture> {
    fixture_for(Mode::Sync, load, consumers).await
}

async fn fixture_for(mode: Mode, load: &LoadArgs, consumers: usize) -> Result<Fixture> {
    let mut fx = fixture_granted(mode, load, consumers).await?;
    if load.without_grant_id {
        for g in fx.grants.iter_mut().flatten() {
            g.clear();
        }
    }
    Ok(fx)
}

async fn fixture_granted(mode: Mode, load: &LoadArgs, consumers: usize) -> Result<Fixture> {
    if mode == Mode::Cascade {
        if load.broker.is_some() {
            bail!(
                "cascade starts its own three brokers (hub and two provinces); \
                 it cannot drive an external broker: drop --broker/--identity"
            );
        }
        return Fixture::cascade(
            load.provider_nodes,
            consumers,
            !load.plain_listener,
            |cfg| load.tune_storage(cfg),
        )
        .await;
    }
    match (&load.broker, &load.identity) {
        (Some(url), Some(dir)) => Fixture::external(url, dir, load.provider_nodes, consumers).await,
        _ => {
            Fixture::in_process(
                load.provider_nodes,
                consumers,
                !load.plain_listener,
                |cfg| load.tune_storage(cfg),
            )
            .await
        }
    }
}

fn check_answered(r: &ExchangeResult) -> Result<()> {
    ensure!(
        r.state() == ExchangeState::Answered,
        "exchange {} ended {:?}: {:?}",
        r.exchange_id,
        r.state(),
        r.error
    );
    ensure!(
        r.rows.len() == 1,
        "exchange {} answered {} rows, not 1",
        r.exchange_id,
        r.rows.len()
    );
    Ok(())
}

/// For each (consumer, provider) pair ([`Fixture::pairs`]), the consumer's client and the
/// request it sends for the provider's dataset under its grant (worker `w` uses entry
/// `w % len`).
fn consumer_requests(fx: &Fixture) -> (Arc<Vec<Client>>, Arc<Vec<ExchangeRequest>>) {
    let (clients, reqs) = fx
        .pairs()
        .into_iter()
        .map(|(c, p)| {
            (
                fx.consumers[c].client.clone(),
                base_request(&fx.providers[p].dataset, &fx.grants[c][p]),
            )
        })
        .unzip();
    (Arc::new(clients), Arc::new(reqs))
}

fn sync_op(fx: &Fixture) -> OpFn {
    let (clients, reqs) = consumer_requests(fx);
    Arc::new(move |w, _seq| {
        let i = w % clients.len();
        let (c, req) = (clients[i].clone(), reqs[i].clone());
        Box::pin(async move {
            let r = c.request(req).await?;
            check_answered(&r)
        })
    })
}

/// Exchanges submitted and waiting for their result, by trace id. A std Mutex: held only to
/// insert or take one entry.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<ExchangeResult>>>>;

/// Locks a std Mutex held only briefly, taking it back even if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The consumer side of `async`: an acknowledger per consumer node, and a watch stream per
/// consumer node and dataset.
struct AsyncConsumers {
    pending: Pending,
    watchers: Vec<JoinHandle<()>>,
    ackers: Vec<JoinHandle<()>>,
    acked: Arc<AtomicU64>,
    ack_errors: Arc<Mutex<Option<String>>>,
}

impl AsyncConsumers {
    async fn start(fx: &Fixture) -> Result<Self> {
        let pending: Pending = Arc::default();
        let acked = Arc::new(AtomicU64::new(0));
        let ack_errors = Arc::new(Mutex::new(None));
        let mut watchers = Vec::new();
        let mut ackers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in &fx.consumers {
            if !seen.insert(c.id.clone()) {
                continue; // one watch per node: a node's results go to any of its streams
            }
            let (tx, rx) = mpsc::channel::<String>(65_536);
            ackers.push(tokio::spawn(ack_loop(
                c.client.clone(),
                rx,
                acked.clone(),
                ack_errors.clone(),
            )));
            for p in &fx.providers {
                let mut stream = c
                    .client
                    .watch(p.dataset.clone())
                    .await
                    .context("opening the Watch stream")?;
                let (pending, tx) = (pending.clone(), tx.clone());
                watchers.push(tokio::spawn(async move {
                    while let Ok(Some(r)) = stream.message().await {
                        let id = r.exchange_id.clone();
                        let waiter = lock(&pending).remove(&r.trace_id);
                        if let Some(w) = waiter {
                            let _ = w.send(r);
                        }
                        if tx.send(id).await.is_err() {
                            break;
                        }
                    }
                }));
            }
        }
        Ok(Self {
            pending,
            watchers,
            ackers,
            acked,
            ack_errors,
        })
    }

    fn op(&self, fx: &Fixture) -> OpFn {
        let (clients, reqs) = consumer_requests(fx);
        let nonce: u64 = rand::random();
        let pending = self.pending.clone();
        Arc::new(move |w, seq| {
            let i = w % clients.len();
            let (c, mut req) = (clients[i].clone(), reqs[i].clone());
            let pending = pending.clone();
            Box::pin(async move {
                let trace = format!("{nonce:016x}{seq:016x}");
                req.trace_id = trace.clone();
                let (tx, rx) = oneshot::channel();
                lock(&pending).insert(trace.clone(), tx);
                match c.submit(req).await {
                    Ok(s) if s.duplicate => {
                        lock(&pending).remove(&trace);
                        bail!("submit {} came back as a duplicate", s.exchange_id)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        lock(&pending).remove(&trace);
                        return Err(e.into());
                    }
                }
                let r = tokio::time::timeout(RESULT_WAIT, rx)
                    .await
                    .with_context(|| {
                        format!("no result on the watch stream within {RESULT_WAIT:?}")
                    })?
                    .context("the watch stream ended")?;
                check_answered(&r)
            })
        })
    }

    /// Stops watching, waits for every acknowledgement; returns (acked, first ack error).
    async fn finish(self) -> (u64, Option<String>) {
        for w in &self.watchers {
            w.abort();
        }
        for w in self.watchers {
            let _ = w.await;
        }
        for a in self.ackers {
            let _ = a.await;
        }
        let err = lock(&self.ack_errors).clone();
        (self.acked.load(Ordering::Relaxed), err)
    }
}

/// Acknowledges the ids it receives in batches, a few calls at a time, until the channel closes.
async fn ack_loop(
    client: Client,
    mut rx: mpsc::Receiver<String>,
    acked: Arc<AtomicU64>,
    errors: Arc<Mutex<Option<String>>>,
) {
    let sem = Arc::new(Semaphore::new(ACKS_IN_FLIGHT));
    let mut calls = JoinSet::new();
    let mut buf = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut buf, ACK_BATCH).await > 0 {
        let ids = std::mem::take(&mut buf);
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (c, acked, errors) = (client.clone(), acked.clone(), errors.clone());
        calls.spawn(async move {
            match c.ack(ids).await {
                Ok(r) => {
                    acked.fetch_add(u64::from(r.acked), Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&errors).get_or_insert_with(|| e.to_string());
                }
            }
            drop(permit);
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

/// The measured phase's finish condition.
pub(crate) fn finish_of(load: &LoadArgs) -> Finish {
    match load.count {
        Some(c) => Finish::Count(c),
        None => Finish::Duration(load.duration),
    }
}

/// Runs warm-up then the measured phase; returns (warm-up, measured, cpu s, flush counts delta).
pub(crate) async fn warm_and_measure(
    name: &str,
    load: &LoadArgs,
    op: OpFn,
    flushes: impl Fn() -> futures::future::BoxFuture<'static, Option<(u64, u64)>>,
) -> Result<(
    Option<PhaseStats>,
    PhaseStats,
    Option<f64>,
    Option<(u64, u64)>,
)> {
    let phase = |label: String, finish, first_seq| Phase {
        label,
        concurrency: load.concurrency,
        rate: load.rate,
        finish,
        progress: !load.quiet,
        first_seq,
    };
    let warm = if load.warmup.is_zero() {
        None
    } else {
        Some(
            drive(
                &phase(format!("{name} warm-up"), Finish::Duration(load.warmup), 0),
                op.clone(),
            )
            .await?,
        )
    };
    let f0 = flushes().await;
    let c0 = sys::cpu_seconds(None);
    let measured = drive(&phase(name.to_string(), finish_of(load), 1 << 40), op).await?;
    let c1 = sys::cpu_seconds(None);
    let f1 = flushes().await;
    let cpu = c0.zip(c1).map(|(a, b)| b - a);
    let fl = f0
        .zip(f1)
        .map(|(a, b)| (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)));
    Ok((warm, measured, cpu, fl))
}

/// Runs `sync`, `async` or `fanin`.
pub(crate) async fn run(mode: Mode, load: &LoadArgs) -> Result<ScenarioResult> {
    let consumers = load
        .consumers
        .unwrap_or(if mode == Mode::Fanin { 16 } else { 1 });
    let fx = Arc::new(fixture_for(mode, load, consumers).await?);
    let providers =
        Provider::start_many(&fx, load.providers, load.max_in_flight, load.row_bytes).await?;
    let consumers_side = if mode == Mode::Async {
        Some(AsyncConsumers::start(&fx).await?)
    } else {
        None
    };
    let op = match &consumers_side {
        Some(a) => a.op(&fx),
        None => sync_op(&fx),
    };
    let fx2 = fx.clone();
    let flushes = move || {
        let fx = fx2.clone();
        Box::pin(async move { fx.flushes().await }) as futures::future::BoxFuture<'static, _>
    };
    let (warm, measured, cpu, fl) = warm_and_measure(mode.name(), load, op, flushes).await?;
    let peak = sys::peak_rss(None);
    let mut all: Vec<&PhaseStats> = warm.iter().collect();
    all.push(&measured);
    let mut r = ScenarioResult::from_phase(mode.name(), load, fx.target.clone(), &measured, &all);
    r.cpu_s_per_1k = cpu.and_then(|c| r.per_1k(c));
    r.peak_rss_mib = peak.map(sys::mib);
    if let Some((flushes, writes)) = fl {
        r.fsyncs_per_1k = r.per_1k(flushes as f64);
        r.extra.insert(
            "durable_writes_per_1k".into(),
            r.per_1k(writes as f64).into(),
        );
    } else {
        r.notes
            .push("fsyncs: unknown (external broker without an admin/ identity)".into());
    }
    r.extra.insert("consumers".into(), consumers.into());
    r.extra
        .insert("provider_nodes".into(), fx.providers.len().into());
    if let Some(a) = consumers_side {
        let (acked, err) = a.finish().await;
        r.extra.insert("acked".into(), acked.into());
        if let Some(e) = err {
            r.notes.push(format!("ack failed: {e}"));
        }
        r.notes.push("latency from Submit to the result on the Watch stream; results acknowledged in batches".into());
    }
    if mode == Mode::Cascade {
        r.notes.push(
            "Request at the consumer's broker 330000/hub -> 000000/hub -> 440000/hub \
             -> provider and back; fsyncs and cpu: all three brokers"
                .into(),
        );
    }
    for (k, v) in &fx.setup_ms {
        r.extra.insert((*k).into(), (*v).into());
    }
    if fx.broker.is_some() {
        r.notes
            .push("cpu: this process, load generator and broker together".into());
    }
    let served: u64 = providers
        .iter()
        .map(|p| p.answered.load(Ordering::Relaxed))
        .sum();
    r.extra.insert("provider_answered".into(), served.into());
    let mut by_node = vec![0u64; fx.providers.len()];
    for p in &providers {
        if let Some(n) = by_node.get_mut(p.node) {
            *n += p.answered.load(Ordering::Relaxed);
        }
    }
    r.extra
        .insert("provider_answered_by_node".into(), by_node.into());
    for p in providers {
        p.stop();
    }
    match Arc::try_unwrap(fx) {
        Ok(fx) => fx.shutdown().await?,
        Err(_) => {
            tracing::warn!("fixture still shared at the end; broker dropped without shutdown")
        }
    }
    Ok(r)
}
