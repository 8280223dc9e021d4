//! The broker's configuration: one TOML file in the data dir, every setting defaulted.

use crate::error::BrokerError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Who this broker is and where it listens.
    pub broker: BrokerSection,
    /// TLS identity and trust files.
    pub tls: TlsSection,
    /// Storage tuning.
    pub storage: StorageSection,
    /// Supply-demand rules.
    pub sharing: SharingSection,
    /// Exchanges: deadlines, redelivery, queue bounds, idempotency.
    pub exchange: ExchangeSection,
    /// Metrics, status and the operator console.
    pub metrics: MetricsSection,
    /// Logging.
    pub log: LogSection,
    /// The link to a parent broker and the scopes of child brokers.
    pub federation: FederationSection,
    /// Limits that keep one node from starving the others.
    pub limits: LimitsSection,
    /// The directory the file was loaded from; relative paths resolve against it. Not in the file.
    #[serde(skip)]
    pub data_dir: PathBuf,
}

/// `[broker]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// This broker's node id, REGION/NAME.
    pub id: String,
    /// The gRPC listen address.
    pub listen: SocketAddr,
    /// The admin node created by `init`; registered automatically at start.
    pub admin_id: String,
}

/// `[tls]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The broker's certificate (PEM), relative to the data dir.
    pub cert: PathBuf,
    /// The broker's private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// CA certificates whose client certificates are accepted (PEM bundle).
    pub client_ca: PathBuf,
    /// The CA certificate and key `issue` signs with; a real deployment may remove them from the broker host.
    pub ca_cert: PathBuf,
    /// The CA's private key.
    pub ca_key: PathBuf,
    /// Seconds between checks of `cert`, `key` and `client_ca` for changes (a change is
    /// loaded without a restart); 0 leaves reloads to SIGHUP.
    pub reload_check_secs: u64,
}

/// `[storage]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// The database directory, relative to the data dir.
    pub path: PathBuf,
    /// Unused since the storage of 2026-11-29 (it was sled's page cache); accepted so that
    /// existing config files still load.
    pub cache_capacity_bytes: u64,
    /// Free bytes the database's disk must keep: below them new work is refused with
    /// RESOURCE_EXHAUSTED while work already accepted goes on; 0 turns the check off.
    pub min_free_bytes: u64,
    /// Longest a flush waits for writes on their way (accepts being checked, answers on their
    /// way through the dispatcher), so that under load one fsync covers many of them (an idle
    /// broker flushes at once); 0 never waits.
    pub flush_linger_us: u64,
}

/// `[sharing]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharingSection {
    /// Days a provider has to decide a CONDITIONAL demand before it counts as overdue.
    pub demand_response_days: u32,
    /// When above 0, the response deadline in seconds instead of days (for drills and tests).
    pub demand_response_seconds: u64,
    /// Days of access when a demand does not say.
    pub default_period_days: u32,
    /// Longest period a demand may ask for.
    pub max_period_days: u32,
}

/// `[exchange]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExchangeSection {
    /// Deadline of a Submit that sets none, in seconds.
    pub default_deadline_secs: u64,
    /// Deadline of a Request whose call has no gRPC deadline, in seconds.
    pub default_sync_deadline_secs: u64,
    /// Longest deadline an exchange may ask for, in seconds.
    pub max_deadline_secs: u64,
    /// How long a provider instance may hold a request unanswered before it is redelivered, in seconds.
    pub ack_wait_secs: u64,
    /// Deliveries before an exchange goes to the dead-letter queue.
    pub max_deliveries: u32,
    /// Most exchanges queued for one destination; more are refused with RESOURCE_EXHAUSTED.
    pub queue_max_count: u64,
    /// Most bytes queued for one destination.
    pub queue_max_bytes: u64,
    /// How long a repeated idempotency key returns the first exchange, in seconds.
    pub idempotency_window_secs: u64,
    /// Most rows in one response; the rest are cut and the result marked truncated.
    pub max_rows: u32,
    /// Most filters in one query.
    pub max_filters: u32,
}

