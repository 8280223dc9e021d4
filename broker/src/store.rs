//! The `Store` seam over the storage engine ([`crate::kv`]): named trees, atomic multi-tree
//! writes with their audit entries, and group commit (one flusher thread makes many writers
//! durable with one flush).

use crate::audit::{self, AuditHead};
use crate::error::{BrokerError, Result};
use crate::kv;
use govshare_proto::v1::AuditEntry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// The trees the broker keeps, in the order of [`Store::all`]; the index is the position.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum T {
    /// Node id → `Node`.
    Nodes = 0,
    /// Dataset id → `Dataset`.
    Datasets,
    /// Search index: gram ‖ 0 ‖ dataset id → ().
    CatGram,
    /// Tag index: tag ‖ 0 ‖ dataset id → ().
    CatTag,
    /// Demand id → `Demand`.
    Demands,
    /// consumer ‖ 0 ‖ demand id → ().
    DemandsByConsumer,
    /// provider ‖ 0 ‖ demand id → ().
    DemandsByProvider,
    /// Grant id → `Grant`.
    Grants,
    /// consumer ‖ 0 ‖ grant id → ().
    GrantsByConsumer,
    /// provider ‖ 0 ‖ grant id → ().
    GrantsByProvider,
    /// Audit seq (u64 big-endian) → `AuditEntry`.
    Audit,
    /// Small settings and counters.
    Meta,
    /// Exchange id → `StoredExchange`.
    Exchanges,
    /// No longer written (until 2026-11-29: destination ‖ 0 ‖ seq → exchange id, the durable
    /// queues; each record names its queue and place), cleared at start; kept so that the
    /// trees after it keep their numbers.
    Queue,
    /// consumer ‖ 0 ‖ seq (u64 BE) → exchange id: finished exchanges awaiting the consumer's ack.
    Results,
    /// consumer ‖ 0 ‖ idempotency key → `DedupRecord`.
    Dedup,
    /// Exchange id → `DeadLetter`.
    DeadLetters,
    /// grant id ‖ 0 ‖ day (i64 BE) → exchanges counted (u64 BE).
    Quota,
    /// Exchange id → `InFlight`: handed to a provider instance, not yet answered. Cleared at
    /// start, since every delivery of a stopped broker goes back to its queue.
    InFlight,
    /// Broker id ‖ 0 ‖ key id → `KeyAnnouncement`: the keys grants are verified with.
    Keys,
    /// peer ‖ 0 ‖ seq (u64 BE) → `LinkFrame`: what waits to cross a federation link, in order,
    /// until the peer acknowledges holding it.
    Outbox,
    /// Node id → `RouteRecord`: nodes reached through a child broker.
    Routes,
    /// Grant id → `GrantRevocation`: revocations learned from any broker in the cascade.
    Revoked,
}

const TREE_NAMES: [&str; 23] = [
    "nodes",
    "datasets",
    "cat_gram",
    "cat_tag",
    "demands",
    "demands_by_consumer",
    "demands_by_provider",
    "grants",
    "grants_by_consumer",
    "grants_by_provider",
    "audit",
    "meta",
    "exchanges",
    "queue",
    "results",
    "dedup",
    "dead_letters",
    "quota",
    "in_flight",
    "keys",
    "outbox",
    "routes",
    "revoked",
];

/// A view of every tree inside one transaction.
#[derive(Debug)]
pub struct Tx<'a> {
    tx: &'a kv::Tx<'a>,
}

