//! Other languages: department systems in Python (grpcio), built from the `.proto` files as the
//! README says. A Python provider serves a dataset on its `Serve` stream, and a Python consumer
//! files a demand and exchanges through the broker over mutual TLS; the consumer keeps working
//! on the same channel after the broker ends its idle connection (GOAWAY; `limits.rs` checks the
//! frames themselves).

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{NodeRole, ShareType};
use govshare_tests::cascade::publish;
use govshare_tests::{register, wait_until, TestBroker};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long a Python program may take over one step (compiling the protos is the longest).
const STEP: Duration = Duration::from_secs(60);

/// One of the Python programs in `tests/interop`, running.
struct Python {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    name: &'static str,
}

impl Python {
    fn start(
        python: &Path,
        script: &'static str,
        args: &[&dyn AsRef<std::ffi::OsStr>],
    ) -> Result<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = tokio::process::Command::new(python);
        // Nothing written into the source tree.
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        cmd.arg(dir.join("interop").join(script))
            .arg(dir.join("../proto"));
        for a in args {
            cmd.arg(a);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {script}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            lines,
            name: script,
        })
    }

    /// The program's next line of progress.
    async fn next(&mut self) -> Result<String> {
        let name = self.name;
        match tokio::time::timeout(STEP, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("{name} ended early (its stderr is above)"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("{name} said nothing for {STEP:?}"),
        }
    }
}

/// Issues and registers a department's identity; returns its directory.
async fn department(broker: &TestBroker, node: &str) -> Result<PathBuf> {
    let dir = broker.issue(node, NodeRole::Department)?;
    register(&broker.admin().await?, node, NodeRole::Department).await?;
    Ok(dir)
}

#[tokio::test]
async fn a_python_provider_and_a_python_consumer_exchange_and_call_again_after_an_idle_close(
) -> Result<()> {
    let test = "interop::a_python_provider_and_a_python_consumer_exchange_and_call_again_after_an_idle_close";
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
    let addr = broker.addr.to_string();
    let civil = department(&broker, "330000/civil").await?;
    let ds = publish(
        &broker.connect(&civil).await?,
        "death-registration",
        ShareType::Unconditional,
    )
    .await?;
    let mut provider = Python::start(&python, "python_provider.py", &[&addr, &civil])?;
    ensure!(
        provider.next().await? == "ready 330000/hub",
        "the provider's stream was accepted"
    );

    let consumer = "330000/pension";
    let pension = department(&broker, consumer).await?;
    let mut py = Python::start(&python, "python_consumer.py", &[&addr, &pension, &ds])?;
    ensure!(py.next().await? == format!("whoami {consumer}"), "WhoAmI");
    ensure!(py.next().await?.starts_with("approved "), "the demand");
    ensure!(
        py.next().await? == "answered EXCHANGE_STATE_ANSWERED",
        "the first Request"
    );
    ensure!(
        provider.next().await?.starts_with("answered "),
        "the provider answered it"
    );
    ensure!(py.next().await?.starts_with("waiting"), "waiting");
    // Its connection falls idle and the broker ends it (GOAWAY, then the close); the provider's
    // is held open by its stream.
    wait_until(
        Duration::from_secs(20),
        "the idle connection to close",
        || async {
            Ok((broker.running().map(|b| b.connections_of(consumer)) == Some(0)).then_some(()))
        },
    )
    .await?;
    py.stdin.write_all(b"go\n").await?;
    ensure!(
        py.next().await? == "answered EXCHANGE_STATE_ANSWERED",
        "the Request after the idle close, on the same channel"
    );
    ensure!(
        provider.next().await?.starts_with("answered "),
        "the provider answered it"
    );
    let status = tokio::time::timeout(STEP, py.child.wait()).await??;
    ensure!(status.success(), "the consumer exited with {status}");
    ensure!(
        broker.running().map(|b| b.connections_of("330000/civil")) == Some(1),
        "the provider's connection outlived the idle timeout"
    );
    Ok(())
}
