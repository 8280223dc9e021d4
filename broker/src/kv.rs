//! govshare's own storage engine: an append-only, group-committed log of atomic batches, with
//! an in-memory ordered index of keys, meant to take sled's place under [`crate::store`].
//!
//! Why: sled 0.34 costs about 40% of the CPU of an exchange (its page cache, its transaction
//! machinery, and an I/O thread pool that wakes every idle thread for each write), and it
//! keeps the values it wrote in memory with no bound (bench/HISTORY.md). Here a batch is
//! one `pwrite` of one CRC-checked frame, durability is one `fdatasync` for every batch written
//! since the last one, and the index holds only keys and where their values are, with small
//! values inline. The trade: every key of every tree is in memory, and opening reads the
//! whole log.
//!
//! Layout: a directory of segment files `NNNNNNNNNN.seg`, each an 8-byte header and then
//! frames `[body length u32 LE][crc32 of body u32 LE][body]`; a body is a sequence of
//! operations (put, remove, clear tree). A frame is the unit of atomicity: at open, frames
//! are replayed in order, and a frame that is incomplete or fails its CRC at the end of the
//! last segment is a write a crash interrupted, so it and what follows are cut off. Anywhere
//! else it is damage, and opening fails rather than silently drop later writes: a segment is
//! made durable before the next one gets its first frame, so a crash leaves a torn frame
//! only at the very end.
//!
//! Space: a put or remove makes the older record of its key dead; [`Db::compact`] rewrites
//! the live records of the oldest segment at the head, makes them durable, and deletes the
//! segment, while the log is more than twice the live bytes. Compacting only the oldest
//! segment is what makes it safe to drop its removes: no older segment is left that could
//! hold a put they undo.

use std::cell::{Cell, RefCell};
use std::collections::{btree_map, BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A value (or key) read from the store: cheap to clone, derefs to bytes.
pub type Value = bytes::Bytes;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed (a full disk, above all).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A segment is damaged somewhere other than a torn last write.
    #[error(
        "{path} is damaged at byte {offset}: {what}; the data directory needs repair from a backup"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where its first bad frame starts.
        offset: u64,
        /// What is wrong with it.
        what: String,
    },
    /// Another process holds the directory.
    #[error("{0} is in use by another process")]
    Locked(PathBuf),
    /// An earlier write or flush failed; nothing is written until the store is reopened,
    /// since what reached the disk is no longer known.
    #[error("storage failed earlier ({0}); reopen the store")]
    Failed(String),
    /// A key, value or batch beyond the format's limits.
    #[error("{0}")]
    TooLarge(String),
    /// A write, flush or id asked for from inside a transaction, which holds the writer.
    #[error("a store write from inside a transaction (it would wait for itself)")]
    Reentrant,
}

thread_local! {
    /// True while this thread runs a transaction's closure (see [`Db::writer`]).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a transaction until dropped (also when the closure panics).
struct Inside;

impl Inside {
    fn enter() -> Self {
        INSIDE.with(|c| c.set(true));
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(false));
    }
}

/// Results of the store.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// Trees (numbered from 0) the store keeps.
    pub trees: usize,
    /// A segment is sealed, and a new one started, once it reaches this size.
    pub segment_bytes: u64,
    /// Values up to this size are kept in memory; larger ones are read from their segment.
    pub inline_bytes: usize,
    /// Trees whose keys are 8-byte big-endian sequence numbers, mostly appended in order
    /// (the audit log): indexed in a quarter of the memory (see [`Index::Seq`]). A key of
    /// another length turns the tree's index back into the general one, so nothing breaks.
    pub seq_trees: Vec<usize>,
    /// Trees whose values are all kept in memory, whatever their size: small trees read on
    /// every request, where a read from the segment would cost a system call each time.
    pub memory_trees: Vec<usize>,
}

impl Options {
    /// Whether a value of `len` bytes in `tree` is kept in memory.
    fn inline(&self, tree: usize, len: usize) -> bool {
        len <= self.inline_bytes || self.memory_trees.contains(&tree)
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            trees: 32,
            segment_bytes: 64 << 20,
            inline_bytes: 64,
            seq_trees: Vec::new(),
            memory_trees: Vec::new(),
        }
    }
}

const MAGIC: &[u8; 8] = b"GSKV\0\0\0\x01";
const HEADER: u64 = MAGIC.len() as u64;
const FRAME_HEAD: usize = 8;
/// The largest frame: a u32 length, and well under a segment's u32 offsets.
#[cfg(not(test))]
const MAX_FRAME: usize = 1 << 30;
/// Smaller in unit tests, which write more than one frame's worth.
#[cfg(test)]
const MAX_FRAME: usize = 16 << 20;
const OP_PUT: u8 = 1;
const OP_REMOVE: u8 = 2;
const OP_CLEAR: u8 = 3;
/// The internal tree of the id counter (see [`Db::generate_id`]); not one of the caller's.
const ID_TREE: u8 = u8::MAX;
/// Ids reserved (made durable) at a time by [`Db::generate_id`].
const ID_BLOCK: u64 = 1 << 20;

/// Where a key's value is: the segment and offset of its bytes (which also name the record,
/// for compaction), and the value itself when small, borrowed from the index (or from the
/// frame being written, on its way in).
#[derive(Debug, Clone, Copy)]
struct Slot<'a> {
    seg: u32,
    off: u32,
    len: u32,
    inline: Option<&'a [u8]>,
}

/// What the general index keeps for a key besides the key: where its value is, and whether
/// the value is held inline, after the key in the key's own allocation (see [`Key`]).
#[derive(Debug, Clone, Copy)]
struct Stored {
    seg: u32,
    off: u32,
    len: u32,
    inline: bool,
}

impl Stored {
    fn slot<'a>(&self, key: &'a Key) -> Slot<'a> {
        Slot {
            seg: self.seg,
            off: self.off,
            len: self.len,
            inline: self.inline.then(|| key.parts().1),
        }
    }
}

/// A key of the general index, followed by its value when the value is held inline: one
/// allocation where a key and an inline value took two, and 32 bytes an entry in the map's
/// nodes (with [`Stored`]) where they took 48. Every key of every tree is in memory, so
/// this is most of what a queued exchange costs the store. Layout: the key's length (one
/// byte below 255, else 255 and four bytes, little-endian), the key, the value.
#[derive(Debug)]
struct Key(Box<[u8]>);

impl Key {
    fn new(key: &[u8], inline: Option<&[u8]>) -> Self {
        let value = inline.unwrap_or_default();
        let head = if key.len() < usize::from(u8::MAX) {
            1
        } else {
            5
        };
        // Exactly the size: a boxed slice made from a larger Vec would reallocate.
        let mut b = Vec::with_capacity(head + key.len() + value.len());
        match u8::try_from(key.len()) {
            Ok(n) if n < u8::MAX => b.push(n),
            _ => {
                b.push(u8::MAX);
                b.extend_from_slice(&(key.len() as u32).to_le_bytes());
            }
        }
        b.extend_from_slice(key);
        b.extend_from_slice(value);
        Key(b.into_boxed_slice())
    }

    /// The key, and the inline value (empty when there is none).
    fn parts(&self) -> (&[u8], &[u8]) {
        let b = &self.0[..];
        let (n, at) = match b.first() {
            Some(&n) if n < u8::MAX => (usize::from(n), 1),
            Some(_) => (
                b.get(1..5)
                    .and_then(|l| <[u8; 4]>::try_from(l).ok())
                    .map_or(0, |l| u32::from_le_bytes(l) as usize),
                5,
            ),
            None => (0, 0),
        };
        let end = (at + n).min(b.len());
        (
            b.get(at.min(end)..end).unwrap_or_default(),
            b.get(end..).unwrap_or_default(),
        )
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.parts().0
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.parts().0 == other.parts().0
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().0.cmp(other.parts().0)
    }
}

/// A put record's size in the log (op, tree, key length, key, value length, value), for the
/// live-bytes count.
fn rec_size(key: usize, value: u32) -> u64 {
    (2 + 4 + key + 4) as u64 + u64::from(value)
}

#[derive(Debug)]
struct Seg {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes written (the header and whole frames).
    size: u64,
    /// Bytes of records that are still the current value of their key.
    live: u64,
}

/// One tree's index of its keys.
#[derive(Debug)]
enum Index {
    /// Any keys: an ordered map to where each value is.
    Map(BTreeMap<Key, Stored>),
    /// Keys that are all 8-byte big-endian numbers: 24 bytes an entry in sorted chunks,
    /// against about a hundred in the map (its node's share and the boxed key). The audit
    /// log gains a few entries with every exchange and never loses one, so in a map it
    /// would grow the broker's memory for as long as it runs.
    Seq(SeqIndex),
}

/// Sorted entries in chunks of at most [`SEQ_CHUNK`] (twice that after inserts in the
/// middle, which are rare): appending fills a chunk and starts the next, so a growing tree
/// never reallocates, or copies, more than one chunk.
#[derive(Debug, Default)]
struct SeqIndex {
    chunks: Vec<Vec<SeqEntry>>,
    len: usize,
}

/// Entries a sequence index's chunk is filled to when appending.
#[cfg(not(test))]
const SEQ_CHUNK: usize = 4096;
/// Small in unit tests, so that they cross chunks.
#[cfg(test)]
const SEQ_CHUNK: usize = 4;

/// An entry of a sequence index: the key as a number, and where its value is (never held
/// inline: the audit log's values are hundreds of bytes).
#[derive(Debug, Clone, Copy)]
struct SeqEntry {
    key: u64,
    seg: u32,
    off: u32,
    len: u32,
}

impl SeqEntry {
    fn slot(&self) -> Slot<'static> {
        Slot {
            seg: self.seg,
            off: self.off,
            len: self.len,
            inline: None,
        }
    }

    fn stored(&self) -> Stored {
        Stored {
            seg: self.seg,
            off: self.off,
            len: self.len,
            inline: false,
        }
    }

    fn key(&self) -> [u8; 8] {
        self.key.to_be_bytes()
    }
}

impl SeqIndex {
    /// The first position (chunk, index) whose key fails `before`, which must hold for a
    /// prefix of the keys; `(chunks.len(), 0)` when it holds for all.
    fn position(&self, before: impl Fn(&[u8]) -> bool) -> (usize, usize) {
        let c = self
            .chunks
            .partition_point(|ch| ch.last().is_some_and(|e| before(&e.key())));
        let i = self
            .chunks
            .get(c)
            .map_or(0, |ch| ch.partition_point(|e| before(&e.key())));
        (c, i)
    }

    fn find(&self, key: u64) -> std::result::Result<(usize, usize), (usize, usize)> {
        let at = self.position(|k| *k < key.to_be_bytes()[..]);
        match self.chunks.get(at.0).and_then(|ch| ch.get(at.1)) {
            Some(e) if e.key == key => Ok(at),
            _ => Err(at),
        }
    }