impl Tx<'_> {
    /// Reads and decodes a protobuf record.
    pub fn get<M: prost::Message + Default>(&self, t: T, key: &str) -> Result<Option<M>> {
        match self.tx.get(t as usize, key.as_bytes())? {
            Some(v) => Ok(Some(M::decode(v.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Encodes and writes a protobuf record.
    pub fn put<M: prost::Message>(&self, t: T, key: &str, m: &M) -> Result<()> {
        Ok(self
            .tx
            .insert(t as usize, key.as_bytes(), m.encode_to_vec())?)
    }

    /// Writes raw bytes.
    pub fn put_raw(&self, t: T, key: &[u8], v: &[u8]) -> Result<()> {
        Ok(self
            .tx
            .insert(t as usize, key, kv::Value::copy_from_slice(v))?)
    }

    /// Reads raw bytes.
    pub fn get_raw(&self, t: T, key: &[u8]) -> Result<Option<kv::Value>> {
        Ok(self.tx.get(t as usize, key)?)
    }

    /// Writes an index key with an empty value.
    pub fn mark(&self, t: T, key: &[u8]) -> Result<()> {
        Ok(self.tx.insert(t as usize, key, kv::Value::new())?)
    }

    /// Removes a key.
    pub fn unmark(&self, t: T, key: &[u8]) -> Result<()> {
        Ok(self.tx.remove(t as usize, key)?)
    }
}

/// Joins a sequence key: `a ‖ 0 ‖ seq` with seq big-endian, so keys sort in seq order.
pub fn seq_key(a: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 9);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Joins an index key: `a ‖ 0 ‖ b`. Ids never contain a NUL byte, so the join is unambiguous.
pub fn index_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// The storage handle: cheap to clone, shared by every service.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Free space against `[storage] min_free_bytes`.
    space: Arc<Space>,
    db: kv::Db,
    /// The trees and the audit chain's head, shared with the committer thread.
    core: Arc<Core>,
    /// The `keys` tree in memory, loaded on first use. A std RwLock: never held across an await.
    keys: std::sync::RwLock<Option<Arc<Vec<govshare_proto::v1::KeyAnnouncement>>>>,
    /// Taken (dropped) in `Drop` to stop the flusher; always Some before that.
    flush_tx: Option<mpsc::Sender<Waiter>>,
    /// Writes for the committer (see [`Store::write_grouped`]); taken in `Drop` like `flush_tx`.
    commit_tx: Option<mpsc::Sender<Box<dyn Job>>>,
    /// Joined in `Drop`, before the flusher, so that every write handed to it is committed.
    committer: Option<std::thread::JoinHandle<()>>,
    /// Joined in `Drop`, so that the store's directory lock is released once the last handle is gone
    /// and the same data dir can be opened again (a restart in a test, or `audit verify`).
    flusher: Option<std::thread::JoinHandle<()>>,
    /// Stops the flush watchdog when dropped (see [`watchdog`]); joined like the flusher.
    watchdog_stop: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// Stops the compactor when dropped (see [`compactor`]); joined like the watchdog.
    compactor_stop: Option<std::sync::mpsc::Sender<()>>,
    compactor: Option<std::thread::JoinHandle<()>>,
    stats: Arc<FlushStats>,
    /// Set once by the first storage I/O failure; see [`Failure`].
    failure: Arc<Failure>,
    /// True when [`Store::begin_run`] found that the last run did not stop cleanly.
    unclean: std::sync::atomic::AtomicBool,
    /// Durable writes on their way to the flusher, and how long it waits for them.
    linger: Arc<Linger>,
}

/// Fail-stop after a storage I/O error (a full disk, above all). After a failed `fdatasync`
/// the kernel may have dropped pages it could not write, so what reached the disk is no
/// longer known, and the index in memory may hold writes that never did. So the broker does
/// not carry on: it stops taking work, answers UNAVAILABLE naming the failure, reports
/// NOT_SERVING, and needs a restart of the process, whose replay of the log recovers
/// everything that was made durable; nothing else was ever acknowledged. (sled, the storage
/// before 2026-11-29, could not go on after an I/O error either, and could wedge for good.)
#[derive(Debug)]
struct Failure {
    /// The database directory, named in the message so the operator knows which disk.
    path: PathBuf,
    /// The message callers get; None while storage is healthy.
    tx: watch::Sender<Option<String>>,
    /// The storage itself, stopped from writing when a failure is recorded: writes that do
    /// not go through a transaction (`Store::tree`) would otherwise still reach it.
    db: kv::Db,
}

impl Failure {
    /// Records a storage error as the failure (see [`Failure::record`]).
    fn set(&self, e: &kv::Error) -> BrokerError {
        self.record(crate::error::storage_failed(e, &self.path))
    }

    /// Records the first failure (later ones only repeat it) and returns the caller's error.
    fn record(&self, msg: String) -> BrokerError {
        let first = self.tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(msg.clone());
                true
            } else {
                false
            }
        });
        if first {
            self.db.fail(&msg);
            tracing::error!(error = %msg, "storage failed; refusing work until the broker is restarted");
        }
        self.error().unwrap_or(BrokerError::Unavailable(msg))
    }

    /// The error to answer with, once storage has failed.
    fn error(&self) -> Option<BrokerError> {
        self.tx.borrow().clone().map(BrokerError::Unavailable)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.commit_tx.take());
        // A grouped write may hold a store handle (through `Fed`), so the last handle can be
        // dropped on the committer itself, which must not join itself (that panics); its loop
        // ends by itself once the channel is closed, and then the flusher's, whose channel
        // the committer holds a sender of: joining the flusher here would wait for ever.
        let on_committer = self
            .committer
            .as_ref()
            .is_some_and(|h| h.thread().id() == std::thread::current().id());
        if let Some(h) = self.committer.take() {
            // Like the flusher below: after a failure the disk may never return to it.
            if !on_committer && (self.failure.error().is_none() || h.is_finished()) {
                let _ = h.join();
            }
        }
        drop(self.flush_tx.take());
        if let Some(h) = self.flusher.take() {
            // After a failure the flusher may wait on the disk forever (see `Failure`); the process
            // is to be restarted anyway, so it is left behind rather than hang the shutdown.
            if !on_committer && (self.failure.error().is_none() || h.is_finished()) {
                let _ = h.join();
            }
        }
        // These two end by themselves once their senders are gone, unless a failed disk holds
        // them (the compactor in a flush, the watchdog reading the free space): left then.
        drop(self.compactor_stop.take());
        drop(self.watchdog_stop.take());
        for h in [self.compactor.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            if self.failure.error().is_none() || h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// Counters of the group-commit flusher.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Flushes performed.
    pub flushes: AtomicU64,
    /// Durability requests answered (a flush answers a whole batch).
    pub requests: AtomicU64,
}

impl Store {
    /// Opens (or creates) the database and starts the flusher thread. The cache size is
    /// unused since the store of 2026-11-29 (it was sled's), and kept for the callers.
    pub fn open(path: &Path, _cache_bytes: u64, broker_id: &str) -> Result<Self> {
        refuse_sled(path)?;
        let db = kv::Db::open(path, kv_options()).map_err(|e| match e {
            kv::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                BrokerError::Unavailable(format!(
                    "cannot open the database at {}: no space left on its disk; free some and start again",
                    path.display()
                ))
            }
            kv::Error::Locked(_) => BrokerError::Unavailable(format!(
                "cannot open the database at {}: it is in use (is another broker using this data dir?)",
                path.display()
            )),
            other => BrokerError::Unavailable(format!(
                "cannot open the database at {}: {other}",
                path.display()
            )),
        })?;
        let head = audit::load_head(&db.tree(T::Audit as usize))?;
        let stats = Arc::new(FlushStats::default());
        // Bounded: a writer that outruns the disk waits for room instead of growing memory.
        let (flush_tx, flush_rx) = mpsc::channel(4096);
        let failure = Arc::new(Failure {
            path: path.to_path_buf(),
            tx: watch::channel(None).0,
            db: db.clone(),
        });
        let core = Arc::new(Core {
            db: db.clone(),
            write_lock: Mutex::new(head),
            broker_id: broker_id.to_string(),
            failure: failure.clone(),
            committing: Arc::new(Mutex::new(None)),
        });
        // Bounded like the flusher's channel: writers wait for room rather than grow memory.
        let (commit_tx, commit_rx) = mpsc::channel(4096);
        let committer_core = core.clone();
        // The committer's own sender: the flusher ends once the committer and the store are gone.
        let committer_flush = flush_tx.clone();
        let committer = std::thread::Builder::new()
            .name("govshare-commit".into())
            .spawn(move || committer(committer_core, commit_rx, committer_flush))
            .map_err(|e| BrokerError::internal(format!("cannot start committer thread: {e}")))?;
        let flushing = Arc::new(Mutex::new(Flushing::default()));
        let flusher_db = db.clone();
        let flusher_stats = stats.clone();
        let flusher_failure = failure.clone();
        let flusher_flushing = flushing.clone();
        let linger = Arc::new(Linger::default());
        let flusher_linger = linger.clone();
        let flusher = std::thread::Builder::new()
            .name("govshare-flusher".into())
            .spawn(move || {
                flusher(
                    flusher_db,
                    flush_rx,
                    flusher_stats,
                    flusher_failure,
                    flusher_flushing,
                    flusher_linger,
                )
            })
            .map_err(|e| BrokerError::internal(format!("cannot start flusher thread: {e}")))?;
        let (compactor_stop, compactor_stopped) = std::sync::mpsc::channel();
        let compactor_db = db.clone();
        let compactor_failure = failure.clone();
        let compactor = std::thread::Builder::new()
            .name("govshare-compact".into())
            .spawn(move || compactor(compactor_db, compactor_stopped, compactor_failure))
            .map_err(|e| BrokerError::internal(format!("cannot start compactor: {e}")))?;
        let (watchdog_stop, stopped) = std::sync::mpsc::channel();
        let watchdog_failure = failure.clone();
        let space = Arc::new(Space {
            path: path.to_path_buf(),
            db: db.clone(),
            min_free: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            appended: AtomicU64::new(0),
        });
        let watchdog_space = space.clone();
        let watchdog_committing = core.committing.clone();
        let watchdog_db = db.clone();
        let watchdog = std::thread::Builder::new()
            .name("govshare-flushdog".into())
            .spawn(move || {
                watchdog(
                    watchdog_db,
                    stopped,
                    Watched {
                        flushing,
                        committing: watchdog_committing,
                    },
                    watchdog_failure,
                    watchdog_space,
                )
            })
            .map_err(|e| BrokerError::internal(format!("cannot start flush watchdog: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                core,
                commit_tx: Some(commit_tx),
                committer: Some(committer),
                keys: std::sync::RwLock::new(None),
                flush_tx: Some(flush_tx),
                flusher: Some(flusher),
                watchdog_stop: Some(watchdog_stop),
                watchdog: Some(watchdog),
                compactor_stop: Some(compactor_stop),
                compactor: Some(compactor),
                stats,
                failure,
                space,
                unclean: std::sync::atomic::AtomicBool::new(false),
                linger,
            }),
        })
    }

    /// Sets `[storage] flush_linger_us`: how long at most a flush waits for durable writes
    /// that are on their way (see [`Store::durable_intent`]); 0 flushes at once.
    pub fn set_flush_linger(&self, linger: std::time::Duration) {
        let us = u64::try_from(linger.as_micros()).unwrap_or(u64::MAX);
        self.inner.linger.max_us.store(us, Ordering::Relaxed);
    }

    /// Says that a durable write is coming (an accept being checked, before its
    /// [`Store::write_grouped_durable`]; an answer on its way to the dispatcher's
    /// [`Store::durable_for`]): while any are, a flush waits for them, up to
    /// `[storage] flush_linger_us`, so that under load one flush covers many writes and an
    /// idle broker flushes at once. Dropping it (the write handed to the flusher, or given
    /// up) says it is no longer coming.
    pub fn durable_intent(&self) -> Intent {
        self.inner.linger.add();
        Intent(self.inner.linger.clone())
    }

    /// Sets `[storage] min_free_bytes` (0: no check) and checks the disk now.
    pub fn set_min_free(&self, bytes: u64) {
        self.inner.space.min_free.store(bytes, Ordering::Relaxed);
        self.inner.space.refresh();
    }

    /// Refuses new work (not work already accepted) while the database's disk is below
    /// `[storage] min_free_bytes`, and after a storage failure.
    pub fn check_room(&self) -> Result<()> {
        self.check()?;
        let s = &self.inner.space;
        if s.low() {
            let mib = |b: u64| b / (1024 * 1024);
            return Err(BrokerError::ResourceExhausted(format!(
                "the disk holding {} has {} MiB free, below [storage] min_free_bytes ({} MiB): new work is refused until space is freed; work already accepted goes on",
                s.path.display(),
                mib(s.free()),
                mib(s.min_free.load(Ordering::Relaxed))
            )));
        }
        Ok(())
    }

    /// A tree, for reads, scans and single writes outside a transaction.
    pub fn tree(&self, t: T) -> kv::Tree {
        self.inner.db.tree(t as usize)
    }

    /// Reads and decodes a protobuf record.
    pub fn get<M: prost::Message + Default>(&self, t: T, key: &str) -> Result<Option<M>> {
        // After a failure, answer as every other call does, naming it.
        self.check()?;
        let got = self.tree(t).get(key.as_bytes()).map_err(|e| match e {
            kv::Error::Io { .. } => self.inner.failure.set(&e),
            other => other.into(),
        })?;
        match got {
            Some(v) => Ok(Some(M::decode(v.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Runs `f` as one atomic transaction over every tree, appending the audit entries it
    /// returns to the hash chain in the same transaction. Blocking: call from a blocking thread.
    pub fn write<R>(&self, f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)>) -> Result<R> {
        self.inner.core.transact(f)
    }

    /// Like [`Store::write`], but `f` runs on the committer thread, in one transaction with the
    /// writes other callers handed it meanwhile: one frame, one `pwrite`, and one lock of the
    /// index for the whole group, so on a busy broker this is cheaper than a transaction each. `f` sees
    /// what the writes before it in the group wrote, as if they had run one after another; if
    /// `f` fails, the group is undone and each write runs alone, so `f` may run twice (it must
    /// not act outside the transaction). Keep `f` short: it holds up the writes behind it.
    pub async fn write_grouped<R: Send + 'static>(
        &self,
        f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send + 'static,
    ) -> Result<R> {
        self.hand_over(Grouped::job(f, None)).await
    }

    /// Like [`Store::write_grouped`], and asks for the write to be made durable: the committer
    /// asks for one flush for all such writes of a group, so that a group's callers share a
    /// flush rather than each starting one. Answers once the write has committed, with what
    /// resolves once it is on disk; an error means it was not written.
    pub async fn write_grouped_durable<R: Send + 'static>(
        &self,
        intent: Intent,
        f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send + 'static,
    ) -> Result<(R, Flushed)> {
        let (flushed, reply) = oneshot::channel();
        let r = self
            .hand_over(Grouped::job(f, Some((flushed, intent))))
            .await?;
        Ok((r, self.flushed(reply)))
    }

    /// Hands a write to the committer and waits for its answer.
    async fn hand_over<R>(
        &self,
        (job, rx): (Box<dyn Job>, oneshot::Receiver<Result<R>>),
    ) -> Result<R> {
        self.check()?;
        let committer = self.committer()?;
        // After a failure the committer may be held for good (see `Failure`): a write waiting
        // for it, to hand over or for its answer, is refused then rather than left hanging.
        let mut failed = self.inner.failure.tx.subscribe();
        let handed = async {
            committer.send(job).await.map_err(|_| shutting_down())?;
            rx.await.map_err(|_| shutting_down())?
        };
        tokio::select! {
            biased;
            r = handed => r,
            _ = failed.wait_for(Option::is_some) => Err(self.check().err().unwrap_or_else(shutting_down)),
        }
    }

    /// [`Store::write_grouped`] from a blocking thread (never from an async task).
    pub fn write_grouped_blocking<R: Send + 'static>(
        &self,
        f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send + 'static,
    ) -> Result<R> {
        futures::executor::block_on(self.write_grouped(f))
    }

    /// Many [`Store::write_grouped`] writes handed over together (so that they share a
    /// transaction where they can), from a blocking thread; answers each, in order.
    pub fn write_grouped_all_blocking<R, F>(&self, fs: Vec<F>) -> Vec<Result<R>>
    where
        R: Send + 'static,
        F: Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send + 'static,
    {
        futures::executor::block_on(futures::future::join_all(
            fs.into_iter().map(|f| self.write_grouped(f)),
        ))
    }

    fn committer(&self) -> Result<&mpsc::Sender<Box<dyn Job>>> {
        self.inner.commit_tx.as_ref().ok_or_else(shutting_down)
    }

    /// Waits until everything written before the call is on disk. Many callers share one flush.
    pub async fn durable(&self) -> Result<()> {
        self.durable_for(Vec::new()).await
    }

    /// A mark for everything written so far (for [`Store::durable_upto`]): what a caller
    /// read from the store before taking it is covered.
    pub fn written(&self) -> u64 {
        self.inner.db.written()
    }

    /// Waits until everything up to `mark` (from [`Store::written`]) is on disk: at once when
    /// a flush covered it already, as when sending what a writer has flushed itself.
    pub async fn durable_upto(&self, mark: u64) -> Result<()> {
        self.check()?;
        if self.inner.db.durable(mark) {
            return Ok(());
        }
        self.wait_flush(mark, Vec::new()).await
    }

    /// [`Store::durable`] for writes announced with [`Store::durable_intent`]: they are no
    /// longer on their way once the flusher has the request.
    pub async fn durable_for(&self, intents: Vec<Intent>) -> Result<()> {
        self.check()?;
        self.wait_flush(self.written(), intents).await
    }

    /// Asks the flusher for a flush covering `mark`, and waits for it.
    async fn wait_flush(&self, mark: u64, intents: Vec<Intent>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let sender = self.inner.flush_tx.as_ref().ok_or_else(shutting_down)?;
        // A flusher stuck on a failed disk stops taking requests once its channel is full:
        // asking is refused with the failure then, as waiting for the answer is.
        let mut failed = self.inner.failure.tx.subscribe();
        tokio::select! {
            biased;
            sent = sender.send(Waiter(vec![tx], mark)) => sent.map_err(|_| shutting_down())?,
            _ = failed.wait_for(Option::is_some) => {
                return Err(self.check().err().unwrap_or_else(shutting_down))
            }
        }
        drop(intents);
        self.flushed(rx).wait().await
    }

    fn flushed(&self, reply: oneshot::Receiver<std::result::Result<(), String>>) -> Flushed {
        Flushed {
            reply,
            failed: self.inner.failure.tx.subscribe(),
        }
    }

    /// Flushes now, on the calling (blocking) thread; used at shutdown.
    pub fn flush_blocking(&self) -> Result<()> {
        self.check()?;
        self.inner
            .db
            .flush()
            .map_err(|e| self.inner.failure.set(&e))?;
        Ok(())
    }

    /// UNAVAILABLE, naming the failure, once storage has failed (see `Failure` in this module).
    pub fn check(&self) -> Result<()> {
        match self.inner.failure.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The storage failure, once there has been one: the broker needs a restart.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.tx.borrow().clone()
    }

    /// Changes to [`Store::failure`], for the health service. Holding it keeps no store handle.
    pub fn failure_watch(&self) -> watch::Receiver<Option<String>> {
        self.inner.failure.tx.subscribe()
    }

    /// Every broker signing key known here (this broker's and those announced to it).
    /// Read on every grant check, so served from memory; `add_key` keeps the copy current.
    pub fn keys(&self) -> Result<Arc<Vec<govshare_proto::v1::KeyAnnouncement>>> {
        if let Some(k) = self
            .inner
            .keys
            .read()
            .map_err(|_| BrokerError::internal("keys lock poisoned"))?
            .as_ref()
        {
            return Ok(k.clone());
        }
        let loaded: Vec<govshare_proto::v1::KeyAnnouncement> = self
            .tree(T::Keys)
            .iter()
            .map(|kv| Ok(prost::Message::decode(kv?.1.as_ref())?))
            .collect::<Result<_>>()?;
        let loaded = Arc::new(loaded);
        *self
            .inner
            .keys
            .write()
            .map_err(|_| BrokerError::internal("keys lock poisoned"))? = Some(loaded.clone());
        Ok(loaded)
    }

    /// Records a broker's signing key (this broker's own, or one announced over a link).
    pub fn add_key(&self, k: &govshare_proto::v1::KeyAnnouncement) -> Result<()> {
        self.tree(T::Keys).insert(
            index_key(&k.broker_id, &k.key_id),
            prost::Message::encode_to_vec(k),
        )?;
        // Reloaded from the tree at the next read.
        *self
            .inner
            .keys
            .write()
            .map_err(|_| BrokerError::internal("keys lock poisoned"))? = None;
        Ok(())
    }

    /// Marks the database as in use by a running broker (blocking; durable with the next
    /// flush). Answers, and remembers for [`Store::unclean_start`], whether the previous run
    /// ended without [`Store::end_run_blocking`]: a crash, a kill, or a storage failure.
    ///
    /// The mark holds the first audit seq of the run. After an unclean stop, the entries that
    /// run wrote are verified, and each gap among them (entries sled lost while keeping later
    /// ones, as it can when a write fails on a full disk) is recorded by an
    /// [`audit::ENTRIES_LOST`] entry, so that `audit verify` shows the loss rather than an
    /// edit. A break of any other kind is left for `audit verify` to name.
    pub fn begin_run(&self) -> Result<bool> {
        self.check()?;
        let previous = self.tree(T::Meta).get(RUNNING)?;
        let unclean = previous.is_some();
        let mut lost = Vec::new();
        if let Some(mark) = previous {
            match run_start(&mark) {
                Some(from) => lost = self.audit_losses_since(from)?,
                None => tracing::warn!(
                    "the last run's mark names no first audit entry (an older broker wrote \
                     it); its audit entries are not checked"
                ),
            }
        }
        // Nothing else writes during the start, so the head read here is the one the losses
        // are chained onto.
        let head = self
            .inner
            .core
            .write_lock
            .lock()
            .map_err(|_| BrokerError::internal("audit lock poisoned"))?
            .seq;
        let first_of_run = head + lost.len() as u64 + 1;
        self.inner.core.transact(|tx| {
            tx.put_raw(T::Meta, RUNNING, &first_of_run.to_be_bytes())?;
            let entries = lost
                .iter()
                .map(|g| {
                    let mut e = audit::entry(audit::ENTRIES_LOST, self.broker_id());
                    e.lost_from = g.from;
                    e.lost_to = g.to;
                    e.reason = format!(
                        "entries {}-{} were lost before reaching the disk by a run that did not \
                         stop cleanly; none of them had been acknowledged",
                        g.from, g.to
                    );
                    e
                })
                .collect();
            Ok(((), entries))
        })?;
        self.inner.unclean.store(unclean, Ordering::Relaxed);
        Ok(unclean)
    }

    /// The gaps among the audit entries from `from` on (the run that did not stop cleanly):
    /// none can have been recorded yet, since a loss is recorded by the run after the one that
    /// lost it, whose mark comes after the record.
    fn audit_losses_since(&self, from: u64) -> Result<Vec<audit::Loss>> {
        let lost = audit::gaps_from(&self.tree(T::Audit), from)?;
        for g in &lost {
            tracing::warn!(
                from = g.from,
                to = g.to,
                "audit entries of the last run were lost before reaching the disk; recording \
                 the loss in the audit log"
            );
        }
        Ok(lost)
    }

    /// True when the previous run did not stop cleanly (see [`Store::begin_run`]). Frames are
    /// atomic now, but a data dir converted from sled can hold one tree written and not the
    /// next (sled applied a transaction tree by tree), so recovery checks the exchange indexes
    /// against their records.
    pub fn unclean_start(&self) -> bool {
        self.inner.unclean.load(Ordering::Relaxed)
    }

    /// Marks a clean stop and flushes (blocking): the last thing a broker does with the store.
    pub fn end_run_blocking(&self) -> Result<()> {
        self.check()?;
        self.tree(T::Meta).remove(RUNNING)?;
        self.flush_blocking()
    }

    /// A new id, unique and increasing across restarts (for queue and result order).
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.inner.db.generate_id()?)
    }

    /// How many handles share this store (for shutdown, which waits to hold the last one).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// The flusher's counters.
    pub fn flush_stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// This broker's id, as written into audit entries.
    pub fn broker_id(&self) -> &str {
        &self.inner.core.broker_id
    }
}

