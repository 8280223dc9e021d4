//! The command line: global options and the command tree (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use govshare_client::enums::ProtoEnum;
use govshare_client::proto::{DemandState, Filter, NodeRole, ShareType};
use prost_types::Timestamp;

use super::parse::{parse_since, parse_timeout, parse_where};

const CATALOG_PUBLISH_EXAMPLES: &str = "\
Examples:
  govshare --identity ./hrss catalog publish deploy/examples/pension-status.json
  govshare --identity ./mca catalog publish deploy/examples/death-registration.toml

The file uses the proto's field names (code, name, description, share_type, share_condition,
open_type, update_cycle, tags, items[] with name, type, description, share_type, sensitive, mask).
Enums are names, short or full, any case: CONDITIONAL or SHARE_TYPE_CONDITIONAL. Unknown keys are
an error. The provider is always you, so `provider` and `id` in the file are ignored; the output of
`catalog show ID --json` can be edited and published again as a new version.

  {\"code\": \"pension-status\", \"name\": \"城乡居民养老保险待遇发放\",
   \"share_type\": \"CONDITIONAL\", \"open_type\": \"NOT_OPEN\", \"update_cycle\": \"DAILY\",
   \"tags\": [\"social-security\"],
   \"items\": [{\"name\": \"id_number\", \"type\": \"string\", \"sensitive\": true, \"mask\": \"keep:6,4\"},
             {\"name\": \"status\", \"type\": \"string\"}]}";

const DEMAND_FILE_EXAMPLES: &str = "\
Examples:
  govshare --identity ./mca demand file --dataset 330000/hrss/pension-status \\
      --fields id_number,status --purpose \"最低生活保障资格核验\" \\
      --legal-basis \"社会救助暂行办法 第十一条\" --days 365

  # In a script: file, then keep the demand id.
  id=$(govshare --json demand file --dataset 330000/mca/death-registration \\
      --fields id_number,death_date --purpose \"pension eligibility\" | jq -r .id)

An UNCONDITIONAL dataset is granted at once (the grant id is printed), a NOT_SHARED one is refused
at once with the reason, and a CONDITIONAL one stays PENDING until its provider decides
(see `demand show ID`).";

/// govshare's command-line client: nodes, catalog, demands, grants, audit and exchanges.
///
/// Talks to a govshare broker over mutual TLS as the node whose identity directory is given
/// (node.pem, node.key, ca.pem). Times are shown in RFC 3339 at UTC+8. Errors print as
/// `error: CODE: message` with exit status 1; usage errors exit with 2.
#[derive(Debug, Parser)]
#[command(name = "govshare", version, propagate_version = true)]
pub(crate) struct Cli {
    /// The broker's URL.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "GOVSHARE_BROKER",
        default_value = govshare_client::DEFAULT_BROKER_URL,
        value_name = "URL"
    )]
    pub(crate) broker: String,

    /// Identity directory holding node.pem, node.key and ca.pem (required to talk to the broker).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "GOVSHARE_IDENTITY",
        value_name = "DIR"
    )]
    pub(crate) identity: Option<PathBuf>,

    /// Print JSON for scripts instead of tables (objects carry `id`; lists are arrays).
    #[arg(long, global = true, help_heading = "Global options")]
    pub(crate) json: bool,

    /// Print only ids, one per line, of what the command creates, shows or lists (for `demand
    /// approve`, the grant's id), e.g. DEMAND=$(govshare -q demand file ...).
    #[arg(
        short,
        long,
        global = true,
        help_heading = "Global options",
        conflicts_with = "json"
    )]
    pub(crate) quiet: bool,

    /// Deadline of each call, e.g. 10s, 500ms [default: 10s]; for `exchange request|submit` also the exchange's deadline.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub(crate) timeout: Option<Duration>,

    /// The name the broker's certificate carries, when it is not the URL's host.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "GOVSHARE_TLS_SERVER_NAME",
        value_name = "NAME",
        hide_short_help = true
    )]
    pub(crate) tls_server_name: Option<String>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The long help of `serve`.
const SERVE_HELP: &str = "Serve your datasets as a provider.

