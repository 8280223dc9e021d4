//! The govshare end-to-end test harness: real brokers on ephemeral ports, real mutual TLS,
//! real storage in temp dirs, and the real binaries where a process must be real.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let broker = govshare_tests::TestBroker::start().await?;
//! let hrss = broker.client_for("330000/hrss").await?;
//! let me = hrss.whoami().await?;
//! assert_eq!(me.node_id, "330000/hrss");
//! broker.shutdown().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod cascade;
pub mod faults;
pub mod load;
pub mod process;
pub mod provider;
pub mod tlsprobe;

use anyhow::{bail, Context, Result};
use govshare_broker::pki::{self, InitOptions};
use govshare_broker::{Config, RunningBroker};
use govshare_client::proto::{NodeRole, RegisterNodeRequest};
use govshare_client::{Client, ClientConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A broker running in this process on `127.0.0.1:0`, with its data dir in a temp dir.
#[derive(Debug)]
pub struct TestBroker {
    /// Keeps the temp dir alive as long as the broker.
    dir: TempDir,
    /// The broker's data dir (inside `dir`).
    pub data_dir: PathBuf,
    /// The broker's node id.
    pub id: String,
    /// Where it serves now (changes on restart).
    pub addr: SocketAddr,
    running: Option<RunningBroker>,
}

impl TestBroker {
    /// Initialises and starts a broker `330000/hub`.
    pub async fn start() -> Result<Self> {
        Self::start_with_id("330000/hub").await
    }

    /// Initialises and starts a broker with the given node id.
    pub async fn start_with_id(id: &str) -> Result<Self> {
        Self::start_with(id, |_| {}).await
    }

    /// Initialises a broker, lets `tune` change its config (saved to its config.toml, so it
    /// holds across restarts), and starts it.
    pub async fn start_with(id: &str, tune: impl FnOnce(&mut Config)) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, id, None, tune).await
    }

    /// Initialises and starts a child broker `id` linked to `parent`, with a link identity the
    /// parent issued (its scope: `scope`, or by default the child's region prefix).
    pub async fn start_child(
        id: &str,
        parent: &TestBroker,
        scope: &[&str],
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        Self::start_child_via(id, parent, &parent.url(), scope, tune).await
    }

    /// Like [`TestBroker::start_child`], but the child dials `url` (a fault proxy in front of
    /// the parent, say).
    pub async fn start_child_via(
        id: &str,
        parent: &TestBroker,
        url: &str,
        scope: &[&str],
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let link = dir.path().join("link-identity");
        let scope: Vec<String> = scope.iter().map(|s| s.to_string()).collect();
        pki::issue_identity(&parent.data_dir, id, NodeRole::Broker, &link, &scope)?;
        Self::start_in(dir, id, Some((url.to_string(), link)), tune).await
    }

    async fn start_in(
        dir: TempDir,
        id: &str,
        parent: Option<(String, PathBuf)>,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let data_dir = dir.path().join("data");
        let (parent, parent_identity) = match parent {
            Some((u, p)) => (Some(u), Some(p)),
            None => (None, None),
        };
        pki::init_data_dir(&InitOptions {
            data_dir: data_dir.clone(),
            broker_id: id.into(),
            sans: Vec::new(),
            listen: None,
            admin_id: None,
            parent,
            parent_identity,
        })?;
        let mut cfg = Config::load(&data_dir)?;
        tune(&mut cfg);
        std::fs::write(data_dir.join("config.toml"), cfg.render_template())?;
        let mut tb = Self {
            dir,
            data_dir,
            id: id.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            running: None,
        };
        tb.boot().await?;
        Ok(tb)
    }

    async fn boot(&mut self) -> Result<()> {
        log_from_env();
        let mut cfg = Config::load(&self.data_dir)?;
        // Many brokers share this machine in tests: let each metrics port be picked freely.
        cfg.metrics.listen = "127.0.0.1:0".into();
        // The same port again after a restart, so that child brokers find their parent.
        let listener = bind_again(self.addr).await?;
        let running = govshare_broker::start(cfg, listener).await?;
        self.addr = running.local_addr;
        self.running = Some(running);
        Ok(())
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The running broker, for what only the server side can do (reload its TLS files, count
    /// connections); `None` while stopped.
    pub fn running(&self) -> Option<&RunningBroker> {
        self.running.as_ref()
    }

    /// A scratch directory beside the data dir, removed with the broker.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The admin identity made by `init`.
    pub fn admin_dir(&self) -> PathBuf {
        self.data_dir.join("admin")
    }

    /// A client settings block for an identity dir, pointed at this broker.
    pub fn client_config(&self, identity_dir: &Path) -> ClientConfig {
        ClientConfig {
            retries: 0,
            timeout: Duration::from_secs(10),
            ..ClientConfig::new(identity_dir).with_broker_url(self.url())
        }
    }

    /// A client acting as the admin.
    pub async fn admin(&self) -> Result<Client> {
        Ok(Client::connect(self.client_config(&self.admin_dir())).await?)
    }

    /// Issues an identity for `node` in `role` (not registered); returns its directory.
    pub fn issue(&self, node: &str, role: NodeRole) -> Result<PathBuf> {
        let out = self.scratch(&format!("id-{}", node.replace('/', "-")));
        pki::issue_identity(&self.data_dir, node, role, &out, &[])?;
        Ok(out)
    }

    /// Issues, registers (as a department) and connects a node.
    pub async fn client_for(&self, node: &str) -> Result<Client> {
        self.client_for_role(node, NodeRole::Department).await
    }

    /// Issues, registers in `role` and connects a node.
    pub async fn client_for_role(&self, node: &str, role: NodeRole) -> Result<Client> {
        let dir = self.issue(node, role)?;
        register(&self.admin().await?, node, role).await?;
        Ok(Client::connect(self.client_config(&dir)).await?)
    }

    /// Connects with an identity dir that exists already.
    pub async fn connect(&self, identity_dir: &Path) -> Result<Client> {
        Ok(Client::connect(self.client_config(identity_dir)).await?)
    }

    /// The broker's operators' HTTP port (`/metrics`, `/status`, `/`).
    pub fn metrics_url(&self) -> Option<String> {
        self.running
            .as_ref()
            .and_then(|r| r.metrics_addr)
            .map(|a| format!("http://{a}"))
    }

    /// The broker's group-commit counters: (flushes, durability requests).
    pub fn flush_counts(&self) -> (u64, u64) {
        self.running
            .as_ref()
            .map(|r| r.flush_counts())
            .unwrap_or((0, 0))
    }

    /// Stops the broker gracefully (and promptly: no grace for clients), for tests that stop
    /// a broker under load and start it again with [`TestBroker::start_again`].
    pub async fn stop_now(&mut self) -> Result<()> {
        self.stop().await
    }

    /// Starts a stopped broker again from its data dir, on the same port.
    pub async fn start_again(&mut self) -> Result<()> {
        self.boot().await
    }

    /// Stops the broker gracefully and starts it again from the same data dir (same port).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.boot().await
    }

    /// Stops the broker, runs `offline` against its data dir (e.g. to tamper with the store),
    /// and starts it again.
    pub async fn restart_with(&mut self, offline: impl FnOnce() -> Result<()>) -> Result<()> {
        self.stop().await?;
        offline()?;
        self.boot().await
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await?;
        }
        Ok(())
    }

    /// Stops the broker gracefully.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop().await
    }
}