/// The `meta` key present while a broker runs on the database (see [`Store::begin_run`]).
pub const RUNNING: &[u8] = b"running";

/// The first audit seq of the run a [`RUNNING`] mark was written by; None for a mark written
/// by a broker from before marks held it.
pub fn run_start(mark: &[u8]) -> Option<u64> {
    mark.try_into().ok().map(u64::from_be_bytes)
}

fn shutting_down() -> BrokerError {
    BrokerError::Unavailable("storage is shutting down".into())
}

/// What every transaction needs: the trees, the audit chain's head, the failure record.
/// Shared by the store's handles and the committer thread.
#[derive(Debug)]
struct Core {
    db: kv::Db,
    /// Serialises writes that append to the audit chain. A std Mutex, not a tokio one: it is
    /// only taken on blocking threads and never held across an `.await`.
    write_lock: Mutex<AuditHead>,
    broker_id: String,
    failure: Arc<Failure>,
    /// When the committer's group transaction in progress started; None between groups.
    /// Watched like a flush (see [`watchdog`]), since a write to a failing disk may never return.
    committing: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Core {
    /// One atomic transaction over every tree, with `f`'s audit entries chained into it.
    fn transact<R>(&self, f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)>) -> Result<R> {
        if let Some(e) = self.failure.error() {
            return Err(e);
        }
        let mut head = self
            .write_lock
            .lock()
            .map_err(|_| BrokerError::internal("audit lock poisoned"))?;
        // Again under the lock: nothing may be chained onto a transaction that failed to
        // write while this one waited for it.
        if let Some(e) = self.failure.error() {
            return Err(e);
        }
        let start = head.clone();
        let broker = self.broker_id.clone();
        let written = self
            .db
            .transaction(|ktx| -> std::result::Result<_, TxFailed> {
                let tx = Tx { tx: ktx };
                let (r, entries) = f(&tx).map_err(TxFailed::Refused)?;
                let mut h = start.clone();
                for e in entries {
                    let chained = audit::chain(&mut h, e, &broker);
                    ktx.insert(
                        T::Audit as usize,
                        &chained.seq.to_be_bytes()[..],
                        prost::Message::encode_to_vec(&chained),
                    )?;
                }
                Ok((r, h))
            });
        let (r, new_head) = match written {
            Ok(v) => v,
            // Refused before anything was written (a group of writes too big for one frame):
            // not a failed disk. A group then runs its writes one by one (`commit_group`).
            Err(TxFailed::Storage(kv::Error::TooLarge(why))) => {
                return Err(BrokerError::ResourceExhausted(format!(
                    "{why}; write less at once"
                )))
            }
            Err(TxFailed::Storage(e)) => return Err(self.failure.set(&e)),
            Err(TxFailed::Refused(e)) => return Err(e),
        };
        metrics::counter!(crate::metrics::AUDIT_APPENDS).increment(new_head.seq - start.seq);
        *head = new_head;
        Ok(r)
    }

