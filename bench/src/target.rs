//! What a scenario drives: an in-process broker in a temp dir (the default) or an external
//! one, with provider nodes (each with its dataset), consumer nodes and the grants set up; and
//! the provider instances that answer over the `Serve` stream.

use crate::cli::IdentitiesArgs;
use anyhow::{bail, Context, Result};
use govshare_broker::pki::{self, InitOptions};
use govshare_broker::{Config, RunningBroker};
use govshare_client::proto::{
    broker_message, provider_message, value, Dataset, DemandState, FileDemandRequest, InfoItem,
    NodeRole, ProviderAnswer, ProviderMessage, RegisterNodeRequest, Row, ServeHello, ShareType,
    Value,
};
use govshare_client::{Client, ClientConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The (first) provider node of in-process runs.
const PROVIDER: &str = "330000/bench-provider";
/// `cascade`: the brokers (national hub, the consumers' province, the provider's province).
const CASCADE_HUB: &str = "000000/hub";
const CASCADE_CONSUMER_BROKER: &str = "330000/hub";
const CASCADE_PROVIDER_BROKER: &str = "440000/hub";
/// `cascade`: the (first) provider node, at the provider's province.
const CASCADE_PROVIDER: &str = "440000/bench-provider";
/// Most provider nodes (`--provider-nodes`).
pub(crate) const MAX_PROVIDER_NODES: usize = 64;
/// How long `cascade` waits for the catalog entry and the demand's decision to cross the
/// brokers (milliseconds, normally).
const CASCADE_WAIT: Duration = Duration::from_secs(30);
/// The dataset code the harness publishes.
const DATASET_CODE: &str = "bench";
/// The id number every query filters on (masked by the broker with the `id_number` rule).
pub(crate) const ID_NUMBER: &str = "330102199001011234";
/// Per-call deadline of the harness's clients.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Provider node `i` of those based on `first`: `first` itself, then `first-1`, `first-2`...
fn provider_id(first: &str, i: usize) -> String {
    if i == 0 {
        first.to_string()
    } else {
        format!("{first}-{i}")
    }
}

/// The identity dir of provider node `i` under an identities dir: `provider/`, then
/// `provider-1/`, `provider-2/`...
fn provider_dir(dir: &Path, i: usize) -> PathBuf {
    if i == 0 {
        dir.join("provider")
    } else {
        dir.join(format!("provider-{i}"))
    }
}

/// The consumer node id of index `i` for in-process runs.
fn consumer_id(i: usize) -> String {
    format!("330100/bench-c{i}")
}

/// `cascade`: the consumer node id of index `i` out of `n`, at the consumers' province.
fn cascade_consumer_id(i: usize, n: usize) -> String {
    if n == 1 {
        "330000/bench-consumer".into()
    } else {
        format!("330000/bench-consumer-{i}")
    }
}

/// A fast reconnect for in-process children: they start right after their parent.
fn quick_links(c: &mut Config) {
    c.federation.max_backoff_secs = 1;
}

/// A listener on a free loopback port. With `nodelay`, TCP_NODELAY is set on the listening
/// socket, and Linux hands it down to every accepted connection: tonic ignores
/// `Server::tcp_nodelay` when it serves a caller's listener (`serve_with_incoming`), so
/// without this each small response may wait for the peer's delayed ACK (Nagle, ~40 ms).
pub(crate) fn loopback_listener(nodelay: bool) -> Result<tokio::net::TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if nodelay {
        sock.set_nodelay(true)?;
    }
    sock.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(sock.listen(1024)?)
}

/// A broker in this process, in a temp dir.
#[derive(Debug)]
pub(crate) struct InProcess {
    /// Keeps the data dir alive.
    _dir: TempDir,
    data_dir: PathBuf,
    running: Option<RunningBroker>,
    /// Flushes and durable writes of earlier incarnations (before restarts).
    carried: (u64, u64),
    url: String,
    nodelay: bool,
}