impl Default for ExchangeSection {
    fn default() -> Self {
        Self {
            default_deadline_secs: 300,
            default_sync_deadline_secs: 30,
            max_deadline_secs: 7 * 86_400,
            ack_wait_secs: 30,
            max_deliveries: 5,
            queue_max_count: 1_000_000,
            queue_max_bytes: 1024 * 1024 * 1024,
            idempotency_window_secs: 86_400,
            max_rows: 1000,
            max_filters: 32,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `/metrics` (Prometheus), `/status` (JSON) and `/` (console) are served, plain HTTP;
    /// empty turns them off. Keep it on loopback unless a firewall guards the port.
    pub listen: String,
    /// Also count exchanges per dataset (one series per dataset: mind the cardinality).
    pub per_dataset: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            per_dataset: false,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter, e.g. "info" or "govshare_broker=debug,info"; RUST_LOG overrides it.
    pub level: String,
    /// "text" or "json".
    pub format: String,
    /// OTLP/gRPC collector to export tracing spans to, e.g. `http://127.0.0.1:4317`; empty
    /// means no export. `OTEL_EXPORTER_OTLP_ENDPOINT` overrides it.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub otlp_service_name: String,
    /// Share of exchanges whose spans are exported, 0.0 to 1.0; decided by trace id, so every
    /// broker on an exchange's path makes the same choice.
    pub otlp_sample_ratio: f64,
}

/// `[limits]`: what one node, or one connection, may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Calls per second one node may make (a token bucket per node); 0 for no limit.
    pub requests_per_second: u32,
    /// How many calls a node may make at once above that rate.
    pub burst: u32,
    /// Concurrent gRPC streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Connections one node may hold open at once; 0 for no cap.
    pub max_connections_per_node: u32,
    /// Seconds a client has to complete the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds a connection with no call open may stay silent before it is closed; 0 for never.
    pub idle_timeout_secs: u64,
    /// Largest gRPC message a node may send, in bytes.
    pub max_message_bytes: u32,
    /// Most information items in one dataset (also the most taken from another broker).
    pub max_dataset_items: u32,
    /// Most tags on one dataset.
    pub max_dataset_tags: u32,
    /// Most fields one demand, or one approval, may name.
    pub max_demand_fields: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            requests_per_second: 5000,
            burst: 10000,
            max_concurrent_streams: 1024,
            max_connections_per_node: 64,
            tls_handshake_timeout_secs: 10,
            idle_timeout_secs: 600,
            max_message_bytes: 4 * 1024 * 1024,
            max_dataset_items: 256,
            max_dataset_tags: 32,
            max_demand_fields: 256,
        }
    }
}

/// `[federation]`: where this broker sits in the broker tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSection {
    /// The parent broker's URL, e.g. `https://127.0.0.1:7443`; empty means this broker is a
    /// root (the national hub, or a standalone broker).
    pub parent: String,
    /// The directory holding the identity the parent issued for this broker's link
    /// (`node.pem`, `node.key`, `ca.pem`), relative to the data dir.
    pub identity: PathBuf,
    /// The longest wait between reconnect attempts, in seconds (jittered exponential backoff
    /// starting at 200 ms).
    pub max_backoff_secs: u64,
    /// Seconds between keepalive pings on the link.
    pub ping_secs: u64,
    /// How far behind on state updates (catalog entries, keys, revocations, routes) a link may
    /// fall, in MiB, before it is closed to resync: a burst waits rather than closing it.
    pub max_waiting_updates_mib: u64,
    /// Overrides of the scope a child broker may claim, taking precedence over the scope
    /// written into the child's certificate (`[[federation.children]]`).
    pub children: Vec<ChildScope>,
}

/// `[[federation.children]]`: the scope one child broker may claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChildScope {
    /// The child broker's node id, REGION/NAME.
    pub id: String,
    /// The node-id prefixes the child may claim, e.g. `["3301"]`.
    pub scope: Vec<String>,
}

impl FederationSection {
    /// The configured scope of a child broker, if `[[federation.children]]` names it.
    pub fn scope_override(&self, child: &str) -> Option<&[String]> {
        self.children
            .iter()
            .find(|c| c.id == child)
            .map(|c| c.scope.as_slice())
    }

