//! Results: one object per scenario run, tables for people, JSON for machines.

use crate::cli::LoadArgs;
use crate::driver::{Latency, PhaseStats, Point};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// One run of one scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioResult {
    /// The scenario's name (`echo`, `sync`, ...).
    pub scenario: String,
    /// Completed exchanges per second in the measured phase (backlog: the drain rate).
    pub throughput_per_s: f64,
    /// Exchanges completed in the measured phase.
    pub exchanges: u64,
    /// Length of the measured phase, seconds.
    pub elapsed_s: f64,
    /// Latency of the measured phase, ms (backlog: of the submits that filled the queue).
    pub latency_ms: Latency,
    /// CPU seconds (user + system) per 1,000 exchanges: this process, the in-process brokers
    /// included, plus the peer's process for peers.
    pub cpu_s_per_1k: Option<f64>,
    /// Peak resident memory during the scenario, MiB (this process; the peer's for peers).
    pub peak_rss_mib: Option<f64>,
    /// Storage flushes (fsyncs) per 1,000 exchanges, from the broker's group-commit counters.
    pub fsyncs_per_1k: Option<f64>,
    /// Exchanges issued in all phases (warm-up included).
    pub sent: u64,
    /// Exchanges answered in all phases (warm-up included).
    pub answered: u64,
    /// Exchanges that failed, in all phases.
    pub errors: u64,
    /// The first failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// `closed N` or `open R/s`.
    pub load: String,
    /// What was driven: `in-process`, a URL, or the peer's version.
    pub target: String,
    /// Remarks on how to read the figures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Scenario-specific figures (backlog: fill, recovery, drain).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    /// Per-second throughput and latency.
    pub series: Vec<Point>,
}

impl ScenarioResult {
    /// A result from the measured phase, with the totals of every phase.
    pub(crate) fn from_phase(
        scenario: &str,
        load: &LoadArgs,
        target: String,
        measured: &PhaseStats,
        all: &[&PhaseStats],
    ) -> Self {
        Self {
            scenario: scenario.to_string(),
            throughput_per_s: measured.throughput(),
            exchanges: measured.ok,
            elapsed_s: measured.elapsed.as_secs_f64(),
            latency_ms: Latency::of(&measured.hist),
            cpu_s_per_1k: None,
            peak_rss_mib: None,
            fsyncs_per_1k: None,
            sent: all.iter().map(|p| p.sent).sum(),
            answered: all.iter().map(|p| p.ok).sum(),
            errors: all.iter().map(|p| p.errors).sum(),
            first_error: all.iter().find_map(|p| p.first_error.clone()),
            load: load.describe(),
            target,
            notes: Vec::new(),
            extra: Map::new(),
            series: measured.series.clone(),
        }
    }

    /// Per 1,000 exchanges of the measured phase.
    pub(crate) fn per_1k(&self, x: f64) -> Option<f64> {
        (self.exchanges > 0).then(|| x * 1000.0 / self.exchanges as f64)
    }
}

/// A scenario that did not run, and why.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Skip {
    /// The scenario's name.
    pub scenario: String,
    /// Why, and what to install or build.
    pub reason: String,
}

/// A run's outcome.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It ran.
    Done(Box<ScenarioResult>),
    /// It could not run here.
    Skipped(Skip),
}

/// The rounds of one scenario in a comparison.
#[derive(Debug, Clone)]
pub(crate) struct CompareRow {
    /// The scenario's name.
    pub scenario: String,
    /// One result per round.
    pub rounds: Vec<ScenarioResult>,
}

/// A whole `compare`.
#[derive(Debug, Clone)]
pub(crate) struct Comparison {
    /// Rounds asked for.
    pub rounds: u32,
    /// One row per scenario that ran.
    pub rows: Vec<CompareRow>,
    /// Scenarios that could not run.
    pub skipped: Vec<Skip>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl CompareRow {
    /// An empty row.
    pub(crate) fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            rounds: Vec::new(),
        }
    }

    fn med(&self, f: impl Fn(&ScenarioResult) -> Option<f64>) -> Option<f64> {
        median(self.rounds.iter().filter_map(f).collect())
    }

    /// The median throughput over the rounds.
    pub(crate) fn throughput(&self) -> f64 {
        self.med(|r| Some(r.throughput_per_s)).unwrap_or(0.0)
    }

    /// The median of each latency percentile over the rounds.
    pub(crate) fn latency(&self) -> Latency {
        Latency {
            p50: self.med(|r| Some(r.latency_ms.p50)).unwrap_or(0.0),
            p90: self.med(|r| Some(r.latency_ms.p90)).unwrap_or(0.0),
            p99: self.med(|r| Some(r.latency_ms.p99)).unwrap_or(0.0),
            p999: self.med(|r| Some(r.latency_ms.p999)).unwrap_or(0.0),
            max: self
                .rounds
                .iter()
                .map(|r| r.latency_ms.max)
                .fold(0.0, f64::max),
            mean: self.med(|r| Some(r.latency_ms.mean)).unwrap_or(0.0),
        }
    }

    /// The last round's result (for plots).
    pub(crate) fn last_round(&self) -> Option<ScenarioResult> {
        self.rounds.last().cloned()
    }
}

impl Comparison {
    fn echo(&self) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.scenario == "echo")
            .map(CompareRow::throughput)
            .filter(|t| *t > 0.0)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Aligns rows of cells into columns (first column left, the rest right).