    fn get(&self, key: u64) -> Option<&SeqEntry> {
        let (c, i) = self.find(key).ok()?;
        self.chunks.get(c)?.get(i)
    }

    fn insert(&mut self, e: SeqEntry) -> Option<SeqEntry> {
        let (c, i) = match self.find(e.key) {
            Ok((c, i)) => return Some(std::mem::replace(&mut self.chunks[c][i], e)),
            Err(at) => at,
        };
        self.len += 1;
        // Past the last key: onto the last chunk, or a new one once it is full.
        let Some(last) = self.chunks.len().checked_sub(1) else {
            self.chunks.push(Self::chunk(e));
            return None;
        };
        if c > last {
            if self.chunks[last].len() >= SEQ_CHUNK {
                self.chunks.push(Self::chunk(e));
            } else {
                self.chunks[last].push(e);
            }
            return None;
        }
        let ch = &mut self.chunks[c];
        ch.insert(i, e);
        if ch.len() > 2 * SEQ_CHUNK {
            let rest = ch.split_off(SEQ_CHUNK);
            self.chunks.insert(c + 1, rest);
        }
        None
    }

    fn chunk(e: SeqEntry) -> Vec<SeqEntry> {
        let mut ch = Vec::with_capacity(SEQ_CHUNK);
        ch.push(e);
        ch
    }

    fn remove(&mut self, key: u64) -> Option<SeqEntry> {
        let (c, i) = self.find(key).ok()?;
        let e = self.chunks[c].remove(i);
        if self.chunks[c].is_empty() {
            self.chunks.remove(c);
        }
        self.len -= 1;
        Some(e)
    }

    /// The first (or, `back`, the last) entry within the bounds, compared as bytes.
    fn edge(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>, back: bool) -> Option<&SeqEntry> {
        let start = match lo {
            Bound::Included(b) => self.position(|k| k < b),
            Bound::Excluded(b) => self.position(|k| k <= b),
            Bound::Unbounded => (0, 0),
        };
        let end = match hi {
            Bound::Included(b) => self.position(|k| k <= b),
            Bound::Excluded(b) => self.position(|k| k < b),
            Bound::Unbounded => (self.chunks.len(), 0),
        };
        if start >= end {
            return None;
        }
        let (c, i) = if !back {
            start
        } else if end.1 > 0 {
            (end.0, end.1 - 1)
        } else {
            let c = end.0.checked_sub(1)?;
            (c, self.chunks.get(c)?.len().checked_sub(1)?)
        };
        self.chunks.get(c)?.get(i)
    }
}

/// The number an 8-byte key stands for in a sequence index.
fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

impl Index {
    fn new(seq: bool) -> Self {
        if seq {
            Index::Seq(SeqIndex::default())
        } else {
            Index::Map(BTreeMap::new())
        }
    }

    /// Rebuilds a map from its sorted entries, which fills its nodes (see [`Db::open`]).
    fn pack(&mut self) {
        if let Index::Map(m) = self {
            // `collect` frees the old nodes as it reads them into a list (32 bytes an entry),
            // then builds full nodes from it: for a moment the list and the new nodes are
            // held, a little more than the old nodes were. `append` onto a one-entry map would
            // need no list, but measured it saved nothing: it is not documented to rebuild,
            // and rust-lang/rust#153107 makes it insert through a cursor instead.
            *m = std::mem::take(m).into_iter().collect();
        }
    }

    fn get(&self, key: &[u8]) -> Option<Slot<'_>> {
        match self {
            Index::Map(m) => m.get_key_value(key).map(|(k, s)| s.slot(k)),
            Index::Seq(q) => Some(q.get(seq_of(key)?)?.slot()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Index::Map(m) => m.len(),
            Index::Seq(q) => q.len,
        }
    }

