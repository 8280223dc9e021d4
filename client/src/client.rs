//! [`Client`]: one mutually authenticated channel to a broker, and a typed method per RPC.

use std::future::Future;
use std::time::Duration;

use govshare_proto::v1::admin_service_client::AdminServiceClient;
use govshare_proto::v1::audit_service_client::AuditServiceClient;
use govshare_proto::v1::catalog_service_client::CatalogServiceClient;
use govshare_proto::v1::exchange_service_client::ExchangeServiceClient;
use govshare_proto::v1::node_service_client::NodeServiceClient;
use govshare_proto::v1::sharing_service_client::SharingServiceClient;
use govshare_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

use crate::config::ClientConfig;
use crate::error::{error_chain, ClientError, Result};
use crate::identity::Identity;

/// Largest message the client accepts (exchange results can carry many rows).
pub const MAX_DECODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// First pause before retrying an `UNAVAILABLE` call; doubled on each retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How many pages a `*_all` helper follows before it gives up (a broker bug guard).
const MAX_PAGES: usize = 100_000;

/// Installs rustls' ring crypto provider as the process default, once; later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A connection to one broker, as one node. Cheap to clone: clones share the channel.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    url: String,
    timeout: Duration,
    retries: u32,
}

/// Runs a unary RPC on one of the generated clients, with deadline and retries.
macro_rules! unary {
    ($self:ident, $raw:ident, $method:ident, $req:expr) => {
        $self
            .unary($req, |r| {
                let mut c = $self.$raw();
                async move { c.$method(r).await }
            })
            .await
    };
}