impl InProcess {
    async fn start(nodelay: bool, tune: impl FnOnce(&mut Config)) -> Result<Self> {
        let dir = tempfile::tempdir().context("temp dir for the broker")?;
        Self::start_in(dir, "330000/hub", None, nodelay, tune).await
    }

    /// Starts broker `id` as a child of `parent`, which issues its link identity.
    async fn start_child(
        id: &str,
        parent: &InProcess,
        nodelay: bool,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let dir = tempfile::tempdir().with_context(|| format!("temp dir for broker {id}"))?;
        let link = dir.path().join("link-identity");
        pki::issue_identity(&parent.data_dir, id, NodeRole::Broker, &link, &[])
            .with_context(|| format!("issuing {id}'s link identity at its parent"))?;
        let parent = Some((parent.url.clone(), link));
        Self::start_in(dir, id, parent, nodelay, tune).await
    }

    /// Initialises broker `id` in `dir` (a child of `parent`: its URL and the link identity
    /// dir) and starts it.
    async fn start_in(
        dir: TempDir,
        id: &str,
        parent: Option<(String, PathBuf)>,
        nodelay: bool,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let data_dir = dir.path().join("data");
        let (parent, parent_identity) = parent.unzip();
        pki::init_data_dir(&InitOptions {
            data_dir: data_dir.clone(),
            broker_id: id.into(),
            sans: Vec::new(),
            listen: None,
            admin_id: None,
            parent,
            parent_identity,
        })
        .with_context(|| format!("initialising broker {id}"))?;
        let mut cfg = Config::load(&data_dir)?;
        // Metrics stay on, as in production, on a port of their own: several brokers may
        // share this machine.
        cfg.metrics.listen = "127.0.0.1:0".into();
        // The bench measures what a broker can carry; the per-node rate limit is a policy
        // (5,000 calls/s by default) that would hold the bench's one consumer node below it.
        cfg.limits.requests_per_second = 0;
        tune(&mut cfg);
        std::fs::write(data_dir.join("config.toml"), cfg.render_template())?;
        let mut b = Self {
            _dir: dir,
            data_dir,
            running: None,
            carried: (0, 0),
            url: String::new(),
            nodelay,
        };
        b.boot().await?;
        Ok(b)
    }

    async fn boot(&mut self) -> Result<()> {
        let cfg = Config::load(&self.data_dir)?;
        let listener = loopback_listener(self.nodelay)?;
        let running = govshare_broker::start(cfg, listener).await?;
        self.url = format!("https://{}", running.local_addr);
        self.running = Some(running);
        Ok(())
    }

    /// A client acting as this broker's admin (`DATA_DIR/admin`).
    async fn admin(&self) -> Result<Client> {
        connect(&self.url, &self.data_dir.join("admin")).await
    }

    /// For each (node id, dir name) in `nodes`: issues the department identity into that
    /// dir next to the data dir, registers the node and connects it.
    async fn departments(&self, admin: &Client, nodes: &[(String, String)]) -> Result<Vec<Node>> {
        let mut out = Vec::new();
        for (id, name) in nodes {
            let dir = self.data_dir.join("..").join(name);
            pki::issue_identity(&self.data_dir, id, NodeRole::Department, &dir, &[])?;
            register(admin, id).await?;
            out.push(Node {
                client: connect(&self.url, &dir).await?,
                id: id.clone(),
                identity: dir,
            });
        }
        Ok(out)
    }

    fn counts(&self) -> (u64, u64) {
        let (f, w) = self
            .running
            .as_ref()
            .map(RunningBroker::flush_counts)
            .unwrap_or((0, 0));
        (f + self.carried.0, w + self.carried.1)
    }

