//! The load driver: a closed loop (N operations in flight) or an open loop (a target rate,
//! latency counted from each operation's intended send time, so that a stalled system cannot
//! hide its stall: no coordinated omission), HDR latency, a per-second series, progress.

use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// One operation: given the worker index (which connection or consumer to use) and a
/// sequence number unique within the run, do one exchange end to end.
pub(crate) type OpFn = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Most operations outstanding at once in an open loop; beyond it the scheduler waits (and
/// the waiting shows in latency, since latency counts from the intended send time).
const MAX_OUTSTANDING: usize = 20_000;

/// Highest latency the histograms hold: one hour, in microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// When a phase ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Finish {
    /// Stop issuing after this long.
    Duration(Duration),
    /// Stop after issuing this many.
    Count(u64),
}

/// How one phase applies load.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// Label for progress lines.
    pub label: String,
    /// Closed loop: operations in flight. Open loop: worker indexes cycle through 0..concurrency.
    pub concurrency: usize,
    /// Open loop at this rate per second, when set.
    pub rate: Option<f64>,
    /// When the phase ends.
    pub finish: Finish,
    /// Show progress.
    pub progress: bool,
    /// The first sequence number (so that phases of one run never reuse one).
    pub first_seq: u64,
}

/// One second of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Point {
    /// Seconds since the phase began (end of the interval).
    pub t_s: f64,
    /// Operations completed in the interval, per second.
    pub throughput_per_s: f64,
    /// Median latency in the interval, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
}

/// What a phase measured.
#[derive(Debug, Clone)]
pub(crate) struct PhaseStats {
    /// Operations issued.
    pub sent: u64,
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The first failure, in full.
    pub first_error: Option<String>,
    /// From the phase's start to its last completion.
    pub elapsed: Duration,
    /// Latency of successful operations, microseconds.
    pub hist: Histogram<u64>,
    /// Per-second figures.
    pub series: Vec<Point>,
}

impl PhaseStats {
    /// Successful operations per second.
    pub(crate) fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }
}

/// A latency histogram in microseconds.
pub(crate) fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| anyhow!("histogram: {e}"))
}

struct RecInner {
    hist: Histogram<u64>,
    interval: Histogram<u64>,
    ok: u64,
    errors: u64,
    interval_ok: u64,
    first_error: Option<String>,
    last_done: Instant,
    last_tick: Instant,
    series: Vec<Point>,
}

