//! Federation: the 1+32+N cascade of brokers.
//!
//! A child broker dials its parent and keeps one mutually authenticated link (a bidirectional
//! gRPC stream, [`link`]). Over it, brokers advertise the nodes they reach, cascade catalog
//! entries, signing keys and revocations (state, resent in full whenever a link opens), and
//! carry exchanges, results, demands and decisions (custody: written to this broker's durable
//! outbox in the same transaction as the decision to send them, and deleted only when the
//! peer acknowledges holding them).
//!
//! Routing is by node id: a node registered here is local; a node a child advertised goes to
//! that child; anything else goes up to the parent; at a root, it is unknown.

pub mod link;

use crate::error::Result;
use crate::store::{seq_key, Store, Tx, T};
use govshare_proto::v1::{link_frame, ExchangeResult, LinkFrame};
use prost::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The outbox and link key of the parent (its broker id is learned only when the link opens).
pub const PARENT: &str = "^parent";
/// The protocol a link speaks, sent in its hello.
pub const PROTOCOL: &str = "govshare.v1";

/// Where a node is reached, as stored in the `routes` tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteRecord {
    /// The child broker (link key) the node is reached through.
    #[prost(string, tag = "1")]
    pub via: String,
    /// The broker the node is attached to.
    #[prost(string, tag = "2")]
    pub home: String,
    /// Hops from `via` to the home broker.
    #[prost(uint32, tag = "3")]
    pub distance: u32,
}

/// Where something for a node goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The node is registered on this broker.
    Local,
    /// Over the link with this key (a child's broker id, or [`PARENT`]).
    Via(String),
}

/// What handling a frame leads to, done once its writes are durable.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Queue an exchange for a local provider.
    Enqueue {
        /// Exchange id.
        id: String,
        /// The provider node.
        dest: String,
        /// Dataset.
        dataset: String,
        /// Deadline, Unix ms.
        deadline_ms: i64,
    },
    /// An exchange of a local consumer came back with its outcome.
    Result(ExchangeResult),
    /// A grant was revoked: end its queued exchanges here.
    Revoked(String),
    /// Wake the pump of this link.
    Wake(String),
    /// Send a state update to every link except this one.
    Flood(link_frame::Body, String),
    /// Send a state update to the parent.
    ToParent(link_frame::Body),
}

/// How many waiting state updates the updater takes at a time.
const TAKE_UPDATES: usize = 64;

/// One open link, as the rest of the broker sees it.
#[derive(Debug)]
struct LinkHandle {
    /// Which session holds the link (a reconnecting child replaces its old session).
    session: u64,
    /// The peer's broker id.
    peer_id: String,
    /// Wakes the outbox pump when something new is written for this peer.
    wake: Arc<Notify>,
    /// Ends the session (a peer too far behind on state updates resyncs on reconnect).
    abort: tokio::task::AbortHandle,
    /// When it opened, Unix ms.
    since_ms: i64,
    /// The last ping's round-trip time, ms (0 until measured).
    rtt_ms: f64,
    /// State updates waiting for the session's updater to send them, in order.
    updates: VecDeque<link_frame::Body>,
    /// Their encoded size, bytes.
    updates_bytes: usize,
    /// Wakes the updater.
    updates_ready: Arc<Notify>,
    /// Whether the link's whole state has gone out. Until then updates wait, so that nothing
    /// about a node reaches the peer before the node's route does.
    state_sent: bool,
    /// Whether the link fell too far behind and is closing: its next session starts from the
    /// whole state, so what would have been queued meanwhile is dropped.
    behind: bool,
}

