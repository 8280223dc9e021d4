//! The dispatcher: one thread that owns the in-memory queues, provider instances and
//! deliveries, pushes exchanges to providers under their credit, and ends every exchange
//! exactly once (answered, failed, denied, expired or dead-lettered).

use super::deadlines::Deadlines;
use super::enforce::{self, Denial};
use super::record::StoredExchange;
use super::{exchange_entry, Engine, ProviderTx};
use crate::error::{BrokerError, Result};
use crate::store::{seq_key, T};
use crate::time::{ms, now_ms, ts};
use govshare_proto::v1::{
    broker_message, BrokerMessage, DeadLetter, ErrorStatus, ExchangeEnvelope, ExchangeRequest,
    ExchangeResult, ExchangeState, Grant, ProviderAnswer, ProviderRequest, Query, ServeHeartbeat,
    ServeReady,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// How often the dispatcher looks for expired exchanges and overdue deliveries.
const TICK_MS: u64 = 100;
/// How often idle provider streams get a heartbeat.
const HEARTBEAT_MS: i64 = 15_000;
/// How often expired idempotency keys are swept.
const DEDUP_SWEEP_MS: i64 = 60_000;
/// Most commands handled before pending notifications are flushed together.
const BATCH: usize = 256;

/// A provider instance asking to serve.
#[derive(Debug)]
pub struct InstanceSpec {
    /// The provider node.
    pub node: String,
    /// Datasets served; empty means all of the node's.
    pub datasets: Vec<String>,
    /// Requests it can hold at once.
    pub max_in_flight: u32,
    /// Its label, for logs.
    pub label: String,
    /// Where the broker's messages to it go.
    pub tx: ProviderTx,
}

/// What the dispatcher is asked to do.
#[derive(Debug)]
pub enum Cmd {
    /// A durable exchange to queue.
    Enqueue {
        /// Exchange id.
        id: String,
        /// Destination (provider node).
        dest: String,
        /// Dataset.
        dataset: String,
        /// Deadline, Unix ms.
        deadline_ms: i64,
    },
    /// A provider instance connected.
    Connect {
        /// The instance.
        spec: InstanceSpec,
        /// Its id, once registered.
        reply: oneshot::Sender<u64>,
    },
    /// More credit for an instance.
    Credit {
        /// The instance.
        instance: u64,
        /// How much more.
        add: u32,
    },
    /// An instance answered a delivery.
    Answer {
        /// The instance.
        instance: u64,
        /// The answer.
        answer: ProviderAnswer,
        /// Says that the end it brings is on its way to a flush (see `Store::durable_intent`).
        intent: crate::store::Intent,
    },
    /// An instance went away.
    Disconnect {
        /// The instance.
        instance: u64,
    },
    /// Put a dead letter back on its queue.
    Replay {
        /// Exchange id.
        id: String,
        /// The admin asking.
        actor: String,
        /// The outcome.
        reply: oneshot::Sender<Result<()>>,
    },
    /// A grant was revoked: end its queued exchanges now, as denied.
    GrantRevoked {
        /// The grant.
        grant_id: String,
    },
    /// An exchange of a local consumer came back from another broker with its outcome.
    Remote {
        /// The outcome, as the provider's home broker shaped it.
        result: ExchangeResult,
        /// Answered once the outcome is durable (dropped if it could not be stored).
        done: oneshot::Sender<()>,
        /// Says that the end it brings is on its way to a flush (see `Store::durable_intent`).
        intent: crate::store::Intent,
    },
    /// Stop.
    Shutdown,
}

/// An exchange found in the durable queue at start.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Exchange id (the very string the dispatcher then keeps: a million queued exchanges
    /// are a million of them).
    pub id: Id,
    /// Destination and dataset (one lane shared by every exchange queued under them).
    pub lane: Arc<Lane>,
    /// Deadline, Unix ms.
    pub deadline_ms: i64,
    /// Stored size.
    pub bytes: u64,
    /// Its place in the queue (see [`StoredExchange::queue_seq`]).
    pub queue_seq: u64,
}

/// Reads the queued exchanges from their records, in queue order: everything not ended goes
/// back to be delivered, including what was in flight when the broker stopped.
/// `window_ms` is the idempotency window (see [`repair`]).
pub fn recover(store: &crate::store::Store, window_ms: i64) -> Result<Vec<Recovered>> {
    store.tree(T::InFlight).clear()?;
    // Until 2026-11-29 a queued exchange also had an entry in the `queue` tree, which said
    // nothing its record does not (destination, queue seq) and cost ~130 bytes of index each.
    let old_queue = store.tree(T::Queue);
    if !old_queue.is_empty() {
        old_queue.clear()?;
    }
    let digested = digest_dedup_keys(store)?;
    if digested > 0 {
        tracing::info!(
            keys = digested,
            "idempotency keys rewritten in their compact form"
        );
    }
    if store.unclean_start() {
        // The check reads every record anyway, so it finds the queued exchanges too.
        let (queued, fixed) = repair(store, window_ms)?;
        if fixed.any() {
            tracing::warn!(
                ?fixed,
                "repaired exchange indexes left half-written by the last run"
            );
        } else {
            tracing::info!("exchange indexes checked: consistent");
        }
        return Ok(queued);
    }
    let exchanges = store.tree(T::Exchanges);
    // Sized for every record (ended ones not yet acknowledged included): at a million queued,
    // doubling as it grows would leave up to 48 MB unused.
    let mut out = Vec::with_capacity(exchanges.len());
    let mut lanes = Lanes::default();
    for kv in exchanges.iter() {
        let (id, v) = kv?;
        let rec = super::record::QueuedHead::decode(v.as_ref())?;
        if rec.finished() {
            continue;
        }
        out.push(Recovered {
            id: String::from_utf8_lossy(&id).into(),
            lane: lanes.get(&rec.dest, rec.dataset()),
            deadline_ms: rec.envelope.as_ref().map_or(0, |e| ms(&e.deadline)),
            bytes: rec.bytes,
            queue_seq: rec.queue_seq,
        });
    }
    // The queue's order (one counter for every destination, so each keeps its own order),
    // sorted in place: a second list would be 40 MB more at a million queued.
    out.sort_unstable_by_key(|r| r.queue_seq);
    Ok(out)
}

/// Rewrites the idempotency keys of a data dir written before 2026-11-29 (consumer ‖ 0 ‖ key)
/// as [`dedup_key`]s, which are what accepts look up; answers how many.
fn digest_dedup_keys(store: &crate::store::Store) -> Result<u64> {
    let dedup = store.tree(T::Dedup);
    let mut n = 0;
    // Digested keys sort last (they start with 0xFF) and hop marks together, so only the old
    // keys are read: a start does not step through a day's worth of keys to find none.
    use super::record::{DEDUP_HASHED, HOP_MARKS_END, HOP_MARK_PREFIX};
    let last: &[u8] = &[DEDUP_HASHED];
    for kv in dedup
        .range(..HOP_MARK_PREFIX)
        .chain(dedup.range(HOP_MARKS_END..last))
    {
        let (k, v) = kv?;
        if let Some(digested) = super::record::undigested_dedup_key(&k) {
            dedup.insert(digested, v)?;
            dedup.remove(&k)?;
            n += 1;
        }
    }
    Ok(n)
}

/// An exchange id, or a destination's or dataset's name, as the dispatcher holds it: one
/// allocation shared by every index that names it (the queue, the pending map, the
/// deadlines), where a `String` in each would be a copy each.
pub type Id = Arc<str>;

/// What [`repair`] put right.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Result entries restored for exchanges that had ended (else Watch never shows them).
    pub results: u64,
    /// Idempotency keys restored (else a retried submit would make a second exchange).
    pub keys: u64,
    /// Result entries removed that no record (or a different one) stands behind.
    pub stale: u64,
}

impl Repaired {
    fn any(&self) -> bool {
        *self != Repaired::default()
    }
}

