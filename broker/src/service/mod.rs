//! The gRPC services: thin wrappers that authenticate, call the domain, and map errors.

use crate::auth::{self, Caller};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::Result;
use crate::registry::Registry;
use crate::sharing::Sharing;
use crate::store::{self, Store};
use std::sync::Arc;
use tonic::{Request, Status};

pub mod admin;
pub mod catalog;
pub mod exchange;
pub mod federation;
pub mod node;
pub mod sharing;

/// The broker's shared state, one per running broker.
#[derive(Debug)]
pub struct App {
    /// The effective configuration.
    pub cfg: Config,
    /// Storage.
    pub store: Store,
    /// Nodes.
    pub registry: Registry,
    /// Datasets.
    pub catalog: Catalog,
    /// Demands and grants.
    pub sharing: Sharing,
    /// Exchanges.
    pub engine: crate::exchange::Engine,
    /// Links and routes to other brokers.
    pub fed: crate::federation::Fed,
    /// Calls per node per second (`[limits]`), `None` when off.
    pub limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// When this broker started, Unix ms.
    pub started_ms: i64,
    /// Flipped to true at shutdown, so long-lived streams (Watch, Serve) end and the
    /// server's graceful drain can finish.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl App {
    /// Builds the state over an open store and starts the exchange engine.
    pub fn new(
        cfg: Config,
        store: Store,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self> {
        let catalog = Catalog::new(
            store.clone(),
            crate::catalog::CatalogLimits::from_config(&cfg.limits),
        );
        // This broker's signing key, created on first start; announced in its own key table.
        let key = crate::keys::SigningKey::load_or_create(&cfg.data_dir, &cfg.broker.id)?;
        let own = key.announcement();
        store.add_key(&own)?;
        let fed = crate::federation::Fed::new(store.clone(), &cfg.federation)?;
        let engine = crate::exchange::Engine::start(
            store.clone(),
            catalog.clone(),
            cfg.exchange.clone(),
            stopping.clone(),
            cfg.metrics.per_dataset,
            key.clone(),
            fed.clone(),
        )?;
        Ok(Self {
            registry: Registry::new(store.clone()),
            catalog,
            sharing: Sharing::new(
                store.clone(),
                cfg.sharing.clone(),
                key,
                fed.clone(),
                usize::try_from(cfg.limits.max_demand_fields).unwrap_or(usize::MAX),
            ),
            fed,
            limiter: rate_limiter(&cfg.limits),
            engine,
            store,
            cfg,
            started_ms: crate::time::now_ms(),
            stopping,
        })
    }
}

/// The per-node token bucket of `[limits]`.
fn rate_limiter(
    l: &crate::config::LimitsSection,
) -> Option<governor::DefaultKeyedRateLimiter<String>> {
    let rate = std::num::NonZeroU32::new(l.requests_per_second)?;
    let burst = std::num::NonZeroU32::new(l.burst).unwrap_or(rate);
    Some(governor::RateLimiter::keyed(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Authenticates the caller of a request: certificate identity, then registration, then the
/// node's share of calls (a node over its rate is told when to retry).
pub async fn caller<B>(app: &Arc<App>, req: &Request<B>) -> Result<Caller, Status> {
    let id = auth::cert_identity(req)?;
    if let Some(limiter) = &app.limiter {
        if let Err(not_until) = limiter.check_key(&id.node_id.to_string()) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            metrics::counter!(crate::metrics::RATE_LIMITED).increment(1);
            let mut s = Status::resource_exhausted(format!(
                "rate limit: {} allows {} calls per second per node (burst {}); retry in {} ms",
                app.cfg.broker.id,
                app.cfg.limits.requests_per_second,
                app.cfg.limits.burst,
                wait.as_millis().max(1)
            ));
            if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                s.metadata_mut().insert("retry-after-ms", v);
            }
            return Err(s);
        }
    }
    // On the caller's task, as `accept`'s reads are: one lookup in the in-memory index and at
    // most one `pread` of a record the broker wrote (in the page cache), a few microseconds,
    // where a hop to the blocking pool and back costs two thread wake-ups per call.
    app.registry.authenticate(&id)?;
    Ok(Caller {
        id: id.node_id,
        role: id.role,
    })
}

/// Runs read-only domain work on a blocking thread.
pub async fn read<R: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&App) -> Result<R> + Send + 'static,
) -> Result<R, Status> {
    let app = app.clone();
    Ok(store::blocking(move || f(&app)).await?)
}

/// Runs domain work that writes on a blocking thread, then waits for it to be durable
/// (sharing one flush with every other writer waiting at the same time).
pub async fn write<R: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&App) -> Result<R> + Send + 'static,
) -> Result<R, Status> {
    let app2 = app.clone();
    let r = store::blocking(move || f(&app2)).await?;
    app.store.durable().await?;
    // Whatever the write put in an outbox (demands, decisions) may go now.
    app.fed.wake_all();
    Ok(r)
}

/// The answer for RPCs designed in the API but carried by a later release.
pub fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is part of the govshare.v1 API but not implemented by this broker version yet"
    ))
}
