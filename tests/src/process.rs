//! The real `govshare-broker` binary as a child process, for tests where a crash must be real.

use crate::bin_path;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A broker process serving a data dir.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its stderr log file (printed by [`BrokerProcess::log`] when a test fails).
    pub log: PathBuf,
}

impl BrokerProcess {
    /// Starts `govshare-broker run` on `127.0.0.1:0` and waits until it prints its address.
    pub async fn start(data_dir: &Path, log: &Path) -> Result<Self> {
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = Command::new(bin_path("govshare-broker")?)
            .arg("run")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logfile))
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next_line().await? else {
                bail!(
                    "broker exited before listening; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            };
            if let Some(rest) = line.split("listening on https://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr
                    .parse()
                    .with_context(|| format!("address in {line:?}"))?;
            }
        };
        // Keep draining stdout so the broker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            addr,
            log: log.to_path_buf(),
        })
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Kills it with SIGKILL, as a power cut would, and reaps it.
    pub async fn kill9(mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Stops it with SIGTERM and returns its exit code.
    pub async fn term(mut self) -> Result<Option<i32>> {
        self.signal("TERM").await?;
        Ok(self.child.wait().await?.code())
    }

    /// Waits (at most `timeout`) for it to exit by itself; returns its exit code.
    pub async fn exited(mut self, timeout: std::time::Duration) -> Result<Option<i32>> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => bail!("the broker did not exit within {timeout:?}"),
        }
    }

    /// Sends SIGHUP (reload the TLS identity and trust bundle).
    pub async fn hangup(&self) -> Result<()> {
        self.signal("HUP").await
    }

    /// Sends the signal `name` (`TERM`, `HUP`) with kill(1).
    async fn signal(&self, name: &str) -> Result<()> {
        let pid = self.child.id().context("already exited")?;
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .await?;
        if !ok.success() {
            bail!("kill -{name} {pid} failed");
        }
        Ok(())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A broker data dir for `330000/hub` with a development PKI, and the path of its log file,
/// both under `tmp`: what a test of the real binary starts from.
pub fn hub_data_dir(tmp: &Path) -> Result<(PathBuf, PathBuf)> {
    let data = tmp.join("data");
    govshare_broker::pki::init_data_dir(&govshare_broker::pki::InitOptions {
        data_dir: data.clone(),
        broker_id: "330000/hub".into(),
        ..Default::default()
    })?;
    Ok((data, tmp.join("broker.log")))
}

/// Passes `outcome` on; when it failed, prints the broker log at `log` first, for the reader.
pub fn with_log_on_failure<T>(outcome: Result<T>, log: &Path) -> Result<T> {
    if outcome.is_err() {
        eprintln!(
            "---- broker log ----\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    outcome
}