    /// Runs a group of writes as one transaction.
    fn transact_group(&self, jobs: &mut [Box<dyn Job>]) -> Result<()> {
        let jobs = std::cell::RefCell::new(jobs);
        self.transact(|tx| {
            let mut jobs = jobs.borrow_mut();
            let mut entries = Vec::new();
            for j in jobs.iter_mut() {
                entries.extend(j.run(tx)?);
            }
            Ok(((), entries))
        })
    }
}

/// Why a transaction was not committed: the closure refused (nothing was written), or the
/// store failed to write it, which stops the broker taking work (see `Failure`).
enum TxFailed {
    Refused(BrokerError),
    Storage(kv::Error),
}

impl From<kv::Error> for TxFailed {
    fn from(e: kv::Error) -> Self {
        Self::Storage(e)
    }
}

/// A data dir's `db` that sled wrote (by a govshare from before 2026-11-29) is not read by
/// this store: it says so, and how to convert it, rather than start on an empty database.
fn refuse_sled(path: &Path) -> Result<()> {
    if path.join("conf").is_file() && path.join("db").is_file() {
        return Err(BrokerError::Unavailable(format!(
            "{} holds a database in the format of an older govshare (sled); convert it with \
             `govshare-broker migrate-storage --data-dir DIR` (with the broker stopped) and start again",
            path.display()
        )));
    }
    Ok(())
}

fn kv_options() -> kv::Options {
    kv::Options {
        trees: TREE_NAMES.len(),
        // Keyed by sequence number, and never shrinking: the compact index.
        seq_trees: vec![T::Audit as usize],
        // Read for every exchange (the caller's node, its grant, the grant's issuer key,
        // revocations, routes): a read from the segment file was a `pread` each, about 5% of a
        // `sync` exchange's CPU. They hold one record per node, grant, key, revocation and
        // route, so keeping them in memory costs what those records weigh (a grant about
        // 0.5 KB). The catalog (every dataset of the cascade) is left on disk. The consumers'
        // grant index is read for every exchange that names no grant, each entry holding the
        // grant's dataset id.
        memory_trees: [
            T::Nodes,
            T::Grants,
            T::Keys,
            T::Revoked,
            T::Routes,
            T::GrantsByConsumer,
        ]
        .map(|t| t as usize)
        .to_vec(),
        ..kv::Options::default()
    }
}

/// Opens a stopped broker's database for offline tools (`audit verify`, tests).
pub fn open_offline(path: &Path) -> Result<kv::Db> {
    refuse_sled(path)?;
    Ok(kv::Db::open(path, kv_options())?)
}

/// What [`migrate_from_sled`] did.
#[derive(Debug)]
pub struct Migrated {
    /// Records copied, over every tree.
    pub records: u64,
    /// Where the sled database was moved to (kept until the operator deletes it).
    pub kept_at: PathBuf,
}

/// Converts a stopped broker's sled database at `path` (written by a govshare from before
/// 2026-11-29) to the current store, in place: every tree is copied into a new store beside
/// it, made durable, and only then swapped in; the sled files are kept at `PATH.sled-old`.
/// Ids handed out later stay above sled's, so queue and result order hold.
pub fn migrate_from_sled(path: &Path) -> Result<Migrated> {
    if refuse_sled(path).is_ok() {
        return Err(BrokerError::precondition(format!(
            "{} holds no sled database (already converted, or never written by one)",
            path.display()
        )));
    }
    let storage = |e: sled::Error| {
        BrokerError::Unavailable(format!(
            "reading the sled database at {}: {e}",
            path.display()
        ))
    };
    let old = sled::Config::new().path(path).open().map_err(|e| {
        BrokerError::Unavailable(format!(
            "cannot open the sled database at {} (is the broker still running?): {e}",
            path.display()
        ))
    })?;
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let (new_path, kept_at) = (with(".kv-new"), with(".sled-old"));
    if new_path.exists() {
        // Left by a conversion that was interrupted: it never replaced anything.
        std::fs::remove_dir_all(&new_path).map_err(|e| {
            BrokerError::Unavailable(format!("removing {}: {e}", new_path.display()))
        })?;
    }
    let mut records = 0;
    {
        let db = kv::Db::open(&new_path, kv_options())?;
        for (i, name) in TREE_NAMES.iter().enumerate() {
            let tree = old.open_tree(name).map_err(storage)?;
            let mut batch = Vec::new();
            let mut iter = tree.iter();
            loop {
                let next = iter.next().transpose().map_err(storage)?;
                let end = next.is_none();
                if let Some((k, v)) = next {
                    batch.push((k, v));
                }
                if batch.len() >= 1024 || (end && !batch.is_empty()) {
                    records += batch.len() as u64;
                    db.transaction(|tx| {
                        for (k, v) in batch.drain(..) {
                            tx.insert(i, &k, kv::Value::copy_from_slice(&v))?;
                        }
                        Ok::<_, kv::Error>(())
                    })?;
                }
                if end {
                    break;
                }
            }
        }
        db.advance_ids(old.generate_id().map_err(storage)?.saturating_add(1))?;
        db.flush()?;
    }
    drop(old);
    let io = |what: &str, e: std::io::Error| BrokerError::Unavailable(format!("{what}: {e}"));
    std::fs::rename(path, &kept_at).map_err(|e| io("moving the sled database aside", e))?;
    std::fs::rename(&new_path, path).map_err(|e| io("moving the new database in", e))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the data dir", e))?;
    }
    Ok(Migrated { records, kept_at })
}

/// A write waiting for the committer.
trait Job: Send {
    /// Runs the write inside the group's transaction, returning its audit entries.
    fn run(&mut self, tx: &Tx<'_>) -> Result<Vec<AuditEntry>>;
    /// Where to answer once a flush covers the write, if its caller asked for that, and the
    /// intent to drop once the flusher has the request.
    fn take_flush(&mut self) -> Option<(FlushReply, Intent)>;
    /// Answers the caller once the group has committed, or with why not.
    fn finish(self: Box<Self>, outcome: Result<()>);
}

/// A [`Job`] of [`Store::write_grouped`]: the write and where its result goes.
struct Grouped<R, F> {
    f: F,
    out: Option<R>,
    reply: oneshot::Sender<Result<R>>,
    /// Set for [`Store::write_grouped_durable`].
    flush: Option<(FlushReply, Intent)>,
}

impl<R, F> Grouped<R, F>
where
    R: Send + 'static,
    F: Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send + 'static,
{
    /// The job for the committer, and where its result will come.
    fn job(
        f: F,
        flush: Option<(FlushReply, Intent)>,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<R>>) {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(Self {
            f,
            out: None,
            reply,
            flush,
        });
        (job, rx)
    }
}

impl<R, F> Job for Grouped<R, F>
where
    R: Send,
    F: Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)> + Send,
{
    fn run(&mut self, tx: &Tx<'_>) -> Result<Vec<AuditEntry>> {
        let (r, entries) = (self.f)(tx)?;
        self.out = Some(r);
        Ok(entries)
    }

    fn take_flush(&mut self) -> Option<(FlushReply, Intent)> {
        self.flush.take()
    }

    fn finish(self: Box<Self>, outcome: Result<()>) {
        let me = *self;
        let r = outcome.and_then(|()| {
            me.out
                .ok_or_else(|| BrokerError::internal("grouped write committed without running"))
        });
        // A caller that gave up (its call was cancelled) is no loss: the write stands.
        let _ = me.reply.send(r);
    }
}

/// Most writes in one group: enough to amortise the transaction, few enough that one group
/// does not hold up the dispatcher's own transactions for long.
const MAX_GROUP: usize = 128;

/// The committer loop: take every waiting write, commit them in one transaction, answer all,
/// and ask the flusher once for those of them that are to be made durable.
fn committer(core: Arc<Core>, mut rx: mpsc::Receiver<Box<dyn Job>>, flush: mpsc::Sender<Waiter>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        metrics::histogram!(crate::metrics::WRITE_GROUP).record(batch.len() as f64);
        set_since(&core.committing, Some(std::time::Instant::now()));
        let (durable, intents) = commit_group(&core, &mut batch);
        set_since(&core.committing, None);
        if !durable.0.is_empty() {
            // Blocks only while the flusher's channel is full: writers then wait for the disk.
            if let Err(mpsc::error::SendError(w)) = flush.blocking_send(durable) {
                w.answer(&Err("storage is shutting down".into()));
            }
        }
        // Only now, with the request in the flusher's channel, are they no longer coming.
        drop(intents);
    }
}

