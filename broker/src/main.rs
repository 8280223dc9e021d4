//! `govshare-broker`: initialise a data dir, issue identities, run the broker, verify the audit
//! log, probe a broker's health.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use govshare_broker::{audit, config::Config, pki, server};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The data directory used when none is given.
const DEFAULT_DATA_DIR: &str = "./govshare-data";
/// The broker id used when `govshare-broker` initialises a data dir by itself.
const DEFAULT_BROKER_ID: &str = "000000/broker";

/// govshare broker: routes supply-demand requests and data exchanges between government
/// departments over mutual TLS. With no command, runs with ./govshare-data (or
/// $GOVSHARE_DATA_DIR), initialising it on first start as broker 000000/broker.
#[derive(Debug, Parser)]
#[command(name = "govshare-broker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data dir: config.toml, a development CA, the broker's identity and an admin identity (DIR/admin).
    Init(InitArgs),
    /// Write a new node identity (node.pem, node.key, ca.pem) signed by the data dir's CA. Safe while the broker runs.
    Issue(IssueArgs),
    /// Serve gRPC over mutual TLS with all state in the database under the data dir.
    Run(RunArgs),
    /// Re-issue the broker's own TLS certificate and key from the data dir's CA, keeping its
    /// names. Safe while the broker runs: it loads them within [tls] reload_check_secs, or at
    /// once on SIGHUP, without dropping a connection.
    RenewTls(RenewTlsArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Convert the database of a data dir written by a govshare from before 2026-11-29 (sled)
    /// to the current storage, in place, with the broker stopped; the old files are kept
    /// beside it as DB.sled-old.
    MigrateStorage {
        /// The data directory.
        #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Probe a broker's gRPC health service over mutual TLS: prints SERVING or NOT_SERVING; exit
    /// 0 only when serving, 1 when not serving, 2 when the broker cannot be asked (for container
    /// health checks, Kubernetes exec probes and scripts).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// The broker's URL, https://HOST:PORT.
    #[arg(
        long,
        env = "GOVSHARE_BROKER",
        value_name = "URL",
        default_value = "https://127.0.0.1:7443"
    )]
    broker: String,
    /// An identity directory (node.pem, node.key, ca.pem) whose certificate the broker trusts,
    /// e.g. DATA_DIR/admin. Health needs no registered node, only a certificate from the CA.
    #[arg(long, env = "GOVSHARE_IDENTITY", value_name = "DIR")]
    identity: PathBuf,
    /// The service to ask about: "" for the whole broker; govshare.v1.FederationService is
    /// NOT_SERVING while a child broker's link to its parent is down.
    #[arg(long, value_name = "NAME", default_value = "")]
    service: String,
    /// How long to wait for the connection and the answer, e.g. 5s, 500ms.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// The name the broker's certificate carries, when it is not the URL's host.
    #[arg(long, env = "GOVSHARE_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The data directory to create.
    #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// This broker's node id, REGION/NAME (e.g. 330000/hub).
    #[arg(long)]
    id: String,
    /// Another DNS name or IP address for the broker's certificate (besides localhost, 127.0.0.1, ::1). Repeatable.
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// The listen address to write into config.toml.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The admin identity's node id (default: REGION/admin).
    #[arg(long, value_name = "ID")]
    admin_id: Option<String>,
    /// The parent broker's address, e.g. https://10.0.0.1:7443: this broker links to it and
    /// routes what it does not reach upwards. Without it the broker is a root (the national hub,
    /// or standalone). Needs --parent-identity.
    #[arg(long, value_name = "URL", requires = "parent_identity")]
    parent: Option<String>,
    /// The identity the parent issued for this broker's link, made on the parent with
    /// `govshare-broker issue --node ID --role broker --out DIR`; copied into DATA_DIR/link.
    /// Needs --parent.
    #[arg(long, value_name = "DIR", requires = "parent")]
    parent_identity: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// The data directory whose CA signs.
    #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The node id the identity is for, REGION/NAME.
    #[arg(long)]
    node: String,
    /// The node's role.
    #[arg(long, default_value = "department", value_parser = ["department", "admin", "broker"])]
    role: String,
    /// Where to write node.pem, node.key and ca.pem.
    #[arg(long, value_name = "OUTDIR")]
    out: PathBuf,
    /// A node-id prefix the child broker may claim (e.g. 3301, or 000000/mca for a ministry).
    /// Repeatable. Default: its region prefix, e.g. 33 for 330000/hub. Only for --role broker.
    #[arg(long = "scope", value_name = "PREFIX")]
    scope: Vec<String>,
}

