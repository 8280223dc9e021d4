//! Grant enforcement: the checks every hop makes before it forwards or delivers an exchange,
//! and the cut and masking of responses at the provider's home broker.
//!
//! Pure functions over records, so each rule is unit-tested and the same code runs at
//! accept time and again when a queued exchange is taken from its queue.

use crate::error::BrokerError;
use crate::mask::MaskRule;
use crate::time::ms;
use govshare_proto::v1::{value, Dataset, Grant, GrantState, Query, Row, Value};
use std::collections::{BTreeMap, BTreeSet};

/// A refusal under one named rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule's name, as audited and shown in the message (e.g. `grant_revoked`).
    pub rule: &'static str,
    /// What exactly failed.
    pub detail: String,
    /// True for quota refusals (RESOURCE_EXHAUSTED) rather than PERMISSION_DENIED.
    pub exhausted: bool,
}

impl Denial {
    fn new(rule: &'static str, detail: String) -> Self {
        Self {
            rule,
            detail,
            exhausted: false,
        }
    }

    /// The refusal as the caller sees it; the message starts with the rule's name.
    pub fn to_error(&self) -> BrokerError {
        let msg = format!("denied by rule {}: {}", self.rule, self.detail);
        if self.exhausted {
            BrokerError::ResourceExhausted(msg)
        } else {
            BrokerError::PermissionDenied(msg)
        }
    }

    /// The gRPC code number carried in an `ErrorStatus`.
    pub fn code(&self) -> i32 {
        if self.exhausted {
            tonic::Code::ResourceExhausted as i32
        } else {
            tonic::Code::PermissionDenied as i32
        }
    }
}

