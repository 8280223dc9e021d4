//! Parsers for command-line values: durations, points in time, `--where` filters; and time formatting.

use std::time::Duration;

use govshare_client::proto::{value, Filter, Value};
use prost_types::Timestamp;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// China Standard Time: the offset every timestamp is shown in.
pub(crate) const DISPLAY_OFFSET_HOURS: i8 = 8;

/// Parses a duration such as `10s`, `500ms`, `2m`, `1h30m` or `2d` (units ms, s, m, h, d).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 10s, 500ms, 2m, 1h".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "bad duration {text:?}: expected a number at {rest:?} (use e.g. 10s, 500ms, 2m, 1h)"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86_400)),
            "" => {
                return Err(format!(
                    "bad duration {text:?}: missing unit after {number} (use ms, s, m, h or d, e.g. {number}s)"
                ))
            }
            other => {
                return Err(format!(
                    "bad duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Parses a positive duration, for deadlines.
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("the timeout must be greater than zero".to_string());
    }
    Ok(d)
}

/// Parses a point in time: RFC 3339 (`2026-10-01T08:00:00+08:00`), a date (`2026-10-01`, midnight
/// UTC+8), or a duration ago (`1h`, `30m`, `2d`) counted back from `now`.
pub(crate) fn parse_since(text: &str, now: OffsetDateTime) -> Result<Timestamp, String> {
    let s = text.trim();
    let at = if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        t
    } else if let Some(t) = parse_date(s) {
        t
    } else if s.starts_with(|c: char| c.is_ascii_digit())
        && s.contains(|c: char| c.is_ascii_alphabetic())
        && !s.contains('-')
    {
        let ago = parse_duration(s)?;
        let ago = time::Duration::try_from(ago).map_err(|_| format!("{text:?} is too long ago"))?;
        now.checked_sub(ago)
            .ok_or_else(|| format!("{text:?} is too long ago"))?
    } else {
        return Err(format!(
            "bad time {text:?}: use RFC 3339 (2026-10-01T08:00:00+08:00), a date (2026-10-01) or an age (1h, 30m, 2d)"
        ));
    };
    Ok(to_timestamp(at))
}

fn parse_date(s: &str) -> Option<OffsetDateTime> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, &fmt).ok()?;
    Some(date.midnight().assume_offset(display_offset()))
}

/// The UTC+8 offset used for display.
pub(crate) fn display_offset() -> UtcOffset {
    UtcOffset::from_hms(DISPLAY_OFFSET_HOURS, 0, 0).unwrap_or(UtcOffset::UTC)
}

/// Converts a `time` instant to a protobuf timestamp.
pub(crate) fn to_timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// Now plus `d`, as a protobuf timestamp.
pub(crate) fn timestamp_after(d: Duration) -> Timestamp {
    let now = OffsetDateTime::now_utc();
    let later = time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or(now);
    to_timestamp(later)
}

/// Formats a timestamp as RFC 3339 in UTC+8; `precise` keeps fractions of a second.
pub(crate) fn format_timestamp(ts: &Timestamp, precise: bool) -> String {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos.clamp(0, 999_999_999));
    let nanos = if precise {
        nanos
    } else {
        nanos - nanos.rem_euclid(1_000_000_000)
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .map(|t| t.to_offset(display_offset()))
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{}s", ts.seconds))
}

/// Formats an optional timestamp for tables: seconds precision, empty when unset.
pub(crate) fn format_opt(ts: Option<&Timestamp>) -> String {
    ts.map(|t| format_timestamp(t, false)).unwrap_or_default()
}

