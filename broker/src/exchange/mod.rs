//! Exchanges: accepting consumers' requests durably, queueing them per destination, pushing
//! them to providers' serving streams, enforcing grants, and keeping every outcome until the
//! consumer acknowledges it.
//!
//! The accept path runs on the caller's task (its write handed to the store's committer, then
//! one shared flush). Everything that moves an exchange after that runs in one dispatcher, on
//! its own thread, which owns the in-memory queues, provider instances and deliveries: no
//! locks on that state, and its short storage writes never stall the async workers.

mod deadlines;
pub mod dispatcher;
pub mod enforce;
pub mod hop;
pub mod record;

use crate::audit;
use crate::auth::Caller;
use crate::catalog::Catalog;
use crate::config::ExchangeSection;
use crate::error::{BrokerError, Result};
use crate::ids::{self, DatasetId};
use crate::store::{self, index_key, seq_key, Store, T};
use crate::time::{ms, now_ms, ts};
use dispatcher::{Cmd, InstanceSpec};
use enforce::Denial;
use govshare_proto::v1::{
    AuditEntry, BrokerMessage, Dataset, DatasetState, DeadLetter, ExchangeEnvelope,
    ExchangeRequest, ExchangeResult, ExchangeState, Grant, GrantState, ListDeadLettersResponse,
    SubmitResponse,
};
use prost::Message;
use record::{dedup_key, DedupRecord, StoredExchange};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Notify};

/// Most hops an exchange may take (national hub plus provinces and cities, with room).
pub const MAX_HOPS: u32 = 8;
/// How long before a Request's gRPC deadline its exchange is ended, so the answer gets back.
const SYNC_MARGIN_MS: i64 = 250;
/// Most items one query may name.
const MAX_QUERY_FIELDS: usize = 256;

/// The exchange engine: a cheap handle shared by the services.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    catalog: Catalog,
    cfg: ExchangeSection,
    cmd: mpsc::Sender<Cmd>,
    /// Callers of `Request` waiting for their exchange's end. A std Mutex: held only to
    /// insert or take a sender, never across an await.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<ExchangeResult>>>>,
    /// One wake-up per consumer, signalled when one of its exchanges ends.
    notifies: Mutex<HashMap<String, Arc<Notify>>>,
    /// Exchanges and bytes queued per destination, for the queue bounds.
    depth: Mutex<HashMap<String, (u64, u64)>>,
    /// Signs this broker's hop receipts.
    key: crate::keys::SigningKey,
    /// Routes and links to other brokers.
    fed: crate::federation::Fed,
    /// True once the broker is stopping: long waits (Request, Get, Watch) give up.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Count exchanges per dataset too.
    per_dataset: bool,
    /// Connected provider streams (kept by the dispatcher).
    providers: std::sync::atomic::AtomicU64,
    /// Exchanges by outcome since start (for `/status`; Prometheus has its own counters).
    outcomes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The latest refusals, newest last, for the operator console.
    denials: Mutex<std::collections::VecDeque<RecentDenial>>,
    /// End-to-end latency of ended exchanges, in microseconds, for the console's percentiles.
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    /// The dispatcher thread, joined at shutdown.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Ends whose result sequence number is at most this are durable: every end of earlier
    /// runs, then those of each dispatcher batch whose flush has completed. Get and Watch
    /// show no end above it before it is on disk, so that a consumer never sees an end that
    /// a crash could take back (and then answer again, differently).
    durable_results: std::sync::atomic::AtomicU64,
}

/// What accepting an exchange led to.
#[derive(Debug)]
enum Accepted {
    /// Stored; enqueue it.
    New {
        /// The link it leaves through, when its provider is on another broker.
        next_hop: Option<String>,
        id: String,
        trace_id: String,
        dest: String,
        dataset: String,
        deadline_ms: i64,
        /// Resolves once it is on disk; taken by `accept_and_queue`.
        flushed: Option<store::Flushed>,
    },
    /// The idempotency key matched an earlier exchange.
    Duplicate {
        id: String,
        trace_id: String,
        state: ExchangeState,
    },
}

/// Whether an entry of a consumer's grant index may be a grant on `dataset`: each entry holds
/// its grant's dataset id, except those written before it did (empty), whose grant is read.
fn may_be_on(entry: &[u8], dataset: &str) -> bool {
    entry.is_empty() || entry == dataset.as_bytes()
}

/// The quota counter of a grant for the day of `now`.
fn quota_key(grant_id: &str, now: i64) -> Vec<u8> {
    let mut k = index_key(grant_id, "");
    k.extend_from_slice(&enforce::quota_day(now).to_be_bytes());
    k
}

/// Counts one exchange against a grant's daily quota inside a transaction; the denial when
/// the quota is spent (nothing counted then).
fn take_quota(tx: &store::Tx<'_>, grant: &Grant, quota_key: &[u8]) -> Result<Option<Denial>> {
    let used = tx
        .get_raw(T::Quota, quota_key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    if let Some(d) = enforce::quota_denial(grant, used) {
        return Ok(Some(d));
    }
    tx.put_raw(T::Quota, quota_key, &(used + 1).to_be_bytes())?;
    Ok(None)
}

fn lock<'a, T>(m: &'a Mutex<T>) -> std::sync::MutexGuard<'a, T> {
    // A panic elsewhere must not stop the broker; the maps stay consistent at each step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A result handed to the dispatcher by [`Engine::remote_result`], until its outcome is kept.
#[derive(Debug)]
pub struct RemoteKept(oneshot::Receiver<()>);

impl RemoteKept {
    /// Waits until the outcome is durable here (or there was nothing to keep).
    pub async fn wait(self) -> Result<()> {
        self.0.await.map_err(|_| {
            BrokerError::Unavailable("the result could not be stored; it will be sent again".into())
        })
    }
}

/// How many refusals the console keeps.
const RECENT_DENIALS: usize = 50;

/// A refusal, as the operator console shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentDenial {
    /// When, Unix ms.
    pub at_ms: i64,
    /// The rule.
    pub rule: String,
    /// What failed.
    pub detail: String,
    /// The consumer refused.
    pub consumer: String,
    /// The dataset asked.
    pub dataset: String,
}

/// A fresh W3C trace id (32 lowercase hex digits).
fn new_trace_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The audit entry of an exchange decision.
pub(crate) fn exchange_entry(decision: &str, actor: &str, env: &ExchangeEnvelope) -> AuditEntry {
    let mut e = audit::entry(decision, actor);
    e.exchange_id = env.exchange_id.clone();
    e.consumer = env.consumer.clone();
    e.provider = env.provider.clone();
    if let Some(r) = &env.request {
        e.dataset_id = r.dataset_id.clone();
        e.grant_id = r.grant_id.clone();
    }
    e
}