impl LinkHandle {
    /// Queues a state update for the link; true when this update found the link too far behind
    /// to take it, and the caller must close it (once: a link already closing takes nothing).
    /// A burst of updates (a department publishing its whole catalog) waits here rather than
    /// closing the link: the updater sends them as fast as the peer reads.
    fn post(&mut self, body: link_frame::Body, max_bytes: usize) -> bool {
        if self.behind {
            return false;
        }
        let bytes = body.encoded_len();
        if self.updates_bytes.saturating_add(bytes) > max_bytes {
            // Freed now rather than when the session's task ends.
            self.behind = true;
            self.updates = VecDeque::new();
            self.updates_bytes = 0;
            return true;
        }
        self.updates_bytes += bytes;
        self.updates.push_back(body);
        self.updates_ready.notify_one();
        false
    }
}

/// A link as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    /// The link key: a child's broker id, or `^parent`.
    pub peer: String,
    /// The peer's broker id, once known.
    pub peer_id: String,
    /// Whether the link is open.
    pub up: bool,
    /// When it opened, Unix ms (0 while down).
    pub since_ms: i64,
    /// Frames waiting in the outbox toward the peer.
    pub outbox: u64,
    /// The last ping's round-trip time, ms (0 until measured).
    pub rtt_ms: f64,
}

/// The federation state shared by the services, the exchange engine and the links.
#[derive(Debug, Clone)]
pub struct Fed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    me: String,
    has_parent: bool,
    /// State updates that may wait toward one link, bytes (`[federation]
    /// max_waiting_updates_mib`): a peer further behind is closed, and resyncs on reconnect.
    max_waiting_updates: usize,
    /// Open links by key. A std Mutex: held only to look up or swap a handle, never across
    /// an await.
    links: Mutex<HashMap<String, LinkHandle>>,
    next_session: std::sync::atomic::AtomicU64,
    /// The next outbox sequence number. In memory, because the store's id generator refuses
    /// to run inside a transaction (it may need the writer the transaction holds); seeded
    /// past every number in use, so each link's outbox stays in order across restarts.
    next_seq: std::sync::atomic::AtomicU64,
    /// Peers that had a link since start (a new session of one is a reconnect).
    seen: Mutex<std::collections::HashSet<String>>,
    /// Whether the parent link is up, for the health service.
    parent_up: tokio::sync::watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key of a revocation in the `revoked` tree: its issuer and the grant. Keyed by both, so a
/// broker that claims to revoke a grant it did not issue cannot hide the issuer's revocation.
pub fn revoked_key(issuer: &str, grant_id: &str) -> String {
    format!("{issuer}\u{0}{grant_id}")
}

/// True when `node` falls inside one of the scope prefixes.
pub fn in_scope(scope: &[String], node: &str) -> bool {
    scope.iter().any(|p| node.starts_with(p.as_str()))
}

