//! One federation link session, the same on both ends: a hello, the whole state (keys,
//! revocations, catalog, and from a child its routes), then custody frames pumped from the
//! durable outbox under a window and acknowledged once the receiver holds them durably.
//!
//! The child side dials its parent with the identity the parent issued, and reconnects with
//! jittered exponential backoff for as long as the broker runs.

use super::{in_scope, Effect, Fed, Route, RouteRecord, PARENT, PROTOCOL};
use crate::error::{BrokerError, Result};
use crate::exchange::hop::{Hop, HopWrite};
use crate::ids::NodeId;
use crate::service::App;
use crate::store::{self, seq_key, T};
use futures::FutureExt;
use govshare_proto::v1::federation_service_client::FederationServiceClient;
use govshare_proto::v1::{
    link_frame::Body, CatalogUpdate, GrantRevocation, GrantState, LinkAck, LinkFrame, LinkHello,
    LinkPing, LinkPong, Node, NodeRole, NodeState, RouteAdvertisement, RouteWithdrawal,
};
use prost::Message;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Largest link frame, either way.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Custody frames sent and not yet acknowledged, at most.
const WINDOW: usize = 256;
/// Frames queued toward the stream, at most.
const CHANNEL: usize = 1024;
/// Frames handled together (one flush, one ack).
const BATCH: usize = 256;
/// How long a peer has to say hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// The first reconnect wait.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The other end of a link.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The link key: the child's broker id, or [`PARENT`].
    pub key: String,
    /// The peer's broker id.
    pub id: String,
    /// For a child: the node-id prefixes it may claim. `None` for the parent.
    pub scope: Option<Vec<String>>,
    /// Seconds between the peer's pings, from its hello (0: not said).
    pub ping_secs: u32,
}

/// The parent side: a child broker opened a link. Checks its hello and returns the stream of
/// frames toward it; the session runs in its own task.
pub async fn accept_child(
    app: Arc<App>,
    cert: crate::pki::CertIdentity,
    mut inbound: Streaming<LinkFrame>,
) -> Result<ReceiverStream<LinkFrame>> {
    let me = app.store.broker_id().to_string();
    let child = cert.node_id.to_string();
    if child == me {
        return Err(BrokerError::denied(format!(
            "{child} is this broker's own id; a broker cannot link to itself"
        )));
    }
    let hello = match tokio::time::timeout(HELLO_WAIT, inbound.message()).await {
        Ok(Ok(Some(LinkFrame {
            body: Some(Body::Hello(h)),
            ..
        }))) => h,
        Ok(Ok(_)) => return Err(BrokerError::invalid("a link must open with a hello frame")),
        Ok(Err(e)) => return Err(BrokerError::invalid(format!("link stream: {e}"))),
        Err(_) => {
            return Err(BrokerError::DeadlineExceeded(
                "no hello within 10 seconds".into(),
            ))
        }
    };
    if hello.broker_id != child {
        return Err(BrokerError::denied(format!(
            "the hello says {}, the certificate says {child}; a broker links only as itself",
            hello.broker_id
        )));
    }
    if hello.protocol != PROTOCOL {
        return Err(BrokerError::precondition(format!(
            "the child speaks {:?}; this broker speaks {PROTOCOL}",
            hello.protocol
        )));
    }
    let scope: Vec<String> = match app.cfg.federation.scope_override(&child) {
        Some(s) => s.to_vec(),
        None if !cert.scope.is_empty() => cert.scope.clone(),
        None => crate::pki::default_scope(&cert.node_id),
    };
    let (tx, rx) = mpsc::channel(CHANNEL);
    tx.send(LinkFrame {
        seq: 0,
        body: Some(Body::Hello(LinkHello {
            broker_id: me,
            protocol: PROTOCOL.into(),
            scope: scope.clone(),
            ping_secs: ping_secs(&app),
        })),
    })
    .await
    .map_err(|_| BrokerError::internal("link channel closed"))?;
    let peer = Peer {
        key: child.clone(),
        id: child,
        scope: Some(scope),
        ping_secs: hello.ping_secs,
    };
    spawn_session(app, peer, inbound, tx);
    Ok(ReceiverStream::new(rx))
}

/// Runs a session in a task of its own, which the federation state can abort.
fn spawn_session(
    app: Arc<App>,
    peer: Peer,
    inbound: Streaming<LinkFrame>,
    tx: mpsc::Sender<LinkFrame>,
) -> tokio::task::JoinHandle<()> {
    let (abort_tx, abort_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let Ok(abort) = abort_rx.await else { return };
        session(app, peer, inbound, tx, abort).await;
    });
    let _ = abort_tx.send(task.abort_handle());
    task
}

