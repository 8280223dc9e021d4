//! govshare's load and benchmark harness.
//!
//! `govshare-bench run SCENARIO` runs one scenario and prints a table; `govshare-bench
//! compare [SCENARIOS...]` runs several, interleaved over rounds, and reports medians and each
//! scenario's ratio to `echo` (the loopback ceiling: a raw tonic unary call over the same
//! mutual TLS as the broker). By default every scenario starts its own in-process broker in a
//! temp dir; `--broker URL --identity DIR` drives an external one.
//!
//! Scenarios: `echo`, `relay` (echo relayed over a provider's stream: the ceiling of a broker
//! in the middle), `sync`, `async`, `fanin`, `backlog`, `grant-check`, `cascade` (`sync`
//! across three in-process brokers: consumer at province 330000 -> national hub -> province
//! 440000 -> provider), `fsync` (the disk's own floor: one append + `fdatasync` at a time), and
//! the durable peers `redis` and `nats` (run when `redis-server` / `nats-server` are on the PATH).
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod backlog;
pub mod cli;
mod disk;
mod driver;
mod echo;
mod exchange;
pub mod grant_check;
mod peers;
mod plot;
mod relay;
mod report;
mod sys;
mod target;

use anyhow::{bail, Context, Result};
use cli::{Cli, Command, LoadArgs, OutputArgs, Scenario};
use report::{Outcome, ScenarioResult};

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    govshare_broker::server::install_crypto_provider();
    match cli.command {
        Command::Run {
            scenario,
            load,
            out,
        } => {
            load.check()?;
            let outcome = run_one(scenario, &load).await?;
            let results: Vec<ScenarioResult> = match &outcome {
                Outcome::Done(r) => vec![r.as_ref().clone()],
                Outcome::Skipped(_) => Vec::new(),
            };
            let skipped: Vec<report::Skip> = match outcome {
                Outcome::Skipped(s) => vec![s],
                Outcome::Done(_) => Vec::new(),
            };
            println!("{}", report::run_table(&results, &skipped));
            write_outputs(&out, report::run_json(&results, &skipped, &load), &results)?;
            Ok(())
        }
        Command::Compare {
            scenarios,
            rounds,
            load,
            out,
        } => {
            load.check()?;
            if rounds == 0 {
                bail!("--rounds must be at least 1");
            }
            let scenarios = if scenarios.is_empty() {
                Scenario::compare_default()
            } else {
                dedup(scenarios)
            };
            let cmp = compare(&scenarios, rounds, &load).await?;
            println!("{}", report::compare_table(&cmp));
            let last: Vec<ScenarioResult> =
                cmp.rows.iter().filter_map(|r| r.last_round()).collect();
            write_outputs(&out, report::compare_json(&cmp, &load), &last)?;
            Ok(())
        }
        Command::Identities(args) => target::write_identities(&args),
    }
}

fn dedup(v: Vec<Scenario>) -> Vec<Scenario> {
    let mut out = Vec::new();
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn write_outputs(
    out: &OutputArgs,
    json: serde_json::Value,
    plotted: &[ScenarioResult],
) -> Result<()> {
    if let Some(path) = &out.json {
        let text = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &out.plot {
        plot::draw(path, plotted)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs one scenario once.
async fn run_one(scenario: Scenario, load: &LoadArgs) -> Result<Outcome> {
    sys::reset_peak_rss();
    let r = match scenario {
        Scenario::Echo => echo::run(load).await?,
        Scenario::Relay => relay::run(load).await?,
        Scenario::Sync => exchange::run(exchange::Mode::Sync, load).await?,
        Scenario::Async => exchange::run(exchange::Mode::Async, load).await?,
        Scenario::Fanin => exchange::run(exchange::Mode::Fanin, load).await?,
        Scenario::Backlog => backlog::run(load).await?,
        Scenario::GrantCheck => grant_check::run(load)?,
        Scenario::Cascade => exchange::run(exchange::Mode::Cascade, load).await?,
        Scenario::Redis => return peers::redis(load).await,
        Scenario::Nats => return peers::nats(load).await,
        Scenario::Fsync => disk::run(load).await?,
    };
    Ok(Outcome::Done(Box::new(r)))
}

/// Runs each scenario `rounds` times, interleaved (round 1 of each, then round 2 of each...).
async fn compare(
    scenarios: &[Scenario],
    rounds: u32,
    load: &LoadArgs,
) -> Result<report::Comparison> {
    let mut cmp = report::Comparison {
        rounds,
        rows: scenarios
            .iter()
            .map(|s| report::CompareRow::new(s.name()))
            .collect(),
        skipped: Vec::new(),
    };
    for round in 1..=rounds {
        for (i, s) in scenarios.iter().enumerate() {
            if cmp.skipped.iter().any(|k| k.scenario == s.name()) {
                continue;
            }
            eprintln!("== round {round}/{rounds}: {}", s.name());
            match run_one(*s, load).await {
                Ok(Outcome::Done(r)) => cmp.rows[i].rounds.push(*r),
                Ok(Outcome::Skipped(k)) => {
                    eprintln!("skipped {}: {}", k.scenario, k.reason);
                    cmp.skipped.push(k);
                }
                Err(e) => return Err(e.context(format!("scenario {} (round {round})", s.name()))),
            }
        }
    }
    cmp.rows.retain(|r| !r.rounds.is_empty());
    Ok(cmp)
}