impl Fed {
    /// Federation for this broker; `has_parent` when `[federation] parent` is set.
    pub fn new(store: Store, cfg: &crate::config::FederationSection) -> Result<Self> {
        let has_parent = cfg.has_parent();
        let me = store.broker_id().to_string();
        let mut seed = store.next_id()?;
        for kv in store.tree(T::Outbox).iter() {
            let (k, _) = kv?;
            if let Some(tail) = k.len().checked_sub(8).and_then(|i| k.get(i..)) {
                if let Ok(b) = <[u8; 8]>::try_from(tail) {
                    seed = seed.max(u64::from_be_bytes(b).saturating_add(1));
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                me,
                has_parent,
                max_waiting_updates: usize::try_from(cfg.max_waiting_updates_mib)
                    .unwrap_or(usize::MAX / (1 << 20))
                    .saturating_mul(1 << 20),
                links: Mutex::new(HashMap::new()),
                next_session: std::sync::atomic::AtomicU64::new(1),
                next_seq: std::sync::atomic::AtomicU64::new(seed.max(1)),
                seen: Mutex::new(std::collections::HashSet::new()),
                parent_up: tokio::sync::watch::channel(false).0,
            }),
        })
    }

    /// This broker's id.
    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// True when this broker links to a parent.
    pub fn has_parent(&self) -> bool {
        self.inner.has_parent
    }

    /// Where something for `node` goes next; `None` when no broker this one knows reaches it.
    pub fn route(&self, node: &str) -> Result<Option<Route>> {
        let store = &self.inner.store;
        if store.tree(T::Nodes).contains_key(node.as_bytes())? {
            return Ok(Some(Route::Local));
        }
        if let Some(r) = store.get::<RouteRecord>(T::Routes, node)? {
            return Ok(Some(Route::Via(r.via)));
        }
        Ok(self
            .inner
            .has_parent
            .then(|| Route::Via(PARENT.to_string())))
    }

    /// Follows whether the parent link is up.
    pub fn parent_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.parent_up.subscribe()
    }

    /// Records a link's measured round-trip time.
    pub fn set_rtt(&self, peer: &str, rtt: std::time::Duration) {
        if let Some(h) = lock(&self.inner.links).get_mut(peer) {
            h.rtt_ms = rtt.as_secs_f64() * 1000.0;
        }
        metrics::gauge!(crate::metrics::LINK_RTT, "peer" => peer_label(peer))
            .set(rtt.as_secs_f64());
    }

    /// True while the link with this key is open.
    pub fn link_up(&self, peer: &str) -> bool {
        lock(&self.inner.links).contains_key(peer)
    }

    /// The peer's broker id, for messages (the parent's is known once its link opened).
    pub fn peer_name(&self, peer: &str) -> String {
        match lock(&self.inner.links).get(peer) {
            Some(h) => h.peer_id.clone(),
            None if peer == PARENT => "the parent broker".to_string(),
            None => peer.to_string(),
        }
    }

    /// Writes a custody frame into the outbox toward `peer`, inside the caller's transaction;
    /// call [`Fed::wake`] once the transaction is durable.
    pub fn put_outbox(&self, tx: &Tx<'_>, peer: &str, body: link_frame::Body) -> Result<()> {
        let seq = self
            .inner
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frame = LinkFrame {
            seq,
            body: Some(body),
        };
        tx.put_raw(T::Outbox, &seq_key(peer, seq), &frame.encode_to_vec())
    }

    /// Tells the pump of `peer`'s link (if it is open) that its outbox has something new.
    pub fn wake(&self, peer: &str) {
        if let Some(h) = lock(&self.inner.links).get(peer) {
            h.wake.notify_one();
        }
    }

    /// Wakes every open link's pump.
    pub fn wake_all(&self) {
        for h in lock(&self.inner.links).values() {
            h.wake.notify_one();
        }
    }

    /// Sends a state update to every open link except `except` (the one it came from). A link
    /// too far behind to take it is closed: it gets the whole state again when it reopens.
    pub fn broadcast(&self, body: &link_frame::Body, except: &str) {
        let mut slow = Vec::new();
        for (k, h) in lock(&self.inner.links).iter_mut() {
            if k == except {
                continue;
            }
            if h.post(body.clone(), self.inner.max_waiting_updates) {
                slow.push((k.clone(), h.abort.clone()));
            }
        }
        for (k, abort) in slow {
            tracing::warn!(peer = %k, "link too far behind on state updates ([federation] max_waiting_updates_mib); closing it to resync");
            abort.abort();
        }
    }

    /// Sends a state update to the parent only (route advertisements go up, never down).
    pub fn to_parent(&self, body: link_frame::Body) {
        if let Some(h) = lock(&self.inner.links).get_mut(PARENT) {
            if h.post(body, self.inner.max_waiting_updates) {
                tracing::warn!(
                    peer = PARENT,
                    "link too far behind on state updates; closing it to resync"
                );
                h.abort.abort();
            }
        }
    }

    /// Tells the parent that a department node registered here became reachable (active) or
    /// not (suspended).
    pub fn advertise_local(&self, n: &govshare_proto::v1::Node) {
        use govshare_proto::v1::{NodeRole, NodeState, RouteAdvertisement, RouteWithdrawal};
        if n.role() != NodeRole::Department || !self.inner.has_parent {
            return;
        }
        let body = if n.state() == NodeState::Active {
            link_frame::Body::Advertise(RouteAdvertisement {
                node_ids: vec![n.id.clone()],
                home_brokers: vec![self.inner.me.clone()],
                distances: vec![0],
                full: false,
            })
        } else {
            link_frame::Body::Withdraw(RouteWithdrawal {
                node_ids: vec![n.id.clone()],
            })
        };
        self.to_parent(body);
    }

    /// Tells the parent that this broker reaches `node` (one of its own), ahead of anything
    /// about the node that follows on the same link: the parent takes catalog entries only for
    /// nodes it knows are below.
    pub fn advertise_own(&self, node: &str) {
        use govshare_proto::v1::RouteAdvertisement;
        if !self.inner.has_parent {
            return;
        }
        self.to_parent(link_frame::Body::Advertise(RouteAdvertisement {
            node_ids: vec![node.to_string()],
            home_brokers: vec![self.inner.me.clone()],
            distances: vec![0],
            full: false,
        }));
    }

    /// Registers an open link; returns its session number and its pump's wake-up.
    fn opened(
        &self,
        peer: &str,
        peer_id: &str,
        abort: tokio::task::AbortHandle,
    ) -> (u64, Arc<Notify>) {
        let session = self
            .inner
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let updates_ready = Arc::new(Notify::new());
        let old = lock(&self.inner.links).insert(
            peer.to_string(),
            LinkHandle {
                session,
                peer_id: peer_id.to_string(),
                wake: wake.clone(),
                abort,
                since_ms: crate::time::now_ms(),
                rtt_ms: 0.0,
                updates: VecDeque::new(),
                updates_bytes: 0,
                updates_ready: updates_ready.clone(),
                state_sent: false,
                behind: false,
            },
        );
        if !lock(&self.inner.seen).insert(peer.to_string()) {
            metrics::counter!(crate::metrics::LINK_RECONNECTS, "peer" => peer_label(peer))
                .increment(1);
        }
        if peer == PARENT {
            self.inner.parent_up.send_replace(true);
        }
        if let Some(old) = old {
            // The peer reconnected before its old stream was seen to end.
            old.abort.abort();
        }
        metrics::gauge!(crate::metrics::LINK_UP, "peer" => peer_label(peer)).set(1.0);
        (session, wake)
    }

    /// The link's whole state has been queued: the updates that waited meanwhile follow it.
    fn state_sent(&self, peer: &str, session: u64) {
        if let Some(h) = lock(&self.inner.links)
            .get_mut(peer)
            .filter(|h| h.session == session)
        {
            h.state_sent = true;
            h.updates_ready.notify_one();
        }
    }

    /// The state updates waiting toward a link once its state has gone out (empty before),
    /// and what wakes the taker when more come; `None` once the session has ended.
    fn take_updates(
        &self,
        peer: &str,
        session: u64,
    ) -> Option<(Vec<link_frame::Body>, Arc<Notify>)> {
        let mut links = lock(&self.inner.links);
        let h = links.get_mut(peer).filter(|h| h.session == session)?;
        let ready = h.updates_ready.clone();
        if !h.state_sent {
            return Some((Vec::new(), ready));
        }
        // A few at a time, so that little is held outside the link's bound while the updater
        // waits for room (what it holds, and the frames in the channel, are not counted).
        let n = h.updates.len().min(TAKE_UPDATES);
        let taken: Vec<_> = h.updates.drain(..n).collect();
        let bytes: usize = taken.iter().map(link_frame::Body::encoded_len).sum();
        h.updates_bytes = h.updates_bytes.saturating_sub(bytes);
        Some((taken, ready))
    }

    /// Forgets a link's session, unless a newer session already replaced it.
    fn closed(&self, peer: &str, session: u64) {
        let mut links = lock(&self.inner.links);
        if links.get(peer).is_some_and(|h| h.session == session) {
            links.remove(peer);
            metrics::gauge!(crate::metrics::LINK_UP, "peer" => peer_label(peer)).set(0.0);
            if peer == PARENT {
                self.inner.parent_up.send_replace(false);
            }
        }
    }

    /// Closes the link to a child broker, if open (it was suspended, or its certificate
    /// replaced: its next attempt is checked again).
    pub fn close_child(&self, child_id: &str) {
        let links = lock(&self.inner.links);
        for (k, h) in links.iter() {
            if k != PARENT && h.peer_id == child_id {
                tracing::info!(peer = %child_id, "closing the link of a suspended or re-pinned child");
                h.abort.abort();
            }
        }
    }

    /// Closes every link (at shutdown).
    pub fn close_all(&self) {
        for (_, h) in lock(&self.inner.links).drain() {
            h.abort.abort();
        }
    }

    /// Frames waiting toward a peer.
    pub fn outbox_depth(&self, peer: &str) -> u64 {
        let mut prefix = peer.as_bytes().to_vec();
        prefix.push(0);
        self.inner.store.tree(T::Outbox).scan_prefix(prefix).count() as u64
    }

    /// Every link this broker has or expects (the parent's, and each child's seen since start
    /// or with frames waiting).
    pub fn status(&self) -> Vec<LinkStatus> {
        let mut out: Vec<LinkStatus> = lock(&self.inner.links)
            .iter()
            .map(|(k, h)| LinkStatus {
                peer: k.clone(),
                peer_id: h.peer_id.clone(),
                up: true,
                since_ms: h.since_ms,
                outbox: 0,
                rtt_ms: h.rtt_ms,
            })
            .collect();
        if self.inner.has_parent && !out.iter().any(|l| l.peer == PARENT) {
            out.push(LinkStatus {
                peer: PARENT.into(),
                peer_id: String::new(),
                up: false,
                since_ms: 0,
                outbox: 0,
                rtt_ms: 0.0,
            });
        }
        for l in &mut out {
            l.outbox = self.outbox_depth(&l.peer);
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

/// The `peer` label: the parent link is labelled `parent`.
pub fn peer_label(peer: &str) -> String {
    if peer == PARENT {
        "parent".to_string()
    } else {
        peer.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use govshare_proto::v1::RouteWithdrawal;

    fn update(id: &str) -> link_frame::Body {
        link_frame::Body::Withdraw(RouteWithdrawal {
            node_ids: vec![id.to_string()],
        })
    }

    #[tokio::test]
    async fn a_link_behind_is_closed_once_and_then_takes_nothing() {
        let task = tokio::spawn(std::future::pending::<()>());
        let mut h = LinkHandle {
            session: 1,
            peer_id: "330000/hub".into(),
            wake: Arc::new(Notify::new()),
            abort: task.abort_handle(),
            since_ms: 0,
            rtt_ms: 0.0,
            updates: VecDeque::new(),
            updates_bytes: 0,
            updates_ready: Arc::new(Notify::new()),
            state_sent: true,
            behind: false,
        };
        let one = update("330000/civil").encoded_len();
        assert!(!h.post(update("330000/civil"), 2 * one));
        assert!(!h.post(update("330000/civil"), 2 * one));
        assert_eq!((h.updates.len(), h.updates_bytes), (2, 2 * one));
        // The third does not fit: the caller is told to close the link, and what waited is freed.
        assert!(h.post(update("330000/civil"), 2 * one));
        assert_eq!((h.updates.len(), h.updates_bytes), (0, 0));
        // Until the session ends, later updates are dropped without asking for another close.
        assert!(!h.post(update("330000/civil"), 2 * one));
        assert!(h.updates.is_empty());
        task.abort();
    }
}