/// Logs to stderr when `GOVSHARE_TEST_LOG` is set (a tracing filter, e.g. `govshare_broker=debug`).
pub fn log_from_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Ok(filter) = std::env::var("GOVSHARE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

/// Binds `addr` (port 0: any free port), retrying for a while when the old listener's port is
/// not free yet.
async fn bind_again(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline => {
                let _ = e; // the old socket is still closing
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot bind {addr} again: {e}")),
        }
    }
}

/// Awaits `check` until it returns `Ok(Some(v))`, retrying every 20 ms, failing after `timeout`.
/// For conditions that become true asynchronously; never a fixed sleep.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("waiting for {what}")))
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The newest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// The path of a workspace binary (`govshare`, `govshare-broker`), building it when it is
/// missing or older than the sources it is built from: `cargo test -p govshare-tests` alone
/// does not rebuild other packages' binaries, and a stale one would test yesterday's code.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?
        .to_path_buf();
    let path = profile_dir.join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = ["proto", "broker/src", "client/src"]
        .iter()
        .filter_map(|d| newest_mtime(&root.join(d)))
        .max();
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let stale = match (built, sources) {
        (Some(bin), Some(src)) => bin < src,
        (None, _) => true,
        (Some(_), None) => false,
    };
    if stale {
        let built = BUILT.get_or_init(|| {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args([
                "build",
                "-p",
                "govshare-client",
                "-p",
                "govshare-broker",
                "--bins",
            ]);
            if release {
                cmd.arg("--release");
            }
            match cmd.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("cargo build of the binaries failed: {s}")),
                Err(e) => Err(format!("cannot run cargo to build the binaries: {e}")),
            }
        });
        if let Err(e) = built {
            bail!("{e}");
        }
    }
    if !path.exists() {
        bail!("binary {} not found", path.display());
    }
    Ok(path)
}

/// The output of a finished CLI run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Fails with both streams shown unless the command succeeded.
    pub fn ok(self) -> Result<Self> {
        if self.code != 0 {
            bail!(
                "command failed with {}\nstdout:\n{}\nstderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON:\n{}", self.stdout))
    }
}