fn align(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const HEADER: [&str; 11] = [
    "scenario",
    "load",
    "throughput/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "cpu s/1k",
    "peak RSS MiB",
    "fsync/1k",
    "answered/sent",
];

fn cells(name: &str, load: &str, thr: f64, l: &Latency, r: &ScenarioResult) -> Vec<String> {
    vec![
        name.to_string(),
        load.to_string(),
        thousands(thr),
        format!("{:.2}", l.p50),
        format!("{:.2}", l.p90),
        format!("{:.2}", l.p99),
        format!("{:.2}", l.p999),
        opt(r.cpu_s_per_1k, 3),
        opt(r.peak_rss_mib, 0),
        opt(r.fsyncs_per_1k, 1),
        format!("{}/{}", r.answered, r.sent),
    ]
}

fn notes_of(results: &[&ScenarioResult], skipped: &[Skip]) -> String {
    let mut out = String::new();
    for r in results {
        for n in &r.notes {
            out.push_str(&format!("  {}: {n}\n", r.scenario));
        }
        if !r.extra.is_empty() {
            let kv: Vec<String> = r
                .extra
                .iter()
                .map(|(k, v)| match v.as_f64() {
                    Some(f) if v.is_f64() => format!("{k}={f:.3}"),
                    _ => format!("{k}={v}"),
                })
                .collect();
            out.push_str(&format!("  {}: {}\n", r.scenario, kv.join(" ")));
        }
        if let Some(e) = &r.first_error {
            out.push_str(&format!(
                "  {}: {} errors; first: {e}\n",
                r.scenario, r.errors
            ));
        }
    }
    for s in skipped {
        out.push_str(&format!("  skipped {}\n", s.reason));
    }
    out
}

/// The table of a `run`.
pub(crate) fn run_table(results: &[ScenarioResult], skipped: &[Skip]) -> String {
    let mut rows = vec![HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in results {
        rows.push(cells(
            &r.scenario,
            &r.load,
            r.throughput_per_s,
            &r.latency_ms,
            r,
        ));
    }
    let refs: Vec<&ScenarioResult> = results.iter().collect();
    let mut out = align(&rows);
    let notes = notes_of(&refs, skipped);
    if !notes.is_empty() {
        out.push_str(&notes);
    }
    out
}

/// The table of a `compare`: medians over rounds, and the ratio to echo.
pub(crate) fn compare_table(c: &Comparison) -> String {
    let mut header: Vec<String> = HEADER.iter().map(|s| s.to_string()).collect();
    header.push("x echo".into());
    let mut rows = vec![header];
    let echo = c.echo();
    let mut medians = Vec::new();
    for row in &c.rows {
        let Some(last) = row.rounds.last() else {
            continue;
        };
        let mut m = last.clone();
        m.cpu_s_per_1k = row.med(|r| r.cpu_s_per_1k);
        m.peak_rss_mib = row.med(|r| r.peak_rss_mib);
        m.fsyncs_per_1k = row.med(|r| r.fsyncs_per_1k);
        m.answered = row.rounds.iter().map(|r| r.answered).sum();
        m.sent = row.rounds.iter().map(|r| r.sent).sum();
        m.errors = row.rounds.iter().map(|r| r.errors).sum();
        let thr = row.throughput();
        let mut cs = cells(&row.scenario, &last.load, thr, &row.latency(), &m);
        cs.push(match echo {
            Some(e) => format!("{:.2}", thr / e),
            None => "-".into(),
        });
        rows.push(cs);
        medians.push(m);
    }
    let mut out = format!(
        "medians of {} round(s); throughput/s per scenario, ratio to echo in the last column\n",
        c.rounds
    );
    out.push_str(&align(&rows));
    let refs: Vec<&ScenarioResult> = medians.iter().collect();
    out.push_str(&notes_of(&refs, &c.skipped));
    out
}

fn without_series(r: &ScenarioResult) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("series");
    }
    v
}

fn load_json(load: &LoadArgs) -> Value {
    json!({
        "mode": load.describe(),
        "concurrency": load.concurrency,
        "rate_per_s": load.rate,
        "warmup_s": load.warmup.as_secs_f64(),
        "duration_s": load.duration.as_secs_f64(),
        "count": load.count,
        "row_bytes": load.row_bytes,
        "consumers": load.consumers,
        "providers": load.providers,
        "max_in_flight": load.max_in_flight,
        "broker": load.broker,
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The JSON of a `run`.
pub(crate) fn run_json(results: &[ScenarioResult], skipped: &[Skip], load: &LoadArgs) -> Value {
    json!({
        "command": "run",
        "generated_at_unix": now_unix(),
        "machine": crate::sys::machine(),
        "load": load_json(load),
        "scenarios": results,
        "skipped": skipped,
    })
}

/// The JSON of a `compare`: per scenario the medians, the ratio to echo and every round.
pub(crate) fn compare_json(c: &Comparison, load: &LoadArgs) -> Value {
    let echo = c.echo();
    let scenarios: Vec<Value> = c
        .rows
        .iter()
        .map(|row| {
            let thr = row.throughput();
            json!({
                "scenario": row.scenario,
                "throughput_per_s": thr,
                "latency_ms": row.latency(),
                "cpu_s_per_1k": row.med(|r| r.cpu_s_per_1k),
                "peak_rss_mib": row.med(|r| r.peak_rss_mib),
                "fsyncs_per_1k": row.med(|r| r.fsyncs_per_1k),
                "ratio_to_echo": echo.map(|e| thr / e),
                "sent": row.rounds.iter().map(|r| r.sent).sum::<u64>(),
                "answered": row.rounds.iter().map(|r| r.answered).sum::<u64>(),
                "errors": row.rounds.iter().map(|r| r.errors).sum::<u64>(),
                "rounds": row.rounds.iter().map(without_series).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "command": "compare",
        "generated_at_unix": now_unix(),
        "machine": crate::sys::machine(),
        "rounds": c.rounds,
        "load": load_json(load),
        "scenarios": scenarios,
        "skipped": c.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_grouping() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