/// Makes the exchange indexes agree with the exchange records, which are the truth (blocking;
/// at start, before anything else touches them), and answers the exchanges to queue again, in
/// queue order, as [`recover`] does. Needed after an unclean stop of a data dir converted from
/// sled (the storage before 2026-11-29), which applied a transaction tree by tree: a write
/// failing half-way (a full disk) could leave the earlier trees written and not the later
/// ones, e.g. an exchange ended in the `exchanges` tree with no entry in `results`, which no
/// Watch would ever show. (The log since writes a transaction as one frame.) Idempotency keys
/// are restored for exchanges accepted within `window_ms`. Reads the records once, in order.
pub fn repair(store: &crate::store::Store, window_ms: i64) -> Result<(Vec<Recovered>, Repaired)> {
    let mut fixed = Repaired::default();
    let now = now_ms();
    let (results, dedup) = (store.tree(T::Results), store.tree(T::Dedup));
    let exchanges = store.tree(T::Exchanges);
    let mut out = Vec::with_capacity(exchanges.len());
    let mut lanes = Lanes::default();
    for kv in exchanges.iter() {
        let (k, v) = kv?;
        let id = k.as_ref();
        let rec = StoredExchange::decode(v.as_ref())?;
        let env = rec.envelope.clone().unwrap_or_default();
        if rec.finished() {
            if rec.result.is_some() {
                let key = seq_key(&env.consumer, rec.result_seq);
                if results.get(&key)?.as_deref() != Some(id) {
                    results.insert(key, id)?;
                    fixed.results += 1;
                }
            }
        } else {
            out.push(Recovered {
                id: String::from_utf8_lossy(id).into(),
                lane: lanes.get(
                    &rec.dest,
                    env.request.as_ref().map_or("", |r| r.dataset_id.as_str()),
                ),
                deadline_ms: ms(&env.deadline),
                bytes: rec.bytes,
                queue_seq: rec.queue_seq,
            });
        }
        let idem = env.request.as_ref().map(|r| r.idempotency_key.as_str());
        if let Some(idem) = idem.filter(|k| !k.is_empty()) {
            let key = super::record::dedup_key(&env.consumer, idem);
            let at_ms = ms(&env.accepted_at);
            let local = env.origin_broker == store.broker_id();
            if local && now - at_ms <= window_ms && !dedup.contains_key(&key)? {
                let d = super::record::DedupRecord {
                    exchange_id: String::from_utf8_lossy(id).into_owned(),
                    at_ms,
                    deadline_ms: 0,
                };
                dedup.insert(key, d.encode_to_vec())?;
                fixed.keys += 1;
            }
        }
    }
    fixed.stale += drop_stale(store, T::Results, |r, seq| {
        r.finished() && r.result.is_some() && r.result_seq == seq
    })?;
    store.flush_blocking()?;
    // The queue's order (one counter for every destination, so each keeps its own order).
    out.sort_unstable_by_key(|r| r.queue_seq);
    Ok((out, fixed))
}