impl Engine {
    /// Recovers the queues from the store and starts the dispatcher.
    pub fn start(
        store: Store,
        catalog: Catalog,
        cfg: ExchangeSection,
        stopping: tokio::sync::watch::Receiver<bool>,
        per_dataset: bool,
        key: crate::keys::SigningKey,
        fed: crate::federation::Fed,
    ) -> Result<Self> {
        let (cmd_tx, cmd_rx) = mpsc::channel(8192);
        let inner = Arc::new(Inner {
            store: store.clone(),
            catalog,
            cfg,
            cmd: cmd_tx,
            waiters: Mutex::new(HashMap::new()),
            notifies: Mutex::new(HashMap::new()),
            depth: Mutex::new(HashMap::new()),
            stopping,
            key,
            fed,
            per_dataset,
            providers: std::sync::atomic::AtomicU64::new(0),
            outcomes: Mutex::new(std::collections::BTreeMap::new()),
            denials: Mutex::new(std::collections::VecDeque::new()),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .map_err(|e| BrokerError::internal(format!("latency histogram: {e}")))?,
            ),
            thread: Mutex::new(None),
            // Above every result sequence number of earlier runs (ids never go back).
            durable_results: std::sync::atomic::AtomicU64::new(store.next_id()?),
        });
        let engine = Engine { inner };
        let recovered = dispatcher::recover(&store, engine.window_ms())?;
        {
            let mut depth = lock(&engine.inner.depth);
            for r in &recovered {
                let d = depth.entry(r.lane.dest.to_string()).or_default();
                d.0 += 1;
                d.1 += r.bytes;
            }
        }
        tracing::info!(exchanges = recovered.len(), "recovered queued exchanges");
        let handle = dispatcher::spawn(engine.clone(), cmd_rx, recovered)?;
        *lock(&engine.inner.thread) = Some(handle);
        Ok(engine)
    }

    /// Asks the dispatcher to stop, without waiting.
    pub fn request_shutdown(&self) {
        let _ = self.inner.cmd.try_send(Cmd::Shutdown);
    }

    /// Stops the dispatcher and waits for its thread (blocking).
    pub fn shutdown_blocking(&self) {
        let _ = self.inner.cmd.try_send(Cmd::Shutdown);
        let handle = lock(&self.inner.thread).take();
        if let Some(h) = handle {
            if self.inner.cmd.is_closed() || h.is_finished() {
                let _ = h.join();
                return;
            }
            // The command may have found the channel full; keep asking until it stops.
            let asked = std::time::Instant::now();
            while !h.is_finished() {
                // After a storage failure the dispatcher may be stuck on the disk for good (see
                // `store::Failure`); the process is to be restarted, so do not wait for it.
                if self.inner.store.failure().is_some()
                    && asked.elapsed() > std::time::Duration::from_secs(2)
                {
                    tracing::warn!("the dispatcher is stuck in failed storage; leaving it");
                    return;
                }
                let _ = self.inner.cmd.try_send(Cmd::Shutdown);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let _ = h.join();
        }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    pub(crate) fn key(&self) -> &crate::keys::SigningKey {
        &self.inner.key
    }

    pub(crate) fn cfg(&self) -> &ExchangeSection {
        &self.inner.cfg
    }

    pub(crate) fn fed(&self) -> &crate::federation::Fed {
        &self.inner.fed
    }

    /// An exchange of a local consumer came back over a link with its outcome: hands it to
    /// the dispatcher. The returned wait ends once the outcome is durable here (or there was
    /// nothing to keep): only then may the link acknowledge it to the broker it came from.
    /// Handing over a batch's results before waiting lets one flush cover all their ends.
    pub async fn remote_result(&self, result: ExchangeResult) -> Result<RemoteKept> {
        let (done, rx) = oneshot::channel();
        // From here until the dispatcher asks for its flush, a flush may wait for it.
        let intent = self.inner.store.durable_intent();
        self.inner
            .cmd
            .send(Cmd::Remote {
                result,
                done,
                intent,
            })
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        Ok(RemoteKept(rx))
    }

    /// Queues an exchange this broker took custody of from a link.
    pub async fn enqueue_forwarded(&self, id: &str, dest: &str, dataset: &str, deadline_ms: i64) {
        if let Err(e) = self.enqueue(id, dest, dataset, deadline_ms).await {
            tracing::warn!(exchange = id, error = %e, "cannot queue a forwarded exchange now; it is queued again at restart");
        }
    }

    /// The wake-up of a consumer.
    fn notify_for(&self, consumer: &str) -> Arc<Notify> {
        lock(&self.inner.notifies)
            .entry(consumer.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Counts an exchange outcome (and per dataset, when enabled).
    pub(crate) fn record_outcome(&self, dataset: &str, outcome: &'static str) {
        metrics::counter!(crate::metrics::EXCHANGES, "outcome" => outcome).increment(1);
        *lock(&self.inner.outcomes)
            .entry(outcome.to_string())
            .or_insert(0) += 1;
        if self.inner.per_dataset {
            metrics::counter!(crate::metrics::EXCHANGES_BY_DATASET, "dataset" => dataset.to_string(), "outcome" => outcome)
                .increment(1);
        }
    }

    /// Counts a refusal and keeps it for the console.
    pub(crate) fn record_denial(&self, d: &Denial, consumer: &str, dataset: &str) {
        metrics::counter!(crate::metrics::DENIALS, "rule" => d.rule).increment(1);
        self.record_outcome(dataset, "denied");
        let mut recent = lock(&self.inner.denials);
        if recent.len() == RECENT_DENIALS {
            recent.pop_front();
        }
        recent.push_back(RecentDenial {
            at_ms: now_ms(),
            rule: d.rule.to_string(),
            detail: d.detail.clone(),
            consumer: consumer.to_string(),
            dataset: dataset.to_string(),
        });
    }

    /// Records a stage's time.
    pub(crate) fn record_stage(&self, stage: &'static str, millis: i64) {
        let secs = millis.max(0) as f64 / 1000.0;
        metrics::histogram!(crate::metrics::STAGE_SECONDS, "stage" => stage).record(secs);
        if stage == "end_to_end" {
            let _ = lock(&self.inner.latency)
                .record((millis.max(0) as u64).saturating_mul(1000).max(1));
        }
    }

    /// Sets the connected provider streams.
    pub(crate) fn set_providers(&self, n: usize) {
        self.inner
            .providers
            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(crate::metrics::PROVIDER_STREAMS).set(n as f64);
    }

    /// Exchanges by outcome since start, counted here for `/status`.
    pub fn outcome_counts(&self) -> std::collections::BTreeMap<String, u64> {
        lock(&self.inner.outcomes).clone()
    }

    /// Connected provider streams.
    pub fn providers(&self) -> u64 {
        self.inner
            .providers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The latest refusals, newest first.
    pub fn recent_denials(&self) -> Vec<RecentDenial> {
        lock(&self.inner.denials).iter().rev().cloned().collect()
    }

    /// End-to-end latency percentiles in milliseconds (p50, p90, p99) and the count behind them.
    pub fn latency_ms(&self) -> (f64, f64, f64, u64) {
        let h = lock(&self.inner.latency);
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        (q(0.5), q(0.9), q(0.99), h.len())
    }

    /// Records that the ends up to result sequence number `seq` are durable.
    pub(crate) fn results_durable_upto(&self, seq: u64) {
        self.inner
            .durable_results
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    /// The highest result sequence number known durable (see [`Inner::durable_results`]).
    fn durable_results(&self) -> u64 {
        self.inner
            .durable_results
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits, if need be, until the end read with result sequence number `seq` is durable.
    async fn end_durable(&self, seq: u64) -> Result<()> {
        if seq <= self.durable_results() {
            return Ok(());
        }
        // Written before this read: the store's mark now covers it.
        let store = &self.inner.store;
        store.durable_upto(store.written()).await
    }

    /// Called by the dispatcher once an exchange's end is durable.
    pub(crate) fn finished(&self, consumer: &str, result: ExchangeResult, sync: bool) {
        let mut waiters = lock(&self.inner.waiters)
            .remove(&result.exchange_id)
            .unwrap_or_default();
        let mut delivered = false;
        // The last waiter (most often the only one) takes the result itself; a send that
        // fails hands it back, for the release below.
        let last = waiters.pop();
        for w in waiters {
            delivered |= w.send(result.clone()).is_ok();
        }
        let untaken = match last {
            Some(w) => w.send(result).err(),
            None => Some(result),
        };
        delivered |= untaken.is_none();
        if let (true, false, Some(r)) = (sync, delivered, untaken) {
            // Its Request call is gone (deadline, cancel): nobody will take this result, so
            // release it rather than keep it forever. Its end is in the audit log.
            let me = self.clone();
            let c = consumer.to_string();
            tokio::spawn(async move {
                let _ = me.ack(c, vec![r.exchange_id]).await;
            });
        }
        self.notify_for(consumer).notify_waiters();
    }

    /// Drops the Request callers waiting for an exchange whose end could not be made durable;
    /// they answer UNAVAILABLE instead of an answer that a restart would not remember.
    pub(crate) fn abandon_waiters(&self, exchange_id: &str) {
        lock(&self.inner.waiters).remove(exchange_id);
    }

    /// Releases a destination's queue reservation.
    pub(crate) fn release(&self, dest: &str, bytes: u64) {
        let mut depth = lock(&self.inner.depth);
        if let Some(d) = depth.get_mut(dest) {
            d.0 = d.0.saturating_sub(1);
            d.1 = d.1.saturating_sub(bytes);
        }
    }

    /// Counts an exchange against a destination without checking the bounds (admin replays).
    pub(crate) fn force_reserve(&self, dest: &str, bytes: u64) {
        let mut depth = lock(&self.inner.depth);
        let d = depth.entry(dest.to_string()).or_default();
        d.0 += 1;
        d.1 += bytes;
    }

    /// Takes a reservation against a destination's bounds.
    fn reserve(&self, dest: &str, bytes: u64) -> Result<()> {
        let mut depth = lock(&self.inner.depth);
        let d = depth.entry(dest.to_string()).or_default();
        let cfg = &self.inner.cfg;
        if d.0 + 1 > cfg.queue_max_count || d.1 + bytes > cfg.queue_max_bytes {
            return Err(BrokerError::ResourceExhausted(format!(
                "the queue for {dest} is full ({} exchanges, {} bytes; bounds {} and {}); retry later",
                d.0, d.1, cfg.queue_max_count, cfg.queue_max_bytes
            )));
        }
        d.0 += 1;
        d.1 += bytes;
        Ok(())
    }

    /// Exchanges in flight per destination, from the `in_flight` tree (blocking).
    pub fn in_flight(&self) -> Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for kv in self.inner.store.tree(T::InFlight).iter() {
            let (_, v) = kv?;
            let f = record::InFlight::decode(v.as_ref())?;
            *out.entry(f.dest).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Open exchanges (queued or in flight) and bytes per destination ever seen since start.
    pub fn depths(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = lock(&self.inner.depth)
            .iter()
            .map(|(k, d)| (k.clone(), d.0, d.1))
            .collect();
        v.sort();
        v
    }

    /// Finds the grant an exchange runs under: the one named, or the consumer's active one.
    fn resolve_grant(
        &self,
        consumer: &str,
        dataset: &str,
        grant_id: &str,
    ) -> Result<Result<Grant, Denial>> {
        let store = &self.inner.store;
        if !grant_id.is_empty() {
            ids::check_opaque_id("grant_id", grant_id)?;
            return Ok(store
                .get::<Grant>(T::Grants, grant_id)?
                .ok_or_else(|| Denial {
                    rule: "grant_missing",
                    detail: format!("grant {grant_id} does not exist on this broker"),
                    exhausted: false,
                }));
        }
        let now = now_ms();
        let prefix = index_key(consumer, "");
        let mut best: Option<Grant> = None;
        for kv in store.tree(T::GrantsByConsumer).scan_prefix(&prefix) {
            let (k, v) = kv?;
            // A consumer holding hundreds of grants has only this dataset's decoded.
            if !may_be_on(&v, dataset) {
                continue;
            }
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(g) = store.get::<Grant>(T::Grants, &id)? {
                let live = g.state() == GrantState::Active
                    && ms(&g.valid_until) >= now
                    && ms(&g.valid_from) <= now;
                if g.dataset_id == dataset && live {
                    best = Some(g); // ids grow with time: the newest wins
                }
            }
        }
        Ok(best.ok_or_else(|| Denial {
            rule: "grant_missing",
            detail: format!("{consumer} holds no active grant on {dataset}; file a demand first"),
            exhausted: false,
        }))
    }

    /// Validates, enforces and stores a new exchange. Its checks run on the caller's task
    /// (about 50 µs, one signature included; the trees it reads are small and hot); the write
    /// goes to the committer.
    async fn accept(
        &self,
        caller: &Caller,
        mut req: ExchangeRequest,
        sync: bool,
        sync_deadline_ms: Option<i64>,
    ) -> Result<Accepted> {
        let cfg = &self.inner.cfg;
        let store = &self.inner.store;
        // From here until its write reaches the flusher, a flush may wait for it.
        let intent = store.durable_intent();
        let did = DatasetId::parse(&req.dataset_id)?;
        let mut query = req.query.take().unwrap_or_default();
        if query.filters.len() > cfg.max_filters as usize {
            return Err(BrokerError::invalid(format!(
                "{} filters given; at most {} are allowed",
                query.filters.len(),
                cfg.max_filters
            )));
        }
        for f in &query.filters {
            ids::check_item_name(&f.item)?;
            if f.value.as_ref().and_then(|v| v.kind.as_ref()).is_none() {
                return Err(BrokerError::invalid(format!(
                    "filter on {:?} has no value",
                    f.item
                )));
            }
        }
        if query.fields.len() > MAX_QUERY_FIELDS {
            return Err(BrokerError::invalid(format!(
                "{} fields given; at most {MAX_QUERY_FIELDS} are allowed",
                query.fields.len()
            )));
        }
        for f in &query.fields {
            ids::check_item_name(f)?;
        }
        if query.limit == 0 || query.limit > cfg.max_rows {
            query.limit = cfg.max_rows;
        }
        if !req.idempotency_key.is_empty() {
            ids::check_opaque_id("idempotency_key", &req.idempotency_key)?;
        }
        if req.trace_id.is_empty() {
            req.trace_id = new_trace_id();
        } else if req.trace_id.len() != 32 || !req.trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::invalid(
                "trace_id must be 32 hex digits (a W3C trace id)",
            ));
        }
        let now = now_ms();
        let max_ms = i64::try_from(cfg.max_deadline_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let default_ms = if sync {
            cfg.default_sync_deadline_secs
        } else {
            cfg.default_deadline_secs
        };
        let mut deadline = match &req.deadline {
            Some(_) => ms(&req.deadline),
            None => now + i64::try_from(default_ms.saturating_mul(1000)).unwrap_or(i64::MAX),
        };
        if let Some(call) = sync_deadline_ms {
            deadline = deadline.min(call);
        }
        if deadline <= now {
            return Err(BrokerError::invalid("deadline is already past"));
        }
        if deadline - now > max_ms {
            return Err(BrokerError::invalid(format!(
                "deadline is more than {} seconds away; this broker allows at most that",
                cfg.max_deadline_secs
            )));
        }
        let consumer = caller.id.to_string();
        let dedup_key =
            (!req.idempotency_key.is_empty()).then(|| dedup_key(&consumer, &req.idempotency_key));
        if let Some(k) = &dedup_key {
            if let Some(dup) = self.duplicate(k, now)? {
                return Ok(dup);
            }
        }
        let dataset: Dataset = store.get(T::Datasets, &req.dataset_id)?.ok_or_else(|| {
            BrokerError::not_found(format!("dataset {} is not in the catalog", req.dataset_id))
        })?;
        let exchange_id = uuid::Uuid::now_v7().to_string();
        let mut env = ExchangeEnvelope {
            exchange_id: exchange_id.clone(),
            consumer: consumer.clone(),
            provider: did.provider.to_string(),
            request: None,
            grant: None,
            trail: Vec::new(),
            hops_left: MAX_HOPS,
            accepted_at: Some(ts(now)),
            deadline: Some(ts(deadline)),
            origin_broker: store.broker_id().to_string(),
        };
        let mut resolved = None;
        let denial = if dataset.state() != DatasetState::Published {
            Some(Denial {
                rule: "dataset_withdrawn",
                detail: format!("dataset {} is withdrawn", dataset.id),
                exhausted: false,
            })
        } else {
            match self.resolve_grant(&consumer, &req.dataset_id, &req.grant_id)? {
                Err(d) => Some(d),
                Ok(g) => {
                    req.grant_id = g.id.clone();
                    if query.fields.is_empty() {
                        query.fields = g.fields.clone();
                    }
                    let denial = match crate::keys::verify_grant(&g, &store.keys()?) {
                        Err(d) => Some(d),
                        Ok(_) => {
                            enforce::check_grant(&g, &consumer, &req.dataset_id, &query, now).err()
                        }
                    };
                    resolved = Some(g);
                    denial
                }
            }
        };
        req.query = Some(query);
        env.request = Some(req.clone());
        if let Some(d) = denial {
            self.audit_denial(&env, &d).await?;
            return Err(d.to_error());
        }
        let grant: Grant =
            resolved.ok_or_else(|| BrokerError::internal("no grant resolved during accept"))?;
        env.trail
            .push(self.inner.key.receipt(&exchange_id, 0, "accepted", now));
        let dest = env.provider.clone();
        let mut record = StoredExchange {
            envelope: Some(env.clone()),
            state: ExchangeState::Queued as i32,
            deliveries: 0,
            result: None,
            queue_seq: store.next_id()?,
            result_seq: 0,
            sync,
            dest: dest.clone(),
            bytes: 0,
            purpose: grant.purpose.clone(),
        };
        let bytes = record.encoded_len() as u64;
        record.bytes = bytes;
        self.reserve(&dest, bytes)?;
        let quota_key = quota_key(&grant.id, now);
        // The quota is counted where it is authoritative: at the provider's home broker, the
        // grant's issuer. An exchange for a provider elsewhere leaves through a link.
        let own_quota = grant.issuer == store.broker_id();
        let next_hop = match self.inner.fed.route(&dest)? {
            Some(crate::federation::Route::Local) => None,
            Some(crate::federation::Route::Via(peer)) => {
                if sync && !self.inner.fed.link_up(&peer) {
                    self.release(&dest, bytes);
                    return Err(BrokerError::Unavailable(format!(
                        "provider {dest} is reached through {}, and that link is down; use Submit to have the exchange wait for it",
                        self.inner.fed.peer_name(&peer)
                    )));
                }
                Some(peer)
            }
            None => {
                self.release(&dest, bytes);
                return Err(BrokerError::not_found(format!(
                    "provider node {dest} is not registered on this broker or below it, and this broker has no parent"
                )));
            }
        };
        // Only an exchange leaving through a link carries the grant's signed terms.
        let outgoing = next_hop.as_ref().map(|_| ExchangeEnvelope {
            grant: grant.token.clone(),
            ..env.clone()
        });
        let window_ms = self.window_ms();
        let fed = self.inner.fed.clone();
        let (consumer_w, exchange_id_w, next_hop_w, dedup_key_w) = (
            consumer.clone(),
            exchange_id.clone(),
            next_hop.clone(),
            dedup_key.clone(),
        );
        // Grouped with other accepts: one transaction and one flush for many exchanges.
        let outcome = store
            .write_grouped_durable(intent, move |tx| {
                let (consumer, exchange_id, next_hop, dedup_key) =
                    (&consumer_w, &exchange_id_w, &next_hop_w, &dedup_key_w);
                if let Some(k) = dedup_key {
                    if let Some(raw) = tx.get_raw(T::Dedup, k)? {
                        let d = DedupRecord::decode(raw.as_ref())?;
                        if now - d.at_ms <= window_ms {
                            return Ok((Err(d.exchange_id), vec![]));
                        }
                    }
                }
                if own_quota {
                    if let Some(d) = take_quota(tx, &grant, &quota_key)? {
                        let mut e = exchange_entry("exchange_denied", consumer, &env);
                        e.reason = format!("{}: {}", d.rule, d.detail);
                        return Ok((Ok(Some(d)), vec![e]));
                    }
                }
                if let (Some(peer), Some(outgoing)) = (next_hop, &outgoing) {
                    fed.put_outbox(
                        tx,
                        peer,
                        govshare_proto::v1::link_frame::Body::Exchange(outgoing.clone()),
                    )?;
                }
                tx.put(T::Exchanges, exchange_id, &record)?;
                if let Some(k) = dedup_key {
                    let d = DedupRecord {
                        exchange_id: exchange_id.clone(),
                        at_ms: now,
                        deadline_ms: 0,
                    };
                    tx.put_raw(T::Dedup, k, &d.encode_to_vec())?;
                }
                let mut e = exchange_entry("exchange_accepted", consumer, &env);
                e.reason = match (next_hop, sync) {
                    (None, true) => "request".into(),
                    (None, false) => "submit".into(),
                    (Some(p), s) => format!(
                        "{}; grant {} checked: ok; next hop {}",
                        if s { "request" } else { "submit" },
                        grant.id,
                        crate::federation::peer_label(p)
                    ),
                };
                Ok((Ok(None), vec![e]))
            })
            .await;
        match outcome {
            Ok((Ok(None), flushed)) => {
                self.record_outcome(&req.dataset_id, "accepted");
                Ok(Accepted::New {
                    next_hop,
                    id: exchange_id,
                    trace_id: req.trace_id,
                    dest,
                    dataset: req.dataset_id,
                    deadline_ms: deadline,
                    flushed: Some(flushed),
                })
            }
            Ok((Ok(Some(denial)), _)) => {
                self.release(&dest, bytes);
                self.record_denial(&denial, &consumer, &req.dataset_id);
                Err(denial.to_error())
            }
            Ok((Err(first), _)) => {
                self.release(&dest, bytes);
                let (state, trace_id) = self.state_of(&first)?;
                Ok(Accepted::Duplicate {
                    id: first,
                    trace_id,
                    state,
                })
            }
            Err(e) => {
                self.release(&dest, bytes);
                Err(e)
            }
        }
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.inner.cfg.idempotency_window_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX)
    }

    /// The earlier exchange of an idempotency key, if the key is within its window.
    fn duplicate(&self, key: &[u8], now: i64) -> Result<Option<Accepted>> {
        if let Some(raw) = self.inner.store.tree(T::Dedup).get(key)? {
            let d = DedupRecord::decode(raw.as_ref())?;
            if now - d.at_ms <= self.window_ms() {
                let (state, trace_id) = self.state_of(&d.exchange_id)?;
                return Ok(Some(Accepted::Duplicate {
                    id: d.exchange_id,
                    trace_id,
                    state,
                }));
            }
        }
        Ok(None)
    }

    /// An exchange's state and trace id; an acknowledged (forgotten) one is UNSPECIFIED.
    fn state_of(&self, id: &str) -> Result<(ExchangeState, String)> {
        Ok(
            match self.inner.store.get::<StoredExchange>(T::Exchanges, id)? {
                Some(r) => (
                    r.state(),
                    r.envelope
                        .and_then(|e| e.request)
                        .map(|r| r.trace_id)
                        .unwrap_or_default(),
                ),
                None => (ExchangeState::Unspecified, String::new()),
            },
        )
    }

    /// Audits (and counts) a refusal that stored nothing.
    async fn audit_denial(&self, env: &ExchangeEnvelope, d: &Denial) -> Result<()> {
        let dataset = env
            .request
            .as_ref()
            .map(|r| r.dataset_id.as_str())
            .unwrap_or("");
        self.record_denial(d, &env.consumer, dataset);
        let mut e = exchange_entry("exchange_denied", &env.consumer, env);
        e.reason = format!("{}: {}", d.rule, d.detail);
        self.inner
            .store
            .write_grouped(move |_| Ok(((), vec![e.clone()])))
            .await
    }

    /// Accepts an exchange, then makes it durable and hands it to the dispatcher, all in a
    /// task of its own: a call cancelled half-way (client gone, gRPC deadline) cannot leave an
    /// accepted exchange that nothing delivers or expires.
    async fn accept_and_queue(
        &self,
        caller: Caller,
        req: ExchangeRequest,
        sync: bool,
        call_deadline_ms: Option<i64>,
    ) -> Result<(Accepted, Option<oneshot::Receiver<ExchangeResult>>)> {
        // Failed storage, or a disk below its reserve, takes nothing new; say why at once.
        self.inner.store.check_room()?;
        let me = self.clone();
        let started = now_ms();
        let mut req = req;
        if req.trace_id.is_empty() {
            // Assigned here, so that the span below already carries it.
            req.trace_id = new_trace_id();
        }
        let span = tracing::info_span!(
            "exchange",
            consumer = %caller.id,
            dataset = %req.dataset_id,
            trace_id = %req.trace_id,
            sync,
        );
        crate::telemetry::link_trace(&span, &req.trace_id);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut accepted = me.accept(&caller, req, sync, call_deadline_ms).await?;
                let mut rx = None;
                if let Accepted::New {
                    id,
                    dest,
                    dataset,
                    deadline_ms,
                    next_hop,
                    flushed,
                    ..
                } = &mut accepted
                {
                    if sync {
                        rx = Some(me.waiter(id));
                    }
                    let flushed = match flushed.take() {
                        Some(f) => f.wait().await,
                        None => me.inner.store.durable().await,
                    };
                    // Queue it whatever the flush said: it is in the store, and the next flush (or
                    // a restart's recovery) covers it. The caller learns of a failed flush and
                    // retries with its idempotency key.
                    me.enqueue(id, dest, dataset, *deadline_ms).await?;
                    if let Some(peer) = next_hop {
                        me.inner.fed.wake(peer);
                    }
                    me.record_stage("accept", now_ms() - started);
                    tracing::debug!(exchange = %id, dest = %dest, "accepted and queued");
                    flushed?;
                }
                Ok((accepted, rx))
            },
            span,
        ));
        // A write under way when storage fails may never return (see `store::Failure`): answer
        // UNAVAILABLE then rather than hang. Not success: it was not acknowledged durable (if
        // it is on disk after all, a retry with its idempotency key finds it).
        let mut failed = self.inner.store.failure_watch();
        tokio::select! {
            r = task => r.map_err(|e| BrokerError::internal(format!("accept task failed: {e}")))?,
            Ok(_) = failed.wait_for(Option::is_some) => Err(self
                .inner
                .store
                .check()
                .err()
                .unwrap_or_else(|| BrokerError::Unavailable("storage failed".into()))),
        }
    }

    /// Accepts an exchange durably and answers at once (async).
    pub async fn submit(&self, caller: Caller, req: ExchangeRequest) -> Result<SubmitResponse> {
        let (accepted, _) = self.accept_and_queue(caller, req, false, None).await?;
        Ok(match accepted {
            Accepted::Duplicate {
                id,
                trace_id,
                state,
            } => SubmitResponse {
                exchange_id: id,
                duplicate: true,
                state: state as i32,
                trace_id,
            },
            Accepted::New { id, trace_id, .. } => SubmitResponse {
                exchange_id: id,
                duplicate: false,
                state: ExchangeState::Queued as i32,
                trace_id,
            },
        })
    }

    async fn enqueue(&self, id: &str, dest: &str, dataset: &str, deadline_ms: i64) -> Result<()> {
        self.inner
            .cmd
            .send(Cmd::Enqueue {
                id: id.to_string(),
                dest: dest.to_string(),
                dataset: dataset.to_string(),
                deadline_ms,
            })
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))
    }

    /// Tells the dispatcher that a grant was revoked, so its queued exchanges end now.
    pub async fn grant_revoked(&self, grant_id: String) {
        let _ = self.inner.cmd.send(Cmd::GrantRevoked { grant_id }).await;
    }

    /// Accepts an exchange durably and waits for its end (sync); the result is released once returned.
    pub async fn request(
        &self,
        caller: Caller,
        req: ExchangeRequest,
        call_deadline_ms: Option<i64>,
    ) -> Result<ExchangeResult> {
        let consumer = caller.id.to_string();
        // End the exchange a little before the call's own deadline, so the caller hears how it
        // ended instead of a bare timeout.
        let call_deadline_ms = call_deadline_ms.map(|d| d.saturating_sub(SYNC_MARGIN_MS));
        let (accepted, rx) = self
            .accept_and_queue(caller, req, true, call_deadline_ms)
            .await?;
        let (id, deadline_ms) = match (accepted, rx) {
            (
                Accepted::New {
                    id, deadline_ms, ..
                },
                Some(rx),
            ) => {
                let result = self.await_waiter(&id, rx, deadline_ms).await?;
                return self.close_sync(&consumer, result).await;
            }
            (Accepted::New { .. }, None) => {
                return Err(BrokerError::internal("sync exchange without a waiter"))
            }
            (Accepted::Duplicate { id, .. }, _) => {
                let deadline = call_deadline_ms.unwrap_or_else(|| {
                    now_ms()
                        + i64::try_from(self.inner.cfg.default_sync_deadline_secs * 1000)
                            .unwrap_or(i64::MAX)
                });
                (id, deadline)
            }
        };
        // A retried Request: answer from the first exchange if it is still known.
        let rx = self.waiter(&id);
        match self.get_now(&consumer, &id)? {
            None => Err(BrokerError::AlreadyExists(format!(
                "exchange {id} with this idempotency key already ended and was released; use a new key"
            ))),
            Some((r, seq)) if record::is_final(r.state()) => {
                drop(rx);
                self.prune_waiters(&id);
                self.end_durable(seq).await?;
                self.close_sync(&consumer, r).await
            }
            Some(_) => {
                let result = self.await_waiter(&id, rx, deadline_ms).await?;
                self.close_sync(&consumer, result).await
            }
        }
    }

    /// Forgets the waiters of an exchange whose callers have gone, keeping the others.
    fn prune_waiters(&self, id: &str) {
        let mut w = lock(&self.inner.waiters);
        if let Some(list) = w.get_mut(id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(id);
            }
        }
    }

    fn waiter(&self, id: &str) -> oneshot::Receiver<ExchangeResult> {
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    async fn await_waiter(
        &self,
        id: &str,
        rx: oneshot::Receiver<ExchangeResult>,
        deadline_ms: i64,
    ) -> Result<ExchangeResult> {
        // A little past the exchange's own deadline, so that its expiry (not our timer) ends it.
        let wait = u64::try_from(deadline_ms.saturating_sub(now_ms()).max(0)).unwrap_or(0) + 250;
        let mut stopping = self.inner.stopping.clone();
        let outcome = tokio::select! {
            r = tokio::time::timeout(std::time::Duration::from_millis(wait), rx) => r,
            _ = stopping.wait_for(|s| *s) => {
                return Err(BrokerError::Unavailable(format!(
                    "the broker is shutting down; exchange {id} is kept: take its result with Get"
                )))
            }
        };
        match outcome {
            Ok(Ok(r)) => Ok(r),
            // Dropped: storage failed (its end could not be made durable; the exchange is kept
            // for after the restart), or the broker is stopping.
            Ok(Err(_)) => Err(self.inner.store.check().err().unwrap_or_else(|| {
                BrokerError::Unavailable(format!(
                    "the broker is shutting down; exchange {id} is kept: take its result with Get"
                ))
            })),
            Err(_) => {
                self.prune_waiters(id);
                Err(BrokerError::DeadlineExceeded(format!(
                    "exchange {id} did not end before its deadline; take its result with Get"
                )))
            }
        }
    }

    /// Ends a Request: releases its stored result and turns non-answers into statuses.
    async fn close_sync(&self, consumer: &str, result: ExchangeResult) -> Result<ExchangeResult> {
        // The release rides on the next shared flush instead of waiting for one of its own:
        // the caller has its answer now, and a crash before that flush at worst lets the
        // result show once more on Watch (with the same exchange id).
        self.release_now(consumer.to_string(), vec![result.exchange_id.clone()])
            .await?;
        if result.state() == ExchangeState::Answered {
            return Ok(result);
        }
        let err = result.error.clone().unwrap_or_default();
        let msg = format!("exchange {}: {}", result.exchange_id, err.message);
        Err(match tonic::Code::from_i32(err.code) {
            tonic::Code::PermissionDenied => BrokerError::PermissionDenied(msg),
            tonic::Code::ResourceExhausted => BrokerError::ResourceExhausted(msg),
            tonic::Code::DeadlineExceeded => BrokerError::DeadlineExceeded(msg),
            tonic::Code::NotFound => BrokerError::NotFound(msg),
            tonic::Code::InvalidArgument => BrokerError::InvalidArgument(msg),
            tonic::Code::FailedPrecondition => BrokerError::FailedPrecondition(msg),
            tonic::Code::Unavailable => BrokerError::Unavailable(msg),
            _ => BrokerError::FailedPrecondition(format!("{msg} (provider answered {})", err.code)),
        })
    }

    /// An exchange's result or state, if the caller is its consumer, with its result sequence
    /// number (0 while it has not ended); blocking.
    fn get_now(&self, consumer: &str, id: &str) -> Result<Option<(ExchangeResult, u64)>> {
        let Some(r) = self.inner.store.get::<StoredExchange>(T::Exchanges, id)? else {
            return Ok(None);
        };
        let env = r.envelope.clone().unwrap_or_default();
        if env.consumer != consumer {
            // Not found, rather than denied: others may not even learn that it exists.
            return Err(BrokerError::not_found(format!(
                "exchange {id} is not one of {consumer}'s"
            )));
        }
        let seq = r.result_seq;
        Ok(Some(match r.result {
            Some(res) => (res, seq),
            None => (pending_result(&r), seq),
        }))
    }

    /// Returns an exchange's state or result; with `wait`, holds until it ends or `deadline_ms`.
    pub async fn get(
        &self,
        caller: Caller,
        id: String,
        wait: bool,
        deadline_ms: i64,
    ) -> Result<ExchangeResult> {
        ids::check_opaque_id("exchange id", &id)?;
        let consumer = caller.id.to_string();
        let notify = self.notify_for(&consumer);
        // After a storage failure the store may hold ends that never reached the disk; showing
        // one could show an exchange answered twice (again after the restart).
        self.inner.store.check()?;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let me = self.clone();
            let (c, i) = (consumer.clone(), id.clone());
            let (r, seq) = store::blocking(move || me.get_now(&c, &i))
                .await?
                .ok_or_else(|| {
                    BrokerError::not_found(format!(
                        "exchange {id} is unknown here (never accepted, or already acknowledged)"
                    ))
                })?;
            if record::is_final(r.state()) {
                self.end_durable(seq).await?;
                return Ok(r);
            }
            if !wait {
                return Ok(r);
            }
            let left = deadline_ms.saturating_sub(now_ms());
            if left <= 0 {
                return Ok(r);
            }
            let mut stopping = self.inner.stopping.clone();
            tokio::select! {
                _ = tokio::time::timeout(std::time::Duration::from_millis(left as u64), notified) => {}
                _ = stopping.wait_for(|s| *s) => return Ok(r),
            }
        }
    }

    /// Releases ended exchanges the caller has taken, durably; answers how many were released.
    pub async fn ack(&self, consumer: String, ids: Vec<String>) -> Result<u32> {
        let release = self.release_write(consumer, ids)?;
        // Grouped with other releases and accepts: one transaction and flush for many.
        let intent = self.inner.store.durable_intent();
        let (n, flushed) = self
            .inner
            .store
            .write_grouped_durable(intent, release)
            .await?;
        if n > 0 {
            flushed.wait().await?;
        }
        Ok(n)
    }

    /// Releases ended exchanges without waiting for the flush that makes it durable.
    async fn release_now(&self, consumer: String, ids: Vec<String>) -> Result<u32> {
        let release = self.release_write(consumer, ids)?;
        // Grouped with other releases and accepts: one transaction for many.
        self.inner.store.write_grouped(release).await
    }

    /// The write that releases the caller's ended exchanges among `ids`, answering how many.
    fn release_write(
        &self,
        consumer: String,
        ids: Vec<String>,
    ) -> Result<impl Fn(&store::Tx<'_>) -> Result<(u32, Vec<AuditEntry>)> + Send + 'static> {
        if ids.len() > 1000 {
            return Err(BrokerError::invalid("at most 1000 exchange ids per Ack"));
        }
        for id in &ids {
            ids::check_opaque_id("exchange id", id)?;
        }
        // Refused up front after a storage failure, so that an Ack of nothing cannot succeed.
        self.inner.store.check()?;
        Ok(move |tx: &store::Tx<'_>| {
            let mut n = 0;
            for id in &ids {
                let Some(r) = tx.get::<record::ExchangeHead>(T::Exchanges, id)? else {
                    continue;
                };
                if r.consumer() != consumer {
                    return Err(BrokerError::not_found(format!(
                        "exchange {id} is not one of {consumer}'s"
                    )));
                }
                if !r.finished() {
                    continue;
                }
                tx.unmark(T::Results, &seq_key(&consumer, r.result_seq))?;
                tx.unmark(T::Exchanges, id.as_bytes())?;
                n += 1;
            }
            Ok((n, vec![]))
        })
    }

    /// Streams the caller's ended, unacknowledged exchanges: those waiting, then as they end,
    /// until the client goes away or `stop` fires.
    pub fn watch(
        &self,
        caller: Caller,
        dataset: String,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<mpsc::Receiver<std::result::Result<ExchangeResult, tonic::Status>>> {
        if !dataset.is_empty() {
            DatasetId::parse(&dataset)?;
        }
        // As for `get`: nothing that may not be durable is shown after a storage failure.
        self.inner.store.check()?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        let consumer = caller.id.to_string();
        tokio::spawn(async move {
            let notify = me.notify_for(&consumer);
            let mut cursor = 0u64;
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (m, c, ds) = (me.clone(), consumer.clone(), dataset.clone());
                let batch = store::blocking(move || {
                    m.inner.store.check()?;
                    m.results_after(&c, cursor, &ds, 256)
                })
                .await;
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let full = batch.len() == 256;
                // Ends not yet durable wait for their flush, whose completion wakes this loop
                // (`finished`); results are in sequence order, so the rest wait with them.
                let shown = me.durable_results();
                let held = batch.iter().any(|(seq, _)| *seq > shown);
                for (seq, r) in batch {
                    if seq > shown {
                        break;
                    }
                    cursor = seq;
                    tokio::select! {
                        sent = tx.send(Ok(r)) => if sent.is_err() { return },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                if full && !held {
                    continue;
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tx.closed() => return,
                    _ = stop.changed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// Ended exchanges of a consumer after a results cursor (blocking).
    fn results_after(
        &self,
        consumer: &str,
        cursor: u64,
        dataset: &str,
        max: usize,
    ) -> Result<Vec<(u64, ExchangeResult)>> {
        let store = &self.inner.store;
        let prefix = index_key(consumer, "");
        let start = seq_key(consumer, cursor.saturating_add(1));
        let mut out = Vec::new();
        for kv in store.tree(T::Results).range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = k[prefix.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| BrokerError::internal("results key is malformed"))?;
            let id = String::from_utf8_lossy(&v).into_owned();
            if let Some(r) = store.get::<StoredExchange>(T::Exchanges, &id)? {
                if let Some(res) = r.result {
                    if dataset.is_empty() || res.dataset_id == dataset {
                        out.push((seq, res));
                    }
                }
            }
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }

    /// Connects a provider instance; returns the stream the broker pushes requests on.
    pub async fn connect_provider(&self, spec: InstanceSpec) -> Result<u64> {
        // Nothing can be delivered until a restart; the provider should retry then.
        self.inner.store.check()?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Connect { spec, reply: tx })
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        rx.await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))
    }

    /// Passes a command from a provider's stream to the dispatcher.
    pub(crate) async fn send(&self, cmd: Cmd) -> Result<()> {
        self.inner
            .cmd
            .send(cmd)
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))
    }

    /// Lists dead letters, newest first (blocking).
    pub fn dead_letters(
        &self,
        dataset: &str,
        page: u32,
        token: &str,
    ) -> Result<ListDeadLettersResponse> {
        if !dataset.is_empty() {
            DatasetId::parse(dataset)?;
        }
        let size = crate::registry::page_size(page, 100, 1000);
        let tree = self.inner.store.tree(T::DeadLetters);
        let iter: Box<
            dyn Iterator<Item = crate::kv::Result<(crate::kv::Value, crate::kv::Value)>>,
        > = if token.is_empty() {
            Box::new(tree.iter().rev())
        } else {
            Box::new(tree.range(..token.as_bytes().to_vec()).rev())
        };
        let mut out = Vec::new();
        let mut next = String::new();
        for kv in iter {
            let (k, v) = kv?;
            let d = DeadLetter::decode(v.as_ref())?;
            let ds = d
                .exchange
                .as_ref()
                .and_then(|e| e.request.as_ref())
                .map(|r| r.dataset_id.as_str())
                .unwrap_or("");
            if !dataset.is_empty() && ds != dataset {
                continue;
            }
            if out.len() == size {
                next = String::from_utf8_lossy(&k).into_owned();
                // The token is exclusive from above: the next page starts below the last shown.
                next = out
                    .last()
                    .and_then(|d: &DeadLetter| d.exchange.as_ref().map(|e| e.exchange_id.clone()))
                    .unwrap_or(next);
                break;
            }
            out.push(d);
        }
        Ok(ListDeadLettersResponse {
            dead_letters: out,
            next_page_token: next,
        })
    }

    /// Puts a dead letter back on its queue.
    pub async fn replay(&self, admin: &Caller, id: String) -> Result<()> {
        ids::check_opaque_id("exchange id", &id)?;
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Replay {
            id,
            actor: admin.id.to_string(),
            reply: tx,
        })
        .await?;
        let r = rx
            .await
            .map_err(|_| BrokerError::Unavailable("the broker is shutting down".into()))?;
        r?;
        self.inner.store.durable().await
    }

    /// Deletes dead letters (all, or one dataset's); answers how many.
    pub async fn purge(&self, admin: &Caller, dataset: String) -> Result<u64> {
        if !dataset.is_empty() {
            DatasetId::parse(&dataset)?;
        }
        let store = self.inner.store.clone();
        let actor = admin.id.to_string();
        let n = store::blocking(move || {
            let mut ids = Vec::new();
            for kv in store.tree(T::DeadLetters).iter() {
                let (k, v) = kv?;
                let d = DeadLetter::decode(v.as_ref())?;
                let ds = d
                    .exchange
                    .as_ref()
                    .and_then(|e| e.request.as_ref())
                    .map(|r| r.dataset_id.clone())
                    .unwrap_or_default();
                if dataset.is_empty() || ds == dataset {
                    ids.push(k.to_vec());
                }
            }
            let n = ids.len() as u64;
            store.write(|tx| {
                for k in &ids {
                    tx.unmark(T::DeadLetters, k)?;
                }
                let mut e = audit::entry("dead_letters_purged", &actor);
                e.dataset_id = dataset.clone();
                e.reason = format!("{n} purged");
                Ok(((), vec![e]))
            })?;
            Ok(n)
        })
        .await?;
        self.inner.store.durable().await?;
        Ok(n)
    }

    /// How many dead letters there are.
    pub fn dead_letter_count(&self) -> usize {
        self.inner.store.tree(T::DeadLetters).len()
    }
}

