//! Other languages: a department system in Python (grpcio), built from the `.proto` files as
//! the README says, exchanges data through the broker over mutual TLS, and keeps working on the
//! same channel after the broker ends its idle connection (GOAWAY; `limits.rs` checks the
//! frames themselves).

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{NodeRole, ShareType};
use govshare_tests::cascade::{alive_rows, publish};
use govshare_tests::provider::TestProvider;
use govshare_tests::{register, wait_until, TestBroker};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long the Python consumer may take over one step (compiling the protos is the longest).
const STEP: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_python_grpcio_consumer_exchanges_and_calls_again_after_its_idle_connection_ends(
) -> Result<()> {
    let test = "interop::a_python_grpcio_consumer_exchanges_and_calls_again_after_its_idle_connection_ends";
    let Some(python) = govshare_tests::python_with(
        &["grpc", "grpc_tools"],
        "install grpcio and grpcio-tools (python3 -m pip install grpcio grpcio-tools, or the \
         Debian packages python3-grpcio python3-grpc-tools)",
        test,
    )?
    else {
        return Ok(());
    };
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.limits.idle_timeout_secs = 1;
    })
    .await?;
    let civil = broker.client_for("330000/civil").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let _provider = TestProvider::start(&civil, &[&ds], 2, "p", alive_rows()).await?;
    let consumer = "330000/pension";
    let identity = broker.issue(consumer, NodeRole::Department)?;
    register(&broker.admin().await?, consumer, NodeRole::Department).await?;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/python_consumer.py");
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut child = tokio::process::Command::new(python)
        .arg(&script)
        .arg(&protos)
        .arg(broker.addr.to_string())
        .arg(&identity)
        .arg(&ds)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the Python consumer")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let mut next = async || -> Result<String> {
        match tokio::time::timeout(STEP, lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the Python consumer ended early (its stderr is above)"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("the Python consumer said nothing for {STEP:?}"),
        }
    };
    ensure!(next().await? == format!("whoami {consumer}"), "WhoAmI");
    ensure!(next().await?.starts_with("approved "), "the demand");
    ensure!(
        next().await? == "answered EXCHANGE_STATE_ANSWERED",
        "the first Request"
    );
    ensure!(next().await?.starts_with("waiting"), "waiting");
    // Its connection falls idle and the broker ends it (GOAWAY, then the close).
    wait_until(
        Duration::from_secs(20),
        "the idle connection to close",
        || async {
            Ok((broker.running().map(|b| b.connections_of(consumer)) == Some(0)).then_some(()))
        },
    )
    .await?;
    stdin.write_all(b"go\n").await?;
    ensure!(
        next().await? == "answered EXCHANGE_STATE_ANSWERED",
        "the Request after the idle close, on the same channel"
    );
    let status = tokio::time::timeout(STEP, child.wait()).await??;
    ensure!(status.success(), "the Python consumer exited with {status}");
    Ok(())
}
