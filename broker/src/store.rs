//! The `Store` seam over sled: named trees, atomic multi-tree writes with their audit entries,
//! and group commit (one flusher thread makes many writers durable with one flush).

use crate::audit::{self, AuditHead};
use crate::error::{BrokerError, Result};
use govshare_proto::v1::AuditEntry;
use sled::transaction::{ConflictableTransactionError, Transactional, TransactionalTree};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

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
    /// destination ‖ 0 ‖ seq (u64 BE) → exchange id: the durable queues, in order.
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
pub struct Tx<'a>(&'a [TransactionalTree]);

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").field("trees", &self.0.len()).finish()
    }
}

impl Tx<'_> {
    /// One tree of the transaction.
    pub fn t(&self, t: T) -> &TransactionalTree {
        &self.0[t as usize]
    }

    /// Reads and decodes a protobuf record.
    pub fn get<M: prost::Message + Default>(&self, t: T, key: &str) -> Result<Option<M>> {
        match self.t(t).get(key.as_bytes()) {
            Ok(Some(v)) => Ok(Some(M::decode(v.as_ref())?)),
            Ok(None) => Ok(None),
            Err(e) => Err(BrokerError::internal(format!("transaction read: {e}"))),
        }
    }

    /// Encodes and writes a protobuf record.
    pub fn put<M: prost::Message>(&self, t: T, key: &str, m: &M) -> Result<()> {
        self.t(t)
            .insert(key.as_bytes(), m.encode_to_vec())
            .map(|_| ())
            .map_err(|e| BrokerError::internal(format!("transaction write: {e}")))
    }

    /// Writes raw bytes.
    pub fn put_raw(&self, t: T, key: &[u8], v: &[u8]) -> Result<()> {
        self.t(t)
            .insert(key, v)
            .map(|_| ())
            .map_err(|e| BrokerError::internal(format!("transaction write: {e}")))
    }

    /// Reads raw bytes.
    pub fn get_raw(&self, t: T, key: &[u8]) -> Result<Option<sled::IVec>> {
        self.t(t)
            .get(key)
            .map_err(|e| BrokerError::internal(format!("transaction read: {e}")))
    }

    /// Writes an index key with an empty value.
    pub fn mark(&self, t: T, key: &[u8]) -> Result<()> {
        self.t(t)
            .insert(key, &[][..])
            .map(|_| ())
            .map_err(|e| BrokerError::internal(format!("transaction write: {e}")))
    }

    /// Removes a key.
    pub fn unmark(&self, t: T, key: &[u8]) -> Result<()> {
        self.t(t)
            .remove(key)
            .map(|_| ())
            .map_err(|e| BrokerError::internal(format!("transaction write: {e}")))
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
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Serialises writes that append to the audit chain. A std Mutex, not a tokio one: it is
    /// only taken on blocking threads and never held across an `.await`.
    write_lock: Mutex<AuditHead>,
    broker_id: String,
    /// The `keys` tree in memory, loaded on first use. A std RwLock: never held across an await.
    keys: std::sync::RwLock<Option<Arc<Vec<govshare_proto::v1::KeyAnnouncement>>>>,
    /// Taken (dropped) in `Drop` to stop the flusher; always Some before that.
    flush_tx: Option<mpsc::Sender<oneshot::Sender<std::result::Result<(), String>>>>,
    /// Joined in `Drop`, so that sled's file lock is released once the last handle is gone
    /// and the same data dir can be opened again (a restart in a test, or `audit verify`).
    flusher: Option<std::thread::JoinHandle<()>>,
    stats: Arc<FlushStats>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.flush_tx.take());
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
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
    /// Opens (or creates) the database and starts the flusher thread.
    pub fn open(path: &Path, cache_bytes: u64, broker_id: &str) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // Durability is ours to decide (group commit in `durable`); sled's own timer would
            // only blur which writes a crash can lose.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) => BrokerError::Unavailable(format!(
                    "cannot open the database at {}: {io} (is another broker using this data dir?)",
                    path.display()
                )),
                other => BrokerError::internal(format!("opening {}: {other}", path.display())),
            })?;
        let trees = TREE_NAMES
            .iter()
            .map(|n| db.open_tree(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let head = audit::load_head(&trees[T::Audit as usize])?;
        let stats = Arc::new(FlushStats::default());
        // Bounded: a writer that outruns the disk waits for room instead of growing memory.
        let (flush_tx, flush_rx) = mpsc::channel(4096);
        let flusher_db = db.clone();
        let flusher_stats = stats.clone();
        let flusher = std::thread::Builder::new()
            .name("govshare-flusher".into())
            .spawn(move || flusher(flusher_db, flush_rx, flusher_stats))
            .map_err(|e| BrokerError::internal(format!("cannot start flusher thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                trees,
                write_lock: Mutex::new(head),
                broker_id: broker_id.to_string(),
                keys: std::sync::RwLock::new(None),
                flush_tx: Some(flush_tx),
                flusher: Some(flusher),
                stats,
            }),
        })
    }

    /// A tree, for reads and scans.
    pub fn tree(&self, t: T) -> &sled::Tree {
        &self.inner.trees[t as usize]
    }

    /// Reads and decodes a protobuf record.
    pub fn get<M: prost::Message + Default>(&self, t: T, key: &str) -> Result<Option<M>> {
        match self.tree(t).get(key.as_bytes())? {
            Some(v) => Ok(Some(M::decode(v.as_ref())?)),
            None => Ok(None),
        }
    }

    /// Runs `f` as one atomic transaction over every tree, appending the audit entries it
    /// returns to the hash chain in the same transaction. Blocking: call from a blocking thread.
    pub fn write<R>(&self, f: impl Fn(&Tx<'_>) -> Result<(R, Vec<AuditEntry>)>) -> Result<R> {
        let mut head = self
            .inner
            .write_lock
            .lock()
            .map_err(|_| BrokerError::internal("audit lock poisoned"))?;
        let start = head.clone();
        let broker = self.inner.broker_id.clone();
        let (r, new_head) = <[sled::Tree] as Transactional<BrokerError>>::transaction(
            &self.inner.trees[..],
            |txs| {
                let tx = Tx(txs);
                let (r, entries) = f(&tx).map_err(ConflictableTransactionError::Abort)?;
                let mut h = start.clone();
                for e in entries {
                    let chained = audit::chain(&mut h, e, &broker);
                    tx.t(T::Audit).insert(
                        &chained.seq.to_be_bytes()[..],
                        prost::Message::encode_to_vec(&chained),
                    )?;
                }
                Ok((r, h))
            },
        )?;
        metrics::counter!(crate::metrics::AUDIT_APPENDS).increment(new_head.seq - start.seq);
        *head = new_head;
        Ok(r)
    }

    /// Waits until everything written before the call is on disk. Many callers share one flush.
    pub async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let sender = self
            .inner
            .flush_tx
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("storage is shutting down".into()))?;
        sender
            .send(tx)
            .await
            .map_err(|_| BrokerError::Unavailable("storage is shutting down".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Unavailable(format!(
                "storage flush failed: {e}"
            ))),
            Err(_) => Err(BrokerError::Unavailable("storage is shutting down".into())),
        }
    }

    /// Flushes now, on the calling (blocking) thread; used at shutdown.
    pub fn flush_blocking(&self) -> Result<()> {
        self.inner.db.flush()?;
        Ok(())
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
        &self.inner.broker_id
    }
}

/// The group-commit loop: take every waiting request, flush once, answer them all.
fn flusher(
    db: sled::Db,
    mut rx: mpsc::Receiver<oneshot::Sender<std::result::Result<(), String>>>,
    stats: Arc<FlushStats>,
) {
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let started = std::time::Instant::now();
        let res = db.flush().map(|_| ()).map_err(|e| e.to_string());
        metrics::histogram!(crate::metrics::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::FLUSH_BATCH).record(batch.len() as f64);
        metrics::counter!(crate::metrics::FLUSHES).increment(1);
        metrics::counter!(crate::metrics::DURABLE_WRITES).increment(batch.len() as u64);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch.drain(..) {
            // A waiter that gave up (its call was cancelled) is no loss.
            let _ = waiter.send(res.clone());
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