fn set_since(cell: &Mutex<Option<std::time::Instant>>, v: Option<std::time::Instant>) {
    *cell
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = v;
}

/// Commits a group of writes in one transaction and answers each of them; returns the
/// durability waiter of those committed that asked for it, and their intents. A write not
/// committed drops its flush reply (its caller has its error already) and its intent.
fn commit_group(core: &Core, batch: &mut Vec<Box<dyn Job>>) -> (Waiter, Vec<Intent>) {
    let mut durable = Vec::new();
    let mut intents = Vec::new();
    let mut finish = |mut j: Box<dyn Job>, r: Result<()>| {
        if let (Ok(()), Some((f, intent))) = (&r, j.take_flush()) {
            durable.push(f);
            intents.push(intent);
        }
        j.finish(r);
    };
    match core.transact_group(batch) {
        Ok(()) => batch.drain(..).for_each(|j| finish(j, Ok(()))),
        // A failed disk fails them all; so does the one write's own refusal.
        Err(e) if batch.len() == 1 || core.failure.error().is_some() => {
            batch.drain(..).for_each(|j| finish(j, Err(e.clone())))
        }
        // One write refused itself (a denial, a conflict it checks for): the group was
        // undone, so each runs alone and the others are not refused with it.
        Err(_) => {
            for mut j in batch.drain(..) {
                let r = core.transact_group(std::slice::from_mut(&mut j));
                finish(j, r);
            }
        }
    }
    (Waiter(durable, core.db.written()), intents)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A store of `330000/hub` in a temp dir of its own (kept alive with it).
    pub(crate) fn temp_store() -> Result<(tempfile::TempDir, Store)> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::internal(e.to_string()))?;
        let store = Store::open(dir.path(), 1 << 20, "330000/hub")?;
        Ok((dir, store))
    }

    fn sled_ok<R>(r: sled::Result<R>) -> Result<R> {
        r.map_err(|e| BrokerError::internal(format!("sled: {e}")))
    }

    #[test]
    fn a_sled_data_dir_is_refused_then_converted_with_every_record_and_later_ids() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::internal(e.to_string()))?;
        let path = dir.path().join("db");
        let big = vec![7u8; 300];
        let last_id = {
            let db = sled_ok(sled::Config::new().path(&path).open())?;
            for (i, name) in TREE_NAMES.iter().enumerate() {
                let t = sled_ok(db.open_tree(name))?;
                sled_ok(t.insert(format!("k{i}"), format!("v{i}").as_bytes()))?;
            }
            sled_ok(sled_ok(db.open_tree("exchanges"))?.insert("big", big.clone()))?;
            let audit_tree = sled_ok(db.open_tree("audit"))?;
            sled_ok(audit_tree.remove(format!("k{}", T::Audit as usize)))?;
            let mut head = AuditHead::default();
            for n in 0..3 {
                let e = audit::chain(&mut head, entry(&format!("n{n}")), "330000/hub");
                sled_ok(audit_tree.insert(e.seq.to_be_bytes(), prost::Message::encode_to_vec(&e)))?;
            }
            let mut last = 0;
            for _ in 0..5 {
                last = sled_ok(db.generate_id())?;
            }
            sled_ok(db.flush())?;
            last
        };
        wait_for_sled_to_let_go(&path)?;
        match Store::open(&path, 1 << 20, "330000/hub") {
            Err(BrokerError::Unavailable(m)) => assert!(m.contains("migrate-storage"), "{m}"),
            other => panic!("a sled data dir must be refused, got {other:?}"),
        }
        let m = migrate_from_sled(&path)?;
        assert_eq!(m.records, TREE_NAMES.len() as u64 - 1 + 1 + 3);
        assert!(m.kept_at.join("conf").is_file(), "the sled files are kept");
        let store = Store::open(&path, 1 << 20, "330000/hub")?;
        for (i, _) in TREE_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != T::Audit as usize)
        {
            let got = store.inner.db.get(i, format!("k{i}").as_bytes())?;
            assert_eq!(got.as_deref(), Some(format!("v{i}").as_bytes()), "tree {i}");
        }
        assert_eq!(
            store.tree(T::Exchanges).get("big")?.as_deref(),
            Some(&big[..])
        );
        assert_eq!(
            audit::verify(&store.tree(T::Audit), None)?,
            audit::VerifyOutcome::Ok(3)
        );
        assert!(store.next_id()? > last_id, "ids go on above sled's");
        drop(store);
        assert!(matches!(
            migrate_from_sled(&path),
            Err(BrokerError::FailedPrecondition(_))
        ));
        Ok(())
    }

    /// sled releases its lock file when the last of its threads drops the database, which
    /// can be a moment after the caller's drop: waits (at most 10 s) until the lock is free.
    fn wait_for_sled_to_let_go(path: &Path) -> Result<()> {
        let lock_file = path.join("db");
        let f =
            std::fs::File::open(&lock_file).map_err(|e| BrokerError::internal(e.to_string()))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match f.try_lock() {
                Ok(()) => return f.unlock().map_err(|e| BrokerError::internal(e.to_string())),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => {
                    return Err(BrokerError::internal(format!(
                        "{} still locked: {e}",
                        lock_file.display()
                    )))
                }
            }
        }
    }

    fn entry(reason: &str) -> AuditEntry {
        let mut e = audit::entry("test_write", "330000/hub");
        e.reason = reason.to_string();
        e
    }

    /// One run of a broker on `dir`: starts it (`begin_run`), writes `n` audit entries, and
    /// stops cleanly or not. Answers whether the start found the run before it unclean.
    fn one_run(dir: &Path, n: usize, clean: bool) -> Result<bool> {
        let store = Store::open(dir, 1 << 20, "330000/hub")?;
        let unclean = store.begin_run()?;
        for i in 0..n {
            store.write(|_| Ok(((), vec![entry(&format!("w{i}"))])))?;
        }
        if clean {
            store.end_run_blocking()?;
        } else {
            store.flush_blocking()?;
        }
        Ok(unclean)
    }

    /// The database in `dir` with its audit entries `lost` removed, as a store that loses
    /// writes in the middle could leave it (sled could, after a write failed on a full disk);
    /// answers the store, not started.
    fn losing(dir: &Path, lost: &[u64]) -> Result<Store> {
        let store = Store::open(dir, 1 << 20, "330000/hub")?;
        for seq in lost {
            assert!(store.tree(T::Audit).contains_key(seq.to_be_bytes())?);
            store.tree(T::Audit).remove(seq.to_be_bytes())?;
        }
        store.flush_blocking()?;
        Ok(store)
    }

    /// `audit verify` as the CLI runs it: the unclean run's first entry from the mark.
    fn verify_as_offline(store: &Store) -> Result<audit::VerifyOutcome> {
        let mark = store.tree(T::Meta).get(RUNNING)?;
        audit::verify(&store.tree(T::Audit), mark.and_then(|m| run_start(&m)))
    }

    #[test]
    fn entries_an_unclean_run_lost_are_recorded_at_the_next_start_and_verify_as_a_loss(
    ) -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::internal(e.to_string()))?;
        assert!(!one_run(dir.path(), 3, true)?);
        // Entries 4-8, then a crash; sled kept 7 and 8 but lost 5 and 6.
        assert!(!one_run(dir.path(), 5, false)?);
        let store = losing(dir.path(), &[5, 6])?;
        // Offline, before the restart: shown as a loss not yet recorded, not as an edit.
        let pending = audit::Loss {
            from: 5,
            to: 6,
            recorded_at: None,
        };
        assert_eq!(
            verify_as_offline(&store)?,
            audit::VerifyOutcome::OkWithLosses {
                entries: 6,
                losses: vec![pending.clone()]
            }
        );
        // Without the mark's say-so the same gap breaks the chain.
        assert!(matches!(
            audit::verify(&store.tree(T::Audit), None)?,
            audit::VerifyOutcome::Broken { seq: 7, .. }
        ));
        drop(store);

        // The restart records the loss as entry 9, chained like any other.
        assert!(one_run(dir.path(), 2, true)?);
        let store = Store::open(dir.path(), 1 << 20, "330000/hub")?;
        let recorded = audit::Loss {
            recorded_at: Some(9),
            ..pending
        };
        let want = audit::VerifyOutcome::OkWithLosses {
            entries: 9,
            losses: vec![recorded.clone()],
        };
        assert_eq!(verify_as_offline(&store)?, want);
        assert_eq!(audit::verify(&store.tree(T::Audit), None)?, want);
        let nine = store
            .tree(T::Audit)
            .get(9u64.to_be_bytes())?
            .ok_or_else(|| BrokerError::internal("no entry 9"))?;
        let nine = <AuditEntry as prost::Message>::decode(nine.as_ref())?;
        assert_eq!(nine.decision, audit::ENTRIES_LOST);
        assert_eq!((nine.lost_from, nine.lost_to), (5, 6));
        assert!(recorded.to_string().contains("entries 5-6 lost"));
        drop(store);

        // Recorded once: a later start, after clean stops, records nothing again.
        assert!(!one_run(dir.path(), 1, true)?);
        let store = Store::open(dir.path(), 1 << 20, "330000/hub")?;
        assert_eq!(
            audit::verify(&store.tree(T::Audit), None)?,
            audit::VerifyOutcome::OkWithLosses {
                entries: 10,
                losses: vec![recorded]
            }
        );
        Ok(())
    }

    #[test]
    fn a_gap_before_the_unclean_run_is_a_break_and_is_not_recorded() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| BrokerError::internal(e.to_string()))?;
        assert!(!one_run(dir.path(), 5, true)?);
        assert!(!one_run(dir.path(), 3, false)?);
        // Entry 3 was written by the run that stopped cleanly: removing it is an edit.
        let store = losing(dir.path(), &[3])?;
        let broken = audit::VerifyOutcome::Broken {
            seq: 4,
            reason: "expected entry 3, found entry 4: entries 3-3 are missing and no entry \
                     records their loss"
                .into(),
        };
        assert_eq!(verify_as_offline(&store)?, broken);
        drop(store);
        assert!(one_run(dir.path(), 0, true)?);
        let store = Store::open(dir.path(), 1 << 20, "330000/hub")?;
        assert_eq!(audit::verify(&store.tree(T::Audit), None)?, broken);
        let losses = store
            .tree(T::Audit)
            .iter()
            .values()
            .filter_map(|v| <AuditEntry as prost::Message>::decode(v.ok()?.as_ref()).ok())
            .filter(|e| e.decision == audit::ENTRIES_LOST)
            .count();
        assert_eq!(losses, 0, "an edit is never recorded as a loss");
        Ok(())
    }

    #[test]
    fn a_loss_entry_for_entries_still_present_or_an_edit_after_a_gap_breaks_the_chain() -> Result<()>
    {
        let (_dir, store) = temp_store()?;
        for i in 0..3 {
            store.write(|_| Ok(((), vec![entry(&format!("w{i}"))])))?;
        }
        // A forged record of a loss of entries 2-3, which are there.
        let mut forged = audit::entry(audit::ENTRIES_LOST, "330000/hub");
        (forged.lost_from, forged.lost_to) = (2, 3);
        store.write(|_| Ok(((), vec![forged.clone()])))?;
        assert!(matches!(
            audit::verify(&store.tree(T::Audit), Some(1))?,
            audit::VerifyOutcome::Broken { seq: 4, ref reason } if reason.contains("not a gap")
        ));
        // An edited entry after an excused gap still breaks it.
        let (_dir, store) = temp_store()?;
        for i in 0..5 {
            store.write(|_| Ok(((), vec![entry(&format!("w{i}"))])))?;
        }
        let audit_tree = store.tree(T::Audit);
        audit_tree.remove(2u64.to_be_bytes())?;
        let four = audit_tree
            .get(4u64.to_be_bytes())?
            .ok_or_else(|| BrokerError::internal("no entry 4"))?;
        let mut four = <AuditEntry as prost::Message>::decode(four.as_ref())?;
        four.reason = "edited".into();
        audit_tree.insert(4u64.to_be_bytes(), prost::Message::encode_to_vec(&four))?;
        assert!(matches!(
            audit::verify(&audit_tree, Some(1))?,
            audit::VerifyOutcome::Broken { seq: 4, ref reason } if reason.contains("edited?")
        ));
        Ok(())
    }

    /// A grouped write that puts `key` and, when `refuse`, then refuses itself.
    fn job(
        store: &Store,
        key: &'static str,
        refuse: bool,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<&'static str>>) {
        Grouped::job(
            move |tx: &Tx<'_>| {
                tx.put_raw(T::Meta, key.as_bytes(), b"v")?;
                if refuse {
                    return Err(BrokerError::invalid(format!("{key} refused")));
                }
                Ok((key, vec![entry(key)]))
            },
            // Each asks to be made durable, as an accept does.
            Some((oneshot::channel().0, store.durable_intent())),
        )
    }

    #[test]
    fn one_refused_write_undoes_only_itself_and_the_chain_stays_whole() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let core = store.inner.core.clone();
        let (a, ra) = job(&store, "a", false);
        let (b, rb) = job(&store, "b", true);
        let (c, rc) = job(&store, "c", false);
        let mut batch = vec![a, b, c];
        let (durable, intents) = commit_group(&core, &mut batch);
        assert!(batch.is_empty());
        // The two writes that committed are to be flushed; the refused one is not.
        assert_eq!(durable.covers(), 2);
        // The refused write's intent went with it; the others' go once the flusher has them.
        assert_eq!(store.inner.linger.coming(), 2);
        drop(intents);
        assert_eq!(store.inner.linger.coming(), 0);
        assert_eq!(ra.blocking_recv().ok(), Some(Ok("a")));
        assert_eq!(
            rb.blocking_recv().ok(),
            Some(Err(BrokerError::invalid("b refused")))
        );
        assert_eq!(rc.blocking_recv().ok(), Some(Ok("c")));
        let meta = store.tree(T::Meta);
        assert!(meta.get("a")?.is_some() && meta.get("c")?.is_some());
        // The refused write's own put was undone with it.
        assert!(meta.get("b")?.is_none());
        // Two entries, one per committed write, chained without a gap.
        assert_eq!(
            audit::verify(&store.tree(T::Audit), None)?,
            audit::VerifyOutcome::Ok(2)
        );
        Ok(())
    }

    #[test]
    fn a_group_commits_as_one_and_each_write_sees_those_before_it() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let core = store.inner.core.clone();
        let (a, ra) = job(&store, "a", false);
        let (seen, rseen) = Grouped::job(
            |tx: &Tx<'_>| Ok((tx.get_raw(T::Meta, b"a")?.is_some(), vec![])),
            None,
        );
        let mut batch = vec![a, seen];
        assert_eq!(commit_group(&core, &mut batch).0.covers(), 1);
        assert_eq!(ra.blocking_recv().ok(), Some(Ok("a")));
        assert_eq!(rseen.blocking_recv().ok(), Some(Ok(true)));
        Ok(())
    }

    #[test]
    fn the_last_handle_may_be_dropped_by_the_committer_itself() -> Result<()> {
        use std::sync::atomic::AtomicBool;
        static COMMITTER_PANICKED: AtomicBool = AtomicBool::new(false);
        let previous = Arc::new(std::panic::take_hook());
        let chained = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("govshare-commit") {
                COMMITTER_PANICKED.store(true, Ordering::SeqCst);
            }
            chained(info);
        }));
        let (dir, store) = temp_store()?;
        // Hands a write to the committer (one poll sends it), then lets go of the caller.
        let hand_over =
            |f: std::pin::Pin<&mut (dyn std::future::Future<Output = Result<()>> + '_)>| {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(f.poll(&mut cx).is_pending());
            };
        // The first write holds the committer until the test has let go of its handle.
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        hand_over(std::pin::pin!(store.write_grouped(move |_| {
            g.wait();
            Ok(((), vec![]))
        })));
        // The second holds a handle, as an accept does through `Fed`: the last one, once the
        // test drops its own, so the committer drops the store when it is done with it.
        let held = store.clone();
        hand_over(std::pin::pin!(store.write_grouped(move |_| {
            let _keep = &held;
            Ok(((), vec![]))
        })));
        drop(store);
        gate.wait();
        // The store is gone once its file lock is free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut reopened = None;
        while reopened.is_none() && std::time::Instant::now() < deadline {
            reopened = Store::open(dir.path(), 1 << 20, "330000/hub").ok();
            if reopened.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| previous(info)));
        assert!(reopened.is_some(), "the store was never released");
        assert!(
            !COMMITTER_PANICKED.load(Ordering::SeqCst),
            "the committer panicked dropping the last handle"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_writes_from_many_tasks_all_commit() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.write_grouped(move |tx| {
                    tx.put_raw(T::Meta, format!("k{i}").as_bytes(), b"v")?;
                    Ok((i, vec![entry("grouped")]))
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t
                .await
                .map_err(|e| BrokerError::internal(e.to_string()))??;
            assert_eq!(got as usize, i);
        }
        store.durable().await?;
        assert_eq!(store.tree(T::Meta).len(), 200);
        assert_eq!(
            audit::verify(&store.tree(T::Audit), None)?,
            audit::VerifyOutcome::Ok(200)
        );
        Ok(())
    }

    /// Waits (boundedly) until `cond` holds.
    async fn wait_until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
        let since = std::time::Instant::now();
        while !cond() {
            if since.elapsed() > std::time::Duration::from_secs(10) {
                return Err(BrokerError::internal(format!(
                    "timed out waiting until {what}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok(())
    }

    // A flush waits for a durable write on its way, so that both share it; with none on its
    // way it does not wait at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_lingers_for_writes_on_their_way_and_only_for_them() -> Result<()> {
        let (_dir, store) = temp_store()?;
        // Far longer than the test may take: the flushes below end by the intent alone.
        store.set_flush_linger(std::time::Duration::from_secs(60));
        let flush_tx = store.inner.flush_tx.clone().ok_or_else(shutting_down)?;
        let queued = || flush_tx.max_capacity() - flush_tx.capacity();
        let send = |tx: &mpsc::Sender<Waiter>, reply: FlushReply| {
            let tx = tx.clone();
            async move {
                tx.send(Waiter(vec![reply], u64::MAX))
                    .await
                    .map_err(|_| shutting_down())
            }
        };
        let counts = |s: &Store| {
            let st = &s.inner.stats;
            (
                st.flushes.load(Ordering::Relaxed),
                st.requests.load(Ordering::Relaxed),
            )
        };
        // Idle: flushed at once.
        tokio::time::timeout(std::time::Duration::from_secs(10), store.durable())
            .await
            .map_err(|_| BrokerError::internal("an idle store lingered"))??;
        let before = counts(&store);
        // Something to make durable: a flush with nothing new costs no fdatasync and is not
        // counted.
        store.write(|tx| {
            tx.put_raw(T::Meta, b"test", b"1")?;
            Ok(((), vec![]))
        })?;
        let intent = store.durable_intent();
        let (tx1, mut first) = oneshot::channel();
        send(&flush_tx, tx1).await?;
        wait_until("the flusher took the first request", || queued() == 0).await?;
        let (tx2, second) = oneshot::channel();
        send(&flush_tx, tx2).await?;
        // The flusher lingers with the first, so the second waits in its channel.
        assert!(
            first.try_recv().is_err(),
            "the first was flushed without waiting"
        );
        assert_eq!(queued(), 1);
        drop(intent);
        for rx in [first, second] {
            tokio::time::timeout(std::time::Duration::from_secs(10), rx)
                .await
                .map_err(|_| BrokerError::internal("the flush never came"))?
                .map_err(|_| BrokerError::internal("the request was dropped"))?
                .map_err(BrokerError::Unavailable)?;
        }
        let after = counts(&store);
        assert_eq!((after.0 - before.0, after.1 - before.1), (1, 2));
        Ok(())
    }

    // What a writer's own flush covered is sent on (the link's outbox) without another flush;
    // what no flush covered yet is waited for, and flushed.
    #[tokio::test]
    async fn waiting_for_writes_a_flush_covered_already_costs_no_flush() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let put = |v: &'static [u8]| {
            store.write(move |tx| {
                tx.put_raw(T::Meta, b"test", v)?;
                Ok(((), vec![]))
            })
        };
        let flushes = || store.inner.stats.flushes.load(Ordering::Relaxed);
        put(b"1")?;
        let mark = store.written();
        store.durable().await?;
        let before = flushes();
        put(b"2")?;
        store.durable_upto(mark).await?;
        assert_eq!(flushes(), before, "the first write was durable already");
        // Through the flusher, as when the mark is not yet covered on the fast path.
        store.wait_flush(mark, Vec::new()).await?;
        assert_eq!(flushes(), before, "the flusher saw it covered too");
        let later = store.written();
        assert!(!store.inner.db.durable(later));
        store.durable_upto(later).await?;
        assert_eq!(flushes(), before + 1);
        assert!(store.inner.db.durable(later));
        Ok(())
    }

    // A flush request still queued when storage fails may never reach a flush: its caller is
    // answered with the failure, not left waiting for the flusher.
    #[tokio::test]
    async fn a_durability_wait_not_yet_flushed_ends_once_storage_fails() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let (_unanswered, reply) = oneshot::channel();
        let waiting = tokio::spawn(store.flushed(reply).wait());
        store.inner.failure.record("test: the disk failed".into());
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .map_err(|_| BrokerError::internal("the wait hung after the failure"))?
            .map_err(|e| BrokerError::internal(e.to_string()))?;
        assert!(
            matches!(&got, Err(BrokerError::Unavailable(m)) if m.contains("the disk failed")),
            "{got:?}"
        );
        Ok(())
    }

    // A write stuck on the disk holds the log's writer for as long as it is stuck: the
    // watchdog, which never waits for the writer, still declares the failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_stuck_on_the_disk_is_declared_a_failure() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let s = store.clone();
        let stuck = tokio::spawn(async move {
            s.write_grouped(move |_tx| {
                let rx = release_rx
                    .lock()
                    .map_err(|_| BrokerError::internal("gate"))?;
                let _ = rx.recv_timeout(std::time::Duration::from_secs(60));
                Ok(((), vec![]))
            })
            .await
        });
        let since = std::time::Instant::now();
        while store.failure().is_none() && since.elapsed() < FLUSH_STALL * 4 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let failed = store.failure();
        let _ = release_tx.send(());
        let _ = stuck.await;
        let failed = failed.ok_or_else(|| BrokerError::internal("never declared a failure"))?;
        assert!(failed.contains("a write to"), "{failed}");
        Ok(())
    }

    // A flusher stuck on the disk stops taking flush requests once its channel is full: a
    // caller asking for one then is refused once the failure is recorded, not left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asking_a_full_flusher_for_a_flush_ends_on_failure() -> Result<()> {
        let (_dir, store) = temp_store()?;
        // A long linger on writes on their way stands in for a flusher stuck on the disk.
        store.set_flush_linger(std::time::Duration::from_secs(60));
        let intent = store.durable_intent();
        let flush_tx = store.inner.flush_tx.clone().ok_or_else(shutting_down)?;
        flush_tx
            .send(Waiter(vec![], u64::MAX))
            .await
            .map_err(|_| shutting_down())?;
        let since = std::time::Instant::now();
        // The flusher has taken that one and lingers; then its channel is filled.
        while flush_tx.capacity() != flush_tx.max_capacity() {
            assert!(since.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        while flush_tx.try_send(Waiter(vec![], u64::MAX)).is_ok() {}
        let s = store.clone();
        let blocked = tokio::spawn(async move { s.durable().await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!blocked.is_finished(), "the channel was not full");
        store.inner.failure.record("test: the disk failed".into());
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), blocked).await;
        drop(intent);
        drop(flush_tx);
        let got = got.map_err(|_| BrokerError::internal("still waiting after the failure"))?;
        assert!(
            matches!(&got, Ok(Err(BrokerError::Unavailable(m))) if m.contains("the disk failed")),
            "{got:?}"
        );
        Ok(())
    }

    // A group of writes too big for one frame of the log is not a failed disk: each write
    // runs alone, and the store goes on.
    #[test]
    fn a_group_too_big_for_one_frame_runs_its_writes_alone() -> Result<()> {
        let (_dir, store) = temp_store()?;
        let core = store.inner.core.clone();
        // Each write a third of the biggest frame (16 MiB in unit tests): together too big.
        let part = (16 << 20) / 3;
        let (mut batch, mut replies) = (Vec::new(), Vec::new());
        for i in 0..4u8 {
            let (j, rx) = Grouped::job(
                move |tx: &Tx<'_>| {
                    tx.put_raw(T::Meta, format!("big{i}").as_bytes(), &vec![i; part])?;
                    Ok((i, vec![]))
                },
                None,
            );
            batch.push(j);
            replies.push(rx);
        }
        let _ = commit_group(&core, &mut batch);
        assert_eq!(store.failure(), None);
        for (i, rx) in replies.into_iter().enumerate() {
            assert!(matches!(rx.blocking_recv(), Ok(Ok(_))), "write {i} refused");
        }
        for i in 0..4u8 {
            let v = store.tree(T::Meta).get(format!("big{i}").as_bytes())?;
            assert_eq!(v.map(|v| v.len()), Some(part));
        }
        // One write too big on its own is refused, and the store still goes on.
        let too_big = store.write(|tx| {
            tx.put_raw(T::Meta, b"huge-1", &vec![0; 9 << 20])?;
            tx.put_raw(T::Meta, b"huge-2", &vec![0; 9 << 20])?;
            Ok(((), vec![]))
        });
        assert!(
            matches!(&too_big, Err(BrokerError::ResourceExhausted(_))),
            "{too_big:?}"
        );
        assert_eq!(store.failure(), None);
        store.write(|tx| {
            tx.put_raw(T::Meta, b"after", b"1")?;
            Ok(((), vec![]))
        })?;
        Ok(())
    }

    // After a failure nothing is written, also not through a tree directly.
    #[test]
    fn a_tree_write_is_refused_after_a_failure() -> Result<()> {
        let (_dir, store) = temp_store()?;
        store.inner.failure.record("test: the disk failed".into());
        assert!(store.tree(T::Meta).insert(b"after", b"x").is_err());
        Ok(())
    }

    // After a failure the committer may never come back from the disk (see `Failure`); a
    // write waiting behind it is refused with the failure, not left hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_behind_a_stuck_committer_is_refused_once_storage_fails() -> Result<()> {
        let wait = std::time::Duration::from_secs(10);
        let (_dir, store) = temp_store()?;
        let (entered_tx, entered_rx) = oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new((Some(entered_tx), release_rx)));
        let stuck = {
            let s = store.clone();
            tokio::spawn(async move {
                s.write_grouped(move |_tx| {
                    let mut g = gate.lock().map_err(|_| BrokerError::internal("gate"))?;
                    if let Some(t) = g.0.take() {
                        let _ = t.send(());
                    }
                    let _ = g.1.recv_timeout(std::time::Duration::from_secs(30));
                    Ok(((), vec![]))
                })
                .await
            })
        };
        tokio::time::timeout(wait, entered_rx)
            .await
            .map_err(|_| BrokerError::internal("the committer never ran the first write"))?
            .map_err(|_| BrokerError::internal("the first write was dropped"))?;
        let behind = {
            let s = store.clone();
            tokio::spawn(async move { s.write_grouped(|_tx| Ok(((), vec![]))).await })
        };
        // Handed over: it waits in the committer's channel.
        let channel = store.committer()?.clone();
        let since = std::time::Instant::now();
        while channel.capacity() == channel.max_capacity() {
            assert!(
                since.elapsed() < wait,
                "the second write was never handed over"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        store.inner.failure.record("test: the disk failed".into());
        let refused = tokio::time::timeout(wait, behind)
            .await
            .map_err(|_| BrokerError::internal("the write behind the stuck one hung"))?
            .map_err(|e| BrokerError::internal(e.to_string()))?;
        assert!(
            matches!(&refused, Err(BrokerError::Unavailable(m)) if m.contains("the disk failed")),
            "{refused:?}"
        );
        // Lets the committer go, so that the store can be dropped.
        drop(channel);
        let _ = release_tx.send(());
        let _ = stuck.await;
        Ok(())
    }
}