/// Shared by every operation of a phase. A std Mutex: held for a few hundred nanoseconds to
/// record one value, never across an await.
struct Recorder {
    start: Instant,
    inner: Mutex<RecInner>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Recorder {
    fn new(start: Instant) -> Result<Self> {
        Ok(Self {
            start,
            inner: Mutex::new(RecInner {
                hist: histogram()?,
                interval: histogram()?,
                ok: 0,
                errors: 0,
                interval_ok: 0,
                first_error: None,
                last_done: start,
                last_tick: start,
                series: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self, from: Instant, r: Result<()>) {
        let now = Instant::now();
        let us = now.saturating_duration_since(from).as_micros() as u64;
        let mut g = self.lock();
        match r {
            Ok(()) => {
                g.hist.saturating_record(us.max(1));
                g.interval.saturating_record(us.max(1));
                g.ok += 1;
                g.interval_ok += 1;
            }
            Err(e) => {
                g.errors += 1;
                if g.first_error.is_none() {
                    g.first_error = Some(format!("{e:#}"));
                }
            }
        }
        g.last_done = now;
    }

    /// Closes the current interval into the series; returns (ok so far, last point).
    fn tick(&self) -> (u64, u64, Point) {
        let now = Instant::now();
        let mut g = self.lock();
        let secs = now.saturating_duration_since(g.last_tick).as_secs_f64();
        let p = Point {
            t_s: now.saturating_duration_since(self.start).as_secs_f64(),
            throughput_per_s: if secs > 0.0 {
                g.interval_ok as f64 / secs
            } else {
                0.0
            },
            p50_ms: ms(g.interval.value_at_quantile(0.5)),
            p99_ms: ms(g.interval.value_at_quantile(0.99)),
            p999_ms: ms(g.interval.value_at_quantile(0.999)),
        };
        if g.interval_ok > 0 || secs >= 0.5 {
            g.series.push(p);
        }
        g.interval.reset();
        g.interval_ok = 0;
        g.last_tick = now;
        (g.ok, g.errors, p)
    }
}

/// Progress: a bar on a terminal, a plain line per second otherwise, or nothing.
pub(crate) enum Progress {
    Bar(ProgressBar),
    Lines(String),
    Off,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Progress::Bar(_) => "Progress::Bar",
            Progress::Lines(_) => "Progress::Lines",
            Progress::Off => "Progress::Off",
        })
    }
}

impl Progress {
    /// A bar of `len` steps (seconds or operations) on a terminal, lines elsewhere.
    pub(crate) fn new(show: bool, label: &str, len: u64, unit: &str) -> Self {
        if !show {
            return Progress::Off;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(len);
            if let Ok(style) = ProgressStyle::with_template(&format!(
                "{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}"
            )) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            Progress::Bar(bar)
        } else {
            Progress::Lines(label.to_string())
        }
    }

    /// Shows the state after `elapsed`.
    pub(crate) fn update(&self, pos: u64, elapsed: Duration, msg: &str) {
        match self {
            Progress::Bar(b) => {
                b.set_position(pos);
                b.set_message(msg.to_string());
            }
            Progress::Lines(label) => {
                eprintln!("[{label}] {:>5.1}s  {msg}", elapsed.as_secs_f64());
            }
            Progress::Off => {}
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// Runs one phase of load with `op` and returns what it measured.
pub(crate) async fn drive(phase: &Phase, op: OpFn) -> Result<PhaseStats> {
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start)?);
    let issued = Arc::new(AtomicU64::new(0));
    let (len, unit) = match phase.finish {
        Finish::Duration(d) => (d.as_secs().max(1), "s"),
        Finish::Count(c) => (c, "ops"),
    };
    let progress = Progress::new(phase.progress, &phase.label, len, unit);
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (rec, done, issued) = (rec.clone(), done.clone(), issued.clone());
        let finish = phase.finish;
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            iv.tick().await;
            loop {
                iv.tick().await;
                if done.load(Ordering::Acquire) {
                    break;
                }
                let (ok, errors, p) = rec.tick();
                let elapsed = start.elapsed();
                let pos = match finish {
                    Finish::Duration(_) => elapsed.as_secs(),
                    Finish::Count(_) => issued.load(Ordering::Relaxed),
                };
                progress.update(
                    pos,
                    elapsed,
                    &format!(
                        "{ok} ok, {errors} errors, {:.0}/s, p99 {:.2} ms",
                        p.throughput_per_s, p.p99_ms
                    ),
                );
            }
            progress.finish();
        })
    };
    let deadline = match phase.finish {
        Finish::Duration(d) => Some(start + d),
        Finish::Count(_) => None,
    };
    let limit = match phase.finish {
        Finish::Count(c) => c,
        Finish::Duration(_) => u64::MAX,
    };
    match phase.rate {
        None => closed(phase, &op, &rec, &issued, deadline, limit).await,
        Some(rate) => open(phase, &op, &rec, &issued, start, rate, deadline, limit).await,
    }
    done.store(true, Ordering::Release);
    let _ = ticker.await;
    // The last partial second, so the series covers the whole phase.
    rec.tick();
    let g = rec.lock();
    Ok(PhaseStats {
        sent: issued.load(Ordering::Relaxed).min(limit),
        ok: g.ok,
        errors: g.errors,
        first_error: g.first_error.clone(),
        elapsed: g.last_done.saturating_duration_since(start),
        hist: g.hist.clone(),
        series: g.series.clone(),
    })
}

