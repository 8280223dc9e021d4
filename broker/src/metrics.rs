//! Metrics: names, help texts and the Prometheus recorder, through the `metrics` facade.
//!
//! Names follow Prometheus conventions (`govshare_` prefix, unit suffix); every label has a
//! bounded set of values (outcomes, rules, stages, destinations = registered provider nodes).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Exchanges by outcome (`accepted`, `answered`, `failed`, `denied`, `expired`, `dead_lettered`).
pub const EXCHANGES: &str = "govshare_exchanges_total";
/// Exchanges by dataset and outcome, when `[metrics] per_dataset` is on.
pub const EXCHANGES_BY_DATASET: &str = "govshare_exchanges_by_dataset_total";
/// Time per stage (`accept`, `queue_wait`, `provider`, `end_to_end`, `hop`).
pub const STAGE_SECONDS: &str = "govshare_exchange_stage_seconds";
/// Exchanges waiting per destination.
pub const QUEUE_DEPTH: &str = "govshare_queue_depth";
/// Bytes waiting per destination.
pub const QUEUE_BYTES: &str = "govshare_queue_bytes";
/// Exchanges handed to providers and not yet answered.
pub const IN_FLIGHT: &str = "govshare_in_flight";
/// Deliveries taken back and tried again (disconnect, ack wait).
pub const REDELIVERIES: &str = "govshare_redeliveries_total";
/// Exchanges in the dead-letter queue.
pub const DEAD_LETTERS: &str = "govshare_dead_letters";
/// Refusals by rule.
pub const DENIALS: &str = "govshare_denials_total";
/// Demands by state.
pub const DEMANDS: &str = "govshare_demands";
/// Pending demands past their response deadline.
pub const DEMANDS_OVERDUE: &str = "govshare_demands_overdue";
/// Grants in force.
pub const GRANTS_ACTIVE: &str = "govshare_grants_active";
/// Connected provider serving streams.
pub const PROVIDER_STREAMS: &str = "govshare_provider_streams";
/// Storage flushes (fsyncs).
pub const FLUSHES: &str = "govshare_storage_flushes_total";
/// Durability requests answered by flushes.
pub const DURABLE_WRITES: &str = "govshare_storage_durable_writes_total";
/// Requests answered by one flush.
pub const FLUSH_BATCH: &str = "govshare_storage_flush_batch_size";
/// Writes committed in one transaction by the committer (see `Store::write_grouped`).
pub const WRITE_GROUP: &str = "govshare_storage_write_group_size";
/// Time of one flush.
pub const FLUSH_SECONDS: &str = "govshare_storage_flush_seconds";
/// Audit entries appended.
pub const AUDIT_APPENDS: &str = "govshare_audit_appends_total";
/// Seconds since the broker started.
pub const UPTIME: &str = "govshare_uptime_seconds";
/// CPU time of the process.
pub const CPU: &str = "process_cpu_seconds_total";
/// Resident memory of the process.
pub const RSS: &str = "process_resident_memory_bytes";
/// Open file descriptors of the process.
pub const OPEN_FDS: &str = "process_open_fds";

/// 1 while the federation link to a peer broker is up, 0 while it is down (label `peer`).
pub const LINK_UP: &str = "govshare_link_up";
/// Frames over federation links, by peer and direction (`sent`, `received`).
pub const LINK_FRAMES: &str = "govshare_link_frames_total";
/// Frames waiting in the durable outbox toward a peer (not yet acknowledged by it).
pub const LINK_OUTBOX: &str = "govshare_link_outbox";

/// Link sessions opened again after the first, per peer.
pub const LINK_RECONNECTS: &str = "govshare_link_reconnects_total";
/// The last measured round-trip time of a link's ping, per peer.
pub const LINK_RTT: &str = "govshare_link_rtt_seconds";

/// Seconds until each certificate the broker holds expires (label `certificate`: `server`,
/// `client_ca`, and with a parent `link` and `link_ca`); negative once expired.
pub const CERT_EXPIRY: &str = "govshare_certificate_expiry_seconds";