Opens the broker's Serve stream and answers each request pushed to it, until Ctrl-C.
With --from-file, rows come from a JSON-lines file (one JSON object per line): a row
matches when every filter item equals its value. With --exec, the command runs once per
request, gets the query as one JSON object on stdin
  {\"exchange_id\", \"dataset_id\", \"consumer\", \"purpose\", \"filters\": {ITEM: VALUE},
   \"fields\": [...], \"limit\": N}
and writes the rows as JSON lines on stdout; a non-zero exit answers with an error.
The broker cuts every answer to the consumer's grant and applies the catalog's masks.
If the stream breaks, serve reconnects with backoff (unless --once).

Examples:
  govshare serve --dataset 330000/hrss/pension-status --from-file deploy/examples/pension-rows.jsonl
  govshare serve --dataset 330000/hrss/pension-status --exec ./lookup.sh";

/// `serve`'s options.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A dataset to serve (repeatable); none means all of yours.
    #[arg(long = "dataset", value_name = "ID")]
    pub(crate) datasets: Vec<String>,
    /// Answer from this JSON-lines file (one object per row).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "exec",
        required_unless_present = "exec"
    )]
    pub(crate) from_file: Option<std::path::PathBuf>,
    /// Answer by running this shell command once per request (query JSON on stdin, rows as JSON lines on stdout).
    #[arg(long, value_name = "CMD")]
    pub(crate) exec: Option<String>,
    /// Requests this instance holds at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub(crate) max_in_flight: u32,
    /// A label for this instance in the broker's logs.
    #[arg(long, value_name = "NAME")]
    pub(crate) instance: Option<String>,
    /// Exit when the stream ends instead of reconnecting.
    #[arg(long)]
    pub(crate) once: bool,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show who the broker thinks you are, from your certificate.
    Whoami,
    /// Register, list, show, suspend and resume nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Publish, search, show and withdraw datasets in the catalog.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// File, list and decide demands (requests for access to datasets).
    #[command(subcommand)]
    Demand(DemandCmd),
    /// List, show and revoke grants (access approved for a consumer).
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Ask providers for rows under a grant, and take the results.
    #[command(subcommand)]
    Exchange(ExchangeCmd),
    /// List, replay and purge dead-lettered exchanges (admin).
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Show the broker's status, federation links and queues (admin).
    Status,
    /// Serve your datasets as a provider: answer queries from a JSON-lines file or a command.
    #[command(long_about = SERVE_HELP)]
    Serve(ServeArgs),
}

/// A node role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// A department's system.
    Department,
    /// An operator.
    Admin,
    /// A broker that links to this one.
    Broker,
}

impl From<RoleArg> for NodeRole {
    fn from(r: RoleArg) -> NodeRole {
        match r {
            RoleArg::Department => NodeRole::Department,
            RoleArg::Admin => NodeRole::Admin,
            RoleArg::Broker => NodeRole::Broker,
        }
    }
}

