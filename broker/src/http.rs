//! The operators' HTTP port: `/metrics` for Prometheus, `/status` as JSON, and `/`, a small
//! read-only console page (embedded; no build step, no CDN) that renders `/status`.

use crate::service::App;
use crate::time::now_ms;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

/// The console page.
const CONSOLE: &str = include_str!("../assets/console.html");

/// What `/status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// This broker's node id.
    pub broker_id: String,
    /// The software version.
    pub version: String,
    /// When it started, Unix ms.
    pub started_ms: i64,
    /// Seconds since start.
    pub uptime_secs: i64,
    /// Federation links: the parent's (if any) and each child's, up or down, with the frames
    /// waiting toward each.
    pub links: Vec<crate::federation::LinkStatus>,
    /// Connected provider streams.
    pub providers: u64,
    /// Queues per destination.
    pub queues: Vec<QueueStatus>,
    /// Exchanges in the dead-letter queue.
    pub dead_letters: u64,
    /// Exchanges by outcome since start.
    pub exchanges: std::collections::BTreeMap<String, u64>,
    /// End-to-end latency percentiles, ms.
    pub latency_ms: Latency,
    /// Pending and overdue demands, active grants.
    pub demands_pending: u64,
    /// Pending demands past their deadline.
    pub demands_overdue: u64,
    /// Grants in force.
    pub grants_active: u64,
    /// Storage flushes and the durable writes they covered.
    pub flushes: u64,
    /// Durable writes since start.
    pub durable_writes: u64,
    /// The latest refusals, newest first.
    pub recent_denials: Vec<crate::exchange::RecentDenial>,
    /// When this status was taken, Unix ms.
    pub now_ms: i64,
}

/// One destination's queue.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    /// The destination.
    pub destination: String,
    /// Waiting.
    pub depth: u64,
    /// Bytes waiting.
    pub bytes: u64,
    /// Handed to providers, not answered.
    pub in_flight: u64,
}

/// End-to-end latency percentiles.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Exchanges measured.
    pub count: u64,
}

/// Builds the status, and refreshes the gauges that are read rather than counted (blocking).
pub fn status(app: &App) -> crate::error::Result<Status> {
    use std::sync::atomic::Ordering;
    let in_flight = app.engine.in_flight()?;
    let mut queues = Vec::new();
    for (destination, open, bytes) in app.engine.depths() {
        let held = in_flight.get(&destination).copied().unwrap_or(0);
        let depth = open.saturating_sub(held);
        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "destination" => destination.clone())
            .set(depth as f64);
        metrics::gauge!(crate::metrics::QUEUE_BYTES, "destination" => destination.clone())
            .set(bytes as f64);
        queues.push(QueueStatus {
            destination,
            depth,
            bytes,
            in_flight: held,
        });
    }
    let held: u64 = in_flight.values().sum();
    metrics::gauge!(crate::metrics::IN_FLIGHT).set(held as f64);
    let dead = app.engine.dead_letter_count() as u64;
    metrics::gauge!(crate::metrics::DEAD_LETTERS).set(dead as f64);
    let census = app.sharing.census()?;
    let (pending, overdue, active) = (census.pending, census.overdue, census.active);
    for (state, n) in &census.demands {
        metrics::gauge!(crate::metrics::DEMANDS, "state" => *state).set(*n as f64);
    }
    metrics::gauge!(crate::metrics::DEMANDS_OVERDUE).set(overdue as f64);
    metrics::gauge!(crate::metrics::GRANTS_ACTIVE).set(active as f64);
    let uptime = (now_ms() - app.started_ms) / 1000;
    metrics::gauge!(crate::metrics::UPTIME).set(uptime as f64);
    let (cpu, rss, fds) = crate::metrics::process_stats();
    metrics::gauge!(crate::metrics::CPU).set(cpu);
    metrics::gauge!(crate::metrics::RSS).set(rss as f64);
    metrics::gauge!(crate::metrics::OPEN_FDS).set(fds as f64);
    // Read from the files at each scrape: a certificate replaced on disk shows at once.
    let mut certs = vec![
        ("server", &app.cfg.tls.cert),
        ("client_ca", &app.cfg.tls.client_ca),
    ];
    let link_dir = app.cfg.federation.identity.clone();
    let (link_cert, link_ca) = (
        link_dir.join(crate::pki::NODE_CERT),
        link_dir.join(crate::pki::CA_CERT),
    );
    if !app.cfg.federation.parent.is_empty() {
        certs.push(("link", &link_cert));
        certs.push(("link_ca", &link_ca));
    }
    for (name, path) in certs {
        match std::fs::read(app.cfg.path(path))
            .map_err(|e| crate::error::BrokerError::invalid(e.to_string()))
            .and_then(|pem| crate::pki::seconds_to_expiry(&pem))
        {
            Ok(secs) => {
                metrics::gauge!(crate::metrics::CERT_EXPIRY, "certificate" => name).set(secs as f64)
            }
            Err(e) => {
                tracing::warn!(certificate = name, error = %e, "cannot read a certificate's expiry")
            }
        }
    }
    let links = app.fed.status();
    for l in &links {
        let peer = crate::federation::peer_label(&l.peer);
        metrics::gauge!(crate::metrics::LINK_OUTBOX, "peer" => peer.clone()).set(l.outbox as f64);
        metrics::gauge!(crate::metrics::LINK_UP, "peer" => peer).set(if l.up { 1.0 } else { 0.0 });
    }
    let (p50, p90, p99, count) = app.engine.latency_ms();
    let stats = app.store.flush_stats();
    Ok(Status {
        broker_id: app.cfg.broker.id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: app.started_ms,
        uptime_secs: uptime,
        links,
        providers: app.engine.providers(),
        queues,
        dead_letters: dead,
        exchanges: app.engine.outcome_counts(),
        latency_ms: Latency {
            p50,
            p90,
            p99,
            count,
        },
        demands_pending: pending,
        demands_overdue: overdue,
        grants_active: active,
        flushes: stats.flushes.load(Ordering::Relaxed),
        durable_writes: stats.requests.load(Ordering::Relaxed),
        recent_denials: app.engine.recent_denials(),
        now_ms: now_ms(),
    })
}

async fn status_json(State(app): State<Arc<App>>) -> Response {
    match tokio::task::spawn_blocking(move || status(&app)).await {
        Ok(Ok(s)) => Json(s).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    // Refresh the read-at-scrape gauges first, so one scrape is consistent.
    let _ = tokio::task::spawn_blocking(move || status(&app)).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    )
        .into_response()
}

async fn console() -> Html<&'static str> {
    Html(CONSOLE)
}

/// The router of the operators' port.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics_text))
        .with_state(app)
}