/// The child side: dials the parent and keeps the link up until the broker stops.
pub fn spawn_parent_link(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stopping = app.stopping.clone();
        let max = Duration::from_secs(app.cfg.federation.max_backoff_secs.max(1));
        let mut backoff = FIRST_BACKOFF;
        let url = app.cfg.federation.parent.clone();
        loop {
            if *stopping.borrow() {
                return;
            }
            match dial(&app).await {
                Ok((inbound, tx, hello)) => {
                    let parent_id = hello.broker_id;
                    tracing::info!(parent = %parent_id, %url, "link to the parent is up");
                    backoff = FIRST_BACKOFF;
                    let peer = Peer {
                        key: PARENT.into(),
                        id: parent_id.clone(),
                        scope: None,
                        ping_secs: hello.ping_secs,
                    };
                    let task = spawn_session(app.clone(), peer, inbound, tx);
                    tokio::select! {
                        _ = task => {}
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                    // The session also ends when the broker stops; that is no link going down.
                    if *stopping.borrow() {
                        return;
                    }
                    tracing::warn!(parent = %parent_id, %url, "link to the parent is down; reconnecting");
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot link to the parent");
                }
            }
            // Full jitter: brokers that lost the same parent do not all come back at once.
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(max);
        }
    })
}

/// Opens the link to the parent and exchanges hellos.
async fn dial(app: &App) -> Result<(Streaming<LinkFrame>, mpsc::Sender<LinkFrame>, LinkHello)> {
    let cfg = &app.cfg;
    let dir = cfg.path(&cfg.federation.identity);
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read the link identity {}: {e} ([federation] identity)",
                p.display()
            ))
        })
    };
    let cert = read(crate::pki::NODE_CERT)?;
    let key = read(crate::pki::NODE_KEY)?;
    let ca = read(crate::pki::CA_CERT)?;
    let uri: tonic::transport::Uri = cfg.federation.parent.parse().map_err(|e| {
        BrokerError::invalid(format!(
            "[federation] parent {:?} is not a URL: {e}",
            cfg.federation.parent
        ))
    })?;
    let host = uri.host().unwrap_or("localhost").to_string();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name(host);
    let channel = tonic::transport::Endpoint::from(uri)
        .tls_config(tls)
        .map_err(|e| BrokerError::invalid(format!("link TLS setup: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| BrokerError::Unavailable(format!("connect: {}", error_chain(&e))))?;
    let mut client = FederationServiceClient::new(channel)
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES);
    let (tx, rx) = mpsc::channel(CHANNEL);
    tx.send(LinkFrame {
        seq: 0,
        body: Some(Body::Hello(LinkHello {
            broker_id: app.store.broker_id().to_string(),
            protocol: PROTOCOL.into(),
            scope: Vec::new(),
            ping_secs: ping_secs(app),
        })),
    })
    .await
    .map_err(|_| BrokerError::internal("link channel closed"))?;
    let mut inbound = client
        .link(ReceiverStream::new(rx))
        .await
        .map_err(|s| BrokerError::Unavailable(format!("the parent refused the link: {s}")))?
        .into_inner();
    let hello = match tokio::time::timeout(HELLO_WAIT, inbound.message()).await {
        Ok(Ok(Some(LinkFrame {
            body: Some(Body::Hello(h)),
            ..
        }))) => h,
        Ok(Err(s)) => {
            return Err(BrokerError::Unavailable(format!(
                "the parent refused the link: {s}"
            )))
        }
        _ => return Err(BrokerError::Unavailable("the parent sent no hello".into())),
    };
    tracing::info!(parent = %hello.broker_id, scope = %hello.scope.join(","), "parent accepted the link");
    Ok((inbound, tx, hello))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Forgets the link and stops its pump however the session ends (error, abort, shutdown).
struct Guard {
    fed: Fed,
    key: String,
    session: u64,
    /// The session's own tasks: the outbox pump, the pinger and the updater.
    tasks: [tokio::task::AbortHandle; 3],
}

impl Drop for Guard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.fed.closed(&self.key, self.session);
    }
}

