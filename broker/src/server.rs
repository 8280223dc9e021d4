//! Starting and stopping a broker: the caller binds the listener and passes it in, so tests
//! bind port 0 and read the real address.

use crate::config::Config;
use crate::error::{BrokerError, Result};
use crate::service::{self, App};
use crate::store::{self, Store};
use govshare_proto::v1::{
    admin_service_server::AdminServiceServer, audit_service_server::AuditServiceServer,
    catalog_service_server::CatalogServiceServer, exchange_service_server::ExchangeServiceServer,
    federation_service_server::FederationServiceServer, node_service_server::NodeServiceServer,
    sharing_service_server::SharingServiceServer,
};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The fully qualified names of govshare's services, as health checking reports them.
pub const SERVICE_NAMES: &[&str] = &[
    "govshare.v1.NodeService",
    "govshare.v1.CatalogService",
    "govshare.v1.SharingService",
    "govshare.v1.ExchangeService",
    "govshare.v1.FederationService",
    "govshare.v1.AdminService",
    "govshare.v1.AuditService",
];

/// How long shutdown waits for in-flight calls and their tasks.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A broker serving on a listener.
#[derive(Debug)]
pub struct RunningBroker {
    /// The address it serves on.
    pub local_addr: SocketAddr,
    /// This broker's node id.
    pub broker_id: String,
    shutdown: Option<oneshot::Sender<()>>,
    stopping: tokio::sync::watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    /// Where `/metrics`, `/status` and the console are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
    http_task: Option<JoinHandle<()>>,
    tls: Arc<crate::tls::Reloader>,
    conns: Arc<crate::tls::Conns>,
    engine: Option<crate::exchange::Engine>,
    fed: Option<crate::federation::Fed>,
    task: Option<JoinHandle<()>>,
    store: Option<Store>,
}

