//! Criterion benchmark of one hop's grant check:
//! `govshare_broker::exchange::enforce::check_grant` on a grant of ten items, for a query
//! inside it (the path every exchange takes) and for one refused (an item outside the grant).
//! Run with `cargo bench -p govshare-bench --bench grant_check`.
// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use govshare_broker::exchange::enforce::check_grant;
use govshare_proto::v1::{value, Filter, Grant, GrantState, Query, Value};
use std::hint::black_box;

fn grant(now_ms: i64) -> Grant {
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

fn query(fields: &[&str]) -> Query {
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

fn bench(c: &mut Criterion) {
    let now = govshare_broker::time::now_ms();
    let g = grant(now);
    let inside = query(&["status", "month", "amount"]);
    let outside = query(&["status", "salary"]);
    c.bench_function("check_grant/allowed", |b| {
        b.iter(|| {
            check_grant(
                black_box(&g),
                black_box("330100/civil"),
                black_box("330000/hrss/pension-status"),
                black_box(&inside),
                black_box(now),
            )
        })
    });
    c.bench_function("check_grant/field_outside_grant", |b| {
        b.iter(|| {
            check_grant(
                black_box(&g),
                black_box("330100/civil"),
                black_box("330000/hrss/pension-status"),
                black_box(&outside),
                black_box(now),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
