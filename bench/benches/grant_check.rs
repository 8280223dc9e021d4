//! Criterion benchmark of one hop's grant check:
//! `govshare_broker::exchange::enforce::check_grant` on a grant of ten items, for a query
//! inside it (the path every exchange takes) and for one refused (an item outside the grant).
//! The grant and queries are the `grant-check` scenario's own (`govshare_bench::grant_check`).
//! Run with `cargo bench -p govshare-bench --bench grant_check`.
// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use govshare_bench::grant_check::{query_for, sample_grant, sample_query};
use govshare_broker::exchange::enforce::check_grant;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let now = govshare_broker::time::now_ms();
    let g = sample_grant(now);
    let inside = sample_query();
    let outside = query_for(&["status", "salary"]);
    for (name, query) in [
        ("check_grant/allowed", &inside),
        ("check_grant/field_outside_grant", &outside),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                check_grant(
                    black_box(&g),
                    black_box("330100/civil"),
                    black_box("330000/hrss/pension-status"),
                    black_box(query),
                    black_box(now),
                )
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
