//! Time helpers: protobuf timestamps and milliseconds since the Unix epoch.

use prost_types::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds per day.
pub const DAY_MS: i64 = 86_400_000;

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A timestamp from Unix milliseconds.
pub fn ts(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Now, as a timestamp.
pub fn now_ts() -> Timestamp {
    ts(now_ms())
}

/// Unix milliseconds of an optional timestamp (0 when unset).
pub fn ms(t: &Option<Timestamp>) -> i64 {
    t.as_ref()
        .map(|t| {
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos) / 1_000_000)
        })
        .unwrap_or(0)
}