    /// The `[[federation.children]]` tables, one per override.
    fn render_children(&self) -> String {
        let mut out = String::new();
        for c in &self.children {
            let scope: Vec<String> = c.scope.iter().map(|p| toml_str(p)).collect();
            out.push_str(&format!(
                "\n[[federation.children]]\nid = {}\nscope = [{}]\n",
                toml_str(&c.id),
                scope.join(", ")
            ));
        }
        out
    }

    /// True when this broker links to a parent.
    pub fn has_parent(&self) -> bool {
        !self.parent.is_empty()
    }

    /// Checks `[federation]`: the parent URL, the timers and every child override.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if !self.parent.is_empty() {
            check_parent_url(&self.parent, "[federation] parent")?;
            if self.identity.as_os_str().is_empty() {
                return Err(BrokerError::invalid(
                    "[federation] identity must name the link identity directory (default \"link\") when parent is set",
                ));
            }
        }
        if self.max_backoff_secs == 0 || self.ping_secs == 0 || self.max_waiting_updates_mib == 0 {
            return Err(BrokerError::invalid(
                "[federation] max_backoff_secs, ping_secs and max_waiting_updates_mib must be at least 1",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for child in &self.children {
            crate::ids::NodeId::parse(&child.id, "[[federation.children]] id")?;
            if !seen.insert(child.id.as_str()) {
                return Err(BrokerError::invalid(format!(
                    "[[federation.children]] id {:?} appears more than once",
                    child.id
                )));
            }
            if child.scope.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "[[federation.children]] {:?}: scope must list at least one node-id prefix",
                    child.id
                )));
            }
            for prefix in &child.scope {
                check_scope_prefix(prefix).map_err(|e| {
                    BrokerError::invalid(format!("[[federation.children]] {:?}: {e}", child.id))
                })?;
            }
        }
        Ok(())
    }
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            parent: String::new(),
            identity: "link".into(),
            max_backoff_secs: 30,
            ping_secs: 10,
            max_waiting_updates_mib: 64,
            children: Vec::new(),
        }
    }
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            id: "000000/broker".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            admin_id: "000000/admin".into(),
        }
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: "tls/broker.pem".into(),
            key: "tls/broker.key".into(),
            client_ca: "tls/ca.pem".into(),
            ca_cert: "ca/ca.pem".into(),
            ca_key: "ca/ca.key".into(),
            reload_check_secs: 10,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            path: "db".into(),
            cache_capacity_bytes: 256 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            flush_linger_us: 5000,
        }
    }
}

impl Default for SharingSection {
    fn default() -> Self {
        Self {
            demand_response_days: 5,
            demand_response_seconds: 0,
            default_period_days: 365,
            max_period_days: 3650,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            otlp_endpoint: String::new(),
            otlp_service_name: "govshare-broker".into(),
            otlp_sample_ratio: 1.0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker: BrokerSection::default(),
            tls: TlsSection::default(),
            storage: StorageSection::default(),
            sharing: SharingSection::default(),
            exchange: ExchangeSection::default(),
            metrics: MetricsSection::default(),
            log: LogSection::default(),
            federation: FederationSection::default(),
            limits: LimitsSection::default(),
            data_dir: PathBuf::from("."),
        }
    }
}

/// The config file's name inside a data dir.
pub const CONFIG_FILE: &str = "config.toml";