/// Installs the process-wide rustls crypto provider (ring) once; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the store, registers the broker's own nodes, and serves gRPC over mutual TLS on
/// `listener` until [`RunningBroker::shutdown`].
pub async fn start(cfg: Config, listener: TcpListener) -> Result<RunningBroker> {
    install_crypto_provider();
    let local_addr = listener
        .local_addr()
        .map_err(|e| BrokerError::internal(format!("listener address: {e}")))?;
    let tls = Arc::new(crate::tls::Reloader::load(&cfg)?);
    let limits = crate::tls::ConnLimits::from_config(&cfg);
    let conns = Arc::new(crate::tls::Conns::default());
    let max_message = usize::try_from(cfg.limits.max_message_bytes).unwrap_or(usize::MAX);

    let db_path = cfg.path(&cfg.storage.path);
    let cache = cfg.storage.cache_capacity_bytes;
    let min_free = cfg.storage.min_free_bytes;
    let linger = std::time::Duration::from_micros(cfg.storage.flush_linger_us);
    let id = cfg.broker.id.clone();
    let admin = cfg.broker.admin_id.clone();
    let store = store::blocking(move || {
        let s = Store::open(&db_path, cache, &id)?;
        if s.begin_run()? {
            tracing::warn!("the last run did not stop cleanly; checking the exchange indexes");
        }
        s.set_min_free(min_free);
        s.set_flush_linger(linger);
        crate::registry::Registry::new(s.clone()).bootstrap(&id, &admin)?;
        Ok(s)
    })
    .await?;
    store.durable().await?;

    let broker_id = cfg.broker.id.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = {
        let s = store.clone();
        Arc::new(store::blocking(move || App::new(cfg, s, stop_rx)).await?)
    };
    let engine = app.engine.clone();
    let fed = app.fed.clone();
    let fed_for_health = fed.clone();
    crate::metrics::handle();
    let (metrics_addr, http_task) = if app.cfg.metrics.listen.is_empty() {
        (None, None)
    } else {
        let l = tokio::net::TcpListener::bind(&app.cfg.metrics.listen)
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "cannot listen for metrics on {}: {e} (set [metrics] listen or --metrics-listen)",
                    app.cfg.metrics.listen
                ))
            })?;
        let addr = l
            .local_addr()
            .map_err(|e| BrokerError::internal(format!("metrics address: {e}")))?;
        let mut stop = app.stopping.clone();
        let serve =
            axum::serve(l, crate::http::router(app.clone())).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        (
            Some(addr),
            Some(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "metrics server ended");
                }
            })),
        )
    };
    // Health: SERVING only now that storage is open and recovery is done; NOT_SERVING again
    // as soon as shutdown starts, so orchestrators stop routing here first.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for name in SERVICE_NAMES {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    {
        // Failed storage (a full disk) stays failed until a restart (see `store::Failure`):
        // NOT_SERVING everywhere, so that probes and supervisors restart the broker.
        let mut failed = store.failure_watch();
        let reporter = health.clone();
        tokio::spawn(async move {
            if failed.wait_for(Option::is_some).await.is_ok() {
                for name in std::iter::once(&"").chain(SERVICE_NAMES) {
                    reporter
                        .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                        .await;
                }
            }
        });
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(govshare_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::internal(format!("reflection service: {e}")))?;
    // The older protocol too, for grpcurl and tools that predate v1.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(govshare_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| BrokerError::internal(format!("reflection service: {e}")))?;
    let parent = app.cfg.federation.parent.clone();
    let link_app = app.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let routes = tonic::service::Routes::default()
        .add_service(
            NodeServiceServer::new(service::node::NodeSvc(app.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            CatalogServiceServer::new(service::catalog::CatalogSvc(app.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            SharingServiceServer::new(service::sharing::SharingSvc(app.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            ExchangeServiceServer::new(service::exchange::ExchangeSvc(app.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            // Link frames carry whole results (up to the provider stream's limit) plus their
            // envelope: room for the largest, as the link's client side allows.
            FederationServiceServer::new(service::federation::FederationSvc(app.clone()))
                .max_decoding_message_size(crate::federation::link::MAX_FRAME_BYTES)
                .max_encoding_message_size(crate::federation::link::MAX_FRAME_BYTES),
        )
        .add_service(AdminServiceServer::new(service::admin::AdminSvc(
            app.clone(),
        )))
        .add_service(AuditServiceServer::new(service::admin::AuditSvc(
            app.clone(),
        )))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .prepare();
    // TLS is ours, not tonic's, and so is the serving loop: see `tls` (reload, handshake and idle
    // timeouts, per-node cap) and `serve` (GOAWAY on idle).
    let incoming = crate::tls::incoming(
        listener,
        tls.clone(),
        limits,
        conns.clone(),
        app.stopping.clone(),
    );
    if app.cfg.tls.reload_check_secs > 0 {
        spawn_tls_watch(
            tls.clone(),
            std::time::Duration::from_secs(app.cfg.tls.reload_check_secs),
            app.stopping.clone(),
        );
    }
    let task = tokio::spawn(crate::serve::serve(
        routes,
        incoming,
        app.cfg.limits.max_concurrent_streams,
        async {
            let _ = rx.await;
        },
    ));
    tracing::info!(%local_addr, broker = %broker_id, "broker serving");
    if !parent.is_empty() {
        // Health reports the parent link on the federation service's name: NOT_SERVING while
        // it is down, so probes and operators see a broker cut off from the cascade.
        let mut up = fed_for_health.parent_watch();
        let reporter = health.clone();
        tokio::spawn(async move {
            loop {
                let status = if *up.borrow_and_update() {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter
                    .set_service_status("govshare.v1.FederationService", status)
                    .await;
                if up.changed().await.is_err() {
                    return;
                }
            }
        });
        tracing::info!(parent = %parent, "linking to the parent broker");
        crate::federation::link::spawn_parent_link(link_app);
    }
    Ok(RunningBroker {
        local_addr,
        broker_id,
        shutdown: Some(tx),
        stopping: stop_tx,
        health,
        metrics_addr,
        http_task,
        tls,
        conns,
        task: Some(task),
        engine: Some(engine),
        fed: Some(fed),
        store: Some(store),
    })
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        // Dropped without `shutdown()`: at least stop the dispatcher thread and the streams,
        // so the store can close. Everything accepted is already on disk.
        let _ = self.stopping.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(engine) = self.engine.take() {
            engine.request_shutdown();
        }
        if let Some(fed) = self.fed.take() {
            fed.close_all();
        }
    }
}

/// Checks the TLS files every `every` and loads them when they change.
fn spawn_tls_watch(
    tls: Arc<crate::tls::Reloader>,
    every: std::time::Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            let t = tls.clone();
            // A failed reload is logged and counted inside; the old identity keeps serving.
            let _ = tokio::task::spawn_blocking(move || t.reload_logged("file change")).await;
        }
    });
}

impl RunningBroker {
    /// Loads the TLS identity and trust bundle from their files again (what SIGHUP does).
    /// New connections use them; open connections keep theirs. On error the old ones stay.
    pub fn reload_tls(&self) -> Result<bool> {
        self.tls.reload_logged("reload request")
    }

    /// Watches for a storage failure: `Some(message)` once storage has failed and the process
    /// should be restarted (see `store::Failure`); never while stopped.
    pub fn storage_failure_watch(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        match &self.store {
            Some(s) => s.failure_watch(),
            None => tokio::sync::watch::channel(None).1,
        }
    }

    /// Connections `node` holds open to this broker now.
    pub fn connections_of(&self, node: &str) -> usize {
        self.conns.of_node(node)
    }

    /// Connections `node` has opened to this broker since it started.
    pub fn connections_opened_by(&self, node: &str) -> u64 {
        self.conns.opened_by(node)
    }

    /// The broker's storage, for tests and for a program embedding the broker.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The group-commit counters: (flushes, durability requests they answered).
    pub fn flush_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.store
            .as_ref()
            .map(|s| {
                let st = s.flush_stats();
                (
                    st.flushes.load(Ordering::Relaxed),
                    st.requests.load(Ordering::Relaxed),
                )
            })
            .unwrap_or((0, 0))
    }

    /// Stops accepting, lets in-flight calls finish, flushes storage and releases the data dir.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop(true).await
    }

    /// Stops like [`RunningBroker::shutdown`] but leaves the database marked as in use, as a
    /// crash does, so that the next start checks its exchange indexes (the bench harness
    /// measures that recovery with it).
    pub async fn shutdown_as_crashed(mut self) -> Result<()> {
        self.stop(false).await
    }

    async fn stop(&mut self, clean: bool) -> Result<()> {
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Long-lived streams end now; unary calls in flight finish normally.
        let _ = self.stopping.send(true);
        if let Some(fed) = self.fed.take() {
            fed.close_all();
        }
        if let Some(mut task) = self.task.take() {
            // In-flight calls get a grace period; a client that never lets go does not keep
            // the broker from stopping.
            match tokio::time::timeout(DRAIN_GRACE, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
                Err(_) => {
                    tracing::warn!("connections still open after the grace period; closing them");
                    // Dropping the serving loop cuts the connections it still serves.
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        if let Some(t) = self.http_task.take() {
            let _ = tokio::time::timeout(DRAIN_GRACE, t).await;
        }
        if let Some(engine) = self.engine.take() {
            // Queued and in-flight exchanges are already durable in the queue tree.
            store::blocking(move || {
                engine.shutdown_blocking();
                Ok(())
            })
            .await?;
        }
        if let Some(store) = self.store.take() {
            // Tasks that were ending (streams, blocking calls) still hold handles for a moment;
            // wait for them, so that dropping ours releases the data dir for a restart.
            let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
            while store.handles() > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if store.handles() > 1 {
                tracing::warn!(
                    handles = store.handles(),
                    "storage still in use at shutdown"
                );
            }
            // The last handle: flushing and dropping it on a blocking thread joins the flusher.
            store::blocking(move || {
                if clean {
                    store.end_run_blocking()?;
                } else {
                    store.flush_blocking()?;
                }
                drop(store);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Waits until the server ends (it does only once shutdown has begun).
    pub async fn wait(&mut self) -> Result<()> {
        if let Some(task) = self.task.as_mut() {
            if let Err(e) = task.await {
                return Err(BrokerError::internal(format!("server task: {e}")));
            }
            self.task = None;
        }
        Ok(())
    }
}