/// The view of an exchange that has not ended.
pub(crate) fn pending_result(r: &StoredExchange) -> ExchangeResult {
    let env = r.envelope.clone().unwrap_or_default();
    let req = env.request.clone().unwrap_or_default();
    ExchangeResult {
        exchange_id: env.exchange_id,
        state: r.state,
        dataset_id: req.dataset_id,
        grant_id: req.grant_id,
        trace_id: req.trace_id,
        accepted_at: env.accepted_at,
        trail: env.trail,
        ..Default::default()
    }
}

/// A message for a provider's stream.
pub type ProviderTx = mpsc::Sender<std::result::Result<BrokerMessage, tonic::Status>>;

#[cfg(test)]
mod tests {
    use super::may_be_on;

    // Entries written before the index named the dataset are empty: their grant is read, so
    // that a data dir from before still finds its grants.
    #[test]
    fn a_grant_index_entry_is_skipped_only_when_it_names_another_dataset() {
        assert!(may_be_on(
            b"330000/hrss/pension-status",
            "330000/hrss/pension-status"
        ));
        assert!(
            may_be_on(b"", "330000/hrss/pension-status"),
            "written before"
        );
        assert!(!may_be_on(
            b"330000/hrss/death-record",
            "330000/hrss/pension-status"
        ));
        assert!(!may_be_on(
            b"330000/hrss/pension",
            "330000/hrss/pension-status"
        ));
    }
}