impl SharingSection {
    /// The response deadline of a demand, in milliseconds.
    pub fn response_ms(&self) -> i64 {
        if self.demand_response_seconds > 0 {
            i64::try_from(self.demand_response_seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
        } else {
            i64::from(self.demand_response_days) * crate::time::DAY_MS
        }
    }
}

impl Config {
    /// Loads `DIR/config.toml` and validates it.
    pub fn load(data_dir: &Path) -> Result<Self, BrokerError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            BrokerError::invalid(format!(
                "cannot read {}: {e} (run `govshare-broker init --data-dir {}` first)",
                path.display(),
                data_dir.display()
            ))
        })?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|e| BrokerError::invalid(format!("{}: {e}", path.display())))?;
        cfg.data_dir = data_dir.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<(), BrokerError> {
        crate::ids::NodeId::parse(&self.broker.id, "[broker] id")?;
        crate::ids::NodeId::parse(&self.broker.admin_id, "[broker] admin_id")?;
        let s = &self.sharing;
        if s.demand_response_days == 0 || s.max_period_days == 0 {
            return Err(BrokerError::invalid(
                "[sharing] demand_response_days and max_period_days must be at least 1",
            ));
        }
        if s.default_period_days == 0 || s.default_period_days > s.max_period_days {
            return Err(BrokerError::invalid(
                "[sharing] default_period_days must be between 1 and max_period_days",
            ));
        }
        let x = &self.exchange;
        if x.default_deadline_secs == 0
            || x.default_sync_deadline_secs == 0
            || x.ack_wait_secs == 0
            || x.max_deliveries == 0
            || x.queue_max_count == 0
            || x.queue_max_bytes == 0
            || x.max_rows == 0
        {
            return Err(BrokerError::invalid(
                "[exchange] deadlines, ack_wait_secs, max_deliveries, queue bounds and max_rows must be at least 1",
            ));
        }
        if x.default_deadline_secs > x.max_deadline_secs
            || x.default_sync_deadline_secs > x.max_deadline_secs
        {
            return Err(BrokerError::invalid(
                "[exchange] default deadlines must not exceed max_deadline_secs",
            ));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(BrokerError::invalid(format!(
                "[metrics] listen {:?} is not an address like 127.0.0.1:9464 (or \"\" for off)",
                self.metrics.listen
            )));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(BrokerError::invalid(
                "[log] format must be \"text\" or \"json\"",
            ));
        }
        self.log.validate_otlp()?;
        if self.limits.requests_per_second > 0 && self.limits.burst == 0 {
            return Err(BrokerError::invalid(
                "[limits] burst must be at least 1 when requests_per_second is set",
            ));
        }
        if self.limits.max_concurrent_streams == 0 {
            return Err(BrokerError::invalid(
                "[limits] max_concurrent_streams must be at least 1",
            ));
        }
        if self.limits.tls_handshake_timeout_secs == 0 {
            return Err(BrokerError::invalid(
                "[limits] tls_handshake_timeout_secs must be at least 1",
            ));
        }
        if self.limits.max_dataset_items == 0
            || self.limits.max_dataset_tags == 0
            || self.limits.max_demand_fields == 0
        {
            return Err(BrokerError::invalid(
                "[limits] max_dataset_items, max_dataset_tags and max_demand_fields must be at least 1",
            ));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(BrokerError::invalid(
                "[limits] max_message_bytes must be at least 1024",
            ));
        }
        self.federation.validate()
    }
}

impl LogSection {
    /// Checks the OTLP settings: an `http://` endpoint or none, a service name, a ratio in 0..=1.
    pub fn validate_otlp(&self) -> Result<(), BrokerError> {
        check_otlp_endpoint(&self.otlp_endpoint, "[log] otlp_endpoint")?;
        if self.otlp_service_name.trim().is_empty() {
            return Err(BrokerError::invalid(
                "[log] otlp_service_name must not be empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            return Err(BrokerError::invalid(format!(
                "[log] otlp_sample_ratio {} must be between 0.0 and 1.0",
                self.otlp_sample_ratio
            )));
        }
        Ok(())
    }
}

/// Validates an OTLP/gRPC collector URL: `""` (off) or `http://HOST:PORT`.
pub fn check_otlp_endpoint(url: &str, what: &str) -> Result<(), BrokerError> {
    if url.is_empty() {
        return Ok(());
    }
    if url.starts_with("https://") {
        return Err(BrokerError::invalid(format!(
            "{what} {url:?}: only plain http:// is supported (export to a collector on loopback or a sidecar), e.g. http://127.0.0.1:4317"
        )));
    }
    let rest = url.strip_prefix("http://").unwrap_or("");
    if rest.is_empty() || rest.starts_with('/') || rest.chars().any(char::is_whitespace) {
        return Err(BrokerError::invalid(format!(
            "{what} {url:?} must be a URL like http://127.0.0.1:4317 (or \"\" for off)"
        )));
    }
    Ok(())
}