async fn session(
    app: Arc<App>,
    peer: Peer,
    mut inbound: Streaming<LinkFrame>,
    tx: mpsc::Sender<LinkFrame>,
    abort: tokio::task::AbortHandle,
) {
    let fed = app.fed.clone();
    let (session, wake) = fed.opened(&peer.key, &peer.id, abort);
    let acked = Arc::new(AtomicU64::new(0));
    let ack_notify = Arc::new(Notify::new());
    let sent_max = Arc::new(AtomicU64::new(0));
    let pump = tokio::spawn(pump(
        app.clone(),
        peer.key.clone(),
        tx.clone(),
        wake,
        acked.clone(),
        ack_notify.clone(),
        sent_max.clone(),
    ));
    let ping_every = Duration::from_secs(u64::from(ping_secs(&app)));
    let silence = silence_limit(ping_every, peer.ping_secs);
    let ping_sent = Arc::new(std::sync::Mutex::new(None));
    // Pings go out from their own task: a peer that hears them knows this end is alive even
    // while its reader is busy writing a large batch.
    let pinger = tokio::spawn(pinger(tx.clone(), ping_every, ping_sent.clone()));
    let updater = tokio::spawn(updater(fed.clone(), peer.key.clone(), session, tx.clone()));
    let _guard = Guard {
        fed: fed.clone(),
        key: peer.key.clone(),
        session,
        tasks: [
            pump.abort_handle(),
            pinger.abort_handle(),
            updater.abort_handle(),
        ],
    };
    // The state goes out while this end reads: with more state each way than the link's
    // buffers hold, two ends that each send all of theirs before reading would wait for each
    // other forever.
    let state = std::pin::pin!(send_state(&app, &peer, &tx));
    let mut state = Some(state);
    let label = super::peer_label(&peer.key);
    let mut check = tokio::time::interval(ping_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    let mut stopping = app.stopping.clone();
    // An ack waiting for room toward the peer. The reader never waits on its own sends: it
    // must keep reading while the peer's sends wait for this end's window.
    let mut ack_pending: Option<u64> = None;
    // Its place in the queue for room, kept across turns of the loop: a reservation made
    // afresh each turn would go to the back behind the pump and the updater every time a
    // frame comes in first, and the peer, out of window, would wait for the ack.
    let mut ack_room: Option<AckRoom> = None;
    loop {
        if let Some(up_to) = ack_pending {
            if tx.try_send(ack_frame(up_to)).is_ok() {
                ack_pending = None;
                ack_room = None;
            } else if ack_room.is_none() {
                ack_room = Some(Box::pin(tx.clone().reserve_owned()));
            }
        }
        let first = tokio::select! {
            m = inbound.message() => m,
            sent = if_some(state.as_mut()), if state.is_some() => {
                state = None;
                match sent {
                    Ok(n) => {
                        fed.state_sent(&peer.key, session);
                        tracing::debug!(peer = %peer.id, frames = n, "link state sent");
                    }
                    Err(e) => {
                        tracing::warn!(peer = %peer.id, error = %e, "cannot send the link state; closing");
                        return;
                    }
                }
                continue;
            }
            permit = if_some(ack_room.as_mut()), if ack_room.is_some() => {
                ack_room = None;
                let Ok(permit) = permit else { return };
                if let Some(up_to) = ack_pending.take() {
                    permit.send(ack_frame(up_to));
                }
                continue;
            }
            _ = check.tick() => {
                if last_heard.elapsed() <= silence {
                    continue;
                }
                // This end's own work may have kept it from reading: a frame waiting shows
                // the peer is alive.
                match inbound.message().now_or_never() {
                    Some(m) => m,
                    None => {
                        tracing::warn!(peer = %peer.id, silent_secs = silence.as_secs(), "nothing heard on the link for three pings; closing it");
                        return;
                    }
                }
            }
            _ = stopping.wait_for(|s| *s) => return,
        };
        let mut frames = match first {
            Ok(Some(f)) => vec![f],
            Ok(None) => return,
            Err(s) => {
                tracing::info!(peer = %peer.id, status = %s, "link stream ended");
                return;
            }
        };
        last_heard = tokio::time::Instant::now();
        let mut ended = false;
        while frames.len() < BATCH {
            match inbound.message().now_or_never() {
                Some(Ok(Some(f))) => frames.push(f),
                Some(_) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        metrics::counter!(crate::metrics::LINK_FRAMES, "peer" => label.clone(), "direction" => "received")
            .increment(frames.len() as u64);
        let mut custody = Vec::new();
        // Acks are cumulative: only the batch's highest needs the outbox cleared up to it.
        let mut ack_upto = None;
        for f in frames {
            match f.body {
                // An ack covers only what was sent: a peer cannot wipe frames it never got.
                Some(Body::Ack(a)) => {
                    let up_to = a.up_to_seq.min(sent_max.load(Ordering::Acquire));
                    ack_upto = ack_upto.max(Some(up_to));
                }
                Some(Body::Ping(p)) => {
                    let _ = tx.try_send(LinkFrame {
                        seq: 0,
                        body: Some(Body::Pong(LinkPong { nonce: p.nonce })),
                    });
                }
                Some(Body::Pong(p)) => {
                    let sent = super::lock(&ping_sent).take_if(|(nonce, _)| *nonce == p.nonce);
                    if let Some((_, at)) = sent {
                        fed.set_rtt(&peer.key, at.elapsed());
                    }
                }
                Some(Body::Hello(_)) | None => {}
                Some(body) => custody.push((f.seq, body)),
            }
        }
        if let Some(up_to) = ack_upto {
            on_ack(&app, &peer.key, up_to, &acked, &ack_notify).await
        }
        if !custody.is_empty() {
            // A flush that another writer asks for meanwhile waits for this batch's writes
            // (up to `flush_linger_us`): under load, one fsync for the links' frames and the
            // broker's own writes instead of one each.
            let intent = app.store.durable_intent();
            let a = app.clone();
            let p = peer.clone();
            let handled = store::blocking(move || handle_frames(&a, &p, custody)).await;
            let Handled {
                up_to,
                effects,
                wrote,
            } = match handled {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(peer = %peer.id, error = %e, "cannot take custody of link frames; closing the link so the peer resends them");
                    return;
                }
            };
            let flushed = if wrote {
                app.store.durable_for(vec![intent]).await
            } else {
                // Only results for this broker's consumers: the dispatcher makes each end
                // durable before `apply` returns, and only then is the batch acknowledged.
                drop(intent);
                Ok(())
            };
            if let Err(e) = flushed {
                tracing::error!(peer = %peer.id, error = %e, "flush failed; closing the link so the peer resends");
                return;
            }
            if let Err(e) = apply(&app, effects).await {
                tracing::warn!(peer = %peer.id, error = %e, "closing the link unacknowledged, so the peer resends");
                return;
            }
            if up_to > 0 {
                // Acks are cumulative: a newer one replaces one still waiting.
                ack_pending = ack_pending.max(Some(up_to));
            }
        }
        if ended {
            return;
        }
    }
}

/// How long a link may stay silent before it is closed: three pings of the slower end. A peer
/// pinging every 10 s is not dead after three of this end's 1 s pings; a peer that said nothing
/// (0) is judged by this end's interval, and a claim above an hour is capped so that a peer
/// cannot keep a dead link open for days.
fn silence_limit(own: Duration, peer_secs: u32) -> Duration {
    own.max(Duration::from_secs(u64::from(peer_secs.min(3600)))) * 3
}

/// Awaits `f` when there is one, and never otherwise: a `select!` arm kept across turns of a
/// loop, guarded by its presence.
async fn if_some<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A reservation of room toward the peer, waiting for its turn.
type AckRoom = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::result::Result<
                    mpsc::OwnedPermit<LinkFrame>,
                    mpsc::error::SendError<()>,
                >,
            > + Send,
    >,
>;

/// Seconds between this broker's pings on a link (`[federation] ping_secs`, at least 1).
fn ping_secs(app: &App) -> u32 {
    u32::try_from(app.cfg.federation.ping_secs.max(1)).unwrap_or(u32::MAX)
}

/// The last ping sent and when, until its pong comes back.
type PingSent = Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>;

/// Pings the peer every `every`, for as long as the session runs.
async fn pinger(tx: mpsc::Sender<LinkFrame>, every: Duration, sent: PingSent) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let nonce = rand::random();
        let ping = LinkFrame {
            seq: 0,
            body: Some(Body::Ping(LinkPing {
                nonce,
                sent_at: Some(crate::time::now_ts()),
            })),
        };
        *super::lock(&sent) = Some((nonce, tokio::time::Instant::now()));
        // A queue too full for a ping is sending frames, which the peer hears as well.
        let _ = tx.try_send(ping);
    }
}