/// Calls refused because their node was over its rate (`[limits]`).
pub const RATE_LIMITED: &str = "govshare_rate_limited_total";

/// Reloads of the broker's TLS identity and trust bundle, by result (`ok`, `error`).
pub const TLS_RELOADS: &str = "govshare_tls_reloads_total";

/// Connections closed before serving, by reason (`handshake_failed`, `handshake_timeout`,
/// `node_connection_cap`).
pub const CONNECTIONS_REFUSED: &str = "govshare_connections_refused_total";

/// Connections ended for being idle (`[limits] idle_timeout_secs`), by how (`goaway`: told to
/// go away; `cut`: closed after ignoring that).
pub const CONNECTIONS_IDLE_CLOSED: &str = "govshare_connections_idle_closed_total";

/// Every metric name the broker exports (for tests that check dashboards and alerts).
pub const ALL: &[&str] = &[
    EXCHANGES,
    EXCHANGES_BY_DATASET,
    STAGE_SECONDS,
    QUEUE_DEPTH,
    QUEUE_BYTES,
    IN_FLIGHT,
    REDELIVERIES,
    DEAD_LETTERS,
    DENIALS,
    DEMANDS,
    DEMANDS_OVERDUE,
    GRANTS_ACTIVE,
    PROVIDER_STREAMS,
    FLUSHES,
    DURABLE_WRITES,
    FLUSH_BATCH,
    WRITE_GROUP,
    FLUSH_SECONDS,
    AUDIT_APPENDS,
    UPTIME,
    CPU,
    RSS,
    OPEN_FDS,
    LINK_UP,
    LINK_FRAMES,
    LINK_OUTBOX,
    LINK_RECONNECTS,
    LINK_RTT,
    CERT_EXPIRY,
    RATE_LIMITED,
    TLS_RELOADS,
    CONNECTIONS_REFUSED,
    CONNECTIONS_IDLE_CLOSED,
];

/// The process-wide Prometheus recorder (one per process: brokers in one test process share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ])
            .unwrap_or_else(|_| PrometheusBuilder::new());
        // Batch sizes are counts, not seconds: their own buckets.
        let recorder = recorder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(FLUSH_BATCH.to_string()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(WRITE_GROUP.to_string()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding program's): keep ours local.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        zero();
        handle
    })
}

/// Every grant rule that can refuse an exchange (the `rule` label of denials).
pub const RULES: &[&str] = &[
    "grant_missing",
    "grant_consumer",
    "grant_dataset",
    "grant_revoked",
    "grant_not_yet_valid",
    "grant_expired",
    "filter_outside_grant",
    "field_outside_grant",
    "quota_exhausted",
    "dataset_withdrawn",
    "masking_unavailable",
    "grant_forged",
    "hop_scope",
    "hop_limit",
    "no_route",
];

/// Every exchange outcome (the `outcome` label).
pub const OUTCOMES: &[&str] = &[
    "accepted",
    "answered",
    "failed",
    "denied",
    "expired",
    "dead_lettered",
];

/// Creates every counter series at zero, so that `rate()` and alerts see them from the start.
fn zero() {
    for o in OUTCOMES {
        metrics::counter!(EXCHANGES, "outcome" => *o).increment(0);
    }
    for r in RULES {
        metrics::counter!(DENIALS, "rule" => *r).increment(0);
    }
    for r in ["ok", "error"] {
        metrics::counter!(TLS_RELOADS, "result" => r).increment(0);
    }
    for r in [
        "handshake_failed",
        "handshake_timeout",
        "node_connection_cap",
    ] {
        metrics::counter!(CONNECTIONS_REFUSED, "reason" => r).increment(0);
    }
    for h in ["goaway", "cut"] {
        metrics::counter!(CONNECTIONS_IDLE_CLOSED, "how" => h).increment(0);
    }
    for c in [
        REDELIVERIES,
        FLUSHES,
        DURABLE_WRITES,
        AUDIT_APPENDS,
        RATE_LIMITED,
    ] {
        metrics::counter!(c).increment(0);
    }
}