/// A TOML basic string, quoted and escaped.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Longest scope prefix (a node id is at most 6 + 1 + 63 characters).
pub const MAX_SCOPE_PREFIX: usize = 70;

/// Validates a scope entry, a node-id prefix: 1 to 70 of `0-9`, `a-z`, `/` and `-`.
pub fn check_scope_prefix(prefix: &str) -> Result<(), BrokerError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_SCOPE_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'/' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(format!(
            "scope prefix {prefix:?} must be 1 to {MAX_SCOPE_PREFIX} of 0-9, a-z, '/' and '-' (a node-id prefix, e.g. 33 or 3301 or 000000/mca)"
        )))
    }
}

/// Validates a parent broker URL: `https://HOST:PORT` (links are always mutual TLS).
pub fn check_parent_url(url: &str, what: &str) -> Result<(), BrokerError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        BrokerError::invalid(format!(
            "{what} {url:?} must start with https:// (links to the parent are mutual TLS), e.g. https://10.0.0.1:7443"
        ))
    })?;
    if rest.is_empty() || rest.starts_with('/') || rest.chars().any(char::is_whitespace) {
        return Err(BrokerError::invalid(format!(
            "{what} {url:?} has no host; expected e.g. https://10.0.0.1:7443"
        )));
    }
    Ok(())
}