#[derive(Debug, Args)]
struct RenewTlsArgs {
    /// The data directory whose certificate is renewed (its CA signs).
    #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Another DNS name or IP address for the new certificate, besides the current ones. Repeatable.
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The data directory (made by `init`).
    #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Listen address, overriding [broker] listen in config.toml.
    #[arg(long, env = "GOVSHARE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of /metrics, /status and the console (plain HTTP), overriding [metrics] listen; "" turns them off.
    #[arg(long, env = "GOVSHARE_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// The parent broker's URL (https://HOST:PORT), overriding [federation] parent; "" makes this broker a root.
    #[arg(long, env = "GOVSHARE_PARENT", value_name = "URL")]
    parent: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the audit hash chain offline (the broker must be stopped); names the first entry that does not verify.
    Verify {
        /// The data directory.
        #[arg(long, env = "GOVSHARE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// mimalloc instead of the system allocator: prost, tonic and storage allocate many small,
/// short-lived buffers per exchange, and glibc's malloc was a fifth of the broker's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Some(Command::Init(a)) => {
            let broker_id = a.id.clone();
            let report = pki::init_data_dir(&pki::InitOptions {
                data_dir: a.data_dir.clone(),
                broker_id: a.id,
                sans: a.sans,
                listen: a.listen,
                admin_id: a.admin_id,
                parent: a.parent.clone(),
                parent_identity: a.parent_identity,
            })?;
            println!("initialised {}", a.data_dir.display());
            println!("  config:         {}", report.config_path.display());
            println!(
                "  admin identity: {} (node {})",
                report.admin_dir.display(),
                report.admin_id
            );
            if let (Some(parent), Some(link)) = (&a.parent, &report.link_dir) {
                println!("  link identity:  {}", link.display());
                println!("broker {broker_id} will link to the parent {parent} when it runs");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Issue(a)) => {
            let role = pki::parse_role(&a.role)?;
            pki::issue_identity(&a.data_dir, &a.node, role, &a.out, &a.scope)?;
            println!(
                "wrote {} identity for {} to {} (node.pem, node.key, ca.pem)",
                a.role,
                a.node,
                a.out.display()
            );
            if role == govshare_proto::v1::NodeRole::Broker {
                let scope = if a.scope.is_empty() {
                    govshare_broker::ids::NodeId::parse(&a.node, "--node")
                        .map(|n| pki::default_scope(&n))?
                } else {
                    a.scope.clone()
                };
                println!(
                    "  scope (node-id prefixes it may claim): {}",
                    scope.join(", ")
                );
                println!(
                    "on the child: govshare-broker init --data-dir CHILD --id {} --parent https://THIS_HOST:PORT --parent-identity {}",
                    a.node,
                    a.out.display()
                );
            }
            if role == govshare_proto::v1::NodeRole::Department {
                println!(
                    "register it before use: govshare --identity {}/admin node register --id {} --name NAME",
                    a.data_dir.display(),
                    a.node
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::RenewTls(a)) => {
            let sans = pki::renew_server_identity(&a.data_dir, &a.sans)?;
            println!(
                "renewed the broker certificate in {} for {}",
                a.data_dir.display(),
                sans.join(", ")
            );
            println!("a running broker loads it within [tls] reload_check_secs; `kill -HUP PID` loads it now");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Run(a)) => run(&a.data_dir, a.listen, a.metrics_listen, a.parent, false),
        None => {
            // The zero-argument start still honours the same environment as `run`.
            let data_dir = std::env::var_os("GOVSHARE_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            let listen = match std::env::var("GOVSHARE_LISTEN") {
                Ok(v) => Some(v.parse::<SocketAddr>().with_context(|| {
                    format!("GOVSHARE_LISTEN={v:?} is not an address like 127.0.0.1:7443")
                })?),
                Err(_) => None,
            };
            let metrics = std::env::var("GOVSHARE_METRICS_LISTEN").ok();
            let parent = std::env::var("GOVSHARE_PARENT").ok();
            run(&data_dir, listen, metrics, parent, true)
        }
        Some(Command::Audit(AuditCommand::Verify { data_dir })) => audit_verify(&data_dir),
        Some(Command::MigrateStorage { data_dir }) => {
            let cfg = Config::load(&data_dir)?;
            let path = cfg.path(&cfg.storage.path);
            let m = govshare_broker::store::migrate_from_sled(&path)
                .with_context(|| format!("converting {}", path.display()))?;
            println!(
                "converted {}: {} records; the old sled files are kept at {} (delete them once the broker runs well)",
                path.display(),
                m.records,
                m.kept_at.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Health(a)) => Ok(health(&a)),
    }
}

/// Parses a duration such as `5s`, `500ms` or `1m` (units ms, s, m).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}: use e.g. 5s, 500ms, 1m"))?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("bad duration {text:?}: use e.g. 5s, 500ms, 1m")),
    };
    if d.is_zero() {
        return Err(format!("bad duration {text:?}: must be above zero"));
    }
    Ok(d)
}

/// `govshare-broker health`: exit 0 when serving, 1 when not, 2 when the broker cannot be asked.
fn health(a: &HealthArgs) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let what = if a.service.is_empty() {
        "the broker".to_string()
    } else {
        format!("service {}", a.service)
    };
    match rt.block_on(async { tokio::time::timeout(a.timeout, health_check(a)).await }) {
        Ok(Ok(status)) => {
            use tonic_health::pb::health_check_response::ServingStatus;
            let name = status.as_str_name();
            println!("{name}");
            if status == ServingStatus::Serving {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("{} reports {what} as {name}", a.broker);
                std::process::ExitCode::from(1)
            }
        }
        Ok(Err(e)) => {
            eprintln!(
                "error: cannot check the health of {what} at {}: {e:#}",
                a.broker
            );
            std::process::ExitCode::from(2)
        }
        Err(_) => {
            eprintln!(
                "error: cannot check the health of {what} at {}: no answer within {:?}",
                a.broker, a.timeout
            );
            std::process::ExitCode::from(2)
        }
    }
}