/// The sequence number at the end of an `owner ‖ 0 ‖ seq` key (0 if it is malformed).
fn key_seq(k: &[u8]) -> u64 {
    k.len()
        .checked_sub(8)
        .and_then(|at| k[at..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Removes the entries of `t` (owner ‖ 0 ‖ seq → exchange id) whose record does not `hold`
/// them; answers how many.
fn drop_stale(
    store: &crate::store::Store,
    t: T,
    holds: impl Fn(&StoredExchange, u64) -> bool,
) -> Result<u64> {
    let mut n = 0;
    let tree = store.tree(t);
    for kv in tree.iter() {
        let (k, id) = kv?;
        let seq = key_seq(&k);
        let rec = store.get::<StoredExchange>(T::Exchanges, &String::from_utf8_lossy(&id))?;
        if !rec.is_some_and(|r| holds(&r, seq)) {
            tree.remove(&k)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Starts the dispatcher thread, once it holds every recovered exchange: the broker reports
/// itself started (and healthy) only when it can deliver what it recovered, and a recovery's
/// time and memory are the start's, not those of whatever comes next.
pub fn spawn(
    engine: Engine,
    rx: mpsc::Receiver<Cmd>,
    recovered: Vec<Recovered>,
) -> Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BrokerError::internal(format!("cannot start the dispatcher runtime: {e}")))?;
    // Here, not on the new thread: the memory it frees (the recovered list) stays resident
    // until the thread that freed it allocates again, and the dispatcher thread is idle until
    // a provider connects, while this one goes on to start the server.
    let mut actor = Actor::new(engine);
    actor.take_over(recovered);
    std::thread::Builder::new()
        .name("govshare-dispatch".into())
        .spawn(move || rt.block_on(actor.run(rx)))
        .map_err(|e| BrokerError::internal(format!("cannot start the dispatcher thread: {e}")))
}

#[derive(Debug, Default)]
struct DestQ {
    /// Per dataset, exchange ids in order. Ids that ended meanwhile are skipped lazily.
    queues: BTreeMap<Id, VecDeque<Id>>,
    /// Rotates which dataset goes first, so one busy dataset cannot starve another.
    turn: usize,
}

#[derive(Debug)]
struct Inst {
    node: String,
    datasets: HashSet<String>,
    credit: u32,
    /// The in-flight limit it asked for; this many stale deliveries mean it has hung.
    max: u32,
    tx: ProviderTx,
    label: String,
    /// Deliveries taken back from it (ack wait passed); its late answers only return credit.
    stale: HashSet<String>,
}

impl Inst {
    fn serves(&self, dataset: &str) -> bool {
        self.datasets.is_empty() || self.datasets.contains(dataset)
    }
}

#[derive(Debug)]
struct Delivery {
    exchange_id: String,
    instance: u64,
    ack_deadline_ms: i64,
    /// When it was handed over, Unix ms (for the provider-time metric).
    since_ms: i64,
}

/// What writing an end leaves to do: (consumer, destination, bytes, result, sync, the link a
/// remote consumer's result leaves through); `None` when the exchange had ended already.
type Released = Option<(String, String, u64, ExchangeResult, bool, Option<String>)>;

/// An end decided but not yet written.
struct Ending {
    id: String,
    end: End,
    result_seq: u64,
    back: Option<crate::federation::Route>,
    /// Its dispatcher entry, put back if the write fails.
    pending: Option<Pending>,
    /// When it ended, Unix ms.
    at_ms: i64,
    /// This broker's hop number, from the record as the end was decided.
    hop: Option<u32>,
    /// This broker's receipt for the end, signed by [`Actor::commit`] before the batch's
    /// transaction: signed inside it, a batch of ends held the store's writer (and every
    /// accept waiting to write) for about 20 µs per end.
    receipt: Option<govshare_proto::v1::HopReceipt>,
}

/// This broker's hop number in a trail (0 at the consumer's home broker).
fn own_hop(trail: &[govshare_proto::v1::HopReceipt], broker: &str) -> u32 {
    trail
        .iter()
        .find(|r| r.broker == broker)
        .or(trail.last())
        .map_or(0, |r| r.hop)
}

/// A delivery decided but not yet written; its request goes out once it is.
struct Staged {
    id: String,
    rec: StoredExchange,
    in_flight: super::record::InFlight,
    audit: govshare_proto::v1::AuditEntry,
    permit: mpsc::OwnedPermit<std::result::Result<BrokerMessage, tonic::Status>>,
    msg: BrokerMessage,
    instance: u64,
    delivery_id: String,
}

/// Whether a deadline's entry is still that of an exchange in the dispatcher's hands: the
/// entries of ended exchanges stay in [`Deadlines`] until they come up.
fn live_under(pending: &HashMap<Id, Pending>) -> impl Fn(i64, &str) -> bool + '_ {
    |dl, id| pending.get(id).is_some_and(|p| p.deadline_ms == dl)
}

/// An exchange in the dispatcher's hands (queued or delivered): one per queued exchange, so
/// kept small (see [`Id`]).
#[derive(Debug)]
struct Pending {
    /// Shared by every exchange queued under the same destination and dataset: 8 bytes
    /// where two names took 32.
    lane: Arc<Lane>,
    deadline_ms: i64,
}

/// A destination and a dataset: what an exchange is queued under.
#[derive(Debug)]
pub struct Lane {
    /// The destination (provider node, or next-hop broker).
    pub dest: Id,
    /// The dataset.
    pub dataset: Id,
}

/// Every lane in use, each held once, found by its names.
#[derive(Debug, Default)]
struct Lanes(HashMap<Id, HashMap<Id, Arc<Lane>>>);

impl Lanes {
    fn get(&mut self, dest: &str, dataset: &str) -> Arc<Lane> {
        if let Some(l) = self.0.get(dest).and_then(|m| m.get(dataset)) {
            return l.clone();
        }
        let lane = Arc::new(Lane {
            dest: dest.into(),
            dataset: dataset.into(),
        });
        self.0
            .entry(lane.dest.clone())
            .or_default()
            .insert(lane.dataset.clone(), lane.clone());
        lane
    }
}

/// How an exchange ends.
struct End {
    state: ExchangeState,
    /// The rule, for denials.
    rule: Option<Denial>,
    code: i32,
    message: String,
    decision: &'static str,
    dead_letter: Option<String>,
    rows: Vec<govshare_proto::v1::Row>,
    masked: Vec<String>,
    dropped: Vec<String>,
    truncated: bool,
    /// The hop trail so far, when it came back from other brokers (else the envelope's).
    trail: Option<Vec<govshare_proto::v1::HopReceipt>>,
}

impl End {
    fn error(
        state: ExchangeState,
        code: tonic::Code,
        message: String,
        decision: &'static str,
    ) -> Self {
        Self {
            state,
            rule: None,
            code: code as i32,
            message,
            decision,
            dead_letter: None,
            rows: Vec::new(),
            masked: Vec::new(),
            dropped: Vec::new(),
            truncated: false,
            trail: None,
        }
    }

    fn denied(d: &Denial) -> Self {
        let mut e = Self::error(
            ExchangeState::Denied,
            tonic::Code::PermissionDenied,
            format!("denied by rule {}: {}", d.rule, d.detail),
            "exchange_denied",
        );
        e.code = d.code();
        e.rule = Some(d.clone());
        e
    }
}

struct Actor {
    engine: Engine,
    dests: HashMap<String, DestQ>,
    instances: BTreeMap<u64, Inst>,
    next_instance: u64,
    /// Rotates which instance gets the next delivery.
    instance_turn: u64,
    deliveries: HashMap<String, Delivery>,
    pending: HashMap<Id, Pending>,
    /// The delivery id of each pending exchange in a provider's hands. Apart from `pending`,
    /// whose entries (a million for a million queued) it would otherwise make half as big again.
    delivered: HashMap<Id, Box<str>>,
    deadlines: Deadlines,
    /// The lanes [`Pending`] and the queues share.
    lanes: Lanes,
    /// Ended exchanges whose consumers are told after the next shared flush.
    done: Vec<(String, ExchangeResult, bool)>,
    /// Links whose outboxes got results, woken after the next shared flush.
    wake: BTreeSet<String>,
    /// Deliveries decided in this batch, written together by [`Actor::commit`] before their
    /// requests go out: one transaction for many deliveries instead of one each.
    staged: Vec<Staged>,
    /// Ends decided in this batch, written together by [`Actor::commit`].
    ending: Vec<Ending>,
    /// Told once this batch's ends are written and flushed (links waiting to acknowledge).
    after_commit: Vec<oneshot::Sender<()>>,
    /// Told after the next shared flush.
    after_flush: Vec<oneshot::Sender<()>>,
    /// Answers of this batch, on their way to its flush: a flush waits for them.
    coming: Vec<crate::store::Intent>,
    /// The highest result sequence number of the ends written since the last flush was
    /// asked for: durable once that flush is (see `Engine::results_durable_upto`).
    written_seq: u64,
    last_heartbeat: i64,
    last_sweep: i64,
}

impl Actor {
    fn new(engine: Engine) -> Self {
        Self {
            engine,
            dests: HashMap::new(),
            instances: BTreeMap::new(),
            next_instance: 1,
            instance_turn: 0,
            deliveries: HashMap::new(),
            pending: HashMap::new(),
            delivered: HashMap::new(),
            deadlines: Deadlines::default(),
            lanes: Lanes::default(),
            done: Vec::new(),
            wake: BTreeSet::new(),
            staged: Vec::new(),
            ending: Vec::new(),
            after_commit: Vec::new(),
            after_flush: Vec::new(),
            coming: Vec::new(),
            written_seq: 0,
            last_heartbeat: now_ms(),
            last_sweep: now_ms(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if !self.handle(cmd) { break }
                    // Take whatever else is waiting, so one flush covers the whole batch.
                    let mut n = 1;
                    let mut stop = false;
                    while n < BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => { n += 1; if !self.handle(cmd) { stop = true; break } }
                            Err(_) => break,
                        }
                    }
                    self.commit();
                    self.flush_done();
                    if stop { break }
                }
                _ = tick.tick() => {
                    self.tick();
                    self.commit();
                    self.flush_done();
                }
            }
            // The tasks `flush_done` spawns (telling consumers and waiting Requests once their
            // ends are durable) run on this thread's runtime, which polls them only when this
            // loop gives way. Receiving gives way only every 128 commands (tokio's budget);
            // under a steady stream of answers that is 128 batches, each with its own
            // transaction, and results reached consumers seconds late, in bursts.
            tokio::task::yield_now().await;
        }
        self.commit();
        self.flush_done();
        // Let the last notifications go out before the runtime is dropped.
        tokio::task::yield_now().await;
    }

    /// Tells consumers (and waiting Requests) about ended exchanges once they are durable.
    fn flush_done(&mut self) {
        // With nothing to flush, the answers of the batch are no longer on their way.
        let coming = std::mem::take(&mut self.coming);
        if self.done.is_empty() && self.wake.is_empty() && self.after_flush.is_empty() {
            return;
        }
        let done = std::mem::take(&mut self.done);
        let wake = std::mem::take(&mut self.wake);
        let after_flush = std::mem::take(&mut self.after_flush);
        let written_seq = std::mem::take(&mut self.written_seq);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let flushed = engine.store().durable_for(coming).await;
            match &flushed {
                Ok(()) => {
                    // Before anyone is told: Get and Watch may show these ends from now on.
                    engine.results_durable_upto(written_seq);
                    for d in after_flush {
                        let _ = d.send(());
                    }
                }
                Err(e) => {
                    // Dropping `after_flush` makes the waiting links resend their results.
                    // Consumers are not told of ends that may not be on disk: a restart would
                    // deliver those exchanges again, and they would be answered twice. Storage
                    // that fails to flush stays failed until the restart (`store::Failure`).
                    tracing::warn!(error = %e, "flush failed; the ends of this batch are told after the restart");
                    for (_, result, _) in &done {
                        engine.abandon_waiters(&result.exchange_id);
                    }
                    return;
                }
            }
            for (consumer, result, sync) in done {
                engine.finished(&consumer, result, sync);
            }
            for peer in wake {
                engine.fed().wake(&peer);
            }
        });
    }

    /// Ends an exchange of a local consumer with the outcome that came back over a link. The
    /// grant is checked once more here (fail closed): a revocation that arrived first wins.
    fn remote(&mut self, result: ExchangeResult, done: oneshot::Sender<()>) {
        let id = result.exchange_id.clone();
        // A read that fails is not an exchange that is gone: acknowledging it would let the
        // link drop a result that was never kept. Dropping `done` makes the link resend it.
        let rec = match self.engine.store().get::<StoredExchange>(T::Exchanges, &id) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                let _ = done.send(()); // acknowledged and gone: nothing to keep
                return;
            }
            Err(e) => {
                tracing::error!(exchange = %id, error = %e, "cannot read exchange; its result will be sent again");
                return;
            }
        };
        let ours = rec.envelope.as_ref().map(|e| e.origin_broker.as_str())
            == Some(self.engine.store().broker_id());
        let req = rec
            .envelope
            .as_ref()
            .and_then(|e| e.request.clone())
            .unwrap_or_default();
        if rec.finished() {
            // Ended already (an earlier copy of this result, resent): its end may still be on
            // its way to the disk, and the link lets go of the result once told.
            self.after_flush.push(done);
            return;
        }
        if !ours || req.dataset_id != result.dataset_id {
            let _ = done.send(());
            return;
        }
        let state = result.state();
        let mut end = match state {
            ExchangeState::Answered => match self.recheck(&rec) {
                Err(d) => End::denied(&d),
                Ok(grant) => End {
                    state,
                    rule: None,
                    code: 0,
                    message: String::new(),
                    decision: "exchange_answered",
                    dead_letter: None,
                    // Cut again here to the grant's fields: a result from another broker
                    // carries nothing the consumer was not granted.
                    rows: result
                        .rows
                        .into_iter()
                        .map(|mut r| {
                            r.fields.retain(|k, _| grant.fields.contains(k));
                            r
                        })
                        .collect(),
                    masked: result.masked_fields,
                    dropped: result.dropped_fields,
                    truncated: result.truncated,
                    trail: None,
                },
            },
            other => {
                let (decision, fallback) = match other {
                    ExchangeState::Denied => ("exchange_denied", tonic::Code::PermissionDenied),
                    ExchangeState::Expired => ("exchange_expired", tonic::Code::DeadlineExceeded),
                    _ => ("exchange_failed", tonic::Code::Unknown),
                };
                let err = result.error.clone().unwrap_or_default();
                let shown = match other {
                    ExchangeState::Denied | ExchangeState::Expired => other,
                    _ => ExchangeState::Failed,
                };
                let mut e = End::error(shown, fallback, err.message, decision);
                if err.code != 0 {
                    e.code = err.code;
                }
                e
            }
        };
        end.trail = Some(result.trail);
        self.end(&id, end);
        if self.ending.iter().any(|e| e.id == id) {
            self.after_commit.push(done);
        } // else: not staged (storage trouble); dropping `done` makes the link resend it
    }

    /// Handles one command; false means stop.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Enqueue {
                id,
                dest,
                dataset,
                deadline_ms,
            } => {
                self.queue(id.into(), &dest, &dataset, deadline_ms, false);
                self.dispatch(&dest);
            }
            Cmd::Connect { spec, reply } => {
                let id = self.next_instance;
                self.next_instance += 1;
                let ready = BrokerMessage {
                    body: Some(broker_message::Body::Ready(ServeReady {
                        dataset_ids: spec.datasets.clone(),
                        broker_id: self.engine.store().broker_id().to_string(),
                    })),
                };
                if spec.tx.try_send(Ok(ready)).is_err() {
                    return true;
                }
                tracing::info!(node = %spec.node, instance = id, label = %spec.label, credit = spec.max_in_flight, "provider connected");
                let dest = spec.node.clone();
                self.instances.insert(
                    id,
                    Inst {
                        node: spec.node,
                        datasets: spec.datasets.into_iter().collect(),
                        credit: spec.max_in_flight,
                        max: spec.max_in_flight,
                        tx: spec.tx,
                        label: spec.label,
                        stale: HashSet::new(),
                    },
                );
                let _ = reply.send(id);
                self.engine.set_providers(self.instances.len());
                self.dispatch(&dest);
            }
            Cmd::Credit { instance, add } => {
                if let Some(inst) = self.instances.get_mut(&instance) {
                    inst.credit = inst.credit.saturating_add(add).min(100_000);
                    let dest = inst.node.clone();
                    self.dispatch(&dest);
                }
            }
            Cmd::Answer {
                instance,
                answer,
                intent,
            } => {
                self.coming.push(intent);
                self.answer(instance, answer)
            }
            Cmd::Disconnect { instance } => self.disconnect(instance),
            Cmd::Replay { id, actor, reply } => {
                let r = self.replay(&id, &actor);
                let _ = reply.send(r);
            }
            Cmd::GrantRevoked { grant_id } => self.revoked(&grant_id),
            Cmd::Remote {
                result,
                done,
                intent,
            } => {
                self.coming.push(intent);
                self.remote(result, done)
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    /// Adds an exchange to its queue (at the back, or the front when it is being retried).
    fn queue(&mut self, id: Id, dest: &str, dataset: &str, deadline_ms: i64, front: bool) {
        let lane = self.lanes.get(dest, dataset);
        let id = match self.pending.get_key_value(&id) {
            Some(_) if !front => return, // already queued
            // The id the other indexes hold already, not a second copy.
            Some((held, _)) => held.clone(),
            None => {
                self.deadlines.push(deadline_ms, id.clone());
                let p = Pending {
                    lane: lane.clone(),
                    deadline_ms,
                };
                self.pending.insert(id.clone(), p);
                id
            }
        };
        self.lane_queue(&lane, id, front);
    }

    /// Puts an id in its lane's queue (nothing else).
    fn lane_queue(&mut self, lane: &Lane, id: Id, front: bool) {
        if !self.dests.contains_key(&*lane.dest) {
            self.dests.insert(lane.dest.to_string(), DestQ::default());
        }
        let Some(dq) = self.dests.get_mut(&*lane.dest) else {
            return;
        };
        let q = dq.queues.entry(lane.dataset.clone()).or_default();
        if front {
            q.push_front(id);
        } else {
            q.push_back(id);
        }
    }

    /// Queues what [`recover`] found, in its order, before anything else reaches the
    /// dispatcher. It does what [`Actor::queue`] does for each, in an order that keeps the
    /// peak low at a million queued. Memory freed meanwhile is returned to the system only
    /// some time later (mimalloc's purge delay), so what is allocated at all counts, not only
    /// what is kept. The pending map and each lane's queue are sized once (grown by doubling,
    /// each would briefly need its old table and its new one: 16 MB more for a lane of a
    /// million); the list's memory is given back as it empties (48 MB at a million, which
    /// otherwise stays until its last entry is in); and the deadlines are built in place,
    /// without sorting (see [`Deadlines`]), once the recovered list is gone.
    fn take_over(&mut self, mut recovered: Vec<Recovered>) {
        if recovered.is_empty() {
            return;
        }
        self.pending.reserve(recovered.len());
        // Lanes are few (one per destination and dataset); each is counted by the address of
        // the recovered list's own lane, which all of its entries share.
        let mut per_lane: HashMap<*const Lane, (Arc<Lane>, usize)> = HashMap::new();
        for r in &recovered {
            per_lane
                .entry(Arc::as_ptr(&r.lane))
                .or_insert_with(|| (r.lane.clone(), 0))
                .1 += 1;
        }
        for (lane, n) in per_lane.into_values() {
            let dq = self.dests.entry(lane.dest.to_string()).or_default();
            dq.queues
                .entry(lane.dataset.clone())
                .or_default()
                .reserve_exact(n);
        }
        recovered.reverse();
        while let Some(r) = recovered.pop() {
            let lane = self.lanes.get(&r.lane.dest, &r.lane.dataset);
            let p = Pending {
                lane: lane.clone(),
                deadline_ms: r.deadline_ms,
            };
            // Ids are keys of one tree, so none is there twice.
            self.pending.insert(r.id.clone(), p);
            self.lane_queue(&lane, r.id, false);
            // At a quarter, not a half: mimalloc shrinks a block in place, keeping all of it,
            // when at least half of it is still used.
            if recovered.capacity() > 4096 && recovered.len() < recovered.capacity() / 4 {
                recovered.shrink_to_fit();
            }
        }
        drop(recovered);
        let deadlines: Vec<(i64, Id)> = self
            .pending
            .iter()
            .map(|(id, p)| (p.deadline_ms, id.clone()))
            .collect();
        self.deadlines = Deadlines::from_vec(deadlines);
    }

    /// Delivers as much of a destination's queue as its instances have credit for.
    fn dispatch(&mut self, dest: &str) {
        if self.engine.store().failure().is_some() {
            return; // nothing can be recorded as delivered until the restart
        }
        loop {
            let Some(dq) = self.dests.get_mut(dest) else {
                return;
            };
            let datasets: Vec<Id> = dq
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| k.clone())
                .collect();
            if datasets.is_empty() {
                return;
            }
            dq.turn = dq.turn.wrapping_add(1);
            let turn = dq.turn;
            let mut progressed = false;
            for i in 0..datasets.len() {
                let ds = &datasets[(turn + i) % datasets.len()];
                let Some(inst) = self.pick_instance(dest, ds) else {
                    continue;
                };
                let id = self
                    .dests
                    .get_mut(dest)
                    .and_then(|dq| dq.queues.get_mut(ds))
                    .and_then(VecDeque::pop_front);
                let Some(id) = id else { continue };
                progressed = true;
                // Ended meanwhile (expired, replayed elsewhere): drop the stale entry.
                if !self.pending.contains_key(&id) || self.delivered.contains_key(&id) {
                    continue;
                }
                if !self.deliver(&id, inst) {
                    return; // storage trouble: try again at the next tick, not in a busy loop
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn pick_instance(&mut self, dest: &str, dataset: &str) -> Option<u64> {
        let candidates: Vec<u64> = self
            .instances
            .iter()
            .filter(|(_, i)| i.node == dest && i.credit > 0 && i.serves(dataset))
            .map(|(k, _)| *k)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        self.instance_turn = self.instance_turn.wrapping_add(1);
        Some(candidates[(self.instance_turn as usize) % candidates.len()])
    }

    fn load(&self, id: &str) -> Option<StoredExchange> {
        match self.engine.store().get::<StoredExchange>(T::Exchanges, id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(exchange = id, error = %e, "cannot read exchange");
                None
            }
        }
    }

    /// Checks the grant again (it may have been revoked or expired while queued).
    fn recheck(&self, rec: &StoredExchange) -> std::result::Result<Grant, Denial> {
        let default_env = ExchangeEnvelope::default();
        let env = rec.envelope.as_ref().unwrap_or(&default_env);
        let default_req = ExchangeRequest::default();
        let req = env.request.as_ref().unwrap_or(&default_req);
        let grant = self
            .engine
            .store()
            .get::<Grant>(T::Grants, &req.grant_id)
            .ok()
            .flatten();
        let Some(grant) = grant else {
            return Err(Denial {
                rule: "grant_missing",
                detail: format!("grant {} is no longer on this broker", req.grant_id),
                exhausted: false,
            });
        };
        let keys = self.engine.store().keys().map_err(|e| Denial {
            rule: "grant_forged",
            detail: format!("cannot read the issuers' keys: {e}"),
            exhausted: false,
        })?;
        crate::keys::verify_grant(&grant, &keys)?;
        enforce::check_grant(
            &grant,
            &env.consumer,
            &req.dataset_id,
            req.query.as_ref().unwrap_or(&Query::default()),
            now_ms(),
        )?;
        Ok(grant)
    }

    /// Hands one exchange to one instance; false when storage failed and dispatch should pause.
    fn deliver(&mut self, id: &str, instance: u64) -> bool {
        let Some(mut rec) = self.load(id) else {
            self.forget(id);
            return true;
        };
        if rec.finished() {
            self.forget(id);
            return true;
        }
        let now = now_ms();
        let env = rec.envelope.clone().unwrap_or_default();
        if now > ms(&env.deadline) {
            self.expire(id);
            return true;
        }
        if let Err(d) = self.recheck(&rec) {
            self.end(id, End::denied(&d));
            return true;
        }
        let max = self.engine.cfg().max_deliveries;
        if rec.deliveries >= max {
            let mut e = End::error(
                ExchangeState::DeadLettered,
                tonic::Code::Unavailable,
                format!("no answer after {max} deliveries; dead-lettered"),
                "exchange_dead_lettered",
            );
            e.dead_letter = Some(format!(
                "max deliveries ({max}) exhausted without an answer"
            ));
            self.end(id, e);
            return true;
        }
        let Some(inst) = self.instances.get(&instance) else {
            self.requeue_front(id);
            return true;
        };
        // Room on the stream first, so nothing is recorded as delivered that cannot be sent.
        let tx = inst.tx.clone();
        let permit = match tx.try_reserve_owned() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The provider is not reading: stop sending until it answers something.
                if let Some(inst) = self.instances.get_mut(&instance) {
                    inst.credit = 0;
                }
                self.requeue_front(id);
                return true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.requeue_front(id);
                self.disconnect(instance);
                return true;
            }
        };
        rec.deliveries += 1;
        rec.state = ExchangeState::InFlight as i32;
        let delivery_id = uuid::Uuid::now_v7().to_string();
        let req = env.request.clone().unwrap_or_default();
        let msg = BrokerMessage {
            body: Some(broker_message::Body::Request(ProviderRequest {
                delivery_id: delivery_id.clone(),
                exchange_id: id.to_string(),
                dataset_id: req.dataset_id.clone(),
                consumer: env.consumer.clone(),
                query: req.query.clone(),
                deadline: env.deadline,
                trace_id: req.trace_id.clone(),
                grant_id: req.grant_id.clone(),
                purpose: rec.purpose.clone(),
                attempt: rec.deliveries,
            })),
        };
        let label = inst.label.clone();
        let store = self.engine.store().clone();
        let in_flight = super::record::InFlight {
            delivery_id: delivery_id.clone(),
            dest: rec.dest.clone(),
            instance: label.clone(),
            attempt: rec.deliveries,
            since_ms: now,
        };
        let mut audit = exchange_entry("exchange_delivered", store.broker_id(), &env);
        audit.reason = format!("attempt {} to instance {label}", rec.deliveries);
        tracing::debug!(exchange = id, trace_id = %req.trace_id, instance = %label, attempt = rec.deliveries, "delivering");
        if rec.deliveries == 1 {
            self.engine
                .record_stage("queue_wait", now.saturating_sub(ms(&env.accepted_at)));
        }
        self.staged.push(Staged {
            id: id.to_string(),
            rec,
            in_flight,
            audit,
            permit,
            msg,
            instance,
            delivery_id: delivery_id.clone(),
        });
        if let Some(inst) = self.instances.get_mut(&instance) {
            inst.credit = inst.credit.saturating_sub(1);
        }
        let ack_ms =
            i64::try_from(self.engine.cfg().ack_wait_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.deliveries.insert(
            delivery_id.clone(),
            Delivery {
                exchange_id: id.to_string(),
                instance,
                ack_deadline_ms: now.saturating_add(ack_ms),
                since_ms: now,
            },
        );
        if let Some((held, _)) = self.pending.get_key_value(id) {
            self.delivered.insert(held.clone(), delivery_id.into());
        }
        true
    }

    /// Writes the deliveries and then the ends staged in this batch in one transaction (each
    /// transaction is a frame, a write and a lock of the index of its own, so one per batch), then
    /// sends the deliveries' requests and releases the ends. If the write fails, both go back
    /// to the front of their queues.
    fn commit(&mut self) {
        if self.staged.is_empty() && self.ending.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        let mut ending = std::mem::take(&mut self.ending);
        // Before the transaction, which holds the store's writer, and one after the other, so
        // that the key's tables stay in the cache.
        for x in &mut ending {
            if let Some(hop) = x.hop {
                x.receipt = Some(self.end_receipt(&x.id, &x.end, hop, x.at_ms));
            }
        }
        let store = self.engine.store().clone();
        let now = now_ms();
        let written = store.write(|tx| {
            let mut entries: Vec<_> = staged.iter().map(|s| s.audit.clone()).collect();
            for s in &staged {
                tx.put(T::Exchanges, &s.id, &s.rec)?;
                tx.put(T::InFlight, &s.id, &s.in_flight)?;
            }
            let mut outs = Vec::with_capacity(ending.len());
            for x in &ending {
                let (o, mut e) = self.end_one(tx, x, now)?;
                outs.push(o);
                entries.append(&mut e);
            }
            Ok((outs, entries))
        });
        let failed = written.as_ref().err().cloned();
        self.deliveries_written(staged, failed);
        self.ends_written(ending, written, now);
    }

    /// Sends the requests of written deliveries, or puts them back if the write failed.
    fn deliveries_written(&mut self, staged: Vec<Staged>, failed: Option<BrokerError>) {
        match failed {
            None => {
                for s in staged {
                    s.permit.send(Ok(s.msg));
                }
            }
            Some(e) => {
                tracing::error!(error = %e, deliveries = staged.len(), "cannot record deliveries; will retry");
                for s in staged {
                    drop(s.permit);
                    self.deliveries.remove(&s.delivery_id);
                    if let Some(inst) = self.instances.get_mut(&s.instance) {
                        inst.credit = inst.credit.saturating_add(1);
                    }
                    self.requeue_front(&s.id);
                }
            }
        }
    }

    fn requeue_front(&mut self, id: &str) {
        // Staged deliveries first, so their writes never land after this one's.
        self.commit();
        if let Err(e) = self.engine.store().tree(T::InFlight).remove(id.as_bytes()) {
            tracing::warn!(exchange = id, error = %e, "cannot clear in-flight record");
        }
        let Some((held, p)) = self.pending.get_key_value(id) else {
            return;
        };
        let (id, lane, dl) = (held.clone(), p.lane.clone(), p.deadline_ms);
        self.delivered.remove(&id);
        self.queue(id, &lane.dest, &lane.dataset, dl, true);
    }

    fn forget(&mut self, id: &str) {
        // Its deadline's entry goes when it comes up, or at the next compaction.
        if self.pending.remove(id).is_some() {
            if let Some(d) = self.delivered.remove(id) {
                self.deliveries.remove(&*d);
            }
        }
    }

    fn answer(&mut self, instance: u64, answer: ProviderAnswer) {
        let Some(inst) = self.instances.get_mut(&instance) else {
            return;
        };
        if inst.stale.remove(&answer.delivery_id) {
            // Too late: the exchange was taken back and went elsewhere. The slot is free again.
            inst.credit = inst.credit.saturating_add(1);
            let dest = inst.node.clone();
            self.dispatch(&dest);
            return;
        }
        let owned = self
            .deliveries
            .get(&answer.delivery_id)
            .is_some_and(|d| d.instance == instance);
        if !owned {
            tracing::debug!(delivery = %answer.delivery_id, "answer for an unknown delivery ignored");
            return;
        }
        inst.credit = inst.credit.saturating_add(1);
        let dest = inst.node.clone();
        let Some(d) = self.deliveries.remove(&answer.delivery_id) else {
            return;
        };
        self.engine.record_stage("provider", now_ms() - d.since_ms);
        let id = d.exchange_id;
        self.delivered.remove(id.as_str());
        match self.load(&id) {
            Some(rec) if !rec.finished() => {
                let end = self.shape(&rec, answer);
                self.end_loaded(&id, end, Some(&rec));
            }
            _ => self.forget(&id),
        }
        self.dispatch(&dest);
    }

    /// Turns a provider's answer into the exchange's end: cut and masked rows, or its error.
    fn shape(&self, rec: &StoredExchange, answer: ProviderAnswer) -> End {
        // Fail closed: a grant revoked while the provider worked stops the rows here.
        let grant = match self.recheck(rec) {
            Ok(g) => g,
            Err(d) => return End::denied(&d),
        };
        if let Some(err) = answer.error {
            let code = if err.code == 0 {
                tonic::Code::Unknown as i32
            } else {
                err.code
            };
            let mut e = End::error(
                ExchangeState::Failed,
                tonic::Code::from_i32(code),
                format!("the provider answered: {}", err.message),
                "exchange_failed",
            );
            e.code = code;
            return e;
        }
        let req = rec
            .envelope
            .as_ref()
            .and_then(|e| e.request.clone())
            .unwrap_or_default();
        let query = req.query.unwrap_or_default();
        // Fail closed: without the catalog entry (masks) or the salt, nothing is released.
        let masking = self
            .engine
            .catalog()
            .get(&req.dataset_id)
            .and_then(|d| Ok((d, self.engine.catalog().salt(&req.dataset_id)?)));
        let (dataset, salt) = match masking {
            Ok((d, s)) => (Some(d), s),
            Err(e) => {
                return End::denied(&Denial {
                    rule: "masking_unavailable",
                    detail: format!("cannot read the masking rules of {}: {e}", req.dataset_id),
                    exhausted: false,
                })
            }
        };
        let max = (query.limit as usize).clamp(1, self.engine.cfg().max_rows as usize);
        let shaped: enforce::Shaped = enforce::shape_rows(
            answer.rows,
            &grant,
            &query.fields,
            dataset.as_ref(),
            &salt,
            max,
        );

        End {
            state: ExchangeState::Answered,
            rule: None,
            code: 0,
            message: String::new(),
            decision: "exchange_answered",
            dead_letter: None,
            rows: shaped.rows,
            masked: shaped.masked,
            dropped: shaped.dropped,
            truncated: shaped.truncated || answer.truncated,
            trail: None,
        }
    }

    /// Ends an exchange durably (written now, flushed with the batch) and releases it.
    fn end(&mut self, id: &str, end: End) {
        if self.ending.iter().any(|e| e.id == id) {
            return; // already ending in this batch
        }
        let rec = self.load(id);
        self.end_loaded(id, end, rec.as_ref());
    }

    /// [`Actor::end`] with the exchange's record as the caller just read it.
    fn end_loaded(&mut self, id: &str, end: End, rec: Option<&StoredExchange>) {
        // A staged delivery of this exchange is written before its end: `commit` writes the
        // batch's deliveries first, in the same transaction.
        if self.ending.iter().any(|e| e.id == id) {
            return; // already ending in this batch
        }
        let store = self.engine.store().clone();
        let result_seq = match store.next_id() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(exchange = id, error = %e, "cannot end exchange now; retrying later");
                return;
            }
        };
        // Where a result for a consumer on another broker goes; looked up before the
        // transaction, which holds the store's writer and should be short.
        let back = match rec.and_then(|r| r.envelope.as_ref()) {
            Some(env) if env.origin_broker != store.broker_id() => {
                self.engine.fed().route(&env.consumer).ok().flatten()
            }
            _ => None,
        };
        // Out of the dispatcher's hands now; written with the batch by `commit`.
        // Its deadline's entry goes when it comes up, or at the next compaction.
        let pending = self.pending.remove(id);
        if pending.is_some() {
            if let Some(d) = self.delivered.remove(id) {
                self.deliveries.remove(&*d);
            }
        }
        let hop = rec.and_then(|r| r.envelope.as_ref()).map(|env| {
            let trail = end.trail.as_deref().unwrap_or(&env.trail);
            own_hop(trail, store.broker_id())
        });
        self.ending.push(Ending {
            id: id.to_string(),
            end,
            result_seq,
            back,
            pending,
            at_ms: now_ms(),
            hop,
            receipt: None,
        });
    }

    /// This broker's signed receipt for an exchange's end, as its `hop`.
    fn end_receipt(
        &self,
        id: &str,
        end: &End,
        hop: u32,
        at_ms: i64,
    ) -> govshare_proto::v1::HopReceipt {
        let decision = end.decision.trim_start_matches("exchange_");
        self.engine.key().receipt(id, hop, decision, at_ms)
    }

    /// Writes one end inside the batch's transaction (see [`Actor::commit`]).
    fn end_one(
        &self,
        tx: &crate::store::Tx<'_>,
        x: &Ending,
        now: i64,
    ) -> Result<(Released, Vec<govshare_proto::v1::AuditEntry>)> {
        let store = self.engine.store();
        let (id, end, result_seq, back) = (x.id.as_str(), &x.end, x.result_seq, &x.back);
        let Some(mut rec) = tx.get::<StoredExchange>(T::Exchanges, id)? else {
            return Ok((None, vec![]));
        };
        if rec.finished() {
            return Ok((None, vec![]));
        }
        // Borrowed, not copied: the envelope (with its request and trail) is most of the record.
        let default_env = ExchangeEnvelope::default();
        let env = rec.envelope.as_ref().unwrap_or(&default_env);
        let default_req = ExchangeRequest::default();
        let req = env.request.as_ref().unwrap_or(&default_req);
        let result = ExchangeResult {
            exchange_id: id.to_string(),
            state: end.state as i32,
            rows: end.rows.clone(),
            error: (end.code != 0).then(|| ErrorStatus {
                code: end.code,
                message: end.message.clone(),
            }),
            dataset_id: req.dataset_id.clone(),
            grant_id: req.grant_id.clone(),
            trace_id: req.trace_id.clone(),
            accepted_at: env.accepted_at,
            finished_at: Some(ts(x.at_ms)),
            masked_fields: end.masked.clone(),
            dropped_fields: end.dropped.clone(),
            trail: {
                let mut t = end.trail.clone().unwrap_or_else(|| env.trail.clone());
                let hop = own_hop(&t, store.broker_id());
                t.push(match &x.receipt {
                    Some(r) if r.hop == hop => r.clone(),
                    // The record changed since (not expected): signed here after all.
                    _ => self.end_receipt(id, end, hop, x.at_ms),
                });
                t
            },
            truncated: end.truncated,
        };
        rec.state = end.state as i32;
        rec.result_seq = result_seq;
        tx.unmark(T::InFlight, id.as_bytes())?;
        if env.origin_broker != store.broker_id() {
            // The consumer is on another broker: the result travels back over the links,
            // and this broker lets go of the exchange (its id stays marked as handled).
            if let Some(crate::federation::Route::Via(peer)) = &back {
                self.engine.fed().put_outbox(
                    tx,
                    peer,
                    govshare_proto::v1::link_frame::Body::Result(
                        govshare_proto::v1::ResultEnvelope {
                            result: Some(result.clone()),
                            origin_broker: env.origin_broker.clone(),
                            consumer: env.consumer.clone(),
                        },
                    ),
                )?;
                tx.unmark(T::Exchanges, id.as_bytes())?;
                super::hop::mark_seen(tx, id, now, ms(&env.deadline))?;
                let mut e = exchange_entry(end.decision, store.broker_id(), env);
                e.reason = if end.message.is_empty() {
                    format!(
                        "rows: {}; result sent toward {}",
                        end.rows.len(),
                        env.origin_broker
                    )
                } else {
                    end.message.clone()
                };
                return Ok((
                    Some((
                        env.consumer.clone(),
                        rec.dest.clone(),
                        rec.bytes,
                        result,
                        false,
                        Some(peer.clone()),
                    )),
                    vec![e],
                ));
            }
            tracing::error!(exchange = id, consumer = %env.consumer, "no route back to the consumer's broker; the result stays here");
        }
        // Kept in the record, and taken back out once it is encoded: no copy of the rows.
        rec.result = Some(result);
        tx.put_raw(
            T::Results,
            &seq_key(&env.consumer, result_seq),
            id.as_bytes(),
        )?;
        if let Some(reason) = &end.dead_letter {
            let dl = DeadLetter {
                exchange: Some(env.clone()),
                reason: reason.clone(),
                at: Some(ts(now)),
                deliveries: rec.deliveries,
            };
            tx.put(T::DeadLetters, id, &dl)?;
        }
        tx.put(T::Exchanges, id, &rec)?;
        let result = rec.result.take().unwrap_or_default();
        let mut e = exchange_entry(end.decision, store.broker_id(), env);
        e.reason = if end.message.is_empty() {
            format!("rows: {}", end.rows.len())
        } else {
            end.message.clone()
        };
        Ok((
            Some((
                env.consumer.clone(),
                rec.dest.clone(),
                rec.bytes,
                result,
                rec.sync,
                None,
            )),
            vec![e],
        ))
    }

    /// After the batch's transaction: tells of the ends written, or puts them back.
    fn ends_written(&mut self, ending: Vec<Ending>, written: Result<Vec<Released>>, now: i64) {
        if ending.is_empty() {
            return;
        }
        let outs = match written {
            Ok(o) => {
                let waiting = std::mem::take(&mut self.after_commit);
                self.after_flush.extend(waiting);
                o
            }
            Err(e) => {
                // Their links resend the results that were waiting on this write.
                self.after_commit.clear();
                tracing::error!(error = %e, exchanges = ending.len(), "cannot end exchanges; they stay queued");
                for x in ending {
                    if let Some(p) = x.pending {
                        self.queue(
                            x.id.into(),
                            &p.lane.dest,
                            &p.lane.dataset,
                            p.deadline_ms,
                            true,
                        );
                    }
                }
                return;
            }
        };
        for (x, out) in ending.into_iter().zip(outs) {
            if out.is_some() {
                self.written_seq = self.written_seq.max(x.result_seq);
            }
            let (id, end) = (x.id.as_str(), &x.end);
            self.released(id, end, out, now);
        }
    }

    /// After an end is written: logs, metrics, queue bounds, and telling the consumer.
    fn released(&mut self, id: &str, end: &End, written: Released, now: i64) {
        match written {
            Some((consumer, dest, bytes, result, sync, back)) => {
                if end.state == ExchangeState::Answered {
                    tracing::debug!(exchange = id, trace_id = %result.trace_id, rows = result.rows.len(), "exchange answered");
                } else {
                    tracing::info!(exchange = id, trace_id = %result.trace_id, state = ?end.state, reason = %end.message, "exchange ended without rows");
                }
                let outcome = match end.state {
                    ExchangeState::Answered => "answered",
                    ExchangeState::Failed => "failed",
                    ExchangeState::Expired => "expired",
                    ExchangeState::DeadLettered => "dead_lettered",
                    _ => "denied",
                };
                match &end.rule {
                    Some(d) => self.engine.record_denial(d, &consumer, &result.dataset_id),
                    None => self.engine.record_outcome(&result.dataset_id, outcome),
                }
                self.engine
                    .record_stage("end_to_end", now.saturating_sub(ms(&result.accepted_at)));
                self.engine.release(&dest, bytes);
                match back {
                    Some(peer) => {
                        self.wake.insert(peer);
                    }
                    None => self.done.push((consumer, result, sync)),
                }
            }
            // Already ended (or acknowledged and gone) before this end was written.
            None => self.forget(id),
        }
    }

    fn expire(&mut self, id: &str) {
        let in_flight = self.delivered.remove(id);
        if let Some(d) = &in_flight {
            if let Some(del) = self.deliveries.remove(&**d) {
                if let Some(inst) = self.instances.get_mut(&del.instance) {
                    inst.stale.insert(d.to_string());
                }
            }
        }
        // A refusal outranks an expiry: a grant revoked meanwhile makes it a denial.
        if let Some(rec) = self.load(id) {
            if let Err(d) = self.recheck(&rec) {
                self.end(id, End::denied(&d));
                return;
            }
        }
        let stage = if in_flight.is_some() {
            "in flight at the provider"
        } else {
            "queued"
        };
        let mut e = End::error(
            ExchangeState::Expired,
            tonic::Code::DeadlineExceeded,
            format!("the deadline passed while the exchange was {stage}"),
            "exchange_expired",
        );
        e.dead_letter = Some(format!("expired while {stage}"));
        self.end(id, e);
    }

    fn disconnect(&mut self, instance: u64) {
        let Some(inst) = self.instances.remove(&instance) else {
            return;
        };
        tracing::info!(node = %inst.node, instance, label = %inst.label, "provider disconnected");
        let taken: Vec<String> = self
            .deliveries
            .iter()
            .filter(|(_, d)| d.instance == instance)
            .map(|(k, _)| k.clone())
            .collect();
        for d in taken {
            if let Some(del) = self.deliveries.remove(&d) {
                metrics::counter!(crate::metrics::REDELIVERIES).increment(1);
                self.requeue_front(&del.exchange_id);
            }
        }
        self.engine.set_providers(self.instances.len());
        self.dispatch(&inst.node);
    }

    fn tick(&mut self) {
        if self.engine.store().failure().is_some() {
            // No expiry or redelivery can be written after a storage failure; the restart
            // recovers every open exchange from disk and carries on from there.
            return;
        }
        let now = now_ms();
        let due = self.deadlines.due(now, live_under(&self.pending));
        for (dl, id) in due {
            self.expire(&id);
            // Not ended (storage trouble): tried again at the next tick.
            if live_under(&self.pending)(dl, &id) {
                self.deadlines.push(dl, id);
            }
        }
        self.deadlines
            .compact(self.pending.len(), live_under(&self.pending));
        let overdue: Vec<String> = self
            .deliveries
            .iter()
            .filter(|(_, d)| d.ack_deadline_ms < now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut dests = BTreeSet::new();
        let mut hung = BTreeSet::new();
        for d in overdue {
            if let Some(del) = self.deliveries.remove(&d) {
                if let Some(inst) = self.instances.get_mut(&del.instance) {
                    inst.stale.insert(d);
                    dests.insert(inst.node.clone());
                    // Every slot it asked for is held by requests it never answered: it has
                    // hung. Dropping it lets a healthy instance (or its restart) take over.
                    if inst.stale.len() >= inst.max as usize {
                        hung.insert(del.instance);
                    }
                }
                tracing::info!(exchange = %del.exchange_id, "no answer within the ack wait; redelivering");
                metrics::counter!(crate::metrics::REDELIVERIES).increment(1);
                self.requeue_front(&del.exchange_id);
                if let Some(p) = self.pending.get(del.exchange_id.as_str()) {
                    dests.insert(p.lane.dest.to_string());
                }
            }
        }
        for i in hung {
            tracing::warn!(
                instance = i,
                "provider instance answered nothing within the ack wait; dropping it"
            );
            self.disconnect(i);
        }
        for d in dests {
            self.dispatch(&d);
        }
        if now - self.last_heartbeat >= HEARTBEAT_MS {
            self.last_heartbeat = now;
            for inst in self.instances.values() {
                let hb = BrokerMessage {
                    body: Some(broker_message::Body::Heartbeat(ServeHeartbeat {
                        at: Some(ts(now)),
                    })),
                };
                let _ = inst.tx.try_send(Ok(hb));
            }
        }
        if now - self.last_sweep >= DEDUP_SWEEP_MS {
            self.last_sweep = now;
            // A full scan: off this thread, so dispatch never waits for it.
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = sweep_dedup(&engine, now) {
                    tracing::warn!(error = %e, "idempotency sweep failed");
                }
            });
        }
    }

    /// Ends the queued exchanges of a revoked grant as denied (in-flight ones are denied
    /// when their answer comes, or when they are taken back).
    fn revoked(&mut self, grant_id: &str) {
        let queued: Vec<Id> = self
            .pending
            .iter()
            .filter(|(id, _)| !self.delivered.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in queued {
            let Some(rec) = self.load(&id) else { continue };
            let under = rec
                .envelope
                .as_ref()
                .and_then(|e| e.request.as_ref())
                .is_some_and(|r| r.grant_id == grant_id);
            if under {
                if let Err(d) = self.recheck(&rec) {
                    self.end(&id, End::denied(&d));
                }
            }
        }
    }

    fn replay(&mut self, id: &str, actor: &str) -> Result<()> {
        self.commit();
        let store = self.engine.store().clone();
        let dl: DeadLetter = store.get(T::DeadLetters, id)?.ok_or_else(|| {
            BrokerError::not_found(format!("exchange {id} is not in the dead-letter queue"))
        })?;
        let now = now_ms();
        let deadline = now
            + i64::try_from(self.engine.cfg().default_deadline_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX);
        let queue_seq = store.next_id()?;
        let rec = store.write(|tx| {
            let old: Option<StoredExchange> = tx.get(T::Exchanges, id)?;
            if old.is_none() {
                // Its consumer already took and acknowledged the outcome: a replay would show
                // it a second answer for the same exchange.
                return Err(BrokerError::precondition(format!(
                    "exchange {id} was already acknowledged by its consumer; submit a new exchange instead"
                )));
            }
            let mut env = dl.exchange.clone().unwrap_or_default();
            env.deadline = Some(ts(deadline));
            let mut rec = old.clone().unwrap_or_else(|| StoredExchange {
                dest: env.provider.clone(),
                ..Default::default()
            });
            if let Some(o) = &old {
                if o.result.is_some() {
                    tx.unmark(T::Results, &seq_key(&env.consumer, o.result_seq))?;
                }
            }
            rec.envelope = Some(env.clone());
            rec.state = ExchangeState::Queued as i32;
            rec.deliveries = 0;
            rec.result = None;
            rec.result_seq = 0;
            rec.queue_seq = queue_seq;
            rec.bytes = rec.encoded_len() as u64;
            tx.unmark(T::DeadLetters, id.as_bytes())?;
            tx.put(T::Exchanges, id, &rec)?;
            let mut e = exchange_entry("exchange_replayed", actor, &env);
            e.reason = format!("replayed from the dead-letter queue (was: {})", dl.reason);
            Ok((rec, vec![e]))
        })?;
        let env = rec.envelope.clone().unwrap_or_default();
        let dataset = env.request.map(|r| r.dataset_id).unwrap_or_default();
        self.engine.force_reserve(&rec.dest, rec.bytes);
        self.queue(id.into(), &rec.dest, &dataset, deadline, false);
        self.dispatch(&rec.dest);
        Ok(())
    }
}