impl Config {
    /// Resolves a configured path against the data dir.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    /// The config file as `init` writes it: every setting, its default and what it is for.
    pub fn render_template(&self) -> String {
        format!(
            r#"# govshare broker configuration. Every setting is shown with its default.
# Relative paths are resolved against the directory holding this file.
# Flags override the file: `govshare-broker run --listen ADDR`.

[broker]
# This broker's node id, REGION/NAME (REGION: 6-digit GB/T 2260 division code).
id = "{id}"
# gRPC listen address (mutual TLS). Default "127.0.0.1:7443".
listen = "{listen}"
# The admin identity made by `init` (in admin/); registered automatically at start.
admin_id = "{admin}"

[tls]
# The broker's certificate and key (PEM). Default tls/broker.pem, tls/broker.key.
cert = {t_cert}
key = {t_key}
# CA bundle trusted for client certificates. Default tls/ca.pem.
client_ca = {t_client_ca}
# The CA used by `govshare-broker issue`. Default ca/ca.pem, ca/ca.key.
ca_cert = {t_ca_cert}
ca_key = {t_ca_key}
# Seconds between checks of cert, key and client_ca for changes: a change is loaded without a
# restart (so is SIGHUP), and connections already open keep going. 0 leaves it to SIGHUP.
# Default 10.
reload_check_secs = {t_reload}

[storage]
# The database directory (an append-only log in segment files). Default "db".
path = {s_path}
# Unused: it was sled's page cache, before 2026-11-29; kept so older files load.
cache_capacity_bytes = {cache}
# Free bytes the database's disk must keep. Below them new work (submits, requests, demands,
# publishing) is refused with RESOURCE_EXHAUSTED while work already accepted still completes,
# and it is taken again once space is freed. 0 turns the check off. Default 268435456 (256 MiB).
min_free_bytes = {s_min_free}
# Longest a flush waits, in microseconds, for writes on their way (accepts being checked,
# providers' answers on their way through the dispatcher), so that under load one fsync covers
# many of them. It waits only while some are on their way, so an idle broker
# flushes at once. 0 never waits. Default 5000.
flush_linger_us = {s_linger}

[sharing]
# Days a provider has to decide a CONDITIONAL demand before it is overdue. Default 5.
demand_response_days = {resp}
# When above 0, the response deadline in seconds instead of days (drills and tests). Default 0.
demand_response_seconds = {resp_s}
# Days of access when a demand does not say. Default 365.
default_period_days = {defp}
# Longest period a demand may ask for, in days. Default 3650.
max_period_days = {maxp}

[exchange]
# Deadline of a Submit that sets none, in seconds. Default 300.
default_deadline_secs = {x_def}
# Deadline of a Request whose call has no gRPC deadline, in seconds. Default 30.
default_sync_deadline_secs = {x_sync}
# Longest deadline an exchange may ask for, in seconds. Default 604800 (7 days).
max_deadline_secs = {x_max}
# Seconds a provider instance may hold a request unanswered before it is redelivered. Default 30.
ack_wait_secs = {x_ack}
# Deliveries before an exchange is dead-lettered. Default 5.
max_deliveries = {x_deliv}
# Most exchanges queued for one destination (more get RESOURCE_EXHAUSTED). Default 1000000.
queue_max_count = {x_qc}
# Most bytes queued for one destination. Default 1073741824 (1 GiB).
queue_max_bytes = {x_qb}
# Seconds a repeated idempotency key returns the first exchange. Default 86400.
# Each key stays in memory (about 125 bytes) this long: at 100 keyed exchanges a
# second, the default day holds about 1 GB of them.
idempotency_window_secs = {x_idem}
# Most rows in one response (the rest are cut, the result marked truncated). Default 1000.
max_rows = {x_rows}
# Most filters in one query. Default 32.
max_filters = {x_filters}

[metrics]
# Plain-HTTP address of /metrics (Prometheus), /status (JSON) and / (operator console);
# "" turns them off. Keep it on loopback unless a firewall guards it. Default "127.0.0.1:9464".
listen = "{m_listen}"
# Also count exchanges per dataset (a series per dataset). Default false.
per_dataset = {m_per}

[log]
# tracing filter; RUST_LOG overrides it. Default "info".
level = "{level}"
# "text" or "json". Default "text".
format = "{format}"
# OpenTelemetry: export the exchange and hop spans over OTLP/gRPC to a collector (plain
# http://, e.g. a collector on loopback or a sidecar), with the exchange's trace id as their
# trace id. "" turns it off; OTEL_EXPORTER_OTLP_ENDPOINT overrides it. Default "".
otlp_endpoint = {otlp_endpoint}
# service.name of the exported spans. Default "govshare-broker".
otlp_service_name = {otlp_service}
# Share of exchanges exported, 0.0 to 1.0, chosen by trace id (the same at every broker).
# Default 1.0.
otlp_sample_ratio = {otlp_ratio:?}

[limits]
# Calls per second one node may make (a token bucket per node); a node over it is answered
# RESOURCE_EXHAUSTED with the time to retry. 0 turns the limit off. Default 5000.
requests_per_second = {l_rps}
# Calls a node may make at once above that rate. Default 10000.
burst = {l_burst}
# Concurrent gRPC calls (streams) per connection. Default 1024.
max_concurrent_streams = {l_streams}
# Connections one node may hold open at once (one connection carries many calls); a
# connection over it is answered RESOURCE_EXHAUSTED and closed. 0 for no cap. Default 64.
max_connections_per_node = {l_conns}
# Seconds a client has to complete the TLS handshake. Default 10.
tls_handshake_timeout_secs = {l_hs}
# Seconds a connection with no call open may stay silent before it is closed; 0 for never.
# Default 600.
idle_timeout_secs = {l_idle}
# Largest gRPC message a node may send, in bytes (links between brokers have their own, larger
# limit). Default 4194304 (4 MiB).
max_message_bytes = {l_msg}
# Most information items in one dataset; entries from other brokers over it are refused too.
# Default 256.
max_dataset_items = {l_items}
# Most tags on one dataset. Default 32.
max_dataset_tags = {l_tags}
# Most fields one demand, or one approval, may name. Default 256.
max_demand_fields = {l_fields}

[federation]
# The parent broker's URL (mutual TLS), e.g. "https://10.0.0.1:7443"; "" means this broker is
# a root (the national hub, or a standalone broker). `init --parent` sets it. Default "".
parent = {f_parent}
# Directory of the identity the parent issued for this broker's link (node.pem, node.key,
# ca.pem), from `govshare-broker issue --role broker` on the parent. Default "link".
identity = {f_identity}
# Longest wait between reconnect attempts to the parent, in seconds (jittered exponential
# backoff starting at 200 ms). Default 30.
max_backoff_secs = {f_backoff}
# Seconds between keepalive pings on the link. Default 10.
ping_secs = {f_ping}
# How far behind on state updates (catalog entries, keys, revocations, routes) a link may fall,
# in MiB, before it is closed to resync: a burst of publishing waits rather than closing the
# link. Default 64.
max_waiting_updates_mib = {f_waiting}
# Scope overrides for child brokers: the node-id prefixes a child may claim, taking precedence
# over the scope written into its certificate. None by default. For example:
# [[federation.children]]
# id = "330100/hub"
# scope = ["3301"]
{f_children}"#,
            t_reload = self.tls.reload_check_secs,
            t_cert = toml_str(&self.tls.cert.to_string_lossy()),
            t_key = toml_str(&self.tls.key.to_string_lossy()),
            t_client_ca = toml_str(&self.tls.client_ca.to_string_lossy()),
            t_ca_cert = toml_str(&self.tls.ca_cert.to_string_lossy()),
            t_ca_key = toml_str(&self.tls.ca_key.to_string_lossy()),
            s_path = toml_str(&self.storage.path.to_string_lossy()),
            s_min_free = self.storage.min_free_bytes,
            s_linger = self.storage.flush_linger_us,
            l_rps = self.limits.requests_per_second,
            l_burst = self.limits.burst,
            l_streams = self.limits.max_concurrent_streams,
            l_conns = self.limits.max_connections_per_node,
            l_hs = self.limits.tls_handshake_timeout_secs,
            l_idle = self.limits.idle_timeout_secs,
            l_msg = self.limits.max_message_bytes,
            l_items = self.limits.max_dataset_items,
            l_tags = self.limits.max_dataset_tags,
            l_fields = self.limits.max_demand_fields,
            id = self.broker.id,
            listen = self.broker.listen,
            admin = self.broker.admin_id,
            cache = self.storage.cache_capacity_bytes,
            resp = self.sharing.demand_response_days,
            resp_s = self.sharing.demand_response_seconds,
            defp = self.sharing.default_period_days,
            maxp = self.sharing.max_period_days,
            x_def = self.exchange.default_deadline_secs,
            x_sync = self.exchange.default_sync_deadline_secs,
            x_max = self.exchange.max_deadline_secs,
            x_ack = self.exchange.ack_wait_secs,
            x_deliv = self.exchange.max_deliveries,
            x_qc = self.exchange.queue_max_count,
            x_qb = self.exchange.queue_max_bytes,
            x_idem = self.exchange.idempotency_window_secs,
            x_rows = self.exchange.max_rows,
            x_filters = self.exchange.max_filters,
            m_listen = self.metrics.listen,
            m_per = self.metrics.per_dataset,
            level = self.log.level,
            format = self.log.format,
            otlp_endpoint = toml_str(&self.log.otlp_endpoint),
            otlp_service = toml_str(&self.log.otlp_service_name),
            otlp_ratio = self.log.otlp_sample_ratio,
            f_parent = toml_str(&self.federation.parent),
            f_identity = toml_str(&self.federation.identity.to_string_lossy()),
            f_backoff = self.federation.max_backoff_secs,
            f_ping = self.federation.ping_secs,
            f_waiting = self.federation.max_waiting_updates_mib,
            f_children = self.federation.render_children(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let cfg = Config::default();
        let parsed: Config = toml::from_str(&cfg.render_template())?;
        assert_eq!(parsed.broker.id, cfg.broker.id);
        assert_eq!(parsed.broker.listen, cfg.broker.listen);
        assert_eq!(parsed.sharing.demand_response_days, 5);
        parsed.validate()?;
        Ok(())
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Config>("[broker]\nidd = \"x\"").is_err());
        let mut cfg = Config::default();
        cfg.sharing.default_period_days = 0;
        assert!(cfg.validate().is_err());
        let mut cfg = Config::default();
        cfg.broker.id = "nope".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn federation_defaults_and_template() -> Result<(), Box<dyn std::error::Error>> {
        let cfg = Config::default();
        assert_eq!(cfg.federation.parent, "");
        assert!(!cfg.federation.has_parent());
        assert_eq!(cfg.federation.identity, PathBuf::from("link"));
        assert_eq!(cfg.federation.max_backoff_secs, 30);
        assert_eq!(cfg.federation.ping_secs, 10);
        assert!(cfg.federation.children.is_empty());
        // A file without [federation] gets the defaults.
        let parsed: Config = toml::from_str("[broker]\nid = \"330000/hub\"")?;
        assert_eq!(parsed.federation.identity, PathBuf::from("link"));
        assert_eq!(parsed.federation.ping_secs, 10);

        let mut cfg = Config::default();
        cfg.federation.parent = "https://10.0.0.1:7443".into();
        cfg.federation.max_backoff_secs = 60;
        cfg.federation.children = vec![
            ChildScope {
                id: "330100/hub".into(),
                scope: vec!["3301".into()],
            },
            ChildScope {
                id: "000000/mca".into(),
                scope: vec!["000000/mca".into(), "000000/mca-death".into()],
            },
        ];
        cfg.validate()?;
        let parsed: Config = toml::from_str(&cfg.render_template())?;
        parsed.validate()?;
        assert_eq!(parsed.federation.parent, "https://10.0.0.1:7443");
        assert_eq!(parsed.federation.max_backoff_secs, 60);
        assert_eq!(parsed.federation.children, cfg.federation.children);
        assert_eq!(
            parsed.federation.scope_override("330100/hub"),
            Some(&["3301".to_string()][..])
        );
        assert_eq!(parsed.federation.scope_override("330200/hub"), None);
        // The following section still parses as its own table after the children.
        assert_eq!(parsed.log.level, "info");
        Ok(())
    }

    #[test]
    fn federation_toml_children() -> Result<(), Box<dyn std::error::Error>> {
        let cfg: Config = toml::from_str(
            "[federation]\nparent = \"https://hub:7443\"\n\n[[federation.children]]\nid = \"330100/hub\"\nscope = [\"3301\", \"3302\"]\n",
        )?;
        cfg.validate()?;
        assert_eq!(
            cfg.federation.scope_override("330100/hub"),
            Some(&["3301".to_string(), "3302".to_string()][..])
        );
        assert!(toml::from_str::<Config>("[federation]\nparnt = \"x\"").is_err());
        Ok(())
    }

    #[test]
    fn federation_validation() {
        let with = |f: &dyn Fn(&mut FederationSection)| {
            let mut cfg = Config::default();
            f(&mut cfg.federation);
            cfg.validate()
        };
        assert!(with(&|f| f.parent = "https://127.0.0.1:7443".into()).is_ok());
        let err = with(&|f| f.parent = "http://127.0.0.1:7443".into());
        assert!(matches!(&err, Err(e) if e.to_string().contains("[federation] parent")));
        assert!(with(&|f| f.parent = "127.0.0.1:7443".into()).is_err());
        assert!(with(&|f| f.parent = "https://".into()).is_err());
        assert!(with(&|f| f.ping_secs = 0).is_err());
        assert!(with(&|f| f.max_waiting_updates_mib = 0).is_err());
        assert!(with(&|f| f.max_backoff_secs = 0).is_err());
        let child = |id: &str, scope: &[&str]| ChildScope {
            id: id.into(),
            scope: scope.iter().map(|s| s.to_string()).collect(),
        };
        assert!(with(&|f| f.children = vec![child("nope", &["33"])]).is_err());
        assert!(with(&|f| f.children = vec![child("330100/hub", &[])]).is_err());
        assert!(with(&|f| f.children = vec![child("330100/hub", &["33 01"])]).is_err());
        assert!(with(&|f| f.children = vec![child("330100/hub", &["ABC"])]).is_err());
        assert!(with(&|f| f.children = vec![
            child("330100/hub", &["3301"]),
            child("330100/hub", &["3302"])
        ])
        .is_err());
        assert!(check_scope_prefix(&"3".repeat(70)).is_ok());
        assert!(check_scope_prefix(&"3".repeat(71)).is_err());
        assert!(check_scope_prefix("").is_err());
    }
}