/// Registers `node` in `role`, as the admin `admin` (its certificate is made elsewhere).
pub async fn register(admin: &Client, node: &str, role: NodeRole) -> Result<()> {
    admin
        .register_node(RegisterNodeRequest {
            id: node.into(),
            name: format!("test node {node}"),
            role: role as i32,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Runs the `govshare` CLI against a broker with an identity (off the async workers).
pub async fn govshare_cli(
    broker: &TestBroker,
    identity: &Path,
    args: &[&str],
) -> Result<CliOutput> {
    let bin = bin_path("govshare")?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--broker")
        .arg(broker.url())
        .arg("--identity")
        .arg(identity)
        .args(args)
        .env_remove("GOVSHARE_BROKER")
        .env_remove("GOVSHARE_IDENTITY");
    let out = cmd.output().await?;
    Ok(CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The path of a file under the workspace's `deploy/examples`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

/// A file under the workspace's `deploy/`.
pub fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

/// The executable `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// An outside tool a test needs (Prometheus, Chromium): its path, or None after a loud skip
/// message naming the Debian package; an error instead of the skip when
/// `GOVSHARE_REQUIRE_EXTERNAL=1` (which `.ci/run` sets after installing the packages).
pub fn external(tool: &str, package: &str, test: &str) -> Result<Option<PathBuf>> {
    if let Some(p) = on_path(tool) {
        return Ok(Some(p));
    }
    skip(
        test,
        &format!(
            "`{tool}` is not on PATH: install the Debian package `{package}` \
             (apt-get install {package})"
        ),
    )
}

/// A `python3` on PATH that imports every module in `modules`: its path, or None after a loud
/// skip message saying how to install them (`install`); an error instead of the skip when
/// `GOVSHARE_REQUIRE_EXTERNAL=1`.
pub fn python_with(modules: &[&str], install: &str, test: &str) -> Result<Option<PathBuf>> {
    let imports = format!("import {}", modules.join(", "));
    interpreter("python3", &["-c", &imports], None, install, test)
}

/// A `node` on PATH that can `require` every module in `modules` from `dir` (its
/// `node_modules`): its path, or None after a loud skip message saying how to install them;
/// an error instead of the skip when `GOVSHARE_REQUIRE_EXTERNAL=1`.
pub fn node_with(
    modules: &[&str],
    dir: &Path,
    install: &str,
    test: &str,
) -> Result<Option<PathBuf>> {
    let requires: String = modules.iter().map(|m| format!("require('{m}');")).collect();
    interpreter("node", &["-e", &requires], Some(dir), install, test)
}

/// `name` from PATH if `name CHECK...` (run in `cwd`) succeeds; otherwise the skip.
fn interpreter(
    name: &str,
    check: &[&str],
    cwd: Option<&Path>,
    install: &str,
    test: &str,
) -> Result<Option<PathBuf>> {
    let Some(path) = on_path(name) else {
        return skip(test, &format!("`{name}` is not on PATH: {install}"));
    };
    let mut cmd = Command::new(&path);
    cmd.args(check);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if out.status.success() {
        return Ok(Some(path));
    }
    // The line naming the error (Python prints it last, Node first), else the last line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let why = lines
        .iter()
        .find(|l| l.contains("Error"))
        .or(lines.last())
        .copied()
        .unwrap_or("");
    skip(
        test,
        &format!(
            "{} cannot `{}` ({why}): {install}",
            path.display(),
            check.join(" ")
        ),
    )
}

/// Skips `test` loudly for `why`, or fails it when `GOVSHARE_REQUIRE_EXTERNAL=1`.
pub fn skip<T>(test: &str, why: &str) -> Result<Option<T>> {
    use std::io::Write;
    if std::env::var("GOVSHARE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
        bail!("{test}: {why}; GOVSHARE_REQUIRE_EXTERNAL=1 makes this a failure");
    }
    let bar = "=".repeat(100);
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing
    // tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\nSKIPPED {test}: {why}.\n\
         Set GOVSHARE_REQUIRE_EXTERNAL=1 to make a missing tool fail the test (CI does).\n{bar}\n"
    );
    Ok(None)
}

/// A plain HTTP/1.1 GET against the broker's operators' port; returns (status code, body).
pub async fn http_get(base: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16)?;
            if n == 0 {
                break;
            }
            out.push_str(tail.get(..n).context("short chunk")?);
            rest = tail.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// Asserts that a call failed with gRPC `code` and a message containing `needle` (every
/// rejection path must say what to fix, so the message is part of the contract).
pub fn expect_status<T: std::fmt::Debug>(
    r: std::result::Result<T, govshare_client::ClientError>,
    code: tonic::Code,
    needle: &str,
) -> Result<()> {
    match r {
        Ok(v) => bail!("expected {code:?} naming {needle:?}, got success: {v:?}"),
        Err(e) => {
            let Some(s) = e.status().cloned() else {
                bail!("expected {code:?}, got {e}")
            };
            anyhow::ensure!(
                s.code() == code,
                "expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            anyhow::ensure!(
                s.message().contains(needle),
                "message {:?} lacks {needle:?}",
                s.message()
            );
            Ok(())
        }
    }
}