async fn closed(
    phase: &Phase,
    op: &OpFn,
    rec: &Arc<Recorder>,
    issued: &Arc<AtomicU64>,
    deadline: Option<Instant>,
    limit: u64,
) {
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..phase.concurrency {
        let (op, rec, issued) = (op.clone(), rec.clone(), issued.clone());
        let first = phase.first_seq;
        workers.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                let t0 = Instant::now();
                let r = op(w, first + n).await;
                rec.done(t0, r);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            rec.done(Instant::now(), Err(anyhow!("worker task failed: {e}")));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open(
    phase: &Phase,
    op: &OpFn,
    rec: &Arc<Recorder>,
    issued: &Arc<AtomicU64>,
    start: Instant,
    rate: f64,
    deadline: Option<Instant>,
    limit: u64,
) {
    let sem = Arc::new(Semaphore::new(MAX_OUTSTANDING));
    let pacer = Pacer {
        handle: tokio::runtime::Handle::current(),
        sem: sem.clone(),
        op: op.clone(),
        rec: rec.clone(),
        issued: issued.clone(),
        concurrency: phase.concurrency.max(1) as u64,
        first_seq: phase.first_seq,
        start,
        rate,
        deadline,
        limit,
    };
    let (paced_tx, paced) = tokio::sync::oneshot::channel();
    // The schedule is kept by a thread of its own: tokio's timer fires up to 2 ms late (it
    // counts in whole milliseconds and its workers park with millisecond timeouts), and since
    // latency counts from the intended send time, that lateness was the load generator's own,
    // reported as the broker's (an idle `echo` at 100/s showed a 2 ms median, against 0.09 ms
    // one call at a time). A thread's sleep wakes within tens of microseconds.
    let spawned = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            pacer.run();
            let _ = paced_tx.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = paced.await;
        }
        Err(e) => rec.done(
            Instant::now(),
            Err(anyhow!("cannot start the open loop's pacer thread: {e}")),
        ),
    }
    // Wait for every operation still out.
    let _ = sem.acquire_many(MAX_OUTSTANDING as u32).await;
}

/// The open loop's schedule, kept on a thread of its own (see [`open`]).
struct Pacer {
    handle: tokio::runtime::Handle,
    sem: Arc<Semaphore>,
    op: OpFn,
    rec: Arc<Recorder>,
    issued: Arc<AtomicU64>,
    concurrency: u64,
    first_seq: u64,
    start: Instant,
    rate: f64,
    deadline: Option<Instant>,
    limit: u64,
}

impl Pacer {
    /// Sends every operation at its intended time, until the deadline or the limit.
    fn run(self) {
        let mut n: u64 = 0;
        loop {
            // Everything due by now is sent now; the send times stay on the schedule.
            let due = (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1;
            while n < due {
                if n >= self.limit {
                    return;
                }
                let intended = self.start + Duration::from_secs_f64(n as f64 / self.rate);
                if self.deadline.is_some_and(|d| intended >= d) {
                    return;
                }
                let permit = match self.sem.clone().try_acquire_owned() {
                    Ok(p) => p,
                    // Beyond MAX_OUTSTANDING the schedule waits, and the wait shows in latency.
                    Err(tokio::sync::TryAcquireError::NoPermits) => {
                        match self.handle.block_on(self.sem.clone().acquire_owned()) {
                            Ok(p) => p,
                            Err(_) => return,
                        }
                    }
                    Err(tokio::sync::TryAcquireError::Closed) => return,
                };
                let (op, rec) = (self.op.clone(), self.rec.clone());
                let w = (n % self.concurrency) as usize;
                let seq = self.first_seq + n;
                self.handle.spawn(async move {
                    let r = op(w, seq).await;
                    rec.done(intended, r);
                    drop(permit);
                });
                n += 1;
                self.issued.store(n, Ordering::Relaxed);
            }
            let next = self.start + Duration::from_secs_f64(n as f64 / self.rate);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// Summarises a histogram of microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_op(calls: Arc<AtomicU64>) -> OpFn {
        Arc::new(move |_w, _s| {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            })
        })
    }

    #[tokio::test]
    async fn closed_loop_counts_every_operation() {
        let calls = Arc::new(AtomicU64::new(0));
        let phase = Phase {
            label: "t".into(),
            concurrency: 8,
            rate: None,
            finish: Finish::Count(500),
            progress: false,
            first_seq: 0,
        };
        let s = drive(&phase, counting_op(calls.clone())).await.unwrap();
        assert_eq!(s.sent, 500);
        assert_eq!(s.ok, 500);
        assert_eq!(calls.load(Ordering::Relaxed), 500);
        assert_eq!(s.hist.len(), 500);
    }

    #[tokio::test]
    async fn open_loop_keeps_the_schedule() {
        let calls = Arc::new(AtomicU64::new(0));
        let phase = Phase {
            label: "t".into(),
            concurrency: 4,
            rate: Some(2000.0),
            finish: Finish::Count(400),
            progress: false,
            first_seq: 0,
        };
        let s = drive(&phase, counting_op(calls.clone())).await.unwrap();
        assert_eq!(s.ok, 400);
        assert_eq!(s.sent, 400);
        // 400 at 2000/s take about 0.2 s; far from a closed loop of 4 with 1 ms ops (0.1 s).
        assert!(s.elapsed >= Duration::from_millis(190), "{:?}", s.elapsed);
    }
}
