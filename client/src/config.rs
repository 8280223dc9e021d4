//! How to reach a broker: its URL, the identity to present, deadlines and retries.

use std::path::PathBuf;
use std::time::Duration;

/// The broker URL used when none is given.
pub const DEFAULT_BROKER_URL: &str = "https://127.0.0.1:7443";
/// The per-call deadline used when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The time allowed to open the TCP and TLS connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a unary call is retried after `UNAVAILABLE`.
pub const DEFAULT_RETRIES: u32 = 3;

/// Settings of a [`Client`](crate::Client); build with `ClientConfig::new(dir)` or struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The broker's URL, `https://HOST:PORT`; the host is also the TLS name checked unless `tls_server_name` is set.
    pub broker_url: String,
    /// A directory holding `node.pem`, `node.key` and `ca.pem`.
    pub identity_dir: PathBuf,
    /// Deadline of each unary call (sent as `grpc-timeout`); streams have none.
    pub timeout: Duration,
    /// Time allowed to establish the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Retries of a unary call that failed with `UNAVAILABLE`, with backoff 100 ms, 200 ms, 400 ms, ...
    /// (a call whose connection closed before it was sent is sent once more besides these).
    pub retries: u32,
    /// The name the broker's certificate must carry, when it differs from the URL's host.
    pub tls_server_name: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            broker_url: DEFAULT_BROKER_URL.to_string(),
            identity_dir: PathBuf::new(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            tls_server_name: None,
        }
    }
}

impl ClientConfig {
    /// The defaults, with the identity read from `identity_dir`.
    pub fn new(identity_dir: impl Into<PathBuf>) -> Self {
        ClientConfig {
            identity_dir: identity_dir.into(),
            ..ClientConfig::default()
        }
    }

    /// The same settings for another broker URL.
    pub fn with_broker_url(mut self, url: impl Into<String>) -> Self {
        self.broker_url = url.into();
        self
    }
}