    /// Points `key` at `slot`; answers where its value was before.
    fn insert(&mut self, key: &[u8], slot: Slot<'_>) -> Option<Stored> {
        if let Index::Seq(q) = self {
            match seq_of(key) {
                Some(k) => {
                    let e = SeqEntry {
                        key: k,
                        seg: slot.seg,
                        off: slot.off,
                        len: slot.len,
                    };
                    return q.insert(e).map(|old| old.stored());
                }
                None => {
                    // Not a sequence number after all: the general index from now on.
                    let q = std::mem::take(q);
                    let m = q
                        .chunks
                        .into_iter()
                        .flatten()
                        .map(|e| (Key::new(&e.key(), None), e.stored()))
                        .collect();
                    *self = Index::Map(m);
                }
            }
        }
        let Index::Map(m) = self else {
            return None;
        };
        let new = Stored {
            seg: slot.seg,
            off: slot.off,
            len: slot.len,
            inline: slot.inline.is_some(),
        };
        // One descent of the tree for a new key and for a new place of a value on disk (what
        // opening replays, a million times at a million queued); the key built for it is
        // dropped in the second case.
        match m.entry(Key::new(key, slot.inline)) {
            btree_map::Entry::Vacant(v) => {
                v.insert(new);
                None
            }
            btree_map::Entry::Occupied(mut o) => {
                if !o.get().inline && !new.inline {
                    return Some(o.insert(new));
                }
                // An inline value lives in its key's allocation, and a map keeps the key it
                // has: a value held inline, before or after, takes the new key.
                let (_, old) = o.remove_entry();
                m.insert(Key::new(key, slot.inline), new);
                Some(old)
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Stored> {
        match self {
            Index::Map(m) => m.remove(key),
            Index::Seq(q) => q.remove(seq_of(key)?).map(|e| e.stored()),
        }
    }

    /// Empties the index, answering each key's length and where its value was.
    fn take(&mut self) -> Vec<(usize, Stored)> {
        match self {
            Index::Map(m) => std::mem::take(m)
                .into_iter()
                .map(|(k, s)| (k.parts().0.len(), s))
                .collect(),
            Index::Seq(q) => std::mem::take(q)
                .chunks
                .into_iter()
                .flatten()
                .map(|e| (8, e.stored()))
                .collect(),
        }
    }

    /// The first (or, `back`, the last) key within the bounds, and its slot.
    fn edge(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>, back: bool) -> Option<(Vec<u8>, Slot<'_>)> {
        match self {
            Index::Map(m) => {
                let mut r = m.range::<[u8], _>((lo, hi));
                let (k, s) = if back { r.next_back() } else { r.next() }?;
                Some((k.parts().0.to_vec(), s.slot(k)))
            }
            Index::Seq(q) => {
                let e = q.edge(lo, hi, back)?;
                Some((e.key().to_vec(), e.slot()))
            }
        }
    }
}

#[derive(Debug)]
struct State {
    trees: Vec<Index>,
    segs: BTreeMap<u32, Seg>,
}

impl State {
    fn kill(&mut self, key: usize, old: &Stored) {
        if let Some(s) = self.segs.get_mut(&old.seg) {
            s.live = s.live.saturating_sub(rec_size(key, old.len));
        }
    }

    fn put(&mut self, tree: usize, key: &[u8], slot: Slot<'_>) {
        if let Some(s) = self.segs.get_mut(&slot.seg) {
            s.live += rec_size(key.len(), slot.len);
        }
        if let Some(old) = self.trees[tree].insert(key, slot) {
            self.kill(key.len(), &old);
        }
    }

    fn remove(&mut self, tree: usize, key: &[u8]) {
        if let Some(old) = self.trees[tree].remove(key) {
            self.kill(key.len(), &old);
        }
    }

    fn clear(&mut self, tree: usize) {
        for (key_len, slot) in self.trees[tree].take() {
            self.kill(key_len, &slot);
        }
    }

    /// Bytes in segment files, and bytes of records still current.
    fn space(&self) -> (u64, u64) {
        self.segs
            .values()
            .fold((0, 0), |(s, l), g| (s + g.size, l + g.live))
    }

    /// Whether `key`'s current value is the record at `off` of segment `seg` (compaction:
    /// only such records are worth copying).
    fn holds(&self, tree: u8, key: &[u8], seg: u32, off: u32) -> bool {
        self.trees
            .get(usize::from(tree))
            .and_then(|t| t.get(key))
            .is_some_and(|s| s.seg == seg && s.off == off)
    }

    /// Where to read a slot's value from, so that the read can happen after the lock is let
    /// go: a segment compacted away meanwhile stays readable through its open file.
    fn locate(&self, slot: &Slot<'_>) -> Loc {
        match (slot.inline, self.segs.get(&slot.seg)) {
            (Some(v), _) => Loc::Inline(Value::copy_from_slice(v)),
            (None, Some(s)) => Loc::Disk(s.file.clone(), s.path.clone(), slot.off, slot.len),
            (None, None) => Loc::Gone(slot.seg),
        }
    }
}

/// A value's whereabouts, from [`State::locate`].
enum Loc {
    Inline(Value),
    Disk(Arc<File>, PathBuf, u32, u32),
    Gone(u32),
}

impl Loc {
    fn read(self) -> Result<Value> {
        match self {
            Loc::Inline(v) => Ok(v),
            Loc::Disk(file, path, off, len) => {
                let mut buf = vec![0; len as usize];
                file.read_exact_at(&mut buf, u64::from(off))
                    .map_err(io_err(&path))?;
                Ok(buf.into())
            }
            Loc::Gone(seg) => Err(Error::Failed(format!(
                "segment {seg} of a live value is gone"
            ))),
        }
    }
}

#[derive(Debug)]
struct Writer {
    head: u32,
    file: Arc<File>,
    path: PathBuf,
    /// Where the next frame goes.
    len: u64,
    /// The frame being built, kept to reuse its allocation.
    buf: Vec<u8>,
    /// Frames appended so far (this run): what a flush covers is named by it.
    frames: u64,
    /// The highest id ceiling written to the log, flushed or not: what compaction must carry
    /// over when it takes the segment a reservation was written in.
    ceiling_written: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    opts: Options,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    /// Flushes in progress are serialized, so that the count below means what it says.
    sync: Mutex<()>,
    /// Held around every `fdatasync` of a segment (a flush's, or a roll's): the kernel
    /// reports a writeback error to one `fdatasync` of a file description only, so of two at
    /// once on the same segment one could return success for pages that were never written.
    /// One at a time, and each checking [`Inner::failed`] after the ones before, none can.
    /// Taken after the writer or `sync`, never before.
    fsync: Mutex<()>,
    /// The first failed write or flush (or failure the owner declared): from then on
    /// nothing is written. Apart from the writer so that reading it never waits for a write
    /// stuck on the disk; held only to read or set it.
    failed: Mutex<Option<String>>,
    flushes: AtomicU64,
    /// [`Writer::frames`] as of the last flush that succeeded (or segment sealed): a flush
    /// with nothing written since has nothing to do.
    synced: AtomicU64,
    /// [`Writer::frames`], readable without the writer's lock (see [`Db::written`]).
    written: AtomicU64,
    /// Bytes appended to segment files since open (see [`Db::appended`]).
    appended: AtomicU64,
    /// The next id [`Db::generate_id`] hands out. Outside the writer's lock: ids are taken
    /// on request paths, which must not wait for a group transaction being written.
    next_id: AtomicU64,
    /// The first id not yet reserved durably; set only once the reservation is flushed.
    id_ceiling: AtomicU64,
    /// Held across a reservation (its write and flush), so that one reservation is made
    /// when many callers run out of ids at once.
    reserving: Mutex<()>,
    /// Held for the life of the store: the directory's lock.
    _lock: File,
}

/// An open store: cheap to clone, shared by threads.
#[derive(Debug, Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

fn seg_name(id: u32) -> String {
    format!("{id:010}.seg")
}

fn read_lock(l: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock(l: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `fsync`s a segment file. Tests see which files a thread synced.
fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    SYNCED.with(|s| s.borrow_mut().push(path.to_path_buf()));
    #[cfg(not(test))]
    let _ = path;
    file.sync_all()
}

#[cfg(test)]
thread_local! {
    /// The files [`sync_file`] and directories [`sync_dir`] synced on this thread.
    static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    SYNCED.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// One operation of a frame, as parsed.
enum Op<'a> {
    Put {
        tree: u8,
        key: &'a [u8],
        value: &'a [u8],
        /// Offset of the value within the body.
        at: usize,
    },
    Remove {
        tree: u8,
        key: &'a [u8],
    },
    Clear {
        tree: u8,
    },
}

fn take<'a>(body: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(n)?;
    let s = body.get(*pos..end)?;
    *pos = end;
    Some(s)
}

fn take_u32(body: &[u8], pos: &mut usize) -> Option<usize> {
    let b = take(body, pos, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Parses a frame's body, or None if it is malformed.
fn parse(body: &[u8]) -> Option<Vec<Op<'_>>> {
    let mut ops = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let head = take(body, &mut pos, 2)?;
        let (kind, tree) = (head[0], head[1]);
        match kind {
            OP_PUT => {
                let kl = take_u32(body, &mut pos)?;
                let key = take(body, &mut pos, kl)?;
                let vl = take_u32(body, &mut pos)?;
                let at = pos;
                let value = take(body, &mut pos, vl)?;
                ops.push(Op::Put {
                    tree,
                    key,
                    value,
                    at,
                });
            }
            OP_REMOVE => {
                let kl = take_u32(body, &mut pos)?;
                let key = take(body, &mut pos, kl)?;
                ops.push(Op::Remove { tree, key });
            }
            OP_CLEAR => ops.push(Op::Clear { tree }),
            _ => return None,
        }
    }
    Some(ops)
}

fn encode_put(buf: &mut Vec<u8>, tree: u8, key: &[u8], value: &[u8]) -> usize {
    buf.extend_from_slice(&[OP_PUT, tree]);
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    let at = buf.len();
    buf.extend_from_slice(value);
    at
}

fn encode_remove(buf: &mut Vec<u8>, tree: u8, key: &[u8]) {
    buf.extend_from_slice(&[OP_REMOVE, tree]);
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
}

/// Reads a segment's frames in order through a buffer, so that neither opening nor
/// compaction holds a whole segment in memory.
struct Frames {
    r: io::BufReader<File>,
    path: PathBuf,
    /// Where the next frame starts.
    off: u64,
    /// The file's length when opened (a sealed segment does not change).
    len: u64,
    /// The last frame's body, reused.
    body: Vec<u8>,
}

/// What [`Frames::next`] found at an offset.
enum Framed {
    /// A whole frame, its body in [`Frames::body`]; the offset it starts at.
    Ok(u64),
    /// The end of the file.
    End,
    /// Bytes that are not a frame: where they start, and why.
    Bad(u64, &'static str),
}

impl Frames {
    fn open(path: &Path) -> Result<Self> {
        // A file of its own, not a clone of the segment's handle, which would share (and
        // move) its file offset.
        let f = File::open(path).map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        Ok(Self {
            r: io::BufReader::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            off: 0,
            len,
            body: Vec::new(),
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        io::Read::read_exact(&mut self.r, buf).map_err(io_err(&self.path))
    }

    /// Reads and checks the header; false when the file is shorter than one.
    fn header(&mut self) -> Result<bool> {
        if self.len < HEADER {
            return Ok(false);
        }
        let mut magic = [0u8; MAGIC.len()];
        self.read(&mut magic)?;
        if &magic != MAGIC {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                offset: 0,
                what: "not a govshare segment (bad header)".into(),
            });
        }
        self.off = HEADER;
        Ok(true)
    }

    fn next(&mut self) -> Result<Framed> {
        let at = self.off;
        let left = self.len - at;
        if left == 0 {
            return Ok(Framed::End);
        }
        if left < FRAME_HEAD as u64 {
            return Ok(Framed::Bad(at, "an incomplete frame header"));
        }
        let mut head = [0u8; FRAME_HEAD];
        self.read(&mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 {
            return Ok(Framed::Bad(at, "an empty frame"));
        }
        if len as u64 > left - FRAME_HEAD as u64 {
            return Ok(Framed::Bad(at, "a frame longer than the file"));
        }
        self.body.resize(len, 0);
        let mut body = std::mem::take(&mut self.body);
        let read = self.read(&mut body);
        self.body = body;
        read?;
        if crc32fast::hash(&self.body) != crc {
            return Ok(Framed::Bad(at, "a frame whose checksum does not match"));
        }
        self.off = at + (FRAME_HEAD + len) as u64;
        Ok(Framed::Ok(at))
    }
}

impl Db {
    /// Opens (or creates) the store in `dir`, replaying its log.
    pub fn open(dir: &Path, opts: Options) -> Result<Self> {
        if opts.trees == 0 || opts.trees >= usize::from(ID_TREE) {
            return Err(Error::TooLarge(format!(
                "a store keeps 1 to {} trees, not {}",
                ID_TREE - 1,
                opts.trees
            )));
        }
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            // Its entry in the parent too, or a power loss could take the new store away.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if !fs4::fs_std::FileExt::try_lock_exclusive(&lock_file).map_err(io_err(&lock_path))? {
            return Err(Error::Locked(dir.to_path_buf()));
        }
        let mut ids = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
                continue;
            };
            if let Ok(id) = stem.parse::<u32>() {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = State {
            trees: (0..opts.trees)
                .map(|t| Index::new(opts.seq_trees.contains(&t)))
                .collect(),
            segs: BTreeMap::new(),
        };
        let mut id_ceiling = 0;
        let last = ids.last().copied();
        for &id in &ids {
            let path = dir.join(seg_name(id));
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?,
            );
            let is_last = Some(id) == last;
            // In the table before its replay, so that its puts count as its live bytes.
            state.segs.insert(
                id,
                Seg {
                    file: file.clone(),
                    path: path.clone(),
                    size: 0,
                    live: 0,
                },
            );
            let mut frames = Frames::open(&path)?;
            let file_len = frames.len;
            let mut size = replay(&mut state, &opts, id, &mut frames, is_last, &mut id_ceiling)?;
            if is_last && size == 0 {
                // A crash between creating the segment and writing its header.
                file.write_all_at(MAGIC, 0).map_err(io_err(&path))?;
                size = HEADER;
            }
            if size < file_len {
                let kept = keep_cut(dir, &path, &file, size, file_len)?;
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = file_len - size,
                    kept_in = %kept.display(),
                    "cut off the writes after the last whole frame: a crash (a power loss, a \
                     kill) interrupts them; were there none, the disk may be damaged, and the \
                     bytes cut are kept"
                );
                file.set_len(size).map_err(io_err(&path))?;
            }
            // The last segment always: what it holds past the last flush before the stop (a
            // kill leaves it in the page cache) is replayed and served as durable from now
            // on, and may make older records dead, which compaction then deletes for good.
            if is_last || size != file_len {
                sync_file(&file, &path).map_err(io_err(&path))?;
            }
            if let Some(s) = state.segs.get_mut(&id) {
                s.size = size;
            }
        }
        // A last segment whose creation a crash interrupted may have its entry in the
        // directory only in memory still.
        if last.is_some() {
            sync_dir(dir)?;
        }
        // Keys replayed in the order they were written (exchange ids are time-ordered) leave a
        // map's nodes little more than half full: the B-tree splits a full node in the middle,
        // and inserts in order never come back to the left half. Built in one go from sorted
        // entries, the nodes are full: at a million queued exchanges, about 46 MB less.
        for index in &mut state.trees {
            index.pack();
        }
        let head = match last {
            Some(id) => id,
            None => {
                let (file, path) = create_segment(dir, 0)?;
                state.segs.insert(
                    0,
                    Seg {
                        file: Arc::new(file),
                        path,
                        size: HEADER,
                        live: 0,
                    },
                );
                0
            }
        };
        let (file, path, len) = match state.segs.get(&head) {
            Some(s) => (s.file.clone(), s.path.clone(), s.size),
            None => return Err(Error::Failed("the head segment vanished".into())),
        };
        let writer = Writer {
            head,
            file,
            path,
            len,
            buf: Vec::new(),
            frames: 0,
            ceiling_written: id_ceiling,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                opts,
                state: RwLock::new(state),
                writer: Mutex::new(writer),
                sync: Mutex::new(()),
                fsync: Mutex::new(()),
                failed: Mutex::new(None),
                flushes: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                written: AtomicU64::new(0),
                appended: AtomicU64::new(0),
                next_id: AtomicU64::new(id_ceiling),
                id_ceiling: AtomicU64::new(id_ceiling),
                reserving: Mutex::new(()),
                _lock: lock_file,
            }),
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The value of `key` in `tree`.
    pub fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let loc = {
            let st = read_lock(&self.inner.state);
            match st.trees.get(tree).and_then(|t| t.get(key)) {
                Some(slot) => st.locate(&slot),
                None => return Ok(None),
            }
        };
        loc.read().map(Some)
    }

    /// Whether `tree` holds `key`.
    pub fn contains_key(&self, tree: usize, key: &[u8]) -> bool {
        read_lock(&self.inner.state)
            .trees
            .get(tree)
            .is_some_and(|t| t.get(key).is_some())
    }

    /// How many keys `tree` holds.
    pub fn len(&self, tree: usize) -> usize {
        read_lock(&self.inner.state)
            .trees
            .get(tree)
            .map_or(0, Index::len)
    }

    /// Whether `tree` is empty.
    pub fn is_empty(&self, tree: usize) -> bool {
        self.len(tree) == 0
    }

    /// The keys of `tree` in `range`, in order, with their values; see [`Iter`].
    pub fn range(&self, tree: usize, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Iter {
        let own = |b: Bound<&[u8]>| match b {
            Bound::Included(k) => Bound::Included(k.to_vec()),
            Bound::Excluded(k) => Bound::Excluded(k.to_vec()),
            Bound::Unbounded => Bound::Unbounded,
        };
        Iter {
            db: self.clone(),
            tree,
            lo: own(lo),
            hi: own(hi),
            done: false,
            values: true,
        }
    }

    /// Every key of `tree`, in order.
    pub fn iter(&self, tree: usize) -> Iter {
        self.range(tree, Bound::Unbounded, Bound::Unbounded)
    }

    /// The keys of `tree` that start with `prefix`, in order.
    pub fn scan_prefix(&self, tree: usize, prefix: &[u8]) -> Iter {
        match prefix_end(prefix) {
            Some(end) => self.range(tree, Bound::Included(prefix), Bound::Excluded(&end)),
            None => self.range(tree, Bound::Included(prefix), Bound::Unbounded),
        }
    }

    /// The first (smallest) key of `tree` with its value.
    pub fn first(&self, tree: usize) -> Result<Option<(Value, Value)>> {
        self.iter(tree).next().transpose()
    }

    /// The last (largest) key of `tree` with its value.
    pub fn last(&self, tree: usize) -> Result<Option<(Value, Value)>> {
        self.iter(tree).next_back().transpose()
    }

    /// Runs `f` as one atomic write: what it puts and removes becomes visible to readers
    /// together, when `f` returns Ok, and reaches the disk as one frame (durable after the next
    /// [`Db::flush`]); if `f` fails, nothing it did is kept. Writes are serialized: `f` sees
    /// every write committed before it, and its own.
    pub fn transaction<R, E: From<Error>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let mut w = self.writer()?;
        let tx = Tx {
            db: self,
            pending: RefCell::new(HashMap::new()),
            cleared: RefCell::new(Vec::new()),
            ops: RefCell::new(Vec::new()),
        };
        let r = {
            let _inside = Inside::enter();
            f(&tx)?
        };
        let ops = tx.ops.into_inner();
        if !ops.is_empty() {
            self.commit(&mut w, &ops)?;
        }
        Ok(r)
    }

    /// The writer, unless storage has failed, or this thread is inside a transaction (whose
    /// writer it would wait for forever).
    fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        if INSIDE.with(Cell::get) {
            return Err(Error::Reentrant);
        }
        let w = lock(&self.inner.writer);
        match self.failure() {
            Some(msg) => Err(Error::Failed(msg)),
            None => Ok(w),
        }
    }

