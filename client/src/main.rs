//! `govshare`: the command-line client of a govshare broker.
//!
//! Every command talks to the broker over mutual TLS as the node of `--identity DIR`.
//! gRPC errors print as `error: CODE: message` and exit with status 1; usage errors exit with 2.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use govshare_client::{Client, ClientError};

use cli::args::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(identity) = cli.identity.clone() else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--identity DIR (or GOVSHARE_IDENTITY) is required to talk to the broker; \
                 the directory holds node.pem, node.key and ca.pem",
            )
            .exit()
    };
    let cfg = cli::run::client_config(&cli, identity);
    let result = match Client::connect(cfg).await {
        Ok(client) => cli::run::run(cli, client).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            cli::output::note(&format!("error: {}", render_error(&err)));
            ExitCode::FAILURE
        }
    }
}

/// An error as one line: `CODE: message` for gRPC failures (a failed connection is `UNAVAILABLE`).
fn render_error(err: &anyhow::Error) -> String {
    match err.downcast_ref::<ClientError>() {
        Some(e @ ClientError::Connect { .. }) => format!("UNAVAILABLE: {e}"),
        Some(e) => e.to_string(),
        None => format!("{err:#}"),
    }
}