fn describe() {
    describe_gauge!(
        LINK_UP,
        "1 while the federation link to a peer broker is up, 0 while it is down."
    );
    describe_counter!(
        LINK_FRAMES,
        "Frames over federation links, by peer and direction (sent, received)."
    );
    describe_counter!(
        TLS_RELOADS,
        "Reloads of the broker's TLS identity and trust bundle (SIGHUP or changed files), by result."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed before serving: handshake_failed, handshake_timeout, node_connection_cap."
    );
    describe_counter!(
        CONNECTIONS_IDLE_CLOSED,
        "Connections ended for being idle: goaway (told to go away), cut (closed after ignoring that)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Calls refused because their node was over its rate ([limits] requests_per_second)."
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "Seconds until each certificate the broker holds expires (server, client_ca, link, link_ca); negative once expired."
    );
    describe_counter!(
        LINK_RECONNECTS,
        "Federation link sessions opened again after the first, per peer."
    );
    describe_gauge!(
        LINK_RTT,
        Unit::Seconds,
        "The last measured round-trip time of a federation link's ping, per peer."
    );
    describe_gauge!(
        LINK_OUTBOX,
        "Frames waiting in the durable outbox toward a peer broker."
    );
    describe_counter!(
        EXCHANGES,
        "Exchanges by outcome: accepted, answered, failed, denied, expired, dead_lettered."
    );
    describe_counter!(
        EXCHANGES_BY_DATASET,
        "Exchanges by dataset and outcome ([metrics] per_dataset = true)."
    );
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "Time spent per stage: accept, queue_wait, provider, end_to_end, and hop (from one broker's receipt to the next one's)."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Exchanges queued per destination (not yet handed to a provider)."
    );
    describe_gauge!(QUEUE_BYTES, Unit::Bytes, "Bytes queued per destination.");
    describe_gauge!(
        IN_FLIGHT,
        "Exchanges handed to providers and not yet answered."
    );
    describe_counter!(
        REDELIVERIES,
        "Deliveries taken back and tried again (instance gone, ack wait passed)."
    );
    describe_gauge!(DEAD_LETTERS, "Exchanges in the dead-letter queue.");
    describe_counter!(DENIALS, "Exchanges refused, by the rule that refused them.");
    describe_gauge!(DEMANDS, "Demands by state.");
    describe_gauge!(
        DEMANDS_OVERDUE,
        "Pending demands past their response deadline."
    );
    describe_gauge!(GRANTS_ACTIVE, "Grants in force.");
    describe_gauge!(PROVIDER_STREAMS, "Connected provider serving streams.");
    describe_counter!(
        FLUSHES,
        "Storage flushes (fsyncs); with group commit, far fewer than durable writes."
    );
    describe_counter!(DURABLE_WRITES, "Writes that waited for a flush.");
    describe_histogram!(FLUSH_BATCH, "Durable writes answered by one flush.");
    describe_histogram!(
        WRITE_GROUP,
        "Writes committed together in one storage transaction."
    );
    describe_histogram!(FLUSH_SECONDS, Unit::Seconds, "Time of one storage flush.");
    describe_counter!(AUDIT_APPENDS, "Audit log entries appended.");
    describe_gauge!(UPTIME, Unit::Seconds, "Seconds since the broker started.");
    describe_gauge!(CPU, Unit::Seconds, "CPU time used by the broker process.");
    describe_gauge!(RSS, Unit::Bytes, "Resident memory of the broker process.");
    describe_gauge!(OPEN_FDS, "Open file descriptors of the broker process.");
}

/// Reads CPU seconds, resident bytes and open descriptors of this process (Linux /proc).
pub fn process_stats() -> (f64, u64, u64) {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (cpu, rss, fds)
}