impl Client {
    /// Loads the identity from `cfg.identity_dir` and connects, failing now if the broker cannot be reached.
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let identity = Identity::load(&cfg.identity_dir)?;
        Client::connect_with_identity(cfg, identity).await
    }

    /// Connects with an identity already loaded (`cfg.identity_dir` is ignored).
    pub async fn connect_with_identity(cfg: ClientConfig, identity: Identity) -> Result<Client> {
        let endpoint = endpoint(&cfg, &identity)?;
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 0;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if attempt < cfg.retries && is_transient_connect_error(&e) => {
                    attempt += 1;
                    tracing::debug!(url = %cfg.broker_url, attempt, error = %error_chain(&e), "connect failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    return Err(ClientError::Connect {
                        url: cfg.broker_url.clone(),
                        reason: describe_connect_error(&e, &cfg),
                    })
                }
            }
        };
        Ok(Client::from_channel(channel, &cfg))
    }

    /// Builds a client that dials on first use; connection failures then surface as `UNAVAILABLE` from the first call.
    pub fn connect_lazy(cfg: ClientConfig, identity: Identity) -> Result<Client> {
        let endpoint = endpoint(&cfg, &identity)?;
        Ok(Client::from_channel(endpoint.connect_lazy(), &cfg))
    }

    /// Wraps an existing channel (for example one with custom layers), with `cfg`'s deadline and retries.
    pub fn from_channel(channel: Channel, cfg: &ClientConfig) -> Client {
        Client {
            channel,
            url: cfg.broker_url.clone(),
            timeout: cfg.timeout,
            retries: cfg.retries,
        }
    }

    /// A client sharing this one's channel, with another per-call deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The broker URL this client dials.
    pub fn broker_url(&self) -> &str {
        &self.url
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The underlying tonic channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The generated NodeService client on this channel.
    pub fn raw_nodes(&self) -> NodeServiceClient<Channel> {
        NodeServiceClient::new(self.channel.clone())
    }

    /// The generated CatalogService client on this channel.
    pub fn raw_catalog(&self) -> CatalogServiceClient<Channel> {
        CatalogServiceClient::new(self.channel.clone())
    }

    /// The generated SharingService client on this channel.
    pub fn raw_sharing(&self) -> SharingServiceClient<Channel> {
        SharingServiceClient::new(self.channel.clone())
    }

    /// The generated AdminService client on this channel.
    pub fn raw_admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// The generated AuditService client on this channel.
    pub fn raw_audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    /// The generated ExchangeService client on this channel (accepting messages up to 16 MiB).
    pub fn raw_exchange(&self) -> ExchangeServiceClient<Channel> {
        ExchangeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
    }

    /// A request carrying the per-call deadline.
    fn with_deadline<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Runs one unary call, retrying `UNAVAILABLE` with exponential backoff.
    async fn unary<Req, Resp, F, Fut>(&self, msg: Req, mut call: F) -> Result<Resp>
    where
        Req: Clone,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 0;
        let mut resent = false;
        loop {
            match call(self.with_deadline(msg.clone())).await {
                Ok(resp) => return Ok(resp.into_inner()),
                // The connection closed before the call left (a broker closing it as idle just as
                // the call was made): the broker never saw it, so sending it again on a fresh
                // connection is safe whatever the call, and is not one of the configured retries.
                Err(status) if !resent && never_sent(&status) => {
                    resent = true;
                    tracing::debug!(status = %status, "connection closed before the call was sent; sending it again");
                }
                Err(status) if status.code() == Code::Unavailable && attempt < self.retries => {
                    attempt += 1;
                    tracing::debug!(attempt, status = %status, "broker unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(status) => return Err(ClientError::Status(self.deadline_status(status))),
            }
        }
    }

    /// Makes transport failures readable. tonic reports its own client-side deadline as
    /// `CANCELLED: Timeout expired`, which gRPC calls `DEADLINE_EXCEEDED`; and a broker that
    /// refuses the client certificate shows up only as a closed connection on the first call.
    fn deadline_status(&self, status: tonic::Status) -> tonic::Status {
        if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
            return tonic::Status::deadline_exceeded(format!(
                "no answer from the broker within {:?} (the call's deadline)",
                self.timeout
            ));
        }
        if std::error::Error::source(&status).is_none() {
            // The broker's own answer.
            return status;
        }
        let text = crate::error::status_message(&status);
        let lower = text.to_ascii_lowercase();
        let hint = if lower.contains("fatal alert") || lower.contains("broken pipe") {
            "the broker probably refused this node's certificate (node.pem): is it issued by the CA the broker trusts, and still valid?"
        } else {
            return status;
        };
        tonic::Status::new(status.code(), format!("{text} ({hint})"))
    }

    // ----- NodeService -----

    /// Registers a node (admin only); the response carries non-fatal warnings such as a bad credit-code check digit.
    pub async fn register_node(&self, req: RegisterNodeRequest) -> Result<RegisterNodeResponse> {
        unary!(self, raw_nodes, register_node, req)
    }

    /// Returns one registered node.
    pub async fn get_node(&self, id: impl Into<String>) -> Result<Node> {
        unary!(self, raw_nodes, get_node, GetNodeRequest { id: id.into() })
    }

    /// Returns one page of nodes (admin only).
    pub async fn list_nodes(&self, req: ListNodesRequest) -> Result<ListNodesResponse> {
        unary!(self, raw_nodes, list_nodes, req)
    }

    /// Returns every node whose id starts with `region_prefix` (empty: all), following pages (admin only).
    pub async fn list_all_nodes(&self, region_prefix: impl Into<String>) -> Result<Vec<Node>> {
        let base = ListNodesRequest {
            region_prefix: region_prefix.into(),
            ..Default::default()
        };
        paged(None, |token| {
            let req = ListNodesRequest {
                page_token: token,
                ..base.clone()
            };
            async move {
                let page = self.list_nodes(req).await?;
                Ok((page.nodes, page.next_page_token))
            }
        })
        .await
    }

    /// Suspends a node (admin only); the reason goes to the audit log.
    pub async fn suspend_node(
        &self,
        id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Node> {
        let req = SuspendNodeRequest {
            id: id.into(),
            reason: reason.into(),
        };
        unary!(self, raw_nodes, suspend_node, req)
    }

    /// Accepts only this certificate (PEM) for node `id` from now on: every other certificate
    /// naming it is refused, its grants stay (admin only). For a re-issued identity.
    pub async fn pin_certificate(
        &self,
        id: impl Into<String>,
        certificate_pem: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Node> {
        let req = PinCertificateRequest {
            id: id.into(),
            certificate_pem: certificate_pem.into(),
            reason: reason.into(),
        };
        unary!(self, raw_nodes, pin_certificate, req)
    }

    /// Resumes a suspended node (admin only).
    pub async fn resume_node(&self, id: impl Into<String>) -> Result<Node> {
        unary!(
            self,
            raw_nodes,
            resume_node,
            ResumeNodeRequest { id: id.into() }
        )
    }

    /// Who the broker thinks the caller is, from its certificate.
    pub async fn whoami(&self) -> Result<WhoAmIResponse> {
        unary!(self, raw_nodes, who_am_i, WhoAmIRequest {})
    }

    /// The brokers' public signing keys known to this broker (to verify hop receipts).
    pub async fn broker_keys(&self) -> Result<Vec<KeyAnnouncement>> {
        let r: ListBrokerKeysResponse =
            unary!(self, raw_nodes, list_broker_keys, ListBrokerKeysRequest {})?;
        Ok(r.keys)
    }

    /// Verifies the signed hop receipts of an exchange's result with the brokers' keys;
    /// answers how many receipts verified.
    pub async fn verify_trail(&self, result: &ExchangeResult) -> Result<usize> {
        let keys = self.broker_keys().await?;
        crate::trail::verify(&result.exchange_id, &result.trail, &keys)
            .map_err(|reason| ClientError::Protocol { reason })?;
        Ok(result.trail.len())
    }

    // ----- CatalogService -----

    /// Publishes a dataset (or a new version); the broker sets id, provider, version, state and times.
    pub async fn publish_dataset(&self, dataset: Dataset) -> Result<PublishDatasetResponse> {
        let req = PublishDatasetRequest {
            dataset: Some(dataset),
        };
        unary!(self, raw_catalog, publish_dataset, req)
    }

    /// Withdraws one of the caller's datasets.
    pub async fn withdraw_dataset(
        &self,
        id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Dataset> {
        let req = WithdrawDatasetRequest {
            id: id.into(),
            reason: reason.into(),
        };
        unary!(self, raw_catalog, withdraw_dataset, req)
    }

    /// Returns one dataset by id (withdrawn ones included).
    pub async fn get_dataset(&self, id: impl Into<String>) -> Result<Dataset> {
        unary!(
            self,
            raw_catalog,
            get_dataset,
            GetDatasetRequest { id: id.into() }
        )
    }

    /// Returns one page of a catalog search.
    pub async fn search_datasets(
        &self,
        req: SearchDatasetsRequest,
    ) -> Result<SearchDatasetsResponse> {
        unary!(self, raw_catalog, search_datasets, req)
    }

    /// Follows a search's pages, stopping after `limit` datasets when given.
    pub async fn search_all_datasets(
        &self,
        req: SearchDatasetsRequest,
        limit: Option<usize>,
    ) -> Result<Vec<Dataset>> {
        paged(limit, |token| {
            let req = SearchDatasetsRequest {
                page_token: token,
                ..req.clone()
            };
            async move {
                let page = self.search_datasets(req).await?;
                Ok((page.datasets, page.next_page_token))
            }
        })
        .await
    }

    // ----- SharingService -----

    /// Files a demand as the caller; UNCONDITIONAL datasets come back granted, NOT_SHARED ones rejected.
    pub async fn file_demand(&self, req: FileDemandRequest) -> Result<FileDemandResponse> {
        unary!(self, raw_sharing, file_demand, req)
    }

    /// Returns one demand.
    pub async fn get_demand(&self, id: impl Into<String>) -> Result<Demand> {
        unary!(
            self,
            raw_sharing,
            get_demand,
            GetDemandRequest { id: id.into() }
        )
    }

    /// Returns one page of demands.
    pub async fn list_demands(&self, req: ListDemandsRequest) -> Result<ListDemandsResponse> {
        unary!(self, raw_sharing, list_demands, req)
    }

    /// Returns every demand matching `req`, following pages.
    pub async fn list_all_demands(&self, req: ListDemandsRequest) -> Result<Vec<Demand>> {
        paged(None, |token| {
            let req = ListDemandsRequest {
                page_token: token,
                ..req.clone()
            };
            async move {
                let page = self.list_demands(req).await?;
                Ok((page.demands, page.next_page_token))
            }
        })
        .await
    }

    /// Approves a pending demand on one of the caller's datasets and returns the grant.
    pub async fn approve_demand(&self, req: ApproveDemandRequest) -> Result<ApproveDemandResponse> {
        unary!(self, raw_sharing, approve_demand, req)
    }

    /// Rejects a pending demand on one of the caller's datasets.
    pub async fn reject_demand(
        &self,
        id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Demand> {
        let req = RejectDemandRequest {
            id: id.into(),
            reason: reason.into(),
        };
        unary!(self, raw_sharing, reject_demand, req)
    }

    /// Withdraws one of the caller's pending demands.
    pub async fn withdraw_demand(&self, id: impl Into<String>) -> Result<Demand> {
        unary!(
            self,
            raw_sharing,
            withdraw_demand,
            WithdrawDemandRequest { id: id.into() }
        )
    }

    /// Returns one grant.
    pub async fn get_grant(&self, id: impl Into<String>) -> Result<Grant> {
        unary!(
            self,
            raw_sharing,
            get_grant,
            GetGrantRequest { id: id.into() }
        )
    }

    /// Returns one page of grants.
    pub async fn list_grants(&self, req: ListGrantsRequest) -> Result<ListGrantsResponse> {
        unary!(self, raw_sharing, list_grants, req)
    }

    /// Returns every grant matching `req`, following pages.
    pub async fn list_all_grants(&self, req: ListGrantsRequest) -> Result<Vec<Grant>> {
        paged(None, |token| {
            let req = ListGrantsRequest {
                page_token: token,
                ..req.clone()
            };
            async move {
                let page = self.list_grants(req).await?;
                Ok((page.grants, page.next_page_token))
            }
        })
        .await
    }

    /// Revokes a grant (its provider or an admin).
    pub async fn revoke_grant(
        &self,
        id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Grant> {
        let req = RevokeGrantRequest {
            id: id.into(),
            reason: reason.into(),
        };
        unary!(self, raw_sharing, revoke_grant, req)
    }

    // ----- AdminService -----

    /// The broker's identity, uptime, links and counts (admin only).
    pub async fn broker_status(&self) -> Result<BrokerStatus> {
        unary!(
            self,
            raw_admin,
            get_broker_status,
            GetBrokerStatusRequest {}
        )
    }

    /// Queue depth per destination (admin only).
    pub async fn list_queues(&self) -> Result<ListQueuesResponse> {
        unary!(self, raw_admin, list_queues, ListQueuesRequest {})
    }

    /// Returns one page of dead letters, newest first (admin only).
    pub async fn list_dead_letters(
        &self,
        req: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse> {
        unary!(self, raw_admin, list_dead_letters, req)
    }

    /// Returns every dead letter (of one dataset when `dataset_id` is not empty), following pages.
    pub async fn list_all_dead_letters(
        &self,
        dataset_id: impl Into<String>,
    ) -> Result<Vec<DeadLetter>> {
        let base = ListDeadLettersRequest {
            dataset_id: dataset_id.into(),
            ..Default::default()
        };
        paged(None, |token| {
            let req = ListDeadLettersRequest {
                page_token: token,
                ..base.clone()
            };
            async move {
                let page = self.list_dead_letters(req).await?;
                Ok((page.dead_letters, page.next_page_token))
            }
        })
        .await
    }

    /// Puts a dead-lettered exchange back on its queue (admin only).
    pub async fn replay_dead_letter(
        &self,
        exchange_id: impl Into<String>,
    ) -> Result<ReplayDeadLetterResponse> {
        let req = ReplayDeadLetterRequest {
            exchange_id: exchange_id.into(),
        };
        unary!(self, raw_admin, replay_dead_letter, req)
    }

    /// Deletes dead letters, all or one dataset's (admin only).
    pub async fn purge_dead_letters(
        &self,
        dataset_id: impl Into<String>,
    ) -> Result<PurgeDeadLettersResponse> {
        let req = PurgeDeadLettersRequest {
            dataset_id: dataset_id.into(),
        };
        unary!(self, raw_admin, purge_dead_letters, req)
    }

    // ----- AuditService -----

    /// Returns one page of audit entries, oldest first.
    pub async fn list_audit(&self, req: ListAuditRequest) -> Result<ListAuditResponse> {
        unary!(self, raw_audit, list_audit, req)
    }

    /// Returns every audit entry matching `req`, following pages.
    pub async fn list_all_audit(&self, req: ListAuditRequest) -> Result<Vec<AuditEntry>> {
        paged(None, |token| {
            let req = ListAuditRequest {
                page_token: token,
                ..req.clone()
            };
            async move {
                let page = self.list_audit(req).await?;
                Ok((page.entries, page.next_page_token))
            }
        })
        .await
    }

    // ----- ExchangeService -----

    /// Asks and waits for rows within the per-call deadline. An empty idempotency key is filled
    /// with a fresh one, so that a retry after `UNAVAILABLE` cannot ask twice.
    pub async fn request(&self, mut req: ExchangeRequest) -> Result<ExchangeResult> {
        fill_idempotency_key(&mut req);
        unary!(self, raw_exchange, request, req)
    }

    /// Submits without waiting; the answer comes once the exchange is durable. An empty
    /// idempotency key is filled with a fresh one, so that retries return the first exchange.
    pub async fn submit(&self, mut req: ExchangeRequest) -> Result<SubmitResponse> {
        fill_idempotency_key(&mut req);
        unary!(self, raw_exchange, submit, req)
    }

    /// Returns the state or result of one of the caller's exchanges; with `wait`, holds until it ends or the deadline.
    pub async fn get_exchange(
        &self,
        exchange_id: impl Into<String>,
        wait: bool,
    ) -> Result<ExchangeResult> {
        let req = GetExchangeRequest {
            exchange_id: exchange_id.into(),
            wait,
        };
        unary!(self, raw_exchange, get, req)
    }

    /// Streams the caller's finished, unacknowledged exchanges (of one dataset when not empty); no deadline.
    pub async fn watch(&self, dataset_id: impl Into<String>) -> Result<Streaming<ExchangeResult>> {
        let req = WatchRequest {
            dataset_id: dataset_id.into(),
        };
        let resp = self.raw_exchange().watch(req).await?;
        Ok(resp.into_inner())
    }

    /// Acknowledges taken results, so that the broker may forget them.
    pub async fn ack<I, S>(&self, exchange_ids: I) -> Result<AckResponse>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let req = AckRequest {
            exchange_ids: exchange_ids.into_iter().map(Into::into).collect(),
        };
        unary!(self, raw_exchange, ack, req)
    }

    /// Opens a provider's serving stream: send a `ServeHello` first through `outbound`, then
    /// credit and answers; read `ServeReady`, requests and heartbeats from the returned stream.
    /// Dropping the sender closes the stream. No deadline applies.
    pub async fn serve(
        &self,
        outbound: mpsc::Receiver<ProviderMessage>,
    ) -> Result<Streaming<BrokerMessage>> {
        let resp = self
            .raw_exchange()
            .serve(ReceiverStream::new(outbound))
            .await?;
        Ok(resp.into_inner())
    }
}

/// Fills an empty idempotency key with a fresh UUIDv7, which makes retrying the call safe.
fn fill_idempotency_key(req: &mut ExchangeRequest) {
    if req.idempotency_key.is_empty() {
        req.idempotency_key = uuid::Uuid::now_v7().to_string();
    }
}

/// Follows page tokens: `fetch(token)` returns a page and the next token (empty at the end).
async fn paged<T, F, Fut>(limit: Option<usize>, mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String)>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let (items, next) = fetch(token.clone()).await?;
        out.extend(items);
        if let Some(limit) = limit {
            if out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
        if next.is_empty() {
            return Ok(out);
        }
        if next == token {
            return Err(ClientError::protocol(format!(
                "the broker returned page token {next:?} twice"
            )));
        }
        token = next;
    }
    Err(ClientError::protocol(format!(
        "more than {MAX_PAGES} pages; narrow the query"
    )))
}

/// Builds the TLS endpoint for `cfg`, checking the URL.
fn endpoint(cfg: &ClientConfig, identity: &Identity) -> Result<Endpoint> {
    install_crypto_provider();
    let bad = |reason: String| ClientError::Config { reason };
    let uri: Uri = cfg
        .broker_url
        .parse()
        .map_err(|e| bad(format!("broker URL {:?} is not a URL: {e}", cfg.broker_url)))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(bad(format!(
                "broker URL {:?} is plain-text http; govshare needs mutual TLS, use https://",
                cfg.broker_url
            )))
        }
        _ => {
            return Err(bad(format!(
                "broker URL {:?} must look like https://HOST:PORT",
                cfg.broker_url
            )))
        }
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad(format!("broker URL {:?} has no host", cfg.broker_url)))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let domain = cfg.tls_server_name.as_deref().unwrap_or(host).to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(identity.tls_ca())
        .identity(identity.tls_identity())
        .domain_name(domain);
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)
        .map_err(|e| bad(format!("TLS setup failed: {}", error_chain(&e))))?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let endpoint = endpoint
        .user_agent(concat!("govshare-client/", env!("CARGO_PKG_VERSION")))
        .map_err(|e| bad(format!("user agent: {e}")))?;
    Ok(endpoint)
}

/// Whether a failed call never reached the broker: hyper cancels a request still waiting for
/// its connection when that connection closes, before any of it is written; and a request that
/// meets a connection the broker has told to go away (GOAWAY without error, as an idle
/// connection is) was not processed, by HTTP/2's own rule.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            return h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
}