/// Asks the broker's `grpc.health.v1.Health/Check` over mutual TLS.
async fn health_check(
    a: &HealthArgs,
) -> anyhow::Result<tonic_health::pb::health_check_response::ServingStatus> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};
    let read = |name: &str| {
        let p = a.identity.join(name);
        std::fs::read(&p).with_context(|| {
            format!(
                "cannot read {} (--identity must be a directory with {}, {} and {})",
                p.display(),
                pki::NODE_CERT,
                pki::NODE_KEY,
                pki::CA_CERT
            )
        })
    };
    let cert = read(pki::NODE_CERT)?;
    let key = read(pki::NODE_KEY)?;
    let ca = read(pki::CA_CERT)?;
    let uri: Uri = a.broker.parse().with_context(|| {
        format!(
            "--broker {:?} is not a URL like https://HOST:7443",
            a.broker
        )
    })?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        bail!("--broker {:?} must be a URL like https://HOST:7443 (the broker speaks mutual TLS only)", a.broker);
    }
    let host = a
        .tls_server_name
        .clone()
        .or_else(|| {
            uri.host()
                .map(|h| h.trim_matches(|c| c == '[' || c == ']').to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(host);
    let channel = Endpoint::from(uri)
        .tls_config(tls)
        .context("TLS setup")?
        .connect_timeout(a.timeout)
        .timeout(a.timeout)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connect: {}", error_chain(&e)))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: a.service.clone(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => anyhow::anyhow!(
                "the broker has no service {:?} (use \"\" for the whole broker, or a govshare.v1 service such as govshare.v1.FederationService)",
                a.service
            ),
            _ => anyhow::anyhow!("health check failed: {:?}: {}", s.code(), s.message()),
        })?;
    Ok(resp.into_inner().status())
}

/// An error and its sources, joined by ": " (tonic's transport errors hide the cause otherwise).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

