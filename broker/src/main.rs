//! `govshare-broker`: initialise a data dir, issue identities, run the broker, verify the audit log.

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
    /// Serve gRPC over mutual TLS with all state in sled under the data dir.
    Run(RunArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
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
    }
}

fn audit_verify(data_dir: &Path) -> anyhow::Result<std::process::ExitCode> {
    let cfg = Config::load(data_dir)?;
    let db = sled::Config::new()
        .path(cfg.path(&cfg.storage.path))
        .open()
        .context(
            "cannot open the database (stop the broker first: audit verify reads it offline)",
        )?;
    let tree = db.open_tree("audit")?;
    match audit::verify(&tree)? {
        audit::VerifyOutcome::Ok(n) => {
            println!("audit chain OK: {n} entries verified");
            Ok(std::process::ExitCode::SUCCESS)
        }
        audit::VerifyOutcome::Broken { seq, reason } => {
            println!("audit chain BROKEN at entry {seq}: {reason}");
            Ok(std::process::ExitCode::from(3))
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
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
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
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
        let mut broker = server::start(cfg, listener).await?;
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
        let stopped = tokio::select! {
            r = broker.wait() => { r?; bail!("the server stopped unexpectedly") }
            s = signal => s,
        };
        println!("{stopped}: shutting down (finishing in-flight calls, flushing)");
        broker.shutdown().await?;
        println!("stopped cleanly");
        Ok(std::process::ExitCode::SUCCESS)
    })
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