/// Checks a grant against an exchange: owner, dataset, validity window, revocation, items.
pub fn check_grant(
    grant: &Grant,
    consumer: &str,
    dataset_id: &str,
    query: &Query,
    now_ms: i64,
) -> Result<(), Denial> {
    if grant.consumer != consumer {
        return Err(Denial::new(
            "grant_consumer",
            format!(
                "grant {} was issued to {}, not {consumer}",
                grant.id, grant.consumer
            ),
        ));
    }
    if grant.dataset_id != dataset_id {
        return Err(Denial::new(
            "grant_dataset",
            format!(
                "grant {} covers {}, not {dataset_id}",
                grant.id, grant.dataset_id
            ),
        ));
    }
    if grant.state() == GrantState::Revoked {
        return Err(Denial::new(
            "grant_revoked",
            format!("grant {} was revoked by {}", grant.id, grant.revoked_by),
        ));
    }
    if now_ms < ms(&grant.valid_from) {
        return Err(Denial::new(
            "grant_not_yet_valid",
            format!("grant {} is not valid before its start", grant.id),
        ));
    }
    if now_ms > ms(&grant.valid_until) {
        return Err(Denial::new(
            "grant_expired",
            format!("grant {} expired", grant.id),
        ));
    }
    for f in &query.filters {
        if !grant.fields.contains(&f.item) {
            return Err(Denial::new(
                "filter_outside_grant",
                format!(
                    "filter on item {:?} is outside grant {} (items: {})",
                    f.item,
                    grant.id,
                    grant.fields.join(", ")
                ),
            ));
        }
    }
    for f in &query.fields {
        if !grant.fields.contains(f) {
            return Err(Denial::new(
                "field_outside_grant",
                format!(
                    "item {f:?} is outside grant {} (items: {})",
                    grant.id,
                    grant.fields.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The quota denial, when a grant's daily quota is spent.
pub fn quota_denial(grant: &Grant, used: u64) -> Option<Denial> {
    (grant.daily_quota > 0 && used >= grant.daily_quota).then(|| Denial {
        rule: "quota_exhausted",
        detail: format!(
            "grant {} allows {} exchanges a day and {used} were used today (UTC+8); try again tomorrow",
            grant.id, grant.daily_quota
        ),
        exhausted: true,
    })
}

/// The calendar day (UTC+8, China Standard Time) a quota counts in.
pub fn quota_day(now_ms: i64) -> i64 {
    (now_ms + 8 * 3_600_000).div_euclid(crate::time::DAY_MS)
}

/// What a response became after the cut and masking.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shaped {
    /// The rows the consumer may see.
    pub rows: Vec<Row>,
    /// Items masked.
    pub masked: Vec<String>,
    /// Items the provider sent outside the grant (or not asked for), removed.
    pub dropped: Vec<String>,
    /// True when rows were cut to the limit.
    pub truncated: bool,
}

/// The text form of a value, for masking.
fn value_text(v: &value::Kind) -> Option<String> {
    match v {
        value::Kind::StringValue(s) => Some(s.clone()),
        value::Kind::IntValue(i) => Some(i.to_string()),
        value::Kind::DoubleValue(d) => Some(d.to_string()),
        value::Kind::BoolValue(b) => Some(b.to_string()),
        value::Kind::BytesValue(_) => None,
    }
}

/// Cuts rows to the items both granted and wanted, applies each item's mask, and limits rows.
pub fn shape_rows(
    rows: Vec<Row>,
    grant: &Grant,
    wanted: &[String],
    dataset: Option<&Dataset>,
    salt: &[u8],
    max_rows: usize,
) -> Shaped {
    let allowed: BTreeSet<&str> = if wanted.is_empty() {
        grant.fields.iter().map(String::as_str).collect()
    } else {
        wanted
            .iter()
            .map(String::as_str)
            .filter(|f| grant.fields.iter().any(|g| g == f))
            .collect()
    };
    let masks: BTreeMap<&str, MaskRule> = dataset
        .map(|d| {
            d.items
                .iter()
                // A rule that no longer parses masks fully: failing closed beats leaking.
                .map(|i| {
                    (
                        i.name.as_str(),
                        MaskRule::parse(&i.mask).unwrap_or(MaskRule::Redact),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Shaped::default();
    let mut masked = BTreeSet::new();
    let mut dropped = BTreeSet::new();
    let total = rows.len();
    for row in rows.into_iter().take(max_rows) {
        let mut fields = std::collections::HashMap::new();
        for (name, v) in row.fields {
            if !allowed.contains(name.as_str()) {
                dropped.insert(name);
                continue;
            }
            let rule = masks.get(name.as_str()).copied().unwrap_or(MaskRule::None);
            let v = match (&rule, &v.kind) {
                (MaskRule::None, _) | (_, None) => v,
                (_, Some(k)) => {
                    masked.insert(name.clone());
                    Value {
                        kind: Some(value::Kind::StringValue(match value_text(k) {
                            Some(t) => rule.apply(&t, salt),
                            None => "***".into(),
                        })),
                    }
                }
            };
            fields.insert(name, v);
        }
        out.rows.push(Row { fields });
    }
    out.truncated = total > max_rows;
    out.masked = masked.into_iter().collect();
    out.dropped = dropped.into_iter().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ts;
    use govshare_proto::v1::{Filter, InfoItem};

    fn grant() -> Grant {
        Grant {
            id: "g1".into(),
            dataset_id: "330000/hrss/p".into(),
            consumer: "330100/civil".into(),
            fields: vec!["id_number".into(), "status".into()],
            valid_from: Some(ts(1_000)),
            valid_until: Some(ts(10_000)),
            state: GrantState::Active as i32,
            ..Default::default()
        }
    }

    fn q(filters: &[&str], fields: &[&str]) -> Query {
        Query {
            filters: filters
                .iter()
                .map(|f| Filter {
                    item: f.to_string(),
                    value: None,
                })
                .collect(),
            fields: fields.iter().map(|s| s.to_string()).collect(),
            limit: 0,
        }
    }

    fn rule(r: Result<(), Denial>) -> &'static str {
        r.err().map(|d| d.rule).unwrap_or("ok")
    }

    #[test]
    fn each_rule_refuses() {
        let g = grant();
        let ok = q(&["id_number"], &["status"]);
        assert_eq!(
            rule(check_grant(&g, "330100/civil", "330000/hrss/p", &ok, 5_000)),
            "ok"
        );
        assert_eq!(
            rule(check_grant(&g, "330100/other", "330000/hrss/p", &ok, 5_000)),
            "grant_consumer"
        );
        assert_eq!(
            rule(check_grant(&g, "330100/civil", "330000/hrss/x", &ok, 5_000)),
            "grant_dataset"
        );
        assert_eq!(
            rule(check_grant(&g, "330100/civil", "330000/hrss/p", &ok, 500)),
            "grant_not_yet_valid"
        );
        assert_eq!(
            rule(check_grant(
                &g,
                "330100/civil",
                "330000/hrss/p",
                &ok,
                20_000
            )),
            "grant_expired"
        );
        let mut r = g.clone();
        r.state = GrantState::Revoked as i32;
        assert_eq!(
            rule(check_grant(&r, "330100/civil", "330000/hrss/p", &ok, 5_000)),
            "grant_revoked"
        );
        assert_eq!(
            rule(check_grant(
                &g,
                "330100/civil",
                "330000/hrss/p",
                &q(&["name"], &[]),
                5_000
            )),
            "filter_outside_grant"
        );
        assert_eq!(
            rule(check_grant(
                &g,
                "330100/civil",
                "330000/hrss/p",
                &q(&[], &["name"]),
                5_000
            )),
            "field_outside_grant"
        );
        let mut quota = g.clone();
        quota.daily_quota = 2;
        assert!(quota_denial(&quota, 1).is_none());
        assert_eq!(
            quota_denial(&quota, 2).map(|d| d.rule),
            Some("quota_exhausted")
        );
        assert!(quota_denial(&g, 1_000_000).is_none(), "0 means unlimited");
    }

    fn sv(s: &str) -> Value {
        Value {
            kind: Some(value::Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn responses_are_cut_and_masked() {
        let g = grant();
        let d = Dataset {
            items: vec![
                InfoItem {
                    name: "id_number".into(),
                    mask: "id_number".into(),
                    ..Default::default()
                },
                InfoItem {
                    name: "status".into(),
                    ..Default::default()
                },
                InfoItem {
                    name: "name".into(),
                    mask: "name".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let row = Row {
            fields: [
                ("id_number".to_string(), sv("330102199001011234")),
                ("status".to_string(), sv("PAID")),
                ("name".to_string(), sv("张三")),
                ("salary".to_string(), sv("9000")),
            ]
            .into_iter()
            .collect(),
        };
        let s = shape_rows(vec![row.clone(), row], &g, &[], Some(&d), b"", 1);
        assert_eq!(s.rows.len(), 1);
        assert!(s.truncated);
        let r = &s.rows[0].fields;
        assert_eq!(r.get("id_number"), Some(&sv("330102********1234")));
        assert_eq!(r.get("status"), Some(&sv("PAID")));
        assert!(!r.contains_key("name") && !r.contains_key("salary"));
        assert_eq!(s.dropped, vec!["name".to_string(), "salary".to_string()]);
        assert_eq!(s.masked, vec!["id_number".to_string()]);
        // Only what was wanted, even inside the grant.
        let s = shape_rows(
            vec![Row {
                fields: [
                    ("id_number".to_string(), sv("x")),
                    ("status".to_string(), sv("y")),
                ]
                .into_iter()
                .collect(),
            }],
            &g,
            &["status".to_string()],
            Some(&d),
            b"",
            10,
        );
        assert_eq!(s.rows[0].fields.len(), 1);
    }
}