    /// The first write or flush failure, once there has been one. Never waits for a write.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failed).clone()
    }

    /// Stops all writing, as a failed write would: for an owner that met a failure of its own
    /// (or of the disk) elsewhere. The first failure recorded stays.
    pub fn fail(&self, why: &str) {
        lock(&self.inner.failed).get_or_insert_with(|| why.to_string());
    }

    /// Appends one frame of `ops` and applies it to the index; the caller holds the writer.
    fn commit(&self, w: &mut Writer, ops: &[TxOp]) -> Result<()> {
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        buf.resize(FRAME_HEAD, 0);
        // Body-relative value offsets, in the order of `ops`' puts.
        let mut ats = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxOp::Put(t, k, v) => {
                    check_sizes(k, v)?;
                    ats.push(encode_put(&mut buf, *t, k, v) - FRAME_HEAD);
                }
                TxOp::Remove(t, k) => encode_remove(&mut buf, *t, k),
                TxOp::Clear(t) => buf.extend_from_slice(&[OP_CLEAR, *t]),
            }
        }
        let body_len = buf.len() - FRAME_HEAD;
        if body_len > MAX_FRAME {
            w.buf = buf;
            return Err(Error::TooLarge(format!(
                "a write of {body_len} bytes; at most {MAX_FRAME} in one transaction"
            )));
        }
        let crc = crc32fast::hash(&buf[FRAME_HEAD..]);
        buf[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        // Rolling before the write, not after, so that a failure to start the next segment
        // fails this write rather than report a write that was made as failed.
        if w.len >= self.inner.opts.segment_bytes || w.len + buf.len() as u64 > u64::from(u32::MAX)
        {
            if let Err(e) = self.roll(w) {
                w.buf = buf;
                return Err(e);
            }
        }
        let at = w.len;
        if let Err(e) = w.file.write_all_at(&buf, at) {
            // Cut off what part of the frame got written, so that the next frame starts
            // clean; if even that fails, the file's end is unknown and writing stops.
            if let Err(e2) = w.file.set_len(at) {
                self.fail(&format!("{}: {e}; then {e2}", w.path.display()));
            }
            w.buf = buf;
            return Err(io_err(&w.path)(e));
        }
        w.len += buf.len() as u64;
        w.frames += 1;
        self.inner
            .appended
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        // Before the index shows the writes: whoever reads them can name a mark covering them.
        self.inner.written.store(w.frames, Ordering::Release);
        let body_at = at + FRAME_HEAD as u64;
        {
            let mut st = write_lock(&self.inner.state);
            if let Some(s) = st.segs.get_mut(&w.head) {
                s.size = w.len;
            }
            let mut ats = ats.into_iter();
            for op in ops {
                match op {
                    TxOp::Put(t, k, v) => {
                        let rel = ats.next().unwrap_or_default();
                        let slot = Slot {
                            seg: w.head,
                            off: (body_at + rel as u64) as u32,
                            len: v.len() as u32,
                            inline: self
                                .inner
                                .opts
                                .inline(usize::from(*t), v.len())
                                .then_some(&v[..]),
                        };
                        if usize::from(*t) == usize::from(ID_TREE) {
                            continue;
                        }
                        st.put(usize::from(*t), k, slot);
                    }
                    TxOp::Remove(t, k) => st.remove(usize::from(*t), k),
                    TxOp::Clear(t) => st.clear(usize::from(*t)),
                }
            }
        }
        w.buf = buf;
        Ok(())
    }

    /// Seals the head segment and starts the next one. The sealed one is made durable first,
    /// so that a crash can tear only the last segment's last frame.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        self.sync_segment(&w.file, &w.path)?;
        // Every frame so far was in the segment just made durable.
        self.inner.synced.fetch_max(w.frames, Ordering::AcqRel);
        let next = w
            .head
            .checked_add(1)
            .ok_or_else(|| Error::TooLarge("the store ran out of segment numbers".into()))?;
        let (file, path) = create_segment(&self.inner.dir, next)?;
        let file = Arc::new(file);
        write_lock(&self.inner.state).segs.insert(
            next,
            Seg {
                file: file.clone(),
                path: path.clone(),
                size: HEADER,
                live: 0,
            },
        );
        w.head = next;
        w.file = file;
        w.path = path;
        w.len = HEADER;
        Ok(())
    }

    /// Makes every committed write durable: one `fdatasync` of the head segment (sealed
    /// segments were made durable when sealed), or none when nothing was written since the
    /// last flush; answers whether it synced. Once it fails, the store refuses writes until
    /// reopened: after a failed `fdatasync` the kernel may have dropped the unwritten pages.
    pub fn flush(&self) -> Result<bool> {
        self.flush_upto(u64::MAX)
    }

    /// A mark for everything committed so far, for [`Db::flush_upto`] and [`Db::durable`]: a
    /// write read back from the store (or committed by the caller) before this call is
    /// covered by the mark the call returns.
    pub fn written(&self) -> u64 {
        self.inner.written.load(Ordering::Acquire)
    }

    /// Bytes of frames appended to the log since the store was opened: a caller that reads
    /// the disk's free space only now and then can tell how much was written since.
    pub fn appended(&self) -> u64 {
        self.inner.appended.load(Ordering::Relaxed)
    }

    /// Whether everything up to `mark` (from [`Db::written`]) is on disk already.
    pub fn durable(&self, mark: u64) -> bool {
        self.inner.synced.load(Ordering::Acquire) >= mark
    }

    /// [`Db::flush`], but none when a flush made since (or running now, which this waits for)
    /// covered everything up to `mark` already: a caller who needs only its own writes
    /// durable does not pay for a flush of those committed after them.
    pub fn flush_upto(&self, mark: u64) -> Result<bool> {
        let _one = lock(&self.inner.sync);
        if self.durable(mark) {
            return Ok(false);
        }
        let (file, path, frames) = {
            let w = self.writer()?;
            (w.file.clone(), w.path.clone(), w.frames)
        };
        if self.inner.synced.load(Ordering::Acquire) >= frames {
            return Ok(false);
        }
        self.sync_segment(&file, &path)?;
        self.inner.synced.fetch_max(frames, Ordering::AcqRel);
        self.inner.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// `fdatasync`s one segment, one at a time (see [`Inner::fsync`]), refusing once storage
    /// has failed; a failure fails the store.
    fn sync_segment(&self, file: &File, path: &Path) -> Result<()> {
        let _one = lock(&self.inner.fsync);
        if let Some(f) = self.failure() {
            return Err(Error::Failed(f));
        }
        file.sync_data().map_err(|e| {
            self.fail(&format!("{}: {e}", path.display()));
            io_err(path)(e)
        })
    }

    /// `fdatasync`s performed by [`Db::flush`] calls so far.
    pub fn flushes(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    /// A number never handed out before by this store, even across crashes (ids are reserved
    /// durably in blocks, so a crash skips the rest of a block).
    pub fn generate_id(&self) -> Result<u64> {
        if INSIDE.with(Cell::get) {
            return Err(Error::Reentrant);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        if id >= self.inner.id_ceiling.load(Ordering::Acquire) {
            self.reserve_ids(id)?;
        }
        Ok(id)
    }

    /// Reserves a block of ids from `id` on, durably, unless a reservation made while this
    /// waited covers `id` already. An id is handed out only once it is below a durable ceiling.
    fn reserve_ids(&self, id: u64) -> Result<()> {
        let _one = lock(&self.inner.reserving);
        if id < self.inner.id_ceiling.load(Ordering::Acquire) {
            return Ok(());
        }
        let ceiling = id.saturating_add(ID_BLOCK);
        self.write_ceiling(ceiling)?;
        self.inner.id_ceiling.fetch_max(ceiling, Ordering::AcqRel);
        Ok(())
    }

    /// Writes an id ceiling to the log and flushes it; the caller publishes it afterwards.
    fn write_ceiling(&self, ceiling: u64) -> Result<()> {
        {
            let mut w = self.writer()?;
            self.commit(&mut w, &[ceiling_op(ceiling)])?;
            w.ceiling_written = w.ceiling_written.max(ceiling);
        }
        self.flush()?;
        Ok(())
    }

    /// Makes every later [`Db::generate_id`] answer at least `floor` (for a store converted
    /// from one that handed out ids already).
    pub fn advance_ids(&self, floor: u64) -> Result<()> {
        let _one = lock(&self.inner.reserving);
        if floor > self.inner.next_id.load(Ordering::Acquire) {
            let ceiling = floor.max(self.inner.id_ceiling.load(Ordering::Acquire));
            self.write_ceiling(ceiling)?;
            self.inner.next_id.fetch_max(floor, Ordering::AcqRel);
            self.inner.id_ceiling.fetch_max(ceiling, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Space used: bytes in segment files, and bytes of records still current.
    pub fn space(&self) -> (u64, u64) {
        read_lock(&self.inner.state).space()
    }

    /// Segment files the store has now.
    pub fn segments(&self) -> usize {
        read_lock(&self.inner.state).segs.len()
    }

    /// Rewrites the oldest segments' live records at the head and deletes those segments,
    /// while the log is more than twice its live bytes (and more than two segments' worth of
    /// dead bytes). Returns how many segments it deleted. Writers wait while a segment's live
    /// records are appended, at most one frame of them at a time.
    pub fn compact(&self) -> Result<usize> {
        let mut deleted = 0;
        loop {
            // The writer before the state, the order every writer takes them in.
            let head = self.writer()?.head;
            let (oldest, path) = {
                let st = read_lock(&self.inner.state);
                let (size, live) = st.space();
                let slack = 2 * self.inner.opts.segment_bytes;
                match st.segs.iter().next() {
                    Some((&id, s)) if id != head && size > 2 * live && size - live > slack => {
                        (id, s.path.clone())
                    }
                    _ => return Ok(deleted),
                }
            };
            self.move_live(oldest, &path)?;
            // The moved records must be durable before their old copies go.
            self.flush()?;
            write_lock(&self.inner.state).segs.remove(&oldest);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            sync_dir(&self.inner.dir)?;
            deleted += 1;
        }
    }

    /// Appends the records of segment `id` that are still current, a frame at a time, and
    /// points the index at the copies.
    fn move_live(&self, id: u32, path: &Path) -> Result<()> {
        let mut frames = Frames::open(path)?;
        let corrupt = |offset: u64, what: &str| Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        };
        if !frames.header()? {
            return Err(corrupt(0, "a segment shorter than its header"));
        }
        let mut batch: Vec<(u8, Value, Value, u32)> = Vec::new();
        let mut batch_bytes = 0;
        let mut had_ceiling = false;
        loop {
            let off = match frames.next()? {
                Framed::Ok(off) => off,
                Framed::End => break,
                Framed::Bad(off, what) => return Err(corrupt(off, what)),
            };
            let body_at = off as usize + FRAME_HEAD;
            let ops = parse(&frames.body)
                .ok_or_else(|| corrupt(off, "a frame with a malformed operation"))?;
            {
                let st = read_lock(&self.inner.state);
                for op in ops {
                    if let Op::Put {
                        tree,
                        key,
                        value,
                        at,
                    } = op
                    {
                        had_ceiling |= tree == ID_TREE;
                        let voff = (body_at + at) as u32;
                        if st.holds(tree, key, id, voff) {
                            batch_bytes += key.len() + value.len() + 10;
                            batch.push((
                                tree,
                                Value::copy_from_slice(key),
                                Value::copy_from_slice(value),
                                voff,
                            ));
                        }
                    }
                }
            }
            if batch_bytes >= 1 << 20 {
                self.rewrite(id, &mut batch)?;
                batch_bytes = 0;
            }
        }
        self.rewrite(id, &mut batch)?;
        if had_ceiling {
            // The id reservation must outlive the segment it was written in.
            let mut w = self.writer()?;
            // The highest written, not the highest published: a reservation still being
            // flushed may have been written in the very segment being taken.
            let ceiling = w.ceiling_written;
            self.commit(&mut w, &[ceiling_op(ceiling)])?;
        }
        Ok(())
    }

    /// Appends the records of `batch` that are still where they were read from.
    fn rewrite(&self, id: u32, batch: &mut Vec<(u8, Value, Value, u32)>) -> Result<()> {
        let mut w = self.writer()?;
        let ops: Vec<TxOp> = {
            let st = read_lock(&self.inner.state);
            batch
                .drain(..)
                .filter(|(t, k, _, voff)| st.holds(*t, k, id, *voff))
                .map(|(t, k, v, _)| TxOp::Put(t, k, v))
                .collect()
        };
        if ops.is_empty() {
            return Ok(());
        }
        self.commit(&mut w, &ops)
    }
}

/// The record of the ids reserved up to `ceiling` (exclusive).
fn ceiling_op(ceiling: u64) -> TxOp {
    TxOp::Put(
        ID_TREE,
        Value::from_static(b"ceiling"),
        Value::copy_from_slice(&ceiling.to_be_bytes()),
    )
}

fn check_sizes(k: &[u8], v: &[u8]) -> Result<()> {
    if k.len() > MAX_FRAME || v.len() > MAX_FRAME {
        return Err(Error::TooLarge(format!(
            "a key of {} bytes and value of {} bytes; each at most {MAX_FRAME}",
            k.len(),
            v.len()
        )));
    }
    Ok(())
}

/// Copies what opening is about to cut off the last segment (bytes `from..to`) to a file of
/// its own beside it, made durable first: a torn last write is what a crash leaves, but the
/// same thing can be damage in the middle of acknowledged writes, and cutting destroys the
/// evidence. The copy is never read by the store; an operator may delete it.
fn keep_cut(dir: &Path, seg: &Path, file: &File, from: u64, to: u64) -> Result<PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = seg.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".cut-{ms}"));
    let path = dir.join(name);
    let len = usize::try_from(to - from)
        .map_err(|_| Error::TooLarge(format!("{} bytes to cut", to - from)))?;
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, from).map_err(io_err(seg))?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    out.write_all_at(&bytes, 0)
        .and_then(|()| out.sync_all())
        .map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(path)
}