/// Durable writes on their way to the flusher (see [`Store::durable_intent`]), and how long a
/// flush waits for them.
#[derive(Debug, Default)]
struct Linger {
    /// `[storage] flush_linger_us`.
    max_us: AtomicU64,
    coming: Mutex<usize>,
    /// Told when `coming` falls to 0.
    none_coming: std::sync::Condvar,
}

impl Linger {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // A count, consistent at every step: a panic elsewhere does not make it unusable.
        self.coming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self) {
        *self.lock() += 1;
    }

    fn sub(&self) {
        let mut n = self.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.none_coming.notify_one();
        }
    }

    #[cfg(test)]
    fn coming(&self) -> usize {
        *self.lock()
    }

    /// Waits until no durable write is coming, or at most `[storage] flush_linger_us`.
    fn wait(&self) {
        let max = std::time::Duration::from_micros(self.max_us.load(Ordering::Relaxed));
        if max.is_zero() {
            return;
        }
        let n = self.lock();
        let _ = self
            .none_coming
            .wait_timeout_while(n, max, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// A durable write on its way (see [`Store::durable_intent`]); dropped once the flusher has
/// its request, or when it will not come.
#[derive(Debug)]
pub struct Intent(Arc<Linger>);

impl Drop for Intent {
    fn drop(&mut self) {
        self.0.sub();
    }
}

/// Where a write's caller is told that a flush covers it: Ok, or the failure's message.
type FlushReply = oneshot::Sender<std::result::Result<(), String>>;

/// A request for durability: the callers a flush answers, and the mark (see
/// [`kv::Db::written`]) it must cover. One for a [`Store::durable`] call; one for a
/// committer group's durable writes (so that a group's callers never split over flushes).
#[derive(Debug)]
struct Waiter(Vec<FlushReply>, u64);

impl Waiter {
    /// How many durable writes (or `durable` calls) it stands for.
    fn covers(&self) -> usize {
        self.0.len()
    }

    /// Tells every caller what the flush came to.
    fn answer(self, r: &std::result::Result<(), String>) {
        for reply in self.0 {
            // A caller that gave up (its call was cancelled) is no loss.
            let _ = reply.send(r.clone());
        }
    }
}

/// Resolves once a flush covers a write of [`Store::write_grouped_durable`], or with the
/// storage failure that stopped it.
#[derive(Debug)]
pub struct Flushed {
    reply: oneshot::Receiver<std::result::Result<(), String>>,
    /// After a failure the flusher may never come back from the disk (see `Failure`), and the
    /// watchdog answers only the flush in progress: a request still queued is answered here.
    failed: watch::Receiver<Option<String>>,
}

impl Flushed {
    /// Waits for the flush.
    pub async fn wait(mut self) -> Result<()> {
        tokio::select! {
            biased;
            r = self.reply => match r {
                Ok(Ok(())) => Ok(()),
                // The flusher has recorded the failure; `e` is its message.
                Ok(Err(e)) => Err(BrokerError::Unavailable(e)),
                Err(_) => Err(shutting_down()),
            },
            f = self.failed.wait_for(Option::is_some) => Err(match f {
                Ok(e) => BrokerError::Unavailable(e.clone().unwrap_or_default()),
                Err(_) => shutting_down(),
            }),
        }
    }
}

/// The flush in progress, shared by the flusher and the [`watchdog`].
#[derive(Debug, Default)]
struct Flushing {
    /// When the flush started; None between flushes.
    since: Option<std::time::Instant>,
    /// Its waiters, answered by the flusher when it ends, or by the watchdog once storage
    /// has failed (the flush may then never end).
    waiters: Vec<Waiter>,
}

fn flushing_lock(f: &Mutex<Flushing>) -> std::sync::MutexGuard<'_, Flushing> {
    // Plain data, consistent at every step: a panic elsewhere does not make it unusable.
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// The group-commit loop: take every waiting request, flush once, answer them all.
fn flusher(
    db: kv::Db,
    mut rx: mpsc::Receiver<Waiter>,
    stats: Arc<FlushStats>,
    failure: Arc<Failure>,
    flushing: Arc<Mutex<Flushing>>,
    linger: Arc<Linger>,
) {
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        // Writes on their way would otherwise need a flush of their own right after this one.
        linger.wait();
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let started = std::time::Instant::now();
        let n: usize = batch.iter().map(Waiter::covers).sum();
        // A flush that ran while these waited may have covered them all already.
        let mark = batch.iter().map(|w| w.1).max().unwrap_or(u64::MAX);
        let res = match failure.error() {
            // Storage takes no more work after its first failure; no need to ask it again.
            Some(e) => Err(e.to_string()),
            None => {
                {
                    let mut f = flushing_lock(&flushing);
                    f.since = Some(started);
                    f.waiters.append(&mut batch);
                }
                db.flush_upto(mark).map_err(|e| failure.set(&e).to_string())
            }
        };
        // A flush with nothing new to make durable costs no `fdatasync`, and is not counted.
        let synced = !matches!(res, Ok(false));
        let res = res.map(|_| ());
        {
            let mut f = flushing_lock(&flushing);
            f.since = None;
            batch.append(&mut f.waiters);
        }
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::FLUSH_BATCH).record(n as f64);
        if synced {
            metrics::counter!(crate::metrics::FLUSHES).increment(1);
            stats.flushes.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(crate::metrics::DURABLE_WRITES).increment(n as u64);
        stats.requests.fetch_add(n as u64, Ordering::Relaxed);
        for waiter in batch.drain(..) {
            waiter.answer(&res);
        }
    }
}

/// How often the compactor looks at how much of the log is dead.
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Reclaims the space of dead records (see [`kv::Db::compact`]) in the background, until
/// the store drops the sender. A failure to compact is a storage failure like any other.
fn compactor(db: kv::Db, stop: std::sync::mpsc::Receiver<()>, failure: Arc<Failure>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(COMPACT_EVERY) {
        if failure.error().is_some() {
            continue;
        }
        match db.compact() {
            Ok(0) => {}
            Ok(n) => {
                let (size, live) = db.space();
                tracing::debug!(segments = n, size, live, "compacted the storage log");
            }
            Err(e) => {
                failure.set(&e);
            }
        }
    }
}

/// How often the watchdog looks at the flush in progress.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// A flush running this long with no error anywhere is taken for a wedged disk.
#[cfg(not(test))]
const FLUSH_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Shorter in unit tests, which wait for it.
#[cfg(test)]
const FLUSH_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// What the [`watchdog`] watches: the flush and the group transaction in progress.
struct Watched {
    flushing: Arc<Mutex<Flushing>>,
    committing: Arc<Mutex<Option<std::time::Instant>>>,
}

/// Keeps writers and durability waiters from waiting forever on a disk that has failed (see
/// `Failure`). It checks the failure the store recorded itself; once storage has failed by
/// any account, it answers the flush's waiters with the failure, since that flush may never
/// end (an `fdatasync` on a failing disk can hang; grouped writers see the failure
/// themselves); and a flush or a group transaction that makes no progress for
/// [`FLUSH_STALL`] fails storage itself. It never calls into the store in a way that can block.
fn watchdog(
    db: kv::Db,
    stop: std::sync::mpsc::Receiver<()>,
    watched: Watched,
    failure: Arc<Failure>,
    space: Arc<Space>,
) {
    // Ends when the store drops the sender.
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(WATCH_EVERY) {
        space.refresh();
        // A failure the store recorded itself (a flush outside the flusher, at shutdown).
        if let Some(msg) = db.failure() {
            failure.set(&kv::Error::Failed(msg));
        }
        let committing = *watched
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut f = flushing_lock(&watched.flushing);
        for (what, since) in [("a flush", f.since), ("a write", committing)] {
            if failure.error().is_none() && since.is_some_and(|t| t.elapsed() >= FLUSH_STALL) {
                failure.record(format!(
                    "storage failed: {what} to {} has not finished in {} s (a full or failing \
                     disk?); restart the broker once the disk is fixed",
                    failure.path.display(),
                    FLUSH_STALL.as_secs()
                ));
            }
        }
        if f.since.is_none() {
            continue;
        }
        if let Some(e) = failure.error() {
            let e = Err(e.to_string());
            for w in f.waiters.drain(..) {
                w.answer(&e);
            }
        }
    }
}

/// Free space on the database's disk. The broker does not carry on after a write fails for
/// want of space (see [`Failure`]), so it keeps a reserve: below it, new work is refused with
/// RESOURCE_EXHAUSTED while accepted work completes into the reserve, and new work is taken
/// again as soon as space is freed, with no restart.
#[derive(Debug)]
struct Space {
    path: PathBuf,
    /// The store, whose appends since the last check count against the free space then.
    db: kv::Db,
    /// `[storage] min_free_bytes`; 0 turns the check off.
    min_free: AtomicU64,
    /// Free bytes at the last check (every [`WATCH_EVERY`]).
    free: AtomicU64,
    /// [`kv::Db::appended`] just before the last check.
    appended: AtomicU64,
}

impl Space {
    /// Free bytes now, as far as known: the last check's, less what the store wrote since.
    /// Between checks (200 ms) a fast store writes megabytes, which would otherwise be taken
    /// from the reserve unseen.
    fn free(&self) -> u64 {
        let since = self
            .db
            .appended()
            .saturating_sub(self.appended.load(Ordering::Relaxed));
        self.free.load(Ordering::Relaxed).saturating_sub(since)
    }

    fn low(&self) -> bool {
        let min = self.min_free.load(Ordering::Relaxed);
        min > 0 && self.free() < min
    }

    fn refresh(&self) {
        if self.min_free.load(Ordering::Relaxed) == 0 {
            return;
        }
        let was_low = self.low();
        // Read before the disk is asked: what lands in between counts twice, never not at all.
        let appended = self.db.appended();
        match fs4::available_space(&self.path) {
            Ok(free) => {
                self.free.store(free, Ordering::Relaxed);
                self.appended.store(appended, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot read free space");
                return;
            }
        }
        match (was_low, self.low()) {
            (false, true) => tracing::warn!(
                path = %self.path.display(),
                free = self.free(),
                min_free = self.min_free.load(Ordering::Relaxed),
                "disk below [storage] min_free_bytes: refusing new work"
            ),
            (true, false) => tracing::info!(
                path = %self.path.display(),
                "disk above [storage] min_free_bytes again: taking new work"
            ),
            _ => {}
        }
    }
}

/// Runs blocking store work off the async workers.
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::internal(format!("blocking task failed: {e}")))?
}