/// `node ...`
#[derive(Debug, Subcommand)]
pub(crate) enum NodeCmd {
    /// Register a node so that certificates naming it may act (admin).
    Register {
        /// The node id, REGION/NAME, e.g. 330000/hrss.
        #[arg(long, value_name = "ID")]
        id: String,
        /// The display name, e.g. 浙江省人力资源和社会保障厅.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The node's role.
        #[arg(long, value_enum, default_value_t = RoleArg::Department)]
        role: RoleArg,
        /// The 18-character unified social credit code (a bad check digit is a warning).
        #[arg(long, value_name = "CODE")]
        credit_code: Option<String>,
        /// How to reach the people responsible.
        #[arg(long, value_name = "TEXT")]
        contact: Option<String>,
    },
    /// List registered nodes (admin).
    List {
        /// Only nodes whose id starts with this region prefix, e.g. 33 or 3301.
        #[arg(long, value_name = "PREFIX")]
        region: Option<String>,
    },
    /// Show one node.
    Show {
        /// The node id.
        id: String,
    },
    /// Suspend a node: its certificates are refused until it is resumed (admin).
    Suspend {
        /// The node id.
        id: String,
        /// Why, recorded in the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Resume a suspended node (admin).
    Resume {
        /// The node id.
        id: String,
    },
    /// Accept only this certificate for a node from now on; every other certificate naming it
    /// (the old, perhaps stolen, one) is refused. Its grants stay. Issue the new identity first:
    /// `govshare-broker issue --data-dir DATA --node ID --out NEWDIR`, then
    /// `govshare node pin-cert ID --cert NEWDIR/node.pem` (admin).
    PinCert {
        /// The node id.
        id: String,
        /// The new certificate (PEM), e.g. NEWDIR/node.pem.
        #[arg(long, value_name = "FILE")]
        cert: std::path::PathBuf,
        /// Why, recorded in the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

fn parse_share_type(s: &str) -> Result<ShareType, String> {
    ShareType::parse_name(s)
}

fn parse_demand_state(s: &str) -> Result<DemandState, String> {
    DemandState::parse_name(s)
}

fn parse_since_now(s: &str) -> Result<Timestamp, String> {
    parse_since(s, time::OffsetDateTime::now_utc())
}

/// `catalog ...`
#[derive(Debug, Subcommand)]
pub(crate) enum CatalogCmd {
    /// Publish one of your datasets (or a new version) from a JSON or TOML file.
    #[command(after_long_help = CATALOG_PUBLISH_EXAMPLES)]
    Publish {
        /// The dataset file, *.json or *.toml.
        file: PathBuf,
    },
    /// Search the catalog by text and filters.
    Search {
        /// Text in the name or description (two characters or more).
        text: Option<String>,
        /// Only datasets of this provider node.
        #[arg(long, value_name = "NODE")]
        provider: Option<String>,
        /// Only providers whose region code starts with this prefix, e.g. 3301.
        #[arg(long, value_name = "PREFIX")]
        region: Option<String>,
        /// Only datasets with this tag.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Only datasets of this share type (UNCONDITIONAL, CONDITIONAL, NOT_SHARED).
        #[arg(long, value_name = "TYPE", value_parser = parse_share_type)]
        share_type: Option<ShareType>,
        /// Show at most this many datasets.
        #[arg(long, value_name = "N", default_value_t = 50, conflicts_with = "all")]
        limit: usize,
        /// Show every match, following all pages.
        #[arg(long)]
        all: bool,
        /// Include withdrawn datasets.
        #[arg(long)]
        include_withdrawn: bool,
    },
    /// Show one dataset and its information items.
    Show {
        /// The dataset id, PROVIDER_NODE/CODE.
        id: String,
    },
    /// Withdraw one of your datasets: no new demands, and it leaves search results.
    Withdraw {
        /// The dataset id.
        id: String,
        /// Why, recorded in the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

/// `demand ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DemandCmd {
    /// File a demand for a dataset; prints its id and state, and the grant if granted at once.
    #[command(after_long_help = DEMAND_FILE_EXAMPLES)]
    File {
        /// The dataset wanted, PROVIDER_NODE/CODE.
        #[arg(long, value_name = "ID")]
        dataset: String,
        /// The information items wanted, comma-separated.
        #[arg(long, value_name = "A,B", value_delimiter = ',', required = true)]
        fields: Vec<String>,
        /// What the data will be used for.
        #[arg(long, value_name = "TEXT")]
        purpose: String,
        /// The law or policy that allows the use.
        #[arg(long, value_name = "TEXT")]
        legal_basis: Option<String>,
        /// Days of access wanted [default: the broker's, 365].
        #[arg(long, value_name = "N")]
        days: Option<u32>,
    },
    /// List your demands, or those on your datasets (--incoming), or all (--all, admin).
    List {
        /// Demands on your datasets, for you to decide.
        #[arg(long, conflicts_with = "all")]
        incoming: bool,
        /// Only pending demands past their response deadline.
        #[arg(long)]
        overdue: bool,
        /// Every demand on the broker (admin).
        #[arg(long)]
        all: bool,
        /// Only demands in this state (PENDING, APPROVED, REJECTED, WITHDRAWN).
        #[arg(long, value_name = "STATE", value_parser = parse_demand_state)]
        state: Option<DemandState>,
    },
    /// Show one demand.
    Show {
        /// The demand id.
        id: String,
    },
    /// Approve a pending demand on one of your datasets, issuing a grant.
    Approve {
        /// The demand id.
        id: String,
        /// Narrow the grant to these items (comma-separated, a subset of the demand's).
        #[arg(long, value_name = "A,B", value_delimiter = ',')]
        fields: Vec<String>,
        /// Narrow the period to this many days (at most the demand's).
        #[arg(long, value_name = "N")]
        days: Option<u32>,
        /// Most exchanges per day under the grant [default: unlimited].
        #[arg(long, value_name = "N")]
        quota: Option<u64>,
        /// A note recorded with the decision.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Reject a pending demand on one of your datasets.
    Reject {
        /// The demand id.
        id: String,
        /// Why; the consumer sees it.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Withdraw one of your own pending demands.
    Withdraw {
        /// The demand id.
        id: String,
    },
}

/// `grant ...`
#[derive(Debug, Subcommand)]
pub(crate) enum GrantCmd {
    /// List the grants you hold, or those on your datasets (--issued), or all (--all, admin).
    List {
        /// Grants on your datasets.
        #[arg(long, conflicts_with = "all")]
        issued: bool,
        /// Every grant on the broker (admin).
        #[arg(long)]
        all: bool,
        /// Also list revoked and expired grants.
        #[arg(long)]
        include_inactive: bool,
        /// Only grants on this dataset.
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
    },
    /// Show one grant.
    Show {
        /// The grant id.
        id: String,
    },
    /// Revoke a grant (its provider, or an admin).
    Revoke {
        /// The grant id.
        id: String,
        /// Why, recorded with the grant and in the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

/// `audit ...`
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCmd {
    /// List audit entries, oldest first.
    List {
        /// Only entries on this dataset.
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
        /// Only entries on this grant.
        #[arg(long, value_name = "ID")]
        grant: Option<String>,
        /// Only entries on this exchange.
        #[arg(long, value_name = "ID")]
        exchange: Option<String>,
        /// Only entries at or after T: RFC 3339, a date (UTC+8), or an age such as 1h, 30m, 2d.
        #[arg(long, value_name = "T", value_parser = parse_since_now)]
        since: Option<Timestamp>,
    },
}

/// What to ask in an exchange.
#[derive(Debug, Args)]
pub(crate) struct ExchangeArgs {
    /// The dataset asked, PROVIDER_NODE/CODE.
    #[arg(long, value_name = "ID")]
    pub(crate) dataset: String,
    /// An equality filter, ITEM=VALUE (text); repeat for AND. Typed: ITEM:int=42, ITEM:bool=true, ITEM:double=1.5, ITEM:null.
    #[arg(long = "where", value_name = "ITEM=VALUE", value_parser = parse_where, required = true)]
    pub(crate) filters: Vec<Filter>,
    /// The items wanted in each row, comma-separated [default: all the grant covers].
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub(crate) fields: Vec<String>,
    /// The grant to ask under [default: your active grant on the dataset].
    #[arg(long, value_name = "ID")]
    pub(crate) grant: Option<String>,
    /// Most rows wanted [default: the broker's maximum].
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u32>,
    /// A key that makes a repeated ask return the first exchange [default: a fresh one].
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
    /// A W3C trace id (32 hex digits) [default: the broker assigns one].
    #[arg(long, value_name = "HEX")]
    pub(crate) trace_id: Option<String>,
}

/// `exchange ...`
#[derive(Debug, Subcommand)]
pub(crate) enum ExchangeCmd {
    /// Ask and wait for rows (up to --timeout); exit status 1 if the exchange ends without rows.
    Request(ExchangeArgs),
    /// Ask without waiting; prints the exchange id (take the result with `exchange get`).
    Submit(ExchangeArgs),
    /// Show an exchange's state or result; exit status 1 if it ended without rows.
    Get {
        /// The exchange id.
        id: String,
        /// Wait until it ends (or --timeout passes).
        #[arg(long)]
        wait: bool,
        /// Show the signed receipts of every broker on the path.
        #[arg(long)]
        trail: bool,
    },
    /// Acknowledge taken results, so that the broker may forget them.
    Ack {
        /// The exchange ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

/// `dlq ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
    /// List dead-lettered exchanges, newest first (admin).
    List {
        /// Only this dataset's.
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
    },
    /// Put a dead-lettered exchange back on its queue with fresh deliveries (admin).
    Replay {
        /// The exchange id.
        id: String,
    },
    /// Delete dead letters, all or one dataset's; their consumers are told (admin).
    Purge {
        /// Only this dataset's.
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exchange_request_takes_repeated_where_and_timeout_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "govshare",
            "exchange",
            "request",
            "--dataset",
            "330000/hrss/pension-status",
            "--where",
            "id_number=330102199001011234",
            "--where",
            "month=2026-10",
            "--fields",
            "status,month",
            "--timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_secs(5)));
        let Command::Exchange(ExchangeCmd::Request(a)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(a.filters.len(), 2);
        assert_eq!(a.fields, ["status", "month"]);
    }

    #[test]
    fn quiet_is_global_and_excludes_json() {
        for args in [
            &["govshare", "-q", "demand", "list"][..],
            &["govshare", "demand", "list", "--quiet"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.quiet && !cli.json, "{args:?}");
        }
        let err = Cli::try_parse_from(["govshare", "-q", "--json", "grant", "list"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["govshare", "--timeout", "10", "whoami"][..],
            &["govshare", "catalog", "search", "--share-type", "sometimes"],
            &["govshare", "demand", "list", "--incoming", "--all"],
            &[
                "govshare",
                "exchange",
                "request",
                "--dataset",
                "d",
                "--where",
                "x",
            ],
            &["govshare", "demand", "reject", "d1"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let cli = Cli::try_parse_from([
            "govshare",
            "catalog",
            "search",
            "--share-type",
            "not_shared",
        ])
        .unwrap();
        let Command::Catalog(CatalogCmd::Search { share_type, .. }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(share_type, Some(ShareType::NotShared));
    }
}