fn create_segment(dir: &Path, id: u32) -> Result<(File, PathBuf)> {
    let path = dir.join(seg_name(id));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let made = file
        .write_all_at(MAGIC, 0)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&path))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = made {
        // Otherwise every later roll would fail on the file left behind (`create_new`), where
        // it could succeed once there is space again.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, path))
}

/// Replays one segment's frames into `state`; returns the length of its valid part.
fn replay(
    state: &mut State,
    opts: &Options,
    id: u32,
    frames: &mut Frames,
    is_last: bool,
    id_ceiling: &mut u64,
) -> Result<u64> {
    let corrupt = |path: &Path, offset: u64, what: &str| Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        what: what.into(),
    };
    if !frames.header()? {
        return if is_last {
            Ok(0)
        } else {
            Err(corrupt(
                &frames.path,
                0,
                "a segment shorter than its header",
            ))
        };
    }
    loop {
        let off = match frames.next()? {
            Framed::Ok(off) => off,
            Framed::End => return Ok(frames.off),
            Framed::Bad(off, what) => {
                return if is_last {
                    Ok(off)
                } else {
                    Err(corrupt(&frames.path, off, what))
                }
            }
        };
        let Some(ops) = parse(&frames.body) else {
            return Err(corrupt(
                &frames.path,
                off,
                "a frame with a malformed operation",
            ));
        };
        let body_at = off as usize + FRAME_HEAD;
        for op in ops {
            match op {
                Op::Put {
                    tree,
                    key,
                    value,
                    at,
                } => {
                    if tree == ID_TREE {
                        if let Ok(b) = <[u8; 8]>::try_from(value) {
                            *id_ceiling = (*id_ceiling).max(u64::from_be_bytes(b));
                        }
                        continue;
                    }
                    let t = usize::from(tree);
                    if t >= opts.trees {
                        return Err(corrupt(
                            &frames.path,
                            off,
                            "a write to a tree this store does not have",
                        ));
                    }
                    let slot = Slot {
                        seg: id,
                        off: (body_at + at) as u32,
                        len: value.len() as u32,
                        inline: opts.inline(t, value.len()).then_some(value),
                    };
                    state.put(t, key, slot);
                }
                Op::Remove { tree, key } => {
                    if usize::from(tree) < opts.trees {
                        state.remove(usize::from(tree), key);
                    }
                }
                Op::Clear { tree } => {
                    if usize::from(tree) < opts.trees {
                        state.clear(usize::from(tree));
                    }
                }
            }
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[derive(Debug)]
enum TxOp {
    Put(u8, Value, Value),
    Remove(u8, Value),
    Clear(u8),
}

/// An atomic write in progress (see [`Db::transaction`]): reads see the store as committed
/// plus this write's own changes.
#[derive(Debug)]
pub struct Tx<'a> {
    db: &'a Db,
    /// This write's changes by tree, for its own reads: None is removed. In cells, so that a
    /// write can be handed around by shared reference like sled's transactional trees.
    pending: RefCell<HashMap<u8, BTreeMap<Value, Option<Value>>>>,
    /// Trees this write cleared: their committed keys are gone for its reads.
    cleared: RefCell<Vec<u8>>,
    ops: RefCell<Vec<TxOp>>,
}

impl Tx<'_> {
    fn tree(&self, tree: usize) -> Result<u8> {
        if tree < self.db.inner.opts.trees {
            Ok(tree as u8)
        } else {
            Err(Error::TooLarge(format!("no tree {tree}")))
        }
    }

    /// The value of `key` in `tree`, as this write would leave it.
    pub fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let t = self.tree(tree)?;
        if let Some(v) = self.pending.borrow().get(&t).and_then(|m| m.get(key)) {
            return Ok(v.clone());
        }
        if self.cleared.borrow().contains(&t) {
            return Ok(None);
        }
        self.db.get(tree, key)
    }

    /// Sets `key` in `tree` to `value`.
    pub fn insert(&self, tree: usize, key: &[u8], value: impl Into<Value>) -> Result<()> {
        let t = self.tree(tree)?;
        let (k, v) = (Value::copy_from_slice(key), value.into());
        check_sizes(&k, &v)?;
        self.pending
            .borrow_mut()
            .entry(t)
            .or_default()
            .insert(k.clone(), Some(v.clone()));
        self.ops.borrow_mut().push(TxOp::Put(t, k, v));
        Ok(())
    }

    /// Removes `key` from `tree`.
    pub fn remove(&self, tree: usize, key: &[u8]) -> Result<()> {
        let t = self.tree(tree)?;
        let k = Value::copy_from_slice(key);
        self.pending
            .borrow_mut()
            .entry(t)
            .or_default()
            .insert(k.clone(), None);
        self.ops.borrow_mut().push(TxOp::Remove(t, k));
        Ok(())
    }

    /// Removes every key of `tree`.
    pub fn clear(&self, tree: usize) -> Result<()> {
        let t = self.tree(tree)?;
        self.pending.borrow_mut().remove(&t);
        self.cleared.borrow_mut().push(t);
        self.ops.borrow_mut().push(TxOp::Clear(t));
        Ok(())
    }
}

