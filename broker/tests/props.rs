//! Property and robustness tests (issue 7 item 5): the broker's parsers, masking rules,
//! grant checks, config loading and grant signatures hold their promises on arbitrary input,
//! and never panic.

use govshare_broker::exchange::enforce::check_grant;
use govshare_broker::ids::{
    check_credit_code, check_item_name, check_opaque_id, check_region_prefix, CreditCodeCheck,
    DatasetId, NodeId,
};
use govshare_broker::keys::{verify_grant, SigningKey};
use govshare_broker::mask::MaskRule;
use govshare_broker::time::{ms, ts};
use govshare_broker::Config;
use govshare_proto::v1::{Filter, Grant, GrantState, KeyAnnouncement, Query};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use std::sync::OnceLock;

/// A modest number of cases per property (`PROPTEST_CASES` overrides it for a longer run),
/// and no regression files written into the tree.
fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary text: any unicode (NUL included), plus strings near the shapes the parsers want.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x7f]{0,80}",
        "[0-9]{0,8}/[a-z0-9A-Z_ -]{0,70}(/[a-z0-9-]{0,70})?",
        "[0-9\\x{0660}-\\x{0669}\\x{ff10}-\\x{ff19}]{6}/[a-z\\x{00e9}\\x{4e00}-\\x{4e10}-]{1,8}",
        "[0-9A-Z\\x{0130}\\x{4e00}]{16,19}",
    ]
}

// ---------------------------------------------------------------- 1. ids and regions

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn id_checks_never_panic(s in text()) {
        if let Ok(n) = NodeId::parse(&s, "id") {
            prop_assert_eq!(n.as_str(), s.as_str());
            prop_assert_eq!(NodeId::parse(&n.to_string(), "id").ok(), Some(n.clone()));
            prop_assert_eq!(n.region().len(), 6);
            prop_assert!(n.region().bytes().all(|b| b.is_ascii_digit()));
        }
        if let Ok(d) = DatasetId::parse(&s) {
            prop_assert_eq!(d.to_id(), s.clone());
            prop_assert_eq!(DatasetId::parse(&d.to_id()).ok(), Some(d));
        }
        if check_region_prefix(&s).is_ok() {
            prop_assert!(s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit()));
        }
        if check_item_name(&s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= 64 && s.is_ascii());
        }
        if check_opaque_id("id", &s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()));
        }
        if check_credit_code(&s).is_ok() {
            prop_assert_eq!(s.chars().count(), 18);
        }
    }

    #[test]
    fn well_formed_node_ids_round_trip(s in "[0-9]{6}/[a-z0-9-]{1,63}") {
        let n = NodeId::parse(&s, "id");
        prop_assert!(n.is_ok(), "{s:?} refused: {n:?}");
        if let Ok(n) = n {
            prop_assert_eq!(NodeId::parse(&n.to_string(), "id").ok(), Some(n.clone()));
            prop_assert_eq!(n.region(), &s[..6]);
        }
    }

    #[test]
    fn well_formed_dataset_ids_round_trip(s in "[0-9]{6}/[a-z0-9-]{1,63}/[a-z0-9][a-z0-9-]{0,63}") {
        let d = DatasetId::parse(&s);
        prop_assert!(d.is_ok(), "{s:?} refused: {d:?}");
        prop_assert_eq!(d.map(|d| d.to_id()).ok(), Some(s));
    }

    #[test]
    fn credit_code_check_digit(body in proptest::collection::vec(0usize..31, 17), wrong in 1usize..31) {
        const CHARSET: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
        const WEIGHTS: [usize; 17] = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28];
        let sum: usize = body.iter().zip(WEIGHTS).map(|(v, w)| v * w).sum();
        let check = (31 - sum % 31) % 31;
        let mut code: String = body.iter().map(|&v| char::from(CHARSET[v])).collect();
        let good = format!("{code}{}", char::from(CHARSET[check]));
        prop_assert_eq!(check_credit_code(&good).ok(), Some(CreditCodeCheck::Valid));
        code.push(char::from(CHARSET[(check + wrong) % 31]));
        prop_assert_eq!(check_credit_code(&code).ok(), Some(CreditCodeCheck::BadCheckDigit));
    }
}

// ---------------------------------------------------------------- 2. masking rules