    /// Stops the broker; unless `clean`, its database stays marked in use, as after a crash.
    async fn stop(&mut self, clean: bool) -> Result<()> {
        if let Some(r) = self.running.take() {
            let (f, w) = r.flush_counts();
            self.carried.0 += f;
            self.carried.1 += w;
            if clean {
                r.shutdown().await?;
            } else {
                r.shutdown_as_crashed().await?;
            }
        }
        Ok(())
    }
}

/// A connected node: its client and id.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// The client, on its own connection.
    pub client: Client,
    /// Its node id.
    pub id: String,
    /// Where its identity is.
    pub identity: PathBuf,
}

/// A provider node and the dataset it publishes.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// The node.
    pub node: Node,
    /// Its dataset's id.
    pub dataset: String,
}

/// A broker with the bench's nodes, datasets and grants in place.
#[derive(Debug)]
pub(crate) struct Fixture {
    /// The in-process broker the consumers attach to, or None for an external one.
    pub broker: Option<InProcess>,
    /// `cascade`: the other in-process brokers (the national hub, the provider's province).
    pub others: Vec<InProcess>,
    /// Set-up steps timed (e.g. how long the catalog entry took to cascade), in ms.
    pub setup_ms: Vec<(&'static str, f64)>,
    /// Where the broker is.
    pub url: String,
    /// The provider nodes, each with the dataset it publishes.
    pub providers: Vec<Served>,
    /// The consumer nodes.
    pub consumers: Vec<Node>,
    /// The grants: `grants[c][p]` lets consumer `c` ask provider `p`'s dataset.
    pub grants: Vec<Vec<String>>,
    /// An admin client, when there is an admin identity.
    pub admin: Option<Client>,
    /// Describes the target for reports.
    pub target: String,
}

fn client_config(url: &str, identity: &Path) -> ClientConfig {
    ClientConfig {
        retries: 0,
        timeout: CALL_TIMEOUT,
        ..ClientConfig::new(identity).with_broker_url(url)
    }
}

async fn connect(url: &str, identity: &Path) -> Result<Client> {
    Client::connect(client_config(url, identity))
        .await
        .with_context(|| format!("connecting to {url} as {}", identity.display()))
}

/// The node id in an identity dir's certificate.
fn node_id_of(identity: &Path) -> Result<(String, NodeRole)> {
    let pem = std::fs::read(identity.join(pki::NODE_CERT))
        .with_context(|| format!("reading {}", identity.join(pki::NODE_CERT).display()))?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not PEM: {e}", identity.display()))?;
    let id = pki::identity_from_der(&p.contents)?;
    Ok((id.node_id.to_string(), id.role))
}

impl Fixture {
    /// Starts an in-process broker (config changed by `tune`) with `providers` provider nodes
    /// and `consumers` consumer nodes.
    pub(crate) async fn in_process(
        providers: usize,
        consumers: usize,
        nodelay: bool,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let broker = InProcess::start(nodelay, tune).await?;
        let url = broker.url.clone();
        let admin = broker.admin().await?;
        let mut ids: Vec<(String, String)> = (0..providers)
            .map(|i| (provider_id(PROVIDER, i), format!("provider-{i}")))
            .collect();
        ids.extend((0..consumers).map(|i| (consumer_id(i), format!("consumer-{i}"))));
        let mut nodes = broker.departments(&admin, &ids).await?;
        let provider_nodes = nodes.drain(..providers).collect();
        Self::finish(
            Some(broker),
            Vec::new(),
            url,
            provider_nodes,
            nodes,
            Some(admin),
            "in-process".into(),
        )
        .await
    }