/// True when a hop mark can go: past this broker's longest deadline and an hour, and past the
/// exchange's own deadline (set by the consumer's broker, whose longest may be longer) and an
/// hour. After its deadline a resend is refused as expired before the mark is looked at.
fn hop_mark_expired(d: &super::record::DedupRecord, hop_window: i64, now: i64) -> bool {
    now.saturating_sub(d.at_ms) > hop_window && now.saturating_sub(d.deadline_ms) > 3_600_000
}

/// Forgets idempotency keys past their window.
fn sweep_dedup(engine: &Engine, now: i64) -> Result<()> {
    let window = i64::try_from(engine.cfg().idempotency_window_secs.saturating_mul(1000))
        .unwrap_or(i64::MAX);
    // A hop's mark must outlive any resend of the exchange: past its longest deadline.
    let hop_window = i64::try_from(engine.cfg().max_deadline_secs.saturating_mul(1000))
        .unwrap_or(i64::MAX)
        .saturating_add(3_600_000)
        .max(window);
    let tree = engine.store().tree(T::Dedup);
    for kv in tree.iter() {
        let (k, v) = kv?;
        let d = super::record::DedupRecord::decode(v.as_ref())?;
        let expired = if k.starts_with(super::record::HOP_MARK_PREFIX) {
            hop_mark_expired(&d, hop_window, now)
        } else {
            now.saturating_sub(d.at_ms) > window
        };
        if expired {
            tree.remove(k)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{index_key, Store};
    use govshare_proto::v1::{ExchangeEnvelope, ExchangeRequest};

    const BROKER: &str = "330000/hub";
    const CONSUMER: &str = "330100/civil";
    const PROVIDER: &str = "330000/hrss";

    fn record(
        id: &str,
        key: &str,
        state: ExchangeState,
        queue_seq: u64,
        result_seq: u64,
    ) -> StoredExchange {
        let finished = super::super::record::is_final(state);
        StoredExchange {
            envelope: Some(ExchangeEnvelope {
                exchange_id: id.into(),
                consumer: CONSUMER.into(),
                provider: PROVIDER.into(),
                origin_broker: BROKER.into(),
                accepted_at: Some(ts(now_ms())),
                request: Some(ExchangeRequest {
                    idempotency_key: key.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            state: state as i32,
            result: finished.then(|| ExchangeResult {
                exchange_id: id.into(),
                state: state as i32,
                ..Default::default()
            }),
            queue_seq,
            result_seq,
            dest: PROVIDER.into(),
            ..Default::default()
        }
    }

    fn put(store: &Store, t: T, key: &[u8], v: &[u8]) {
        store.tree(t).insert(key, v).expect("test write");
    }

    fn keys(store: &Store, t: T) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .tree(t)
            .iter()
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .expect("test read")
            })
            .collect()
    }

    // Each half-written state a failed sled transaction (before 2026-11-29) could leave (the
    // `exchanges` tree was written before `results` and `dedup`), and entries left behind by
    // records that moved on.
    #[test]
    fn repair_makes_the_indexes_agree_with_the_records() -> Result<()> {
        let (_dir, store) = crate::store::tests::temp_store()?;
        // Ended in its record, without a result entry: Watch never shows it.
        let ended = record("ended", "", ExchangeState::Answered, 1, 10);
        put(&store, T::Exchanges, b"ended", &ended.encode_to_vec());
        // Accepted in its record, but not under its idempotency key.
        let accepted = record("accepted", "key-a", ExchangeState::Queued, 2, 0);
        put(&store, T::Exchanges, b"accepted", &accepted.encode_to_vec());
        // Whole: left as it is.
        let whole = record("whole", "key-w", ExchangeState::Queued, 3, 0);
        put(&store, T::Exchanges, b"whole", &whole.encode_to_vec());
        let first = super::super::record::DedupRecord {
            exchange_id: "whole".into(),
            at_ms: now_ms(),
            deadline_ms: 0,
        };
        put(
            &store,
            T::Dedup,
            &super::super::record::dedup_key(CONSUMER, "key-w"),
            &first.encode_to_vec(),
        );
        // Results entries of a record acknowledged since, and of one that has not ended.
        put(&store, T::Results, &seq_key(CONSUMER, 99), b"gone");
        put(&store, T::Results, &seq_key(CONSUMER, 50), b"accepted");

        let (queued, fixed) = repair(&store, 60_000)?;
        let queued: Vec<_> = queued.into_iter().map(|r| r.id.to_string()).collect();
        assert_eq!(queued, ["accepted", "whole"]);
        assert_eq!(
            fixed,
            Repaired {
                results: 1,
                keys: 1,
                stale: 2,
            }
        );
        assert_eq!(
            keys(&store, T::Results),
            vec![(seq_key(CONSUMER, 10), b"ended".to_vec())]
        );
        let dedup = keys(&store, T::Dedup);
        assert_eq!(dedup.len(), 2);
        let restored = dedup
            .iter()
            .find(|(k, _)| *k == super::super::record::dedup_key(CONSUMER, "key-a"))
            .map(|(_, v)| super::super::record::DedupRecord::decode(v.as_slice()));
        assert_eq!(
            restored.transpose()?.map(|d| d.exchange_id),
            Some("accepted".into())
        );
        // Nothing left to do the second time.
        assert_eq!(repair(&store, 60_000)?.1, Repaired::default());
        Ok(())
    }

    // A clean start queues again what the records say has not ended, in the order it was
    // queued (the records' keys are ids, in no such order), and drops the entries of the
    // `queue` tree that data dirs written before 2026-11-29 hold.
    #[test]
    fn recovery_queues_the_unended_records_in_queue_order() -> Result<()> {
        let (_dir, store) = crate::store::tests::temp_store()?;
        for (id, state, seq, dest) in [
            ("c", ExchangeState::Queued, 9, PROVIDER),
            ("a", ExchangeState::InFlight, 5, PROVIDER),
            ("b", ExchangeState::Queued, 2, "440000/other"),
            ("done", ExchangeState::Answered, 1, PROVIDER),
        ] {
            let mut r = record(id, "", state, seq, 0);
            r.dest = dest.into();
            put(&store, T::Exchanges, id.as_bytes(), &r.encode_to_vec());
        }
        put(&store, T::Queue, &seq_key(PROVIDER, 9), b"c");
        assert!(!store.unclean_start());
        let got: Vec<_> = recover(&store, 60_000)?
            .into_iter()
            .map(|r| (r.id.to_string(), r.lane.dest.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("b".to_string(), "440000/other".to_string()),
                ("a".to_string(), PROVIDER.to_string()),
                ("c".to_string(), PROVIDER.to_string()),
            ]
        );
        assert!(store.tree(T::Queue).is_empty());
        Ok(())
    }

    // Idempotency keys stored before 2026-11-29 (consumer ‖ 0 ‖ key) are rewritten at start in
    // the form accepts look up, with their values; hop marks stay as they are.
    #[test]
    fn recovery_rewrites_old_idempotency_keys_in_their_digested_form() -> Result<()> {
        let (_dir, store) = crate::store::tests::temp_store()?;
        let first = super::super::record::DedupRecord {
            exchange_id: "first".into(),
            at_ms: 7,
            deadline_ms: 0,
        };
        let hop = index_key("#hop", "x");
        put(
            &store,
            T::Dedup,
            &index_key(CONSUMER, "k1"),
            &first.encode_to_vec(),
        );
        // A name sorting before the hop marks: the rewrite reads on both sides of them.
        put(&store, T::Dedup, &index_key("!odd", "k2"), b"second");
        put(&store, T::Dedup, &hop, b"mark");
        recover(&store, 60_000)?;
        let digested = super::super::record::dedup_key(CONSUMER, "k1");
        let mut want = vec![
            (digested, first.encode_to_vec()),
            (
                super::super::record::dedup_key("!odd", "k2"),
                b"second".to_vec(),
            ),
            (hop, b"mark".to_vec()),
        ];
        want.sort();
        assert_eq!(keys(&store, T::Dedup), want);
        Ok(())
    }

    // A hop mark outlives both this broker's longest deadline and the exchange's own, which
    // the consumer's broker set and may have allowed to be longer.
    #[test]
    fn a_hop_mark_is_kept_until_the_exchanges_own_deadline() -> Result<()> {
        let hour = 3_600_000;
        let now = 100 * hour;
        let window = 2 * hour;
        let mark = |age: i64, deadline_ms: i64| super::super::record::DedupRecord {
            exchange_id: "x".into(),
            at_ms: now - age,
            deadline_ms,
        };
        assert!(!hop_mark_expired(&mark(hour, now - 2 * hour), window, now));
        assert!(hop_mark_expired(
            &mark(3 * hour, now - 2 * hour),
            window,
            now
        ));
        assert!(!hop_mark_expired(
            &mark(3 * hour, now + 24 * hour),
            window,
            now
        ));
        assert!(!hop_mark_expired(
            &mark(3 * hour, now - hour / 2),
            window,
            now
        ));
        // Written before marks carried the deadline: this broker's window alone.
        assert!(hop_mark_expired(&mark(3 * hour, 0), window, now));
        // A deadline years away, as a peer may send, is kept for a week at most.
        let far = super::super::record::DedupRecord::decode(
            super::super::record::hop_mark("x", 0, i64::MAX).as_slice(),
        )
        .map_err(|e| BrokerError::internal(e.to_string()))?;
        let week = super::super::record::HOP_MARK_DEADLINE_CAP_MS;
        assert_eq!(far.deadline_ms, week);
        assert!(!hop_mark_expired(&far, window, week + hour / 2));
        assert!(hop_mark_expired(&far, window, week + 2 * hour));
        Ok(())
    }

    // An idempotency key past its window is not brought back: the sweep would only drop it.
    #[test]
    fn repair_leaves_expired_idempotency_keys_out() -> Result<()> {
        let (_dir, store) = crate::store::tests::temp_store()?;
        let mut old = record("old", "key-o", ExchangeState::Queued, 4, 0);
        if let Some(env) = old.envelope.as_mut() {
            env.accepted_at = Some(ts(now_ms() - 120_000));
        }
        put(&store, T::Exchanges, b"old", &old.encode_to_vec());
        assert_eq!(repair(&store, 60_000)?.1, Repaired::default());
        assert!(keys(&store, T::Dedup).is_empty());
        Ok(())
    }
}