/// One tree of a store, with the sled `Tree` methods the broker uses. Each write is a
/// transaction of its own.
#[derive(Debug, Clone)]
pub struct Tree {
    db: Db,
    tree: usize,
}

impl Db {
    /// A handle on one tree.
    pub fn tree(&self, tree: usize) -> Tree {
        Tree {
            db: self.clone(),
            tree,
        }
    }
}

fn own_bound<K: AsRef<[u8]>>(b: Bound<&K>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_ref()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Tree {
    /// The value of `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.db.get(self.tree, key.as_ref())
    }

    /// Whether the tree holds `key`.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.db.contains_key(self.tree, key.as_ref()))
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let v = Value::copy_from_slice(value.as_ref());
        self.db
            .transaction(|tx| tx.insert(self.tree, key.as_ref(), v.clone()))
    }

    /// Removes `key`.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.db.transaction(|tx| tx.remove(self.tree, key.as_ref()))
    }

    /// Removes every key.
    pub fn clear(&self) -> Result<()> {
        self.db.transaction(|tx| tx.clear(self.tree))
    }

    /// How many keys the tree holds.
    pub fn len(&self) -> usize {
        self.db.len(self.tree)
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.db.is_empty(self.tree)
    }

    /// Every key, in order.
    pub fn iter(&self) -> Iter {
        self.db.iter(self.tree)
    }

    /// The keys in `r`, in order.
    pub fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(&self, r: R) -> Iter {
        self.db.range(
            self.tree,
            own_bound(r.start_bound()),
            own_bound(r.end_bound()),
        )
    }

    /// The keys that start with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        self.db.scan_prefix(self.tree, prefix.as_ref())
    }

    /// The smallest key, with its value.
    pub fn first(&self) -> Result<Option<(Value, Value)>> {
        self.db.first(self.tree)
    }

    /// The largest key, with its value.
    pub fn last(&self) -> Result<Option<(Value, Value)>> {
        self.db.last(self.tree)
    }
}

/// Keys and values of a range of one tree, in order from either end. It holds no lock
/// between items: each step finds the next key after the last one it gave, so it sees
/// writes committed meanwhile, like sled's iterators.
#[derive(Debug)]
pub struct Iter {
    db: Db,
    tree: usize,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    done: bool,
    /// False for [`Iter::keys`]: values are then not read (from disk) at all.
    values: bool,
}

impl Iter {
    /// The keys alone, without reading their values.
    pub fn keys(mut self) -> impl DoubleEndedIterator<Item = Result<Value>> {
        self.values = false;
        self.map(|kv| kv.map(|(k, _)| k))
    }

    /// The values alone.
    pub fn values(self) -> impl DoubleEndedIterator<Item = Result<Value>> {
        self.map(|kv| kv.map(|(_, v)| v))
    }

    fn step(&mut self, back: bool) -> Option<Result<(Value, Value)>> {
        if self.done {
            return None;
        }
        let st = read_lock(&self.db.inner.state);
        let tree = st.trees.get(self.tree)?;
        let bounds = (
            self.lo.as_ref().map(Vec::as_slice),
            self.hi.as_ref().map(Vec::as_slice),
        );
        // An empty or inverted range is not an error here, as it would be for BTreeMap.
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
            bounds
        {
            let both_in = matches!(bounds, (Bound::Included(_), Bound::Included(_)));
            if a > b || (a == b && !both_in) {
                self.done = true;
                return None;
            }
        }
        let Some((key, slot)) = tree.edge(bounds.0, bounds.1, back) else {
            self.done = true;
            return None;
        };
        let loc = self.values.then(|| st.locate(&slot));
        drop(st);
        let v = loc.map_or(Ok(Value::new()), Loc::read);
        let kv = Value::from(key.clone());
        if back {
            self.hi = Bound::Excluded(key);
        } else {
            self.lo = Bound::Excluded(key);
        }
        Some(v.map(|v| (kv, v)))
    }
}

impl Iterator for Iter {
    type Item = Result<(Value, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(false)
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    type R = std::result::Result<(), Error>;

    fn small() -> Options {
        Options {
            trees: 4,
            segment_bytes: 4096,
            inline_bytes: 8,
            seq_trees: Vec::new(),
            memory_trees: Vec::new(),
        }
    }

    fn put(db: &Db, t: usize, k: &str, v: &str) -> R {
        db.transaction(|tx| tx.insert(t, k.as_bytes(), v.as_bytes().to_vec()))
    }

    fn dump(db: &Db, t: usize) -> Result<Vec<(String, String)>> {
        db.iter(t)
            .map(|kv| {
                kv.map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
            })
            .collect()
    }

    // A kill leaves the head's last writes in the page cache only. The next run replays
    // them and serves them as durable, and its compaction may delete an older segment whose
    // records they made dead: unless the replayed head is made durable at open, a power loss
    // then keeps the deletion and drops the write, and an acknowledged key is gone. So the
    // open syncs the newest segment, also when it had nothing to cut.
    #[test]
    fn opening_makes_the_replayed_newest_segment_durable() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let last = {
            let db = Db::open(dir.path(), small())?;
            put(&db, 1, "acked", "v1")?;
            db.flush()?;
            for round in 0..40 {
                for i in 0..10 {
                    put(&db, 0, &format!("hot{i}"), &format!("{round:>60}"))?;
                }
            }
            db.flush()?;
            put(&db, 1, "acked", "v2")?; // then killed: never flushed
            seg_files(dir.path()).pop().ok_or(Error::Reentrant)?
        };
        assert!(seg_files(dir.path()).len() > 1);
        SYNCED.with(|s| s.borrow_mut().clear());
        let db = Db::open(dir.path(), small())?;
        let synced = SYNCED.with(|s| s.borrow().clone());
        let segs: Vec<&PathBuf> = synced.iter().filter(|p| p.is_file()).collect();
        assert_eq!(
            segs,
            [&last],
            "the newest segment, and only it, synced at open"
        );
        assert!(synced.iter().any(|p| p == dir.path()), "and the directory");
        assert_eq!(db.get(1, b"acked")?.as_deref(), Some(&b"v2"[..]));
        // Served as durable from here on: compaction may now delete segment 0.
        assert!(db.durable(db.written()));
        assert!(db.compact()? > 0);
        Ok(())
    }