    /// `cascade`: three in-process brokers, a national hub with two provinces linked to it;
    /// `providers` provider nodes attached to one province (440000), `consumers` consumer
    /// nodes to the other (330000). Everything the consumers do goes to their own broker, and
    /// from there through the hub to the providers'.
    /// `tune` changes each of the three brokers' config.
    pub(crate) async fn cascade(
        providers: usize,
        consumers: usize,
        nodelay: bool,
        tune: impl Fn(&mut Config),
    ) -> Result<Self> {
        let hub = InProcess::start_in(
            tempfile::tempdir().context("temp dir for the hub")?,
            CASCADE_HUB,
            None,
            nodelay,
            &tune,
        )
        .await?;
        let child = |cfg: &mut Config| {
            quick_links(cfg);
            tune(cfg);
        };
        let home = InProcess::start_child(CASCADE_CONSUMER_BROKER, &hub, nodelay, child).await?;
        let far = InProcess::start_child(CASCADE_PROVIDER_BROKER, &hub, nodelay, child).await?;
        let far_admin = far.admin().await?;
        let provider_ids: Vec<(String, String)> = (0..providers)
            .map(|i| (provider_id(CASCADE_PROVIDER, i), format!("provider-{i}")))
            .collect();
        let provider_nodes = far.departments(&far_admin, &provider_ids).await?;
        let url = home.url.clone();
        let admin = home.admin().await?;
        let ids: Vec<(String, String)> = (0..consumers)
            .map(|i| (cascade_consumer_id(i, consumers), format!("consumer-{i}")))
            .collect();
        let nodes = home.departments(&admin, &ids).await?;
        let target = format!(
            "in-process {CASCADE_CONSUMER_BROKER} -> {CASCADE_HUB} -> {CASCADE_PROVIDER_BROKER}"
        );
        Self::finish(
            Some(home),
            vec![hub, far],
            url,
            provider_nodes,
            nodes,
            Some(admin),
            target,
        )
        .await
    }

    /// Uses an external broker, with the identities under `dir` (see `--help`): `providers`
    /// provider nodes and `consumers` consumer connections.
    pub(crate) async fn external(
        url: &str,
        dir: &Path,
        providers: usize,
        consumers: usize,
    ) -> Result<Self> {
        let admin_dir = dir.join("admin");
        let admin = if admin_dir.join(pki::NODE_CERT).exists() {
            Some(connect(url, &admin_dir).await?)
        } else {
            None
        };
        let provider_dirs: Vec<PathBuf> = (0..providers)
            .map(|i| provider_dir(dir, i))
            .take_while(|d| d.join(pki::NODE_CERT).exists())
            .collect();
        let mut consumer_dirs: Vec<PathBuf> = (0..consumers)
            .map(|i| dir.join(format!("consumer-{i}")))
            .take_while(|d| d.join(pki::NODE_CERT).exists())
            .collect();
        if consumer_dirs.is_empty() && dir.join("consumer").join(pki::NODE_CERT).exists() {
            consumer_dirs.push(dir.join("consumer"));
        }
        if consumer_dirs.is_empty() || provider_dirs.is_empty() {
            bail!(
                "{} must hold provider/ and consumer/ (or consumer-0/, ...) identity dirs; \
                 `govshare-bench identities --data-dir BROKER_DATA_DIR --out {}` makes them",
                dir.display(),
                dir.display()
            );
        }
        if provider_dirs.len() < providers {
            bail!(
                "--provider-nodes {providers} needs provider/ and provider-1/ to provider-{}/ \
                 in {}, which has {} of them; `govshare-bench identities --provider-nodes \
                 {providers} --data-dir BROKER_DATA_DIR --out {}` makes them",
                providers - 1,
                dir.display(),
                provider_dirs.len(),
                dir.display()
            );
        }
        let mut nodes = Vec::new();
        for d in provider_dirs.iter().chain(consumer_dirs.iter()) {
            let (id, _) = node_id_of(d)?;
            if let Some(a) = &admin {
                register(a, &id).await?;
            }
            nodes.push(Node {
                client: connect(url, d).await?,
                id,
                identity: d.clone(),
            });
        }
        let provider_nodes: Vec<Node> = nodes.drain(..providers).collect();
        // With fewer consumer identities than asked, the same nodes take several connections.
        let have = nodes.len();
        for i in have..consumers {
            let n = nodes[i % have].clone();
            nodes.push(Node {
                client: connect(url, &n.identity).await?,
                ..n
            });
        }
        Self::finish(
            None,
            Vec::new(),
            url.to_string(),
            provider_nodes,
            nodes,
            admin,
            url.to_string(),
        )
        .await
    }