fn rule_text() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        Just("redact".to_string()),
        Just("hash".to_string()),
        Just(" id_number ".to_string()),
        prop::sample::select(vec!["id_number", "mobile", "name", "bank_card", "address"])
            .prop_map(String::from),
        (0usize..80, 0usize..80).prop_map(|(a, b)| format!("keep:{a},{b}")),
        "keep:[0-9 ,+-]{0,12}",
    ]
}

fn any_rule() -> impl Strategy<Value = MaskRule> {
    prop_oneof![
        Just(MaskRule::None),
        Just(MaskRule::Redact),
        Just(MaskRule::Hash),
        (0usize..=64, 0usize..=64).prop_map(|(head, tail)| MaskRule::Keep { head, tail }),
    ]
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn mask_parse_never_panics(s in rule_text()) {
        match MaskRule::parse(&s) {
            Ok(MaskRule::Keep { head, tail }) => prop_assert!(head <= 64 && tail <= 64),
            Ok(MaskRule::None) => prop_assert!(s.trim().is_empty()),
            _ => {}
        }
    }

    #[test]
    fn keep_rules_parse(head in 0usize..=64, tail in 0usize..=64) {
        prop_assert_eq!(
            MaskRule::parse(&format!("keep:{head},{tail}")).ok(),
            Some(MaskRule::Keep { head, tail })
        );
    }

    #[test]
    fn masking_hides_what_it_promises(
        rule in any_rule(),
        value in prop_oneof![any::<String>(), "[a-z0-9\\x{4e00}-\\x{4e20}]{0,30}"],
        salt in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let out = rule.apply(&value, &salt);
        let input: Vec<char> = value.chars().collect();
        let got: Vec<char> = out.chars().collect();
        match rule {
            MaskRule::None => prop_assert_eq!(&out, &value),
            MaskRule::Redact => prop_assert_eq!(out.as_str(), "***"),
            MaskRule::Hash => {
                prop_assert_eq!(out.len(), 64);
                prop_assert!(out.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                prop_assert_eq!(&out, &rule.apply(&value, &salt), "hash is deterministic");
                prop_assert_ne!(&out, &value);
            }
            MaskRule::Keep { head, tail } => {
                // Same length; every character kept in place or replaced by '*'.
                prop_assert_eq!(got.len(), input.len());
                for (g, i) in got.iter().zip(&input) {
                    prop_assert!(g == i || *g == '*');
                }
                if !input.is_empty() {
                    // Something is always hidden: at least one '*' ...
                    prop_assert!(got.contains(&'*'), "{rule:?} on {value:?} hid nothing: {out:?}");
                    // ... so a value with no '*' of its own never comes back unchanged.
                    if !value.contains('*') {
                        prop_assert_ne!(&out, &value);
                    }
                }
                let n = input.len();
                if head + tail < n {
                    prop_assert_eq!(&got[..head], &input[..head]);
                    prop_assert_eq!(&got[n - tail..], &input[n - tail..]);
                    prop_assert!(got[head..n - tail].iter().all(|&c| c == '*'));
                }
            }
        }
        if matches!(rule, MaskRule::Redact | MaskRule::Keep { .. }) && !value.is_empty() && !value.contains('*') {
            prop_assert_ne!(&out, &value);
        }
    }
}

// ---------------------------------------------------------------- 3. grant checks

const CONSUMER: &str = "330100/civil";
const DATASET: &str = "330000/hrss/p";
const NOW: i64 = 1_700_000_000_000;

fn item() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z][a-z0-9_]{0,6}", 1 => any::<String>()]
}

fn granted(fields: Vec<String>) -> Grant {
    Grant {
        id: "g1".into(),
        dataset_id: DATASET.into(),
        consumer: CONSUMER.into(),
        provider: "330000/hrss".into(),
        fields,
        valid_from: Some(ts(NOW - 1_000)),
        valid_until: Some(ts(NOW + 1_000)),
        state: GrantState::Active as i32,
        ..Default::default()
    }
}

