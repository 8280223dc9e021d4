//! `grant-check`: one hop's grant check (`govshare_broker::exchange::enforce::check_grant`),
//! timed in-process in batches. The statistically careful version is the criterion benchmark:
//! `cargo bench -p govshare-bench --bench grant_check`.

use crate::cli::LoadArgs;
use crate::driver::{histogram, Point};
use crate::report::ScenarioResult;
use crate::sys;
use anyhow::{ensure, Result};
use govshare_broker::exchange::enforce::check_grant;
use govshare_client::proto::{value, Filter, Grant, GrantState, Query, Value};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Checks timed together, so that the clock's cost does not swamp one check.
const BATCH: u64 = 1000;

/// A grant like the ones the broker issues: ten items, a validity window around `now_ms`.
pub fn sample_grant(now_ms: i64) -> Grant {
    let ts = |ms: i64| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    };
    Grant {
        id: "01a21d70-2d04-7673-ba96-85ec8a761bab".into(),
        dataset_id: "330000/hrss/pension-status".into(),
        consumer: "330100/civil".into(),
        fields: [
            "id_number",
            "name",
            "status",
            "month",
            "amount",
            "county",
            "bank",
            "payee",
            "updated",
            "remark",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        valid_from: Some(ts(now_ms - 86_400_000)),
        valid_until: Some(ts(now_ms + 86_400_000)),
        state: GrantState::Active as i32,
        ..Default::default()
    }
}

/// A query inside that grant: one filter, three items.
pub fn sample_query() -> Query {
    query_for(&["status", "month", "amount"])
}

/// A query with the sample's filter asking for `fields` (inside the grant or not).
pub fn query_for(fields: &[&str]) -> Query {
    Query {
        filters: vec![Filter {
            item: "id_number".into(),
            value: Some(Value {
                kind: Some(value::Kind::StringValue("330102199001011234".into())),
            }),
        }],
        fields: fields.iter().map(|s| s.to_string()).collect(),
        limit: 0,
    }
}

/// Runs the in-process timing loop for `--duration` (or `--count` checks).
pub(crate) fn run(load: &LoadArgs) -> Result<ScenarioResult> {
    let now = govshare_broker::time::now_ms();
    let grant = sample_grant(now);
    let query = sample_query();
    ensure!(
        check_grant(
            &grant,
            "330100/civil",
            "330000/hrss/pension-status",
            &query,
            now
        )
        .is_ok(),
        "the sample grant does not pass its own check"
    );
    let mut hist = histogram()?; // nanoseconds per check, per batch
    let run_for =
        |d: Duration, limit: u64, hist: &mut Option<&mut hdrhistogram::Histogram<u64>>| {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < d && n < limit {
                let t = Instant::now();
                for _ in 0..BATCH {
                    let r = check_grant(
                        black_box(&grant),
                        black_box("330100/civil"),
                        black_box("330000/hrss/pension-status"),
                        black_box(&query),
                        black_box(now),
                    );
                    black_box(r.is_ok());
                }
                let ns = t.elapsed().as_nanos() as u64 / BATCH;
                if let Some(h) = hist.as_mut() {
                    h.saturating_record(ns.max(1));
                }
                n += BATCH;
            }
            (n, start.elapsed())
        };
    run_for(load.warmup, u64::MAX, &mut None);
    let c0 = sys::cpu_seconds(None);
    let (n, elapsed) = match load.count {
        Some(c) => run_for(Duration::from_secs(3600), c, &mut Some(&mut hist)),
        None => run_for(load.duration, u64::MAX, &mut Some(&mut hist)),
    };
    let c1 = sys::cpu_seconds(None);
    let per_s = n as f64 / elapsed.as_secs_f64().max(1e-9);
    let ns = |q: f64| hist.value_at_quantile(q) as f64;
    let mut r = ScenarioResult {
        scenario: "grant-check".into(),
        throughput_per_s: per_s,
        exchanges: n,
        elapsed_s: elapsed.as_secs_f64(),
        latency_ms: crate::driver::Latency {
            p50: ns(0.5) / 1e6,
            p90: ns(0.9) / 1e6,
            p99: ns(0.99) / 1e6,
            p999: ns(0.999) / 1e6,
            max: hist.max() as f64 / 1e6,
            mean: hist.mean() / 1e6,
        },
        cpu_s_per_1k: None,
        peak_rss_mib: sys::peak_rss(None).map(sys::mib),
        fsyncs_per_1k: None,
        sent: n,
        answered: n,
        errors: 0,
        first_error: None,
        load: "1 thread".into(),
        target: "in-process".into(),
        notes: vec![
            format!(
                "ns per check (batches of {BATCH}): p50 {:.0}, p99 {:.0}, mean {:.0}",
                ns(0.5),
                ns(0.99),
                hist.mean()
            ),
            "criterion: cargo bench -p govshare-bench --bench grant_check".into(),
        ],
        extra: Default::default(),
        series: vec![Point {
            t_s: elapsed.as_secs_f64(),
            throughput_per_s: per_s,
            p50_ms: ns(0.5) / 1e6,
            p99_ms: ns(0.99) / 1e6,
            p999_ms: ns(0.999) / 1e6,
        }],
    };
    r.cpu_s_per_1k = c0.zip(c1).and_then(|(a, b)| r.per_1k(b - a));
    r.extra.insert("ns_per_check_p50".into(), ns(0.5).into());
    r.extra
        .insert("ns_per_check_mean".into(), hist.mean().into());
    Ok(r)
}