    /// Publishes each provider's dataset and files each consumer's demand for each. At one
    /// broker an UNCONDITIONAL demand is granted at once; across brokers the catalog entry
    /// must first reach the consumer's broker, and the decision comes back a moment after the
    /// demand.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        broker: Option<InProcess>,
        others: Vec<InProcess>,
        url: String,
        provider_nodes: Vec<Node>,
        consumers: Vec<Node>,
        admin: Option<Client>,
        target: String,
    ) -> Result<Self> {
        let mut setup_ms = Vec::new();
        let mut providers = Vec::new();
        for node in provider_nodes {
            let dataset = publish(&node).await?;
            let published_at = Instant::now();
            if let Some(c) = consumers.first().filter(|_| !others.is_empty()) {
                wait_for(&format!("{dataset} to reach {}'s broker", c.id), || async {
                    Ok(c.client.get_dataset(dataset.clone()).await.ok())
                })
                .await?;
                if providers.is_empty() {
                    setup_ms.push(("catalog_cascade_ms", ms(published_at.elapsed())));
                }
            }
            providers.push(Served { node, dataset });
        }
        let mut grants = Vec::new();
        // Connections of one node share its grants.
        let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
        for c in &consumers {
            if let Some(g) = by_node.get(&c.id) {
                grants.push(g.clone());
                continue;
            }
            let mut granted = Vec::new();
            for p in &providers {
                let filed_at = Instant::now();
                let r = c
                    .client
                    .file_demand(FileDemandRequest {
                        dataset_id: p.dataset.clone(),
                        fields: vec!["id_number".into(), "status".into(), "payload".into()],
                        purpose: "govshare-bench load test".into(),
                        legal_basis: "load test".into(),
                        period_days: 1,
                    })
                    .await
                    .with_context(|| format!("filing {}'s demand for {}", c.id, p.dataset))?;
                let g = match (r.grant, r.demand) {
                    (Some(g), _) => g.id,
                    (None, Some(d)) if d.state() == DemandState::Pending && !others.is_empty() => {
                        let g = approved(&c.client, &d.id).await?;
                        if by_node.is_empty() && granted.is_empty() {
                            setup_ms.push(("demand_decision_ms", ms(filed_at.elapsed())));
                        }
                        g
                    }
                    (None, d) => bail!(
                        "the UNCONDITIONAL demand was not granted at once: {:?}",
                        d.map(|d| (d.state(), d.reason))
                    ),
                };
                granted.push(g);
            }
            by_node.insert(c.id.clone(), granted.clone());
            grants.push(granted);
        }
        Ok(Self {
            broker,
            others,
            setup_ms,
            url,
            providers,
            consumers,
            grants,
            admin,
            target,
        })
    }

    /// Every (consumer, provider) pair, by index: worker `w` of a scenario takes pair
    /// `w % len`, so that the workers spread over every consumer and every provider.
    pub(crate) fn pairs(&self) -> Vec<(usize, usize)> {
        let c = self.consumers.len();
        (0..c * self.providers.len())
            .map(|i| (i % c, i / c))
            .collect()
    }

    /// The group-commit counters (flushes, durable writes) since the broker first started:
    /// in-process from the broker itself, external from its status (with an admin identity).
    /// With several in-process brokers (`cascade`), the sums over all of them.
    pub(crate) async fn flushes(&self) -> Option<(u64, u64)> {
        if let Some(b) = &self.broker {
            return Some(
                self.others
                    .iter()
                    .map(InProcess::counts)
                    .fold(b.counts(), |(f, w), (f2, w2)| (f + f2, w + w2)),
            );
        }
        let st = self.admin.as_ref()?.broker_status().await.ok()?;
        Some((st.flushes, st.durable_writes))
    }

