//! `fsync`: the disk's own floor under every durable scenario. One writer appends a row of
//! `--row-bytes` to a file and calls `fdatasync` after each append, in a temp dir where the
//! in-process brokers keep their data (`TMPDIR`, else `/tmp`). Nothing is grouped: it is what
//! one durable write costs on this disk, and its tail is the least that an exchange waiting for
//! a flush can see. `sync` waits for two (the accept's, then the end's).

use crate::cli::LoadArgs;
use crate::driver::{OpFn, PhaseStats};
use crate::exchange::warm_and_measure;
use crate::report::ScenarioResult;
use crate::sys;
use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// One append and its `fdatasync`, on a blocking thread (as the broker's flusher does it).
async fn append(file: Arc<Mutex<File>>, row: Arc<[u8]>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let mut f = file
            .lock()
            .map_err(|_| anyhow!("an earlier append panicked"))?;
        f.write_all(&row).context("appending")?;
        f.sync_data().context("fdatasync")
    })
    .await
    .context("the append's thread")?
}

/// Runs `fsync`.
pub(crate) async fn run(load: &LoadArgs) -> Result<ScenarioResult> {
    let dir = tempfile::tempdir().with_context(|| {
        format!(
            "creating a temp dir in {} (TMPDIR)",
            std::env::temp_dir().display()
        )
    })?;
    let path = dir.path().join("log");
    let file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let file = Arc::new(Mutex::new(file));
    let row: Arc<[u8]> = vec![b'x'; load.row_bytes].into();
    // One writer: a closed loop of 1. An open loop keeps its rate, and what cannot be written
    // at once waits for the writer (and its wait counts in the latency).
    let mut one = load.clone();
    if one.rate.is_none() {
        one.concurrency = 1;
    }
    let op: OpFn = Arc::new(move |_w, _seq| Box::pin(append(file.clone(), row.clone())));
    let no_flushes = || Box::pin(async { None }) as futures::future::BoxFuture<'static, _>;
    let (warm, measured, cpu, _) = warm_and_measure("fsync", &one, op, no_flushes).await?;
    let peak = sys::peak_rss(None);
    let mut all: Vec<&PhaseStats> = warm.iter().collect();
    all.push(&measured);
    let mut r = ScenarioResult::from_phase("fsync", &one, "in-process".into(), &measured, &all);
    r.cpu_s_per_1k = cpu.and_then(|c| r.per_1k(c));
    r.peak_rss_mib = peak.map(sys::mib);
    r.fsyncs_per_1k = Some(1000.0);
    let parent = dir.path().parent().unwrap_or(dir.path());
    r.notes.push(format!(
        "one writer: append {} bytes + fdatasync, one at a time, in {} (where the in-process \
         brokers keep their data): this disk's floor for one durable write",
        load.row_bytes,
        parent.display()
    ));
    if load.broker.is_some() {
        r.notes.push(
            "fsync runs on this machine's temp dir; --broker does not apply (run it on the broker's machine)"
                .into(),
        );
    }
    Ok(r)
}