    // The kernel tells a writeback error to one `fdatasync` of a file only: a flush whose
    // own call succeeded after another (a roll's) met the error must not report the frames
    // durable. Every sync checks what the ones before it met.
    #[test]
    fn a_flush_after_another_sync_failed_is_refused() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        put(&db, 0, "k", "v")?;
        // As if a roll's fdatasync of this segment had just met EIO.
        // (Set directly: the writer is not involved, as the flush's own sync is not.)
        *lock(&db.inner.failed) = Some("0000000000.seg: Input/output error".into());
        let mark = db.written();
        match db.flush() {
            Err(Error::Failed(why)) => assert!(why.contains("Input/output error"), "{why}"),
            other => panic!("a flush after a failed sync answered {other:?}"),
        }
        assert!(!db.durable(mark), "frames reported durable");
        assert!(matches!(put(&db, 0, "k2", "v"), Err(Error::Failed(_))));
        Ok(())
    }

    // A store made in a new directory makes that directory's entry durable in its parent.
    #[test]
    fn a_new_store_directory_is_made_durable_in_its_parent() -> R {
        let parent = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let dir = parent.path().join("db");
        SYNCED.with(|s| s.borrow_mut().clear());
        drop(Db::open(&dir, small())?);
        let synced = SYNCED.with(|s| s.borrow().clone());
        assert!(synced.iter().any(|p| p == parent.path()), "{synced:?}");
        SYNCED.with(|s| s.borrow_mut().clear());
        drop(Db::open(&dir, small())?);
        let again = SYNCED.with(|s| s.borrow().clone());
        assert!(
            !again.iter().any(|p| p == parent.path()),
            "only when made: {again:?}"
        );
        Ok(())
    }

    // Damage in the middle of the newest segment looks like a torn last write and is cut
    // off, since a power loss can tear any write after the last flush; what is cut is kept
    // in a file of its own, byte for byte, and the segment's valid part still opens.
    #[test]
    fn what_opening_cuts_off_the_newest_segment_is_kept_beside_it() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        {
            let db = Db::open(dir.path(), Options::default())?;
            for i in 0..10 {
                put(&db, 0, &format!("k{i}"), &"v".repeat(100))?;
            }
            db.flush()?;
        }
        let seg = seg_files(dir.path()).pop().ok_or(Error::Reentrant)?;
        let whole = std::fs::read(&seg).map_err(io_err(&seg))?;
        let f = OpenOptions::new()
            .write(true)
            .open(&seg)
            .map_err(io_err(&seg))?;
        f.write_all_at(b"\xde\xad", HEADER + 20)
            .map_err(io_err(&seg))?; // inside the first frame
        drop(f);
        let damaged = std::fs::read(&seg).map_err(io_err(&seg))?;
        let db = Db::open(dir.path(), Options::default())?;
        assert_eq!(db.len(0), 0, "nothing after the bad frame is applied");
        let cut: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .map_err(io_err(dir.path()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains(".seg.cut-"))
            .collect();
        assert_eq!(cut.len(), 1, "{cut:?}");
        let kept = std::fs::read(&cut[0]).map_err(io_err(&cut[0]))?;
        assert_eq!(kept.len(), whole.len() - HEADER as usize);
        assert_eq!(
            kept,
            damaged[HEADER as usize..],
            "the cut bytes, as they were"
        );
        // Later writes go on after the cut; the copy is never read as a segment.
        put(&db, 0, "after", "1")?;
        db.flush()?;
        drop(db);
        let db = Db::open(dir.path(), Options::default())?;
        assert_eq!(dump(&db, 0)?, [("after".to_string(), "1".to_string())]);
        Ok(())
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn appended_counts_every_byte_written_and_a_read_writes_none() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        assert_eq!(db.appended(), 0);
        let big = "x".repeat(3000);
        put(&db, 0, "a", &big)?;
        let one = db.appended();
        assert!(one >= 3000, "{one}");
        db.get(0, b"a")?;
        db.flush()?;
        assert_eq!(db.appended(), one);
        // Into a new segment (4096 bytes each) and over the rolled one: still counted.
        put(&db, 0, "a", &big)?;
        put(&db, 0, "b", &big)?;
        assert!(db.appended() >= 3 * 3000, "{}", db.appended());
        Ok(())
    }

    #[test]
    fn writes_survive_a_reopen_with_small_and_large_values() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let big = "x".repeat(300);
        {
            let db = Db::open(dir.path(), small())?;
            put(&db, 0, "a", "1")?;
            put(&db, 0, "b", &big)?;
            put(&db, 1, "a", "other tree")?;
            put(&db, 0, "a", "2")?;
            db.transaction(|tx| tx.remove(1, b"a"))?;
            assert_eq!(db.get(0, b"b")?.as_deref(), Some(big.as_bytes()));
            db.flush()?;
        }
        let db = Db::open(dir.path(), small())?;
        assert_eq!(
            dump(&db, 0)?,
            vec![("a".into(), "2".into()), ("b".into(), big.clone())]
        );
        assert!(db.is_empty(1));
        assert_eq!(db.len(0), 2);
        assert!(db.contains_key(0, b"a") && !db.contains_key(0, b"c"));
        Ok(())
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_and_a_transaction_reads_its_own_writes() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        put(&db, 0, "k", "old")?;
        let before = db.space().0;
        let r: std::result::Result<(), Error> = db.transaction(|tx| {
            assert!(matches!(db.flush(), Err(Error::Reentrant)));
            assert!(matches!(db.generate_id(), Err(Error::Reentrant)));
            tx.insert(0, b"k", b"new".to_vec())?;
            tx.insert(0, b"j", b"new".to_vec())?;
            assert_eq!(tx.get(0, b"k")?.as_deref(), Some(&b"new"[..]));
            Err(Error::TooLarge("refused on purpose".into()))
        });
        assert!(matches!(r, Err(Error::TooLarge(_))));
        assert_eq!(db.get(0, b"k")?.as_deref(), Some(&b"old"[..]));
        assert!(!db.contains_key(0, b"j"));
        assert_eq!(
            db.space().0,
            before,
            "a refused write must not reach the log"
        );
        db.transaction(|tx| {
            tx.insert(0, b"a", b"1".to_vec())?;
            tx.clear(0)?;
            assert_eq!(tx.get(0, b"k")?, None, "cleared in this write");
            assert_eq!(tx.get(0, b"a")?, None, "put before the clear");
            tx.insert(0, b"z", b"after".to_vec())?;
            assert_eq!(tx.get(0, b"z")?.as_deref(), Some(&b"after"[..]));
            tx.remove(0, b"z")?;
            assert_eq!(tx.get(0, b"z")?, None);
            tx.insert(0, b"y", b"kept".to_vec())
        })?;
        drop(db);
        let db = Db::open(dir.path(), small())?;
        assert_eq!(dump(&db, 0)?, vec![("y".into(), "kept".into())]);
        Ok(())
    }

    // A packed map holds the same keys, in order, with the same places and inline values.
    #[test]
    fn packing_a_map_keeps_every_entry() {
        let mut want = Vec::new();
        let mut index = Index::new(false);
        if let Index::Map(m) = &mut index {
            for i in 0..5000u32 {
                let key = format!("k{i:06}");
                let inline = (i % 3 == 0).then(|| i.to_be_bytes());
                let stored = Stored {
                    seg: i % 7,
                    off: i,
                    len: 4,
                    inline: inline.is_some(),
                };
                m.insert(
                    Key::new(key.as_bytes(), inline.as_ref().map(|b| &b[..])),
                    stored,
                );
                want.push((key.into_bytes(), inline, stored.seg, stored.off));
            }
        }
        index.pack();
        let Index::Map(m) = &index else {
            panic!("still a map")
        };
        let got: Vec<_> = m
            .iter()
            .map(|(k, s)| {
                let (key, value) = k.parts();
                let inline = s
                    .inline
                    .then(|| <[u8; 4]>::try_from(value).unwrap_or_default());
                (key.to_vec(), inline, s.seg, s.off)
            })
            .collect();
        assert_eq!(got, want);
        assert!(index.get(b"k004999").is_some() && index.get(b"k005000").is_none());
    }

    /// Whether `key`'s value in `tree` is held in memory.
    fn held_inline(db: &Db, tree: usize, key: &[u8]) -> bool {
        read_lock(&db.inner.state).trees[tree]
            .get(key)
            .is_some_and(|s| s.inline.is_some())
    }

    // A memory tree holds every value in memory, large ones too, as written, after a reopen
    // (replayed from the log) and after compaction moved it; other trees only small ones.
    #[test]
    fn a_memory_tree_keeps_large_values_in_memory() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let opts = Options {
            memory_trees: vec![1],
            ..small()
        };
        let big = vec![7u8; 1000];
        let check = |db: &Db| -> R {
            assert!(
                held_inline(db, 1, b"big"),
                "a large value of the memory tree"
            );
            assert!(!held_inline(db, 0, b"big"), "a large value of another tree");
            assert!(
                held_inline(db, 0, b"small"),
                "a small value of another tree"
            );
            assert_eq!(db.get(1, b"big")?.as_deref(), Some(&big[..]));
            assert_eq!(db.get(0, b"big")?.as_deref(), Some(&big[..]));
            Ok(())
        };
        let db = Db::open(dir.path(), opts.clone())?;
        db.transaction(|tx| {
            tx.insert(0, b"big", big.clone())?;
            tx.insert(1, b"big", big.clone())?;
            tx.insert(0, b"small", b"s".to_vec())
        })?;
        check(&db)?;
        drop(db);
        let db = Db::open(dir.path(), opts)?;
        check(&db)?;
        // Enough dead records to compact the first segment away.
        for i in 0..40u32 {
            db.transaction(|tx| tx.insert(2, b"churn", vec![0u8; 400 + i as usize]))?;
        }
        assert!(db.compact()? > 0, "a segment compacted");
        check(&db)
    }

    #[test]
    fn ranges_prefixes_and_both_ends() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        for k in ["a/1", "a/2", "a/3", "b/1", "a\u{7f}"] {
            put(&db, 2, k, k)?;
        }
        db.transaction(|tx| tx.insert(2, &[b'c', 0xff], b"ff".to_vec()))?;
        db.transaction(|tx| tx.insert(2, &[b'c', 0xff, 0xff], b"fff".to_vec()))?;
        fn keys(it: impl Iterator<Item = Result<(Value, Value)>>) -> Result<Vec<Vec<u8>>> {
            it.map(|kv| kv.map(|(k, _)| k.to_vec())).collect()
        }
        assert_eq!(
            keys(db.scan_prefix(2, b"a/"))?,
            vec![b"a/1".to_vec(), b"a/2".to_vec(), b"a/3".to_vec()]
        );
        assert_eq!(
            keys(db.scan_prefix(2, &[b'c', 0xff]))?,
            vec![vec![b'c', 0xff], vec![b'c', 0xff, 0xff]]
        );
        assert_eq!(
            keys(
                db.range(2, Bound::Excluded(b"a/1"), Bound::Included(b"a/3"))
                    .rev()
            )?,
            vec![b"a/3".to_vec(), b"a/2".to_vec()]
        );
        assert!(keys(db.range(2, Bound::Included(b"b"), Bound::Excluded(b"a")))?.is_empty());
        assert!(keys(db.range(2, Bound::Excluded(b"a/1"), Bound::Excluded(b"a/1")))?.is_empty());
        let mut both = db.iter(2);
        let first = both.next().transpose()?.map(|(k, _)| k.to_vec());
        let last = both.next_back().transpose()?.map(|(k, _)| k.to_vec());
        assert_eq!(first, Some(b"a/1".to_vec()));
        assert_eq!(last, Some(vec![b'c', 0xff, 0xff]));
        assert_eq!(both.count(), 5, "the two ends meet without repeating a key");
        assert_eq!(db.first(2)?.map(|(k, _)| k.to_vec()), Some(b"a/1".to_vec()));
        assert_eq!(db.last(3)?, None);
        Ok(())
    }

    #[test]
    fn a_torn_last_write_is_cut_off_and_the_store_goes_on() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let last_len;
        {
            let db = Db::open(dir.path(), Options::default())?;
            for i in 0..10 {
                put(&db, 0, &format!("k{i}"), &"v".repeat(100))?;
            }
            db.flush()?;
            last_len = db.space().0;
        }
        let seg = seg_files(dir.path())
            .pop()
            .ok_or_else(|| Error::Failed("no segment".into()))?;
        // Half of the last frame reached the disk.
        let f = OpenOptions::new()
            .write(true)
            .open(&seg)
            .map_err(io_err(&seg))?;
        f.set_len(last_len - 60).map_err(io_err(&seg))?;
        drop(f);
        {
            let db = Db::open(dir.path(), Options::default())?;
            assert_eq!(db.len(0), 9, "the torn write is gone, the others are whole");
            assert!(!db.contains_key(0, b"k9"));
            put(&db, 0, "after", "crash")?;
            db.flush()?;
        }
        // Garbage after the last frame (a write of which only some pages landed).
        let f = OpenOptions::new()
            .append(true)
            .open(&seg)
            .map_err(io_err(&seg))?;
        std::io::Write::write_all(&mut &f, &[7u8; 100]).map_err(io_err(&seg))?;
        drop(f);
        let db = Db::open(dir.path(), Options::default())?;
        assert_eq!(db.len(0), 10);
        assert_eq!(db.get(0, b"after")?.as_deref(), Some(&b"crash"[..]));
        Ok(())
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_open() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        {
            let db = Db::open(dir.path(), small())?;
            for i in 0..100 {
                put(&db, 0, &format!("k{i}"), &"v".repeat(100))?;
            }
            db.flush()?;
            assert!(db.segments() > 2);
        }
        let first = seg_files(dir.path())
            .into_iter()
            .next()
            .ok_or_else(|| Error::Failed("no segment".into()))?;
        let f = OpenOptions::new()
            .write(true)
            .open(&first)
            .map_err(io_err(&first))?;
        f.write_all_at(b"\xde\xad", HEADER + 20)
            .map_err(io_err(&first))?;
        drop(f);
        match Db::open(dir.path(), small()) {
            Err(Error::Corrupt { path, offset, .. }) => {
                assert_eq!(path, first);
                assert_eq!(offset, HEADER);
            }
            other => panic!("expected a refusal naming the damage, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_flush_with_nothing_new_to_make_durable_costs_no_fdatasync() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        assert!(!db.flush()?, "nothing written yet");
        put(&db, 0, "a", "1")?;
        assert!(db.flush()?);
        assert!(!db.flush()?, "already durable");
        assert_eq!(db.flushes(), 1);
        // A refused transaction writes nothing, so there is still nothing to flush.
        let _ = db.transaction(|tx| {
            tx.insert(0, b"b", b"2".to_vec())?;
            Err::<(), _>(Error::TooLarge("no".into()))
        });
        assert!(!db.flush()?);
        // Sealing a segment makes what it holds durable; only what follows needs a flush.
        for i in 0..60 {
            put(&db, 0, &format!("k{i}"), &"v".repeat(100))?;
        }
        assert!(db.segments() > 1);
        assert!(db.flush()?);
        assert!(!db.flush()?);
        Ok(())
    }

    // A caller needing its own writes durable is not made to flush the writes after them.
    #[test]
    fn a_flush_up_to_a_mark_already_durable_costs_no_fdatasync() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let db = Db::open(dir.path(), small())?;
        assert!(
            db.durable(db.written()),
            "nothing written: nothing to wait for"
        );
        put(&db, 0, "a", "1")?;
        let a = db.written();
        assert!(!db.durable(a));
        put(&db, 0, "b", "2")?;
        let b = db.written();
        assert!(b > a);
        // A flush for `a` covers `b` too: one fdatasync for both.
        assert!(db.flush_upto(a)?);
        assert!(db.durable(a) && db.durable(b));
        assert!(!db.flush_upto(b)?);
        put(&db, 0, "c", "3")?;
        // `a` and `b` are durable whatever comes after them; `c` is not until flushed.
        assert!(!db.flush_upto(b)?);
        assert!(!db.durable(db.written()));
        assert_eq!(db.flushes(), 1);
        assert!(db.flush_upto(db.written())?);
        assert_eq!(db.flushes(), 2);
        assert!(db.durable(db.written()));
        Ok(())
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let _db = Db::open(dir.path(), small())?;
        assert!(matches!(
            Db::open(dir.path(), small()),
            Err(Error::Locked(_))
        ));
        Ok(())
    }

    #[test]
    fn compaction_frees_space_keeps_live_data_and_removes_stay_removed() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let opts = small();
        {
            let db = Db::open(dir.path(), opts.clone())?;
            put(&db, 1, "keep", &"k".repeat(50))?;
            put(&db, 1, "gone", "soon removed")?;
            for round in 0..40 {
                for i in 0..10 {
                    put(&db, 0, &format!("hot{i}"), &format!("{round:>60}"))?;
                }
            }
            db.transaction(|tx| tx.remove(1, b"gone"))?;
            let (size, live) = db.space();
            assert!(size > 4 * live, "mostly dead before: {size} / {live}");
            let segs = db.segments();
            let deleted = db.compact()?;
            assert!(deleted > 0);
            assert_eq!(db.segments(), segs - deleted);
            let (size, live) = db.space();
            assert!(
                size <= 2 * live + 2 * opts.segment_bytes,
                "{size} bytes for {live} live"
            );
            assert_eq!(
                db.get(1, b"keep")?.as_deref(),
                Some("k".repeat(50).as_bytes())
            );
            assert!(!db.contains_key(1, b"gone"));
            assert_eq!(seg_files(dir.path()).len(), db.segments());
        }
        let db = Db::open(dir.path(), opts)?;
        assert_eq!(
            db.get(1, b"keep")?.as_deref(),
            Some("k".repeat(50).as_bytes())
        );
        assert!(
            !db.contains_key(1, b"gone"),
            "a remove must not come undone"
        );
        assert_eq!(db.len(0), 10);
        assert_eq!(
            db.get(0, b"hot3")?.as_deref(),
            Some(format!("{:>60}", 39).as_bytes())
        );
        Ok(())
    }

    /// Callers on many threads, running out of a block together: each id once, and a reopened
    /// store starts above all of them.
    #[test]
    fn ids_taken_on_many_threads_across_a_reservation_are_unique_and_durable() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let per_thread = (ID_BLOCK as usize) / 3;
        let mut all = {
            let db = Db::open(dir.path(), small())?;
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let db = db.clone();
                    std::thread::spawn(move || -> Result<Vec<u64>> {
                        (0..per_thread).map(|_| db.generate_id()).collect()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(4 * per_thread);
            for t in threads {
                let ids = t
                    .join()
                    .map_err(|_| Error::Failed("an id thread panicked".into()))??;
                all.extend(ids);
            }
            all
        };
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "an id was handed out twice");
        // 4/3 of a block: the callers crossed at least one reservation.
        assert!(all.last().copied().unwrap_or(0) >= ID_BLOCK);
        let db = Db::open(dir.path(), small())?;
        assert!(db.generate_id()? > all.last().copied().unwrap_or(u64::MAX));
        Ok(())
    }

    #[test]
    fn ids_are_never_handed_out_twice_across_reopens_and_compaction() -> R {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let a = {
            let db = Db::open(dir.path(), small())?;
            let a = db.generate_id()?;
            assert_eq!(db.generate_id()?, a + 1);
            a
        };
        let b = {
            let db = Db::open(dir.path(), small())?;
            let b = db.generate_id()?;
            assert!(b > a + 1);
            // Enough churn that the segment holding the reservation is compacted away.
            for round in 0..200 {
                put(&db, 0, "hot", &format!("{round:>100}"))?;
            }
            assert!(db.compact()? > 0);
            assert!(!seg_files(dir.path())
                .iter()
                .any(|p| p.ends_with(seg_name(0))));
            b
        };
        let db = Db::open(dir.path(), small())?;
        assert!(db.generate_id()? > b);
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put(usize, u8, usize),
        Remove(usize, u8),
        Clear(usize),
        /// A transaction of several steps that is refused.
        Refused(u8),
        Reopen,
        Compact,
        /// A key of another length into the sequence tree (it becomes a general one).
        Odd(u8),
        /// A range read: tree, bounds (0 unbounded, 1 included, 2 excluded), from the back.
        Range(usize, (u8, Vec<u8>), (u8, Vec<u8>), bool),
    }

    /// The tree with a sequence index in the property test.
    const SEQ: usize = 2;

    /// Key `k` of tree `t`: 8 bytes in the sequence tree, spread over them; in tree 1 some
    /// longer than a one-byte length can say (see [`Key`]).
    fn key(t: usize, k: u8) -> Vec<u8> {
        if t == SEQ {
            (u64::from(k) * 0x0100_0100_0001).to_be_bytes().to_vec()
        } else if t == 1 && k.is_multiple_of(3) {
            vec![k; 300]
        } else {
            vec![k]
        }
    }

    fn bound(b: &(u8, Vec<u8>)) -> Bound<&[u8]> {
        match b.0 {
            1 => Bound::Included(&b.1),
            2 => Bound::Excluded(&b.1),
            _ => Bound::Unbounded,
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        let b = || (0..3u8, proptest::collection::vec(0..24u8, 0..10));
        prop_oneof![
            8 => (0..3usize, 0..24u8, 0..200usize).prop_map(|(t, k, n)| Step::Put(t, k, n)),
            3 => (0..3usize, 0..24u8).prop_map(|(t, k)| Step::Remove(t, k)),
            1 => (0..3usize).prop_map(Step::Clear),
            1 => (0..24u8).prop_map(Step::Refused),
            1 => Just(Step::Reopen),
            1 => Just(Step::Compact),
            1 => (0..24u8).prop_map(Step::Odd),
            3 => (0..3usize, b(), b(), any::<bool>()).prop_map(|(t, l, h, back)| Step::Range(t, l, h, back)),
        ]
    }

    fn check(db: &Db, model: &[Model<Vec<u8>, Vec<u8>>]) -> R {
        for (t, m) in model.iter().enumerate() {
            let got: Vec<(Vec<u8>, Vec<u8>)> = db
                .iter(t)
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_>>()?;
            let want: Vec<(Vec<u8>, Vec<u8>)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            assert_eq!(got, want, "tree {t}");
            assert_eq!(db.len(t), m.len());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn the_store_behaves_like_an_ordered_map_through_reopens_and_compaction(
            steps in proptest::collection::vec(step(), 1..160)
        ) {
            let dir = tempfile::tempdir()?;
            // Tree 1 keeps every value in memory; tree 0 only those up to 16 bytes.
            let opts = Options {
                trees: 3,
                segment_bytes: 1024,
                inline_bytes: 16,
                seq_trees: vec![SEQ],
                memory_trees: vec![1],
            };
            let mut db = Db::open(dir.path(), opts.clone())?;
            let mut model: Vec<Model<Vec<u8>, Vec<u8>>> = vec![Model::new(); 3];
            for (i, s) in steps.into_iter().enumerate() {
                match s {
                    Step::Put(t, k, n) => {
                        let v = vec![(i % 251) as u8; n];
                        db.transaction(|tx| tx.insert(t, &key(t, k), v.clone()))?;
                        model[t].insert(key(t, k), v);
                    }
                    Step::Remove(t, k) => {
                        db.transaction(|tx| tx.remove(t, &key(t, k)))?;
                        model[t].remove(&key(t, k));
                    }
                    Step::Odd(k) => {
                        db.transaction(|tx| tx.insert(SEQ, &[k], vec![k; 3]))?;
                        model[SEQ].insert(vec![k], vec![k; 3]);
                    }
                    Step::Range(t, lo, hi, back) => {
                        let (lo, hi) = (bound(&lo), bound(&hi));
                        let it = db.range(t, lo, hi);
                        let got: Vec<(Vec<u8>, Vec<u8>)> = if back {
                            it.rev().map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<_>>()?
                        } else {
                            it.map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<_>>()?
                        };
                        // What BTreeMap::range would panic on is an empty range.
                        let empty = match (lo, hi) {
                            (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                                a > b || (a == b && !matches!((lo, hi), (Bound::Included(_), Bound::Included(_))))
                            }
                            _ => false,
                        };
                        let mut want: Vec<(Vec<u8>, Vec<u8>)> = if empty {
                            Vec::new()
                        } else {
                            model[t].range::<[u8], _>((lo, hi)).map(|(k, v)| (k.clone(), v.clone())).collect()
                        };
                        if back {
                            want.reverse();
                        }
                        prop_assert_eq!(got, want);
                    }
                    Step::Clear(t) => {
                        db.transaction(|tx| tx.clear(t))?;
                        model[t].clear();
                    }
                    Step::Refused(k) => {
                        let r: std::result::Result<(), Error> = db.transaction(|tx| {
                            tx.insert(0, &[k], vec![1; 40])?;
                            tx.clear(1)?;
                            Err(Error::TooLarge("no".into()))
                        });
                        prop_assert!(r.is_err());
                    }
                    Step::Reopen => {
                        db.flush()?;
                        drop(db);
                        db = Db::open(dir.path(), opts.clone())?;
                    }
                    Step::Compact => {
                        db.compact()?;
                    }
                }
            }
            check(&db, &model)?;
            drop(db);
            let db = Db::open(dir.path(), opts)?;
            check(&db, &model)?;
        }
    }
}