fn query(filters: Vec<String>, fields: Vec<String>) -> Query {
    Query {
        filters: filters
            .into_iter()
            .map(|item| Filter { item, value: None })
            .collect(),
        fields,
        limit: 0,
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn check_grant_never_panics(
        g_fields in proptest::collection::vec(item(), 0..6),
        filters in proptest::collection::vec(item(), 0..6),
        fields in proptest::collection::vec(item(), 0..6),
        consumer in text(),
        dataset in text(),
        state in any::<i32>(),
        from in any::<i64>(),
        until in any::<i64>(),
        now in any::<i64>(),
    ) {
        let mut g = granted(g_fields);
        g.state = state;
        g.valid_from = Some(ts(from));
        g.valid_until = Some(ts(until));
        let _ = check_grant(&g, &consumer, &dataset, &query(filters, fields), now);
    }

    #[test]
    fn fields_inside_the_grant_pass_and_outside_are_refused(
        g_fields in proptest::collection::vec(item(), 1..6),
        picks in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..8),
        outsider in item(),
        outside_as_filter in any::<bool>(),
    ) {
        let g = granted(g_fields.clone());
        let mut filters = Vec::new();
        let mut fields = Vec::new();
        for (as_filter, i) in &picks {
            let f = i.get(&g_fields).clone();
            if *as_filter { filters.push(f) } else { fields.push(f) }
        }
        let inside = check_grant(&g, CONSUMER, DATASET, &query(filters.clone(), fields.clone()), NOW);
        prop_assert!(inside.is_ok(), "refused inside the grant: {inside:?}");

        prop_assume!(!g_fields.contains(&outsider));
        let expected = if outside_as_filter {
            filters.push(outsider);
            "filter_outside_grant"
        } else {
            fields.push(outsider);
            "field_outside_grant"
        };
        let outside = check_grant(&g, CONSUMER, DATASET, &query(filters, fields), NOW);
        prop_assert_eq!(outside.err().map(|d| d.rule), Some(expected));
    }
}

// ---------------------------------------------------------------- 4. config parsing