/// Sends the link's state updates as they come, once its whole state has gone out, waiting
/// for room toward the peer rather than dropping any.
async fn updater(fed: Fed, key: String, session: u64, tx: mpsc::Sender<LinkFrame>) {
    while let Some((updates, ready)) = fed.take_updates(&key, session) {
        if updates.is_empty() {
            ready.notified().await;
            continue;
        }
        for body in updates {
            let frame = LinkFrame {
                seq: 0,
                body: Some(body),
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    }
}

/// An acknowledgement of every custody frame up to `up_to`.
fn ack_frame(up_to: u64) -> LinkFrame {
    LinkFrame {
        seq: 0,
        body: Some(Body::Ack(LinkAck { up_to_seq: up_to })),
    }
}

/// The error when the link's session ended while sending on it.
fn link_closed() -> BrokerError {
    BrokerError::Unavailable("link closed".into())
}

/// The peer holds every frame up to `up_to`: this broker lets go of its copies.
async fn on_ack(app: &Arc<App>, key: &str, up_to: u64, acked: &AtomicU64, notify: &Notify) {
    let before = acked.fetch_max(up_to, Ordering::AcqRel);
    if up_to <= before {
        return;
    }
    let store = app.store.clone();
    let key = key.to_string();
    let s = store.clone();
    let keys = store::blocking(move || {
        s.tree(T::Outbox)
            .range(seq_key(&key, 0)..=seq_key(&key, up_to))
            .keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(BrokerError::from)
    })
    .await;
    // Grouped with other writes: a transaction of its own would cost a frame and a write of
    // its own (see `Store::write_grouped`).
    let removed = match keys {
        Ok(keys) if keys.is_empty() => Ok(()),
        Ok(keys) => {
            store
                .write_grouped(move |tx| {
                    for k in &keys {
                        tx.unmark(T::Outbox, k)?;
                    }
                    Ok(((), vec![]))
                })
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        // Harmless: the frames are sent again on the next session, and the peer drops them.
        tracing::warn!(error = %e, "cannot remove acknowledged frames from the outbox");
    }
    notify.notify_one();
}

/// Sends what waits in the outbox toward `key`, in order, at most [`WINDOW`] unacknowledged.
async fn pump(
    app: Arc<App>,
    key: String,
    tx: mpsc::Sender<LinkFrame>,
    wake: Arc<Notify>,
    acked: Arc<AtomicU64>,
    ack_notify: Arc<Notify>,
    sent_max: Arc<AtomicU64>,
) {
    let label = super::peer_label(&key);
    let mut sent_upto = 0u64;
    let mut unacked: VecDeque<u64> = VecDeque::new();
    loop {
        let a = acked.load(Ordering::Acquire);
        while unacked.front().is_some_and(|s| *s <= a) {
            unacked.pop_front();
        }
        if unacked.len() >= WINDOW {
            tokio::select! {
                _ = ack_notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let room = WINDOW - unacked.len();
        let (store, k) = (app.store.clone(), key.clone());
        let entries = store::blocking(move || {
            let tree = store.tree(T::Outbox);
            let mut out = Vec::new();
            for kv in tree
                .range(seq_key(&k, sent_upto.saturating_add(1))..=seq_key(&k, u64::MAX))
                .take(room)
            {
                let (k, v) = kv?;
                out.push((k.to_vec(), LinkFrame::decode(v.as_ref())?));
            }
            Ok(out)
        })
        .await;
        let entries = match entries {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // Nothing leaves before it is durable here: the writer's flush may not have run yet,
        // and a peer must never hold what this broker could forget in a crash. The mark,
        // taken after the read, covers the entries read; most often their writer's own flush
        // has covered them by now, and no flush of later writes is waited for.
        let mark = app.store.written();
        if let Err(e) = app.store.durable_upto(mark).await {
            tracing::error!(error = %e, "flush failed; holding the outbox");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // The last check of each exchange, all in one blocking call: a decision per frame, up to
        // the first that cannot be made.
        let (a, k) = (app.clone(), key.clone());
        let exchanges: Vec<Option<govshare_proto::v1::ExchangeEnvelope>> = entries
            .iter()
            .map(|(_, f)| match &f.body {
                Some(Body::Exchange(env)) => Some(env.clone()),
                _ => None,
            })
            .collect();
        let decided = store::blocking(move || {
            let mut out = Vec::with_capacity(exchanges.len());
            for env in &exchanges {
                let d = env
                    .as_ref()
                    .map_or(Ok(true), |env| a.engine.before_send(&k, env));
                let failed = d.is_err();
                out.push(d);
                if failed {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| vec![Err(e)]);
        for ((okey, frame), send) in entries.into_iter().zip(decided) {
            if matches!(frame.body, Some(Body::Exchange(_))) {
                match send {
                    Ok(true) => {}
                    Ok(false) => {
                        sent_upto = frame.seq;
                        let store = app.store.clone();
                        let _ = store::blocking(move || {
                            store.tree(T::Outbox).remove(okey)?;
                            Ok(())
                        })
                        .await;
                        continue;
                    }
                    Err(e) => {
                        // Keep the frame: it is tried again, not dropped.
                        tracing::error!(error = %e, "cannot check an exchange before sending; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
            sent_upto = frame.seq;
            sent_max.fetch_max(frame.seq, Ordering::AcqRel);
            let seq = frame.seq;
            tracing::debug!(peer = %label, seq, "sending from the outbox");
            if tx.send(frame).await.is_err() {
                return;
            }
            metrics::counter!(crate::metrics::LINK_FRAMES, "peer" => label.clone(), "direction" => "sent")
                .increment(1);
            unacked.push_back(seq);
        }
    }
}

/// The whole state a peer gets when a link opens: keys, revocations, the catalog it does not
/// have from its own side, and (toward the parent) every node this broker reaches.
async fn send_state(app: &Arc<App>, peer: &Peer, tx: &mpsc::Sender<LinkFrame>) -> Result<usize> {
    let a = app.clone();
    let p = peer.clone();
    let frames = store::blocking(move || state_frames(&a, &p)).await?;
    let n = frames.len();
    for body in frames {
        tx.send(LinkFrame {
            seq: 0,
            body: Some(body),
        })
        .await
        .map_err(|_| link_closed())?;
    }
    Ok(n)
}

fn state_frames(app: &App, peer: &Peer) -> Result<Vec<Body>> {
    let store = &app.store;
    let mut out = Vec::new();
    if peer.key == PARENT {
        // Routes first: the parent takes catalog entries only for nodes it knows are below.
        out.push(Body::Advertise(reachable(app)?));
    }
    // Nothing goes back toward where it came from: a child does not send the parent what the
    // parent told it, and the parent does not send a child what came from its own subtree.
    let back = Some(Route::Via(peer.key.clone()));
    for k in store.keys()?.iter() {
        if app.fed.route(&k.broker_id)? != back {
            out.push(Body::Key(k.clone()));
        }
    }
    for kv in store.tree(T::Revoked).iter() {
        let r = GrantRevocation::decode(kv?.1.as_ref())?;
        if app.fed.route(&r.issuer)? != back {
            out.push(Body::Revocation(r));
        }
    }
    for d in app.catalog.all()? {
        if app.fed.route(&d.provider)? != Some(Route::Via(peer.key.clone())) {
            out.push(Body::Catalog(CatalogUpdate { dataset: Some(d) }));
        }
    }
    Ok(out)
}

/// Every node this broker reaches: its own department nodes and those its children advertised.
fn reachable(app: &App) -> Result<RouteAdvertisement> {
    let store = &app.store;
    let me = store.broker_id().to_string();
    // The broker itself too, so that brokers above can tell which keys and revocations came
    // from below.
    let mut adv = RouteAdvertisement {
        full: true,
        node_ids: vec![me.clone()],
        home_brokers: vec![me.clone()],
        distances: vec![0],
    };
    for kv in store.tree(T::Nodes).iter() {
        let n = Node::decode(kv?.1.as_ref())?;
        if n.role() == NodeRole::Department && n.state() == NodeState::Active {
            adv.node_ids.push(n.id);
            adv.home_brokers.push(me.clone());
            adv.distances.push(0);
        }
    }
    for kv in store.tree(T::Routes).iter() {
        let (k, v) = kv?;
        let r = RouteRecord::decode(v.as_ref())?;
        adv.node_ids.push(String::from_utf8_lossy(&k).into_owned());
        adv.home_brokers.push(r.home);
        adv.distances.push(r.distance.saturating_add(1));
    }
    Ok(adv)
}

/// What a batch of link frames came to.
struct Handled {
    /// The highest sequence number now held.
    up_to: u64,
    /// What to do once the writes are durable.
    effects: Vec<Effect>,
    /// Whether any frame wrote here (or may have): if so, a flush before `effects`.
    wrote: bool,
}

/// Handles a batch of frames (blocking). A frame refused by policy is audited and
/// acknowledged; only storage trouble fails the batch (and the peer sends it again).
fn handle_frames(app: &App, peer: &Peer, frames: Vec<(u64, Body)>) -> Result<Handled> {
    let mut up_to = 0;
    let mut wrote = false;
    let mut effects = Vec::new();
    // Exchanges and results write in one grouped transaction for the run of them; any other
    // frame waits until that run is written, so that writes land in the frames' order.
    let mut pending = Vec::new();
    for (seq, body) in frames {
        tracing::debug!(peer = %peer.id, seq, frame = frame_kind(&body), "link frame");
        if !matches!(body, Body::Exchange(_) | Body::Result(_)) {
            settle(app, peer, &mut pending, &mut effects)?;
        }
        match handle(app, peer, body) {
            Ok(Hop::Pass(mut e)) => effects.append(&mut e),
            Ok(Hop::Done(mut e)) => {
                wrote = true;
                effects.append(&mut e)
            }
            Ok(Hop::Write(w)) => {
                wrote = true;
                pending.push(w)
            }
            Err(e) => {
                // It may have written before it failed.
                wrote = true;
                refused(peer, e)?
            }
        }
        up_to = up_to.max(seq);
    }
    settle(app, peer, &mut pending, &mut effects)?;
    Ok(Handled {
        up_to,
        effects,
        wrote,
    })
}

/// Writes the pending hop writes in one grouped transaction, then carries on with each.
fn settle(
    app: &App,
    peer: &Peer,
    pending: &mut Vec<HopWrite>,
    effects: &mut Vec<Effect>,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let (writes, thens): (Vec<_>, Vec<_>) = pending.drain(..).map(|w| (w.write, w.then)).unzip();
    let written = app.store.write_grouped_all_blocking(writes);
    for (w, then) in written.into_iter().zip(thens) {
        match w.and_then(|w| then(&app.engine, w)) {
            Ok(mut e) => effects.append(&mut e),
            Err(e) => refused(peer, e)?,
        }
    }
    Ok(())
}

/// A frame that failed: storage trouble fails the batch (the peer sends it again); a refusal
/// by policy is logged, and the frame is acknowledged.
fn refused(peer: &Peer, e: BrokerError) -> Result<()> {
    match e {
        // On a link, a spent limit comes only from storage (writes too large for one frame):
        // a limit of policy, such as a grant's quota, refuses the exchange with a result
        // that goes back instead. Acknowledging it would drop what the peer holds for us.
        BrokerError::Internal(_)
        | BrokerError::Unavailable(_)
        | BrokerError::ResourceExhausted(_) => Err(e),
        e => {
            tracing::warn!(peer = %peer.id, error = %e, "link frame refused");
            Ok(())
        }
    }
}

/// A frame's kind, for logs.
fn frame_kind(b: &Body) -> &'static str {
    match b {
        Body::Hello(_) => "hello",
        Body::Ack(_) => "ack",
        Body::Advertise(_) => "advertise",
        Body::Withdraw(_) => "withdraw",
        Body::Catalog(_) => "catalog",
        Body::Demand(_) => "demand",
        Body::Decision(_) => "decision",
        Body::Revocation(_) => "revocation",
        Body::Exchange(_) => "exchange",
        Body::Result(_) => "result",
        Body::Key(_) => "key",
        Body::Ping(_) => "ping",
        Body::Pong(_) => "pong",
    }
}

fn refuse(app: &App, peer: &Peer, decision: &str, reason: String) -> Result<Vec<Effect>> {
    tracing::warn!(peer = %peer.id, %decision, %reason, "refused from a link");
    let mut e = crate::audit::entry(decision, &peer.id);
    e.reason = reason;
    app.store.write(|_| Ok(((), vec![e.clone()])))?;
    Ok(vec![])
}

fn handle(app: &App, peer: &Peer, body: Body) -> Result<Hop> {
    let scope = peer.scope.as_deref();
    match body {
        Body::Exchange(env) => app.engine.receive_exchange(&peer.key, scope, env),
        Body::Result(r) => app.engine.receive_result(&peer.key, scope, r),
        body => handle_state(app, peer, body).map(Hop::Done),
    }
}

/// Handles a frame other than an exchange or a result (blocking).
fn handle_state(app: &App, peer: &Peer, body: Body) -> Result<Vec<Effect>> {
    let scope = peer.scope.as_deref();
    let outside = |node: &str| scope.is_some_and(|s| !in_scope(s, node));
    match body {
        Body::Advertise(adv) => advertise(app, peer, adv),
        Body::Withdraw(w) => withdraw(app, peer, w.node_ids),
        Body::Catalog(c) => {
            let Some(d) = c.dataset else {
                return Ok(vec![]);
            };
            if outside(&d.provider) {
                return refuse(
                    app,
                    peer,
                    "catalog_refused",
                    format!(
                        "hop_scope: dataset {} of {} is outside the scope of {} ({})",
                        d.id,
                        d.provider,
                        peer.id,
                        scope.unwrap_or_default().join(", ")
                    ),
                );
            }
            if let Err(e) = app.catalog.check_remote_size(&d) {
                return refuse(app, peer, "catalog_refused", e.to_string());
            }
            // An entry is taken only from the side its provider is reached through.
            if app.fed.route(&d.provider)? != Some(Route::Via(peer.key.clone())) {
                return refuse(
                    app,
                    peer,
                    "catalog_refused",
                    format!(
                        "dataset {} came from {}, but its provider {} is not reached through it",
                        d.id, peer.id, d.provider
                    ),
                );
            }
            Ok(if app.catalog.apply_remote(&d, &peer.id)? {
                vec![Effect::Flood(
                    Body::Catalog(CatalogUpdate { dataset: Some(d) }),
                    peer.key.clone(),
                )]
            } else {
                vec![]
            })
        }
        Body::Key(k) => {
            if outside(&k.broker_id) {
                return refuse(
                    app,
                    peer,
                    "key_refused",
                    format!(
                        "hop_scope: a key of broker {} came from {}, whose scope is {}",
                        k.broker_id,
                        peer.id,
                        scope.unwrap_or_default().join(", ")
                    ),
                );
            }
            let known = app.store.keys()?.iter().any(|x| x == &k);
            if known || k.public_key.len() != 32 {
                return Ok(vec![]);
            }
            app.store.add_key(&k)?;
            let mut e = crate::audit::entry("key_learned", &peer.id);
            e.reason = format!("key {} of broker {}", k.key_id, k.broker_id);
            app.store.write(|_| Ok(((), vec![e.clone()])))?;
            Ok(vec![Effect::Flood(Body::Key(k), peer.key.clone())])
        }
        Body::Revocation(r) => revocation(app, peer, r),
        Body::Demand(d) => app.sharing.receive_demand(&app.fed, peer, d),
        Body::Decision(d) => app.sharing.receive_decision(&app.fed, peer, d),
        Body::Hello(_)
        | Body::Ack(_)
        | Body::Ping(_)
        | Body::Pong(_)
        | Body::Exchange(_)
        | Body::Result(_) => Ok(vec![]),
    }
}

fn advertise(app: &App, peer: &Peer, adv: RouteAdvertisement) -> Result<Vec<Effect>> {
    let Some(scope) = peer.scope.as_deref() else {
        return Ok(vec![]); // a parent does not advertise: what is not below goes up anyway
    };
    let mut accepted: Vec<(&String, RouteRecord)> = Vec::new();
    let mut refused = Vec::new();
    for (i, node) in adv.node_ids.iter().enumerate() {
        if NodeId::parse(node, "advertised node").is_err() {
            refused.push(node.clone());
            continue;
        }
        if !in_scope(scope, node) {
            refused.push(node.clone());
            continue;
        }
        accepted.push((
            node,
            RouteRecord {
                via: peer.key.clone(),
                home: adv.home_brokers.get(i).cloned().unwrap_or_default(),
                distance: adv.distances.get(i).copied().unwrap_or(0),
            },
        ));
    }
    let names: BTreeSet<&String> = accepted.iter().map(|(node, _)| *node).collect();
    // A province re-advertises a provider with each catalog update it sends (so the entry is
    // never taken before its route); a route already held as advertised needs no write here
    // and no word to the parent. A full advertisement (a link opening) passes every route up
    // all the same: one written here whose word to the parent was lost (the link ended mid-
    // batch) is repaired by it.
    let mut changed: Vec<&(&String, RouteRecord)> = Vec::new();
    for a in &accepted {
        if adv.full || app.store.get::<RouteRecord>(T::Routes, a.0)?.as_ref() != Some(&a.1) {
            changed.push(a);
        }
    }
    let mut gone = Vec::new();
    if adv.full {
        for kv in app.store.tree(T::Routes).iter() {
            let (k, v) = kv?;
            let r = RouteRecord::decode(v.as_ref())?;
            let node = String::from_utf8_lossy(&k).into_owned();
            if r.via == peer.key && !names.contains(&node) {
                gone.push(node);
            }
        }
    }
    let mut entries = Vec::new();
    if !refused.is_empty() {
        let mut e = crate::audit::entry("route_refused", &peer.id);
        e.reason = format!(
            "hop_scope: {} advertised {} node(s) outside its scope ({}): {}",
            peer.id,
            refused.len(),
            scope.join(", "),
            refused
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        entries.push(e);
        tracing::warn!(peer = %peer.id, refused = refused.len(), "advertisement outside the child's scope refused");
    }
    if changed.is_empty() && gone.is_empty() && entries.is_empty() {
        return Ok(vec![]);
    }
    app.store.write(|tx| {
        for (node, r) in &changed {
            tx.put(T::Routes, node, r)?;
        }
        for node in &gone {
            tx.unmark(T::Routes, node.as_bytes())?;
        }
        Ok(((), entries.clone()))
    })?;
    let mut effects = Vec::new();
    if app.fed.has_parent() {
        if !changed.is_empty() {
            let mut up = RouteAdvertisement::default();
            for (node, r) in changed {
                up.node_ids.push((*node).clone());
                up.home_brokers.push(r.home.clone());
                up.distances.push(r.distance.saturating_add(1));
            }
            effects.push(Effect::ToParent(Body::Advertise(up)));
        }
        if !gone.is_empty() {
            effects.push(Effect::ToParent(Body::Withdraw(RouteWithdrawal {
                node_ids: gone,
            })));
        }
    }
    Ok(effects)
}

fn withdraw(app: &App, peer: &Peer, nodes: Vec<String>) -> Result<Vec<Effect>> {
    if peer.scope.is_none() {
        return Ok(vec![]);
    }
    let mut gone = Vec::new();
    app.store.write(|tx| {
        for n in &nodes {
            if let Some(r) = tx.get::<RouteRecord>(T::Routes, n)? {
                if r.via == peer.key {
                    tx.unmark(T::Routes, n.as_bytes())?;
                }
            }
        }
        Ok(((), vec![]))
    })?;
    for n in nodes {
        if app.store.get::<RouteRecord>(T::Routes, &n)?.is_none() {
            gone.push(n);
        }
    }
    Ok(if app.fed.has_parent() && !gone.is_empty() {
        vec![Effect::ToParent(Body::Withdraw(RouteWithdrawal {
            node_ids: gone,
        }))]
    } else {
        vec![]
    })
}

fn revocation(app: &App, peer: &Peer, r: GrantRevocation) -> Result<Vec<Effect>> {
    let key = super::revoked_key(&r.issuer, &r.grant_id);
    if app.store.tree(T::Revoked).contains_key(key.as_bytes())? {
        return Ok(vec![]);
    }
    if let Some(scope) = &peer.scope {
        // A child speaks only for grants issued in its own subtree.
        if !in_scope(scope, &r.issuer) {
            return refuse(
                app,
                peer,
                "revocation_refused",
                format!(
                    "hop_scope: a revocation by {} came from {}, whose scope is {}",
                    r.issuer,
                    peer.id,
                    scope.join(", ")
                ),
            );
        }
    }
    if !crate::keys::verify_revocation(&r, &app.store.keys()?) {
        return refuse(
            app,
            peer,
            "revocation_refused",
            format!(
                "the revocation of grant {} does not carry a valid signature of its issuer {}",
                r.grant_id, r.issuer
            ),
        );
    }
    app.store.write(|tx| {
        tx.put(T::Revoked, &key, &r)?;
        if let Some(mut g) = tx.get::<govshare_proto::v1::Grant>(T::Grants, &r.grant_id)? {
            if g.state() != GrantState::Revoked && g.issuer == r.issuer {
                g.state = GrantState::Revoked as i32;
                g.revoked_at = r.revoked_at;
                g.revoked_by = r.issuer.clone();
                g.revoke_reason = r.reason.clone();
                tx.put(T::Grants, &g.id, &g)?;
            }
        }
        let mut e = crate::audit::entry("grant_revoked", &r.issuer);
        e.grant_id = r.grant_id.clone();
        e.reason = format!("revocation learned from {}: {}", peer.id, r.reason);
        Ok(((), vec![e]))
    })?;
    Ok(vec![
        Effect::Revoked(r.grant_id.clone()),
        Effect::Flood(Body::Revocation(r), peer.key.clone()),
    ])
}

/// Carries out what handled frames led to, once their writes are durable. An error means
/// something could not be kept: the link must not acknowledge, so the peer sends it again.
pub async fn apply(app: &App, effects: Vec<Effect>) -> Result<()> {
    // Every result goes to the dispatcher before any is waited for, so that one flush keeps
    // the ends of the whole batch (waiting for each in turn cost a flush per result).
    let mut kept = Vec::new();
    for e in effects {
        match e {
            Effect::Enqueue {
                id,
                dest,
                dataset,
                deadline_ms,
            } => {
                app.engine
                    .enqueue_forwarded(&id, &dest, &dataset, deadline_ms)
                    .await
            }
            Effect::Result(r) => kept.push(app.engine.remote_result(r).await?),
            Effect::Revoked(g) => app.engine.grant_revoked(g).await,
            Effect::Wake(p) => app.fed.wake(&p),
            Effect::Flood(b, except) => app.fed.broadcast(&b, &except),
            Effect::ToParent(b) => app.fed.to_parent(b),
        }
    }
    for k in kept {
        k.wait().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_judged_by_the_slower_end() {
        let s = Duration::from_secs;
        assert_eq!(silence_limit(s(1), 10), s(30));
        assert_eq!(silence_limit(s(10), 1), s(30));
        assert_eq!(silence_limit(s(2), 0), s(6));
        assert_eq!(silence_limit(s(1), u32::MAX), s(3 * 3600));
    }

    #[test]
    fn only_a_refusal_by_policy_is_acknowledged() {
        let peer = Peer {
            key: "330000/hub".into(),
            id: "330000/hub".into(),
            scope: None,
            ping_secs: 10,
        };
        for e in [
            BrokerError::internal("x"),
            BrokerError::Unavailable("disk".into()),
            BrokerError::ResourceExhausted("too large for one frame".into()),
        ] {
            assert!(
                refused(&peer, e.clone()).is_err(),
                "{e:?} is kept for a resend"
            );
        }
        for e in [
            BrokerError::denied("hop_scope"),
            BrokerError::invalid("malformed"),
            BrokerError::not_found("no route"),
            BrokerError::precondition("withdrawn"),
        ] {
            assert!(refused(&peer, e.clone()).is_ok(), "{e:?} is acknowledged");
        }
    }
}