/// Parses `--where item=value` (a string value) or `item:TYPE=value` with TYPE one of
/// `string`, `int`, `double`, `bool`; `item:null` matches a null value.
pub(crate) fn parse_where(text: &str) -> Result<Filter, String> {
    let bad = |why: &str| {
        format!("bad --where {text:?}: {why} (use ITEM=VALUE, or ITEM:int=VALUE, ITEM:bool=VALUE, ITEM:double=VALUE, ITEM:null)")
    };
    let (lhs, rhs) = match text.split_once('=') {
        Some((l, r)) => (l, Some(r)),
        None => (text, None),
    };
    let (item, ty) = match lhs.split_once(':') {
        Some((i, t)) => (i.trim(), Some(t.trim().to_ascii_lowercase())),
        None => (lhs.trim(), None),
    };
    if item.is_empty() {
        return Err(bad("missing item name"));
    }
    if !item
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(bad("item names are lower-case letters, digits and _"));
    }
    let kind = match (ty.as_deref(), rhs) {
        (Some("null"), None) => None,
        (Some("null"), Some(_)) => return Err(bad("ITEM:null takes no value")),
        (_, None) => return Err(bad("missing =VALUE")),
        (None | Some("string") | Some("str"), Some(v)) => {
            Some(value::Kind::StringValue(v.to_string()))
        }
        (Some("int"), Some(v)) => Some(value::Kind::IntValue(
            v.trim()
                .parse()
                .map_err(|_| bad(&format!("{v:?} is not a whole number")))?,
        )),
        (Some("double") | Some("float"), Some(v)) => {
            let d: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad(&format!("{v:?} is not a number")))?;
            if !d.is_finite() {
                return Err(bad("the number must be finite"));
            }
            Some(value::Kind::DoubleValue(d))
        }
        (Some("bool"), Some(v)) => Some(value::Kind::BoolValue(
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => true,
                "false" | "no" | "0" => false,
                _ => return Err(bad(&format!("{v:?} is not true or false"))),
            },
        )),
        (Some(other), _) => return Err(bad(&format!("unknown type {other:?}"))),
    };
    Ok(Filter {
        item: item.to_string(),
        value: Some(Value { kind }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration(" 1s500ms "), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("1ms").is_ok());
    }

    #[test]
    fn since_accepts_rfc3339_dates_and_ages() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            parse_since("1h", now).unwrap().seconds,
            1_800_000_000 - 3600
        );
        assert_eq!(
            parse_since("30m", now).unwrap().seconds,
            1_800_000_000 - 1800
        );
        assert_eq!(
            parse_since("2d", now).unwrap().seconds,
            1_800_000_000 - 172_800
        );
        let t = parse_since("2026-10-01T08:00:00+08:00", now).unwrap();
        assert_eq!(t.seconds, 1_790_812_800);
        assert_eq!(
            parse_since("2026-10-01T00:00:00Z", now).unwrap().seconds,
            1_790_812_800
        );
        assert_eq!(
            parse_since("2026-10-01", now).unwrap().seconds,
            1_790_812_800 - 8 * 3600
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2026-13-01", now).is_err());
    }

    #[test]
    fn timestamps_show_in_utc_plus_8() {
        let ts = Timestamp {
            seconds: 1_790_812_800,
            nanos: 250_000_000,
        };
        assert_eq!(format_timestamp(&ts, false), "2026-10-01T08:00:00+08:00");
        assert_eq!(format_timestamp(&ts, true), "2026-10-01T08:00:00.25+08:00");
        assert_eq!(format_opt(None), "");
    }

    #[test]
    fn where_filters() {
        let f = parse_where("id_number=330102199001011234").unwrap();
        assert_eq!(f.item, "id_number");
        assert_eq!(
            f.value.unwrap().kind,
            Some(value::Kind::StringValue("330102199001011234".into()))
        );
        // Values keep '=' and ':' after the first '='.
        let f = parse_where("note=a=b:c").unwrap();
        assert_eq!(
            f.value.unwrap().kind,
            Some(value::Kind::StringValue("a=b:c".into()))
        );
        let f = parse_where("name=张三").unwrap();
        assert_eq!(
            f.value.unwrap().kind,
            Some(value::Kind::StringValue("张三".into()))
        );
        assert_eq!(
            parse_where("age:int=42").unwrap().value.unwrap().kind,
            Some(value::Kind::IntValue(42))
        );
        assert_eq!(
            parse_where("ok:bool=true").unwrap().value.unwrap().kind,
            Some(value::Kind::BoolValue(true))
        );
        assert_eq!(
            parse_where("x:double=1.5").unwrap().value.unwrap().kind,
            Some(value::Kind::DoubleValue(1.5))
        );
        assert_eq!(parse_where("x:null").unwrap().value.unwrap().kind, None);
        let f = parse_where("empty=").unwrap();
        assert_eq!(
            f.value.unwrap().kind,
            Some(value::Kind::StringValue(String::new()))
        );
        assert!(parse_where("id_number")
            .unwrap_err()
            .contains("missing =VALUE"));
        assert!(parse_where("=x").unwrap_err().contains("missing item name"));
        assert!(parse_where("Name=x").is_err());
        assert!(parse_where("age:int=forty")
            .unwrap_err()
            .contains("not a whole number"));
        assert!(parse_where("age:date=2020")
            .unwrap_err()
            .contains("unknown type"));
    }
}