/// TOML-ish text: known section and key names with assorted values.
fn config_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "broker",
        "tls",
        "storage",
        "sharing",
        "exchange",
        "metrics",
        "log",
        "federation",
        "limits",
        "federation.children",
        "nope",
    ]);
    let key = prop::sample::select(vec![
        "id",
        "admin_id",
        "listen",
        "demand_response_days",
        "max_period_days",
        "default_period_days",
        "default_deadline_secs",
        "parent",
        "level",
        "format",
        "enabled",
        "bogus",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        "\"[ -~]{0,20}\"",
        Just("\"127.0.0.1:0\"".to_string()),
        Just("\"330000/hub\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[\"33\", 1]".to_string()),
    ];
    proptest::collection::vec(
        (section, proptest::collection::vec((key, value), 0..4)),
        0..4,
    )
    .prop_map(|secs| {
        let mut s = String::new();
        for (sec, kvs) in secs {
            s.push_str(&format!("[{sec}]\n"));
            for (k, v) in kvs {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn config_parsing_never_panics(s in prop_oneof![text(), config_text()]) {
        if let Ok(c) = toml::from_str::<Config>(&s) {
            let _ = c.validate();
            let _ = c.log.validate_otlp();
        }
    }

    #[test]
    fn template_with_one_line_dropped_never_panics(line in any::<prop::sample::Index>()) {
        let template = Config::default().render_template();
        let lines: Vec<&str> = template.lines().collect();
        let drop = line.index(lines.len());
        let text: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != drop)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        if let Ok(c) = toml::from_str::<Config>(&text) {
            let _ = c.validate();
        }
    }
}

#[test]
fn default_template_parses_back_and_validates() {
    let template = Config::default().render_template();
    let parsed = toml::from_str::<Config>(&template);
    assert!(parsed.is_ok(), "template does not parse: {parsed:?}");
    if let Ok(c) = parsed {
        assert!(c.validate().is_ok(), "{:?}", c.validate());
        // The template is the default, written out.
        assert_eq!(c.render_template(), template);
    }
}

// ---------------------------------------------------------------- 5. grant signatures

const ISSUER: &str = "330000/hub";

fn issuer_key() -> &'static (SigningKey, Vec<KeyAnnouncement>) {
    static KEY: OnceLock<(SigningKey, Vec<KeyAnnouncement>)> = OnceLock::new();
    KEY.get_or_init(|| {
        // The key lives in memory once loaded; the directory can go.
        let dir = tempfile::tempdir().expect("temp dir");
        let key = SigningKey::load_or_create(dir.path(), ISSUER).expect("signing key");
        let keys = vec![key.announcement()];
        (key, keys)
    })
}

fn signed_grant() -> impl Strategy<Value = Grant> {
    (
        text(),
        text(),
        text(),
        text(),
        proptest::collection::vec(item(), 0..5),
        -1_000_000_000_000_000i64..1_000_000_000_000_000,
        -1_000_000_000_000_000i64..1_000_000_000_000_000,
        any::<u64>(),
    )
        .prop_map(
            |(id, dataset_id, consumer, provider, fields, from, until, daily_quota)| {
                let mut g = Grant {
                    id,
                    dataset_id,
                    consumer,
                    provider,
                    fields,
                    valid_from: Some(ts(from)),
                    valid_until: Some(ts(until)),
                    daily_quota,
                    issuer: ISSUER.into(),
                    state: GrantState::Active as i32,
                    ..Default::default()
                };
                g.token = Some(issuer_key().0.token_for(&g));
                g
            },
        )
}

/// One change to a grant's signed terms.
#[derive(Debug, Clone)]
enum Mutation {
    Id(String),
    Dataset(String),
    Consumer(String),
    Provider(String),
    AddField(String),
    RemoveField(prop::sample::Index),
    RenameField(prop::sample::Index, String),
    ValidFrom(i64),
    ValidUntil(i64),
    Quota(u64),
    Issuer(String),
    FlipClaims(prop::sample::Index, u8),
    FlipSignature(prop::sample::Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let delta = prop_oneof![1i64..1_000_000, -1_000_000i64..0, Just(i64::MAX / 4)];
    prop_oneof![
        text().prop_map(Mutation::Id),
        text().prop_map(Mutation::Dataset),
        text().prop_map(Mutation::Consumer),
        text().prop_map(Mutation::Provider),
        item().prop_map(Mutation::AddField),
        any::<prop::sample::Index>().prop_map(Mutation::RemoveField),
        (any::<prop::sample::Index>(), item()).prop_map(|(i, s)| Mutation::RenameField(i, s)),
        delta.clone().prop_map(Mutation::ValidFrom),
        delta.prop_map(Mutation::ValidUntil),
        any::<u64>().prop_map(Mutation::Quota),
        text().prop_map(Mutation::Issuer),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::FlipClaims(i, m)),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::FlipSignature(i, m)),
    ]
}

/// Applies a mutation; `None` when it would not change anything (e.g. the same value).
fn mutate(g: &Grant, m: &Mutation) -> Option<Grant> {
    let mut b = g.clone();
    let token = b.token.as_mut()?;
    match m {
        Mutation::Id(s) => b.id = s.clone(),
        Mutation::Dataset(s) => b.dataset_id = s.clone(),
        Mutation::Consumer(s) => b.consumer = s.clone(),
        Mutation::Provider(s) => b.provider = s.clone(),
        Mutation::AddField(s) => b.fields.push(s.clone()),
        Mutation::RemoveField(i) => {
            if b.fields.is_empty() {
                return None;
            }
            b.fields.remove(i.index(b.fields.len()));
        }
        Mutation::RenameField(i, s) => {
            if b.fields.is_empty() {
                return None;
            }
            let n = b.fields.len();
            b.fields[i.index(n)] = s.clone();
        }
        Mutation::ValidFrom(d) => b.valid_from = Some(ts(ms(&b.valid_from).saturating_add(*d))),
        Mutation::ValidUntil(d) => b.valid_until = Some(ts(ms(&b.valid_until).saturating_add(*d))),
        Mutation::Quota(q) => b.daily_quota = *q,
        Mutation::Issuer(s) => b.issuer = s.clone(),
        Mutation::FlipClaims(i, x) => {
            if token.claims.is_empty() {
                return None;
            }
            let n = token.claims.len();
            token.claims[i.index(n)] ^= x;
        }
        Mutation::FlipSignature(i, x) => {
            let n = token.signature.len();
            token.signature[i.index(n)] ^= x;
        }
    }
    (b != *g).then_some(b)
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn unmodified_grants_verify(g in signed_grant()) {
        let keys = &issuer_key().1;
        let r = verify_grant(&g, keys);
        prop_assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn any_single_change_is_forged(g in signed_grant(), m in mutation()) {
        let keys = &issuer_key().1;
        let bad = mutate(&g, &m);
        prop_assume!(bad.is_some());
        if let Some(bad) = bad {
            prop_assert_eq!(verify_grant(&bad, keys).err().map(|d| d.rule), Some("grant_forged"));
        }
    }
}