    /// Stops the in-process broker gracefully and starts it again on the same data dir;
    /// reconnects every client. Returns (shutdown time, start time including recovery).
    /// With `unclean`, the database is then marked as in use again, as a crash leaves it.
    pub(crate) async fn restart(&mut self, unclean: bool) -> Result<(Duration, Duration)> {
        let Some(b) = self.broker.as_mut() else {
            bail!("an external broker cannot be restarted by the harness");
        };
        let t = Instant::now();
        b.stop(!unclean).await?;
        let down = t.elapsed();
        let t = Instant::now();
        b.boot().await.context("starting the broker again")?;
        let up = t.elapsed();
        self.url = b.url.clone();
        for p in &mut self.providers {
            p.node.client = connect(&self.url, &p.node.identity).await?;
        }
        for c in &mut self.consumers {
            c.client = connect(&self.url, &c.identity).await?;
        }
        Ok((down, up))
    }

    /// Stops the in-process brokers, the consumers' first and the hub last.
    pub(crate) async fn shutdown(mut self) -> Result<()> {
        if let Some(b) = self.broker.as_mut() {
            b.stop(true).await?;
        }
        for b in self.others.iter_mut().rev() {
            b.stop(true).await?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Polls `check` every 10 ms until it gives a value; fails after [`CASCADE_WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + CASCADE_WAIT;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up after {CASCADE_WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until demand `id` is decided at the provider's broker and the decision is back;
/// returns its grant.
async fn approved(client: &Client, id: &str) -> Result<String> {
    wait_for(
        &format!("the decision on demand {id} to come back"),
        || async {
            let d = client
                .get_demand(id)
                .await
                .with_context(|| format!("reading demand {id}"))?;
            match d.state() {
                DemandState::Pending => Ok(None),
                DemandState::Approved if !d.grant_id.is_empty() => Ok(Some(d.grant_id)),
                s => bail!("demand {id} ended {s:?}: {}", d.reason),
            }
        },
    )
    .await
}

/// Publishes the bench dataset as `node`; answers its id.
async fn publish(node: &Node) -> Result<String> {
    let item = |name: &str, mask: &str| InfoItem {
        name: name.into(),
        r#type: "string".into(),
        mask: mask.into(),
        ..Default::default()
    };
    let published = node
        .client
        .publish_dataset(Dataset {
            code: DATASET_CODE.into(),
            name: "govshare-bench load test rows".into(),
            description: "rows served by govshare-bench's provider".into(),
            share_type: ShareType::Unconditional as i32,
            items: vec![
                item("id_number", "id_number"),
                item("status", ""),
                item("payload", ""),
            ],
            ..Default::default()
        })
        .await
        .with_context(|| format!("publishing {}'s bench dataset", node.id))?;
    Ok(published
        .dataset
        .map(|d| d.id)
        .unwrap_or_else(|| format!("{}/{DATASET_CODE}", node.id)))
}

async fn register(admin: &Client, id: &str) -> Result<()> {
    let r = admin
        .register_node(RegisterNodeRequest {
            id: id.into(),
            name: format!("govshare-bench {id}"),
            role: NodeRole::Department as i32,
            ..Default::default()
        })
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e)
            if e.status()
                .is_some_and(|s| s.code() == tonic::Code::AlreadyExists) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("registering {id}"))),
    }
}

/// The rows every answer carries: one row of `row_bytes` bytes of item values.
pub(crate) fn answer_rows(row_bytes: usize) -> Vec<Row> {
    let text = |s: String| Value {
        kind: Some(value::Kind::StringValue(s)),
    };
    let fixed = ID_NUMBER.len() + "PAID".len();
    let fields = [
        ("id_number".to_string(), text(ID_NUMBER.to_string())),
        ("status".to_string(), text("PAID".to_string())),
        (
            "payload".to_string(),
            text("x".repeat(row_bytes.saturating_sub(fixed))),
        ),
    ];
    vec![Row {
        fields: fields.into_iter().collect(),
    }]
}

/// A provider instance answering every request with the same rows.
#[derive(Debug)]
pub(crate) struct Provider {
    task: JoinHandle<()>,
    /// Requests answered.
    pub answered: Arc<AtomicU64>,
    /// Which of the fixture's provider nodes it serves (index into `Fixture::providers`).
    pub node: usize,
}

impl Provider {
    /// Opens a serving stream for `dataset` and answers until stopped or the stream ends.
    pub(crate) async fn start(
        client: &Client,
        dataset: &str,
        max_in_flight: u32,
        label: &str,
        rows: Arc<Vec<Row>>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(max_in_flight as usize + 16);
        tx.send(ProviderMessage {
            body: Some(provider_message::Body::Hello(ServeHello {
                dataset_ids: vec![dataset.to_string()],
                max_in_flight,
                instance: label.to_string(),
            })),
        })
        .await?;
        let mut inbound = client.serve(rx).await.context("opening the Serve stream")?;
        let first = inbound
            .message()
            .await?
            .context("the Serve stream ended before ServeReady")?;
        if !matches!(first.body, Some(broker_message::Body::Ready(_))) {
            bail!("expected ServeReady, got {first:?}");
        }
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let Some(broker_message::Body::Request(req)) = m.body else {
                    continue;
                };
                // An answer returns its credit to the broker; no ServeCredit needed.
                let msg = ProviderMessage {
                    body: Some(provider_message::Body::Answer(ProviderAnswer {
                        delivery_id: req.delivery_id,
                        rows: rows.as_ref().clone(),
                        error: None,
                        truncated: false,
                    })),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self {
            task,
            answered,
            node: 0,
        })
    }

    /// Starts `n` instances for each provider node, each node's over its own connection.
    pub(crate) async fn start_many(
        fx: &Fixture,
        n: usize,
        max_in_flight: u32,
        row_bytes: usize,
    ) -> Result<Vec<Provider>> {
        let rows = Arc::new(answer_rows(row_bytes));
        let mut out = Vec::new();
        for (p, served) in fx.providers.iter().enumerate() {
            for i in 0..n {
                let mut instance = Provider::start(
                    &served.node.client,
                    &served.dataset,
                    max_in_flight,
                    &format!("bench-{p}-{i}"),
                    rows.clone(),
                )
                .await?;
                instance.node = p;
                out.push(instance);
            }
        }
        Ok(out)
    }

    /// Closes the stream.
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

/// `identities`: issues provider/ (and provider-N/), consumer-N/ with a broker's CA and copies
/// admin/.
pub(crate) fn write_identities(args: &IdentitiesArgs) -> Result<()> {
    if args.consumers == 0 || args.consumers > 1000 {
        bail!("--consumers must be 1 to 1000");
    }
    if args.provider_nodes == 0 || args.provider_nodes > MAX_PROVIDER_NODES {
        bail!("--provider-nodes must be 1 to {MAX_PROVIDER_NODES}");
    }
    for i in 0..args.provider_nodes {
        pki::issue_identity(
            &args.data_dir,
            &provider_id(PROVIDER, i),
            NodeRole::Department,
            &provider_dir(&args.out, i),
            &[],
        )?;
    }
    for i in 0..args.consumers {
        pki::issue_identity(
            &args.data_dir,
            &consumer_id(i),
            NodeRole::Department,
            &args.out.join(format!("consumer-{i}")),
            &[],
        )?;
    }
    let admin = args.data_dir.join("admin");
    if admin.join(pki::NODE_CERT).exists() {
        let to = args.out.join("admin");
        std::fs::create_dir_all(&to)?;
        for f in [pki::NODE_CERT, pki::NODE_KEY, pki::CA_CERT] {
            std::fs::copy(admin.join(f), to.join(f))
                .with_context(|| format!("copying {}", admin.join(f).display()))?;
        }
    }
    let providers = match args.provider_nodes {
        1 => "provider/".to_string(),
        n => format!("provider/, provider-1/..provider-{}/", n - 1),
    };
    println!(
        "wrote {providers} and consumer-0/..consumer-{}/ to {}{}",
        args.consumers - 1,
        args.out.display(),
        if admin.exists() {
            " with a copy of admin/ (the harness registers the nodes)"
        } else {
            "; register the nodes before use"
        }
    );
    let nodes = match args.provider_nodes {
        1 => String::new(),
        n => format!(" --provider-nodes {n}"),
    };
    println!(
        "use: govshare-bench run sync --broker https://HOST:PORT --identity {}{nodes}",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_load;
    use crate::exchange::{run, Mode};

    /// `identities` then `--broker URL --identity DIR`: a broker the harness did not start
    /// (here one in this process, reached only through its URL and the identities written),
    /// with two provider nodes, each answering part of the load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_external_broker_with_two_provider_nodes() -> Result<()> {
        let mut broker = InProcess::start(true, |_| {}).await?;
        let out = tempfile::tempdir()?;
        let ids = out.path().join("ids");
        write_identities(&IdentitiesArgs {
            data_dir: broker.data_dir.clone(),
            out: ids.clone(),
            consumers: 2,
            provider_nodes: 2,
        })?;
        for d in [
            "provider",
            "provider-1",
            "consumer-0",
            "consumer-1",
            "admin",
        ] {
            assert!(ids.join(d).join(pki::NODE_CERT).is_file(), "{d}/ written");
        }
        assert!(!ids.join("provider-2").exists());
        let (url, dir) = (broker.url.clone(), ids.display().to_string());
        let external = ["--broker", url.as_str(), "--identity", dir.as_str()];
        let mut args = external.to_vec();
        args.extend([
            "--provider-nodes",
            "2",
            "--consumers",
            "2",
            "--concurrency",
            "8",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "-q",
        ]);
        for mode in [Mode::Sync, Mode::Async] {
            let r = run(mode, &parse_load(&args)?).await?;
            assert!(r.answered > 0 && r.answered == r.sent, "{r:?}");
            assert_eq!(r.extra["provider_nodes"], 2);
            assert_eq!(r.extra["provider_answered"], r.answered);
            let by_node = r.extra["provider_answered_by_node"]
                .as_array()
                .context("per-node counts")?;
            assert_eq!(by_node.len(), 2, "{r:?}");
            assert!(
                by_node.iter().all(|n| n.as_u64().is_some_and(|n| n > 0)),
                "every provider node answered: {by_node:?}"
            );
            // admin/ was copied: the broker's flush counts are read from its status.
            assert!(r.fsyncs_per_1k.is_some(), "{r:?}");
        }
        // More provider nodes than identity dirs: refused, naming what is missing.
        let mut three = external.to_vec();
        three.extend(["--provider-nodes", "3", "--duration", "1s", "-q"]);
        let err = run(Mode::Sync, &parse_load(&three)?)
            .await
            .err()
            .context("--provider-nodes 3 with two provider dirs accepted")?;
        assert!(
            err.to_string().contains("provider-2/") && err.to_string().contains("has 2"),
            "{err:#}"
        );
        // backlog queues for one provider node.
        let mut backlog = three.clone();
        backlog.extend(["--count", "10"]);
        let err = crate::backlog::run(&parse_load(&backlog)?)
            .await
            .err()
            .context("backlog with three provider nodes accepted")?;
        assert!(err.to_string().contains("one provider node"), "{err:#}");
        broker.stop(true).await
    }
}
