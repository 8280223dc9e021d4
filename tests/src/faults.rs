//! A TCP fault proxy for tests: it sits between two parties (a child broker and its parent,
//! or a node and its broker) and can pass traffic, delay it, black-hole it (connections stay
//! open, nothing moves), or reset every connection, on command and mid-stream. And a small
//! tmpfs, for a broker whose disk fills.

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk after this delay.
    Delay(Duration),
    /// Accept connections and hold them, forwarding nothing (a partition).
    Blackhole,
}

/// A running proxy; dropped, it stops.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<Fault>,
    /// Bumped to reset every open connection.
    epoch: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.epoch.send_modify(|e| *e += 1);
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port toward `target`, passing traffic.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Fault::Pass);
        let (epoch, epoch_rx) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let (mode, epoch) = (mode_rx.clone(), epoch_rx.clone());
                tokio::spawn(async move {
                    let _ = relay(client, target, mode, epoch).await;
                });
            }
        });
        Ok(Self {
            addr,
            mode,
            epoch,
            connections,
            task,
        })
    }

    /// The URL of the proxied broker.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Changes what happens to traffic, for open connections too.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Resets every open connection (new ones are accepted as the mode says).
    pub fn reset_all(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<Fault>,
    mut epoch: watch::Receiver<u64>,
) -> Result<()> {
    epoch.borrow_and_update();
    let server = TcpStream::connect(target).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        // Dropping both halves of both sockets resets the connection mid-stream.
        _ = epoch.changed() => {}
    }
    Ok(())
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
) -> Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Fault::Pass => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                // Hold the bytes until the partition heals (or the connection is reset).
                Fault::Blackhole => mode.changed().await?,
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// A small tmpfs: a disk that fills, for a broker's database. Unmounted (lazily, so that a
/// broker still holding files cannot stop it) when dropped, even when the test fails.
#[derive(Debug)]
pub struct Tmpfs {
    /// The mount point.
    path: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `path` (made if missing). Mounting needs root
    /// (CAP_SYS_ADMIN): without it, None after a loud skip message naming `test`, or an error
    /// when `GOVSHARE_REQUIRE_EXTERNAL=1`.
    pub fn mount_at(path: &std::path::Path, mib: u64, test: &str) -> Result<Option<Self>> {
        use std::io::Write;
        std::fs::create_dir_all(path)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => {
                return Ok(Some(Self {
                    path: path.to_path_buf(),
                }))
            }
            Ok(o) => format!(
                "`mount -t tmpfs` failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("cannot run `mount`: {e}"),
        };
        let why = format!("{why}; this test mounts a small tmpfs and must run as root");
        if std::env::var("GOVSHARE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            anyhow::bail!("{test}: {why}; GOVSHARE_REQUIRE_EXTERNAL=1 makes this a failure");
        }
        let bar = "=".repeat(100);
        // Straight to the process's stderr: the harness captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\nSKIPPED {test}: {why}.\n\
             Set GOVSHARE_REQUIRE_EXTERNAL=1 to make this a failure (CI does).\n{bar}\n"
        );
        Ok(None)
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Grows (or shrinks) the filesystem in place: space returns without touching its files.
    pub fn resize(&self, mib: u64) -> Result<()> {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m"), "tmpfs"])
            .arg(&self.path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "remount of {} failed: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