/// A connect error worth retrying: the broker refused or dropped the connection (it may be starting).
fn is_transient_connect_error(err: &tonic::transport::Error) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = e.source();
    }
    false
}

/// The connect error's causes, with a hint for the usual TLS mistakes.
fn describe_connect_error(err: &tonic::transport::Error, cfg: &ClientConfig) -> String {
    let chain = error_chain(err);
    let lower = chain.to_ascii_lowercase();
    let hint = if lower.contains("unknownissuer")
        || lower.contains("unknown issuer")
        || lower.contains("badsignature")
    {
        " (the broker's certificate is not signed by the CA in ca.pem)".to_string()
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        " (the broker's certificate does not name this host; dial a name in its certificate or set the TLS server name)".to_string()
    } else if lower.contains("expired") {
        " (the broker's certificate has expired or the clock is wrong)".to_string()
    } else if chain.contains("timed out") || chain.contains("Elapsed") {
        format!(" (no answer within {:?})", cfg.connect_timeout)
    } else {
        String::new()
    };
    format!("{chain}{hint}")
}

#[cfg(test)]
mod tests {
    use super::never_sent;

    // The broker's own answers, and transport failures that may have reached the broker, are
    // not sent again outside the configured retries (hyper's "cancelled before it was sent",
    // which cannot be built here, is exercised by the idle-timeout test in tests/limits.rs).
    #[test]
    fn only_a_call_that_never_left_is_sent_again() {
        assert!(!never_sent(&tonic::Status::unavailable("broker busy")));
        assert!(!never_sent(&tonic::Status::cancelled(
            "operation was canceled"
        )));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let status = tonic::Status::from_error(Box::new(reset));
        assert!(std::error::Error::source(&status).is_some());
        assert!(!never_sent(&status));
        // A stream reset, even without error, may have been processed.
        let reset = tonic::Status::from_error(Box::new(h2::Error::from(h2::Reason::NO_ERROR)));
        assert!(std::error::Error::source(&reset).is_some());
        assert!(!never_sent(&reset));
    }
}