fn audit_verify(data_dir: &Path) -> anyhow::Result<std::process::ExitCode> {
    let cfg = Config::load(data_dir)?;
    use govshare_broker::store::{self, T};
    let db = store::open_offline(&cfg.path(&cfg.storage.path)).context(
        "cannot open the database (stop the broker first: audit verify reads it offline)",
    )?;
    let tree = db.tree(T::Audit as usize);
    // A run that did not stop cleanly may have lost entries it never got to the disk; the
    // broker records them when it next starts, and until then they are shown, not failed.
    let unclean_from = db
        .tree(T::Meta as usize)
        .get(store::RUNNING)?
        .and_then(|m| store::run_start(&m));
    match audit::verify(&tree, unclean_from)? {
        audit::VerifyOutcome::Ok(n) => {
            println!("audit chain OK: {n} entries verified");
            Ok(std::process::ExitCode::SUCCESS)
        }
        audit::VerifyOutcome::OkWithLosses { entries, losses } => {
            println!(
                "audit chain OK: {entries} entries verified, {} gap(s) of lost entries",
                losses.len()
            );
            for loss in losses {
                println!("  {loss}");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        audit::VerifyOutcome::Broken { seq, reason } => {
            println!("audit chain BROKEN at entry {seq}: {reason}");
            Ok(std::process::ExitCode::from(3))
        }
    }
}

fn run(
    data_dir: &Path,
    listen: Option<SocketAddr>,
    metrics_listen: Option<String>,
    parent: Option<String>,
    auto_init: bool,
) -> anyhow::Result<std::process::ExitCode> {
    if auto_init && !data_dir.join(govshare_broker::config::CONFIG_FILE).exists() {
        let report = pki::init_data_dir(&pki::InitOptions {
            data_dir: data_dir.to_path_buf(),
            broker_id: DEFAULT_BROKER_ID.into(),
            ..pki::InitOptions::default()
        })?;
        println!(
            "first start: initialised {} (broker {DEFAULT_BROKER_ID}, config {})",
            data_dir.display(),
            report.config_path.display()
        );
    }
    let mut cfg = Config::load(data_dir)?;
    if let Some(l) = listen {
        cfg.broker.listen = l;
    }
    if let Some(m) = metrics_listen {
        cfg.metrics.listen = m;
        cfg.validate()?;
    }
    if let Some(p) = parent {
        cfg.federation.parent = p;
        cfg.validate()?;
    }
    if cfg.federation.has_parent() {
        let link = cfg.path(&cfg.federation.identity);
        for f in [pki::NODE_CERT, pki::NODE_KEY, pki::CA_CERT] {
            if !link.join(f).is_file() {
                bail!(
                    "[federation] parent is {} but {} is missing: issue a link identity on the parent with `govshare-broker issue --node {} --role broker --out DIR` and copy node.pem, node.key and ca.pem into {}",
                    cfg.federation.parent,
                    link.join(f).display(),
                    cfg.broker.id,
                    link.display()
                );
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Logs, and OTLP span export when [log] otlp_endpoint is set (its gRPC channel lives on
    // `rt`). Declared after `rt`, so it is dropped first: the buffered spans go out on exit.
    let telemetry = {
        let _in_rt = rt.enter();
        govshare_broker::telemetry::init(&cfg.log)?
    };
    let outcome = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.broker.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.broker.listen))?;
        let admin_dir = data_dir.join("admin");
        let broker_id = cfg.broker.id.clone();
        let admin_id = cfg.broker.admin_id.clone();
        let parent = cfg.federation.parent.clone();
        // Listen for signals before announcing ourselves, so that a SIGTERM sent as soon as
        // the address is printed is a graceful stop and not the default kill.
        let signal = shutdown_signal()?;
        tokio::pin!(signal);
        let mut hangups = Hangups::install()?;
        let mut broker = server::start(cfg, listener).await?;
        let mut storage = broker.storage_failure_watch();
        println!(
            "govshare broker {broker_id} listening on https://{} (mutual TLS)",
            broker.local_addr
        );
        println!(
            "admin identity ({admin_id}): {}  e.g. govshare --broker https://{} --identity {} whoami",
            admin_dir.display(),
            broker.local_addr,
            admin_dir.display()
        );
        if !parent.is_empty() {
            println!("parent broker: {parent} (this broker links to it and routes upwards what it does not reach)");
        }
        if let Some(m) = broker.metrics_addr {
            println!("metrics, status and console: http://{m}/metrics  http://{m}/status  http://{m}/");
        }
        let stopped = loop {
            tokio::select! {
                r = broker.wait() => { r?; bail!("the server stopped unexpectedly") }
                s = &mut signal => break s,
                failed = storage.wait_for(Option::is_some) => {
                    // After a storage I/O error what reached the disk is not known; only a new
                    // process, replaying the log, recovers (see `store::Failure`). Exit
                    // non-zero, so a supervisor restarts us.
                    let why = match failed {
                        Ok(v) => v.clone().unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    // No graceful shutdown: nothing more can be made durable, and the index in
                    // memory may hold writes that never reached the disk, so nothing may run on
                    // them.
                    eprintln!("error: {why}");
                    println!("storage failed: exiting with 1 to be restarted");
                    // A moment for calls already failing to get their UNAVAILABLE (naming the
                    // disk) instead of a cut connection; everything new is refused meanwhile.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    std::process::exit(1);
                }
                _ = hangups.next() => {
                    // Errors are logged and counted inside; the old identity keeps serving.
                    if let Ok(changed) = broker.reload_tls() {
                        println!("SIGHUP: TLS identity and trust bundle {}", if changed { "reloaded" } else { "unchanged" });
                    }
                }
            }
        };
        println!("{stopped}: shutting down (finishing in-flight calls, flushing)");
        broker.shutdown().await?;
        println!("stopped cleanly");
        Ok(std::process::ExitCode::SUCCESS)
    });
    // Spans out first (their exporter runs on `rt`), then the runtime, without waiting for
    // ever on a blocking thread stuck in a failed disk.
    drop(telemetry);
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    outcome
}

/// SIGHUP, the conventional "reload your certificates" signal.
struct Hangups {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Hangups {
    /// Installs the handler now, so a SIGHUP right after start is a reload and not a kill.
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot handle SIGHUP")?,
        })
    }

    /// Resolves at the next SIGHUP (never, where there are no signals).
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            if self.hup.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}

/// Installs SIGINT and SIGTERM handlers now; the future resolves with the one that came.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

/// Installs the interrupt handler now; the future resolves when it comes.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        "interrupt"
    })
}
