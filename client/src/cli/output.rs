//! Human output: tables for lists, aligned `label: value` blocks for single objects, and the
//! writer that sends text or JSON to stdout. Times are RFC 3339 in UTC+8.

use std::io::Write;

use govshare_client::enums::short_name;
use govshare_client::proto::{
    self, value, AuditEntry, BrokerStatus, DatasetState, DeadLetter, Demand, DemandState,
    ExchangeResult, ExchangeState, Grant, GrantState, Node, NodeRole, NodeState, OpenType,
    QueueInfo, Row, ShareType, UpdateCycle,
};
use serde_json::Value as Json;

use super::parse::format_opt;
use super::table::{key_values, Table};

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub(crate) fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Writes a JSON value, pretty-printed, to stdout.
pub(crate) fn print_json(value: &Json) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print(&text)
}

/// The ids `--quiet` prints for a JSON view: an object's `id`, or each array element's;
/// empty ids and objects without one (e.g. `{"acked": 2}`) give nothing.
pub(crate) fn ids_of(value: &Json) -> Vec<String> {
    let id = |v: &Json| {
        v.get("id")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    match value {
        Json::Array(items) => items.iter().filter_map(id).collect(),
        other => id(other).into_iter().collect(),
    }
}

/// Writes the ids of a JSON view to stdout, one per line (`--quiet`).
pub(crate) fn print_ids(value: &Json) -> anyhow::Result<()> {
    let text: String = ids_of(value).into_iter().map(|id| id + "\n").collect();
    print(&text)
}

/// Writes a note to stderr (warnings, hints, "no results").
pub(crate) fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Prints a table, or `(none)`-style note on stderr when it is empty.
pub(crate) fn print_table(table: &Table, what: &str) -> anyhow::Result<()> {
    if table.is_empty() {
        note(&format!("no {what}"));
        Ok(())
    } else {
        print(&table.render())
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

// ----- nodes -----

/// The node list.
pub(crate) fn nodes_table(nodes: &[Node]) -> Table {
    let mut t = Table::new(["ID", "NAME", "ROLE", "STATE", "HOME BROKER", "REGISTERED"]);
    for n in nodes {
        t.row([
            n.id.clone(),
            n.name.clone(),
            short_name::<NodeRole>(n.role),
            short_name::<NodeState>(n.state),
            n.home_broker.clone(),
            format_opt(n.registered_at.as_ref()),
        ]);
    }
    t
}

/// One node.
pub(crate) fn node_block(n: &Node) -> String {
    let credit = if n.credit_code.is_empty() {
        String::new()
    } else if n.credit_code_valid {
        n.credit_code.clone()
    } else {
        format!("{} (check digit does not verify)", n.credit_code)
    };
    key_values(&[
        ("id", n.id.clone()),
        ("name", n.name.clone()),
        ("region", n.region.clone()),
        ("role", short_name::<NodeRole>(n.role)),
        ("state", short_name::<NodeState>(n.state)),
        ("credit code", credit),
        ("contact", n.contact.clone()),
        ("home broker", n.home_broker.clone()),
        (
            "certificate",
            if n.certificate_sha256.is_empty() {
                "any from a trusted CA".to_string()
            } else {
                format!("pinned, sha256 {}", n.certificate_sha256)
            },
        ),
        ("registered", format_opt(n.registered_at.as_ref())),
        ("registered by", n.registered_by.clone()),
        ("updated", format_opt(n.updated_at.as_ref())),
    ])
}

// ----- catalog -----

/// The dataset list.
pub(crate) fn datasets_table(datasets: &[proto::Dataset]) -> Table {
    let mut t = Table::new(["ID", "NAME", "SHARE", "CYCLE", "ITEMS", "VER", "STATE"]);
    for d in datasets {
        t.row([
            d.id.clone(),
            d.name.clone(),
            short_name::<ShareType>(d.share_type),
            short_name::<UpdateCycle>(d.update_cycle),
            d.items.len().to_string(),
            d.version.to_string(),
            short_name::<DatasetState>(d.state),
        ]);
    }
    t
}

/// One dataset with its items.
pub(crate) fn dataset_block(d: &proto::Dataset) -> String {
    let mut out = key_values(&[
        ("id", d.id.clone()),
        ("name", d.name.clone()),
        ("description", d.description.clone()),
        ("provider", d.provider.clone()),
        ("home broker", d.home_broker.clone()),
        ("share type", short_name::<ShareType>(d.share_type)),
        ("share condition", d.share_condition.clone()),
        ("open type", short_name::<OpenType>(d.open_type)),
        ("update cycle", short_name::<UpdateCycle>(d.update_cycle)),
        ("tags", d.tags.join(", ")),
        ("version", d.version.to_string()),
        ("state", short_name::<DatasetState>(d.state)),
        ("published", format_opt(d.published_at.as_ref())),
        ("updated", format_opt(d.updated_at.as_ref())),
    ]);
    out.push('\n');
    let mut t = Table::new(["ITEM", "TYPE", "SHARE", "SENSITIVE", "MASK", "DESCRIPTION"]);
    for i in &d.items {
        t.row([
            i.name.clone(),
            i.r#type.clone(),
            or_dash(&short_name::<ShareType>(i.share_type)),
            if i.sensitive { "yes" } else { "" }.to_string(),
            i.mask.clone(),
            i.description.clone(),
        ]);
    }
    out.push_str(&t.render());
    out
}

// ----- demands and grants -----

/// The demand list; overdue pending demands are marked.
pub(crate) fn demands_table(demands: &[Demand]) -> Table {
    let mut t = Table::new([
        "ID",
        "DATASET",
        "CONSUMER",
        "FIELDS",
        "STATE",
        "FILED",
        "RESPOND BY",
    ]);
    for d in demands {
        let mut state = short_name::<DemandState>(d.state);
        if d.overdue {
            state.push_str(" (overdue)");
        }
        t.row([
            d.id.clone(),
            d.dataset_id.clone(),
            d.consumer.clone(),
            d.fields.join(","),
            state,
            format_opt(d.filed_at.as_ref()),
            format_opt(d.respond_by.as_ref()),
        ]);
    }
    t
}

/// One demand.
pub(crate) fn demand_block(d: &Demand) -> String {
    key_values(&[
        ("id", d.id.clone()),
        ("state", short_name::<DemandState>(d.state)),
        (
            "overdue",
            if d.overdue {
                "yes".into()
            } else {
                String::new()
            },
        ),
        ("dataset", d.dataset_id.clone()),
        (
            "dataset version",
            if d.dataset_version == 0 {
                String::new()
            } else {
                d.dataset_version.to_string()
            },
        ),
        ("consumer", d.consumer.clone()),
        ("provider", d.provider.clone()),
        ("fields", d.fields.join(", ")),
        ("purpose", d.purpose.clone()),
        ("legal basis", d.legal_basis.clone()),
        ("period", format!("{} days", d.period_days)),
        ("filed", format_opt(d.filed_at.as_ref())),
        ("respond by", format_opt(d.respond_by.as_ref())),
        ("decided", format_opt(d.decided_at.as_ref())),
        ("decided by", d.decided_by.clone()),
        ("reason", d.reason.clone()),
        ("grant", d.grant_id.clone()),
    ])
}

/// What `demand file` and `demand approve` print: the demand's id and state, and the grant if any.
pub(crate) fn demand_outcome(d: Option<&Demand>, g: Option<&Grant>) -> String {
    let mut pairs = Vec::new();
    if let Some(d) = d {
        pairs.push(("demand", d.id.clone()));
        pairs.push(("state", short_name::<DemandState>(d.state)));
        if !d.reason.is_empty() {
            pairs.push(("reason", d.reason.clone()));
        }
        if d.state == DemandState::Pending as i32 {
            pairs.push(("respond by", format_opt(d.respond_by.as_ref())));
        }
    }
    let grant_id = g
        .map(|g| g.id.clone())
        .or_else(|| d.map(|d| d.grant_id.clone()))
        .unwrap_or_default();
    pairs.push(("grant", grant_id));
    if let Some(g) = g {
        pairs.push(("fields", g.fields.join(", ")));
        pairs.push(("valid until", format_opt(g.valid_until.as_ref())));
    }
    key_values(&pairs)
}

fn quota(q: u64) -> String {
    if q == 0 {
        "unlimited".to_string()
    } else {
        format!("{q}/day")
    }
}

/// The grant list.
pub(crate) fn grants_table(grants: &[Grant]) -> Table {
    let mut t = Table::new([
        "ID",
        "DATASET",
        "CONSUMER",
        "FIELDS",
        "VALID UNTIL",
        "QUOTA",
        "STATE",
    ]);
    for g in grants {
        t.row([
            g.id.clone(),
            g.dataset_id.clone(),
            g.consumer.clone(),
            g.fields.join(","),
            format_opt(g.valid_until.as_ref()),
            quota(g.daily_quota),
            short_name::<GrantState>(g.state),
        ]);
    }
    t
}

/// One grant.
pub(crate) fn grant_block(g: &Grant) -> String {
    key_values(&[
        ("id", g.id.clone()),
        ("state", short_name::<GrantState>(g.state)),
        ("dataset", g.dataset_id.clone()),
        ("consumer", g.consumer.clone()),
        ("provider", g.provider.clone()),
        ("fields", g.fields.join(", ")),
        ("purpose", g.purpose.clone()),
        ("valid from", format_opt(g.valid_from.as_ref())),
        ("valid until", format_opt(g.valid_until.as_ref())),
        ("daily quota", quota(g.daily_quota)),
        ("issuer", g.issuer.clone()),
        ("issued", format_opt(g.issued_at.as_ref())),
        ("demand", g.demand_id.clone()),
        ("revoked", format_opt(g.revoked_at.as_ref())),
        ("revoked by", g.revoked_by.clone()),
        ("revoke reason", g.revoke_reason.clone()),
        (
            "signed",
            g.token
                .as_ref()
                .map(|t| format!("yes, key {}", or_dash(&t.key_id)))
                .unwrap_or_default(),
        ),
    ])
}

// ----- audit -----

/// The audit list: what each entry is about is the first of exchange, grant, demand, dataset, subject.
pub(crate) fn audit_table(entries: &[AuditEntry]) -> Table {
    let mut t = Table::new([
        "SEQ", "AT", "BROKER", "DECISION", "ACTOR", "ABOUT", "REASON",
    ]);
    for e in entries {
        let about = [
            ("exchange ", &e.exchange_id),
            ("grant ", &e.grant_id),
            ("demand ", &e.demand_id),
            ("dataset ", &e.dataset_id),
            ("node ", &e.subject),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}{v}"))
        .unwrap_or_default();
        t.row([
            e.seq.to_string(),
            format_opt(e.at.as_ref()),
            e.broker.clone(),
            e.decision.clone(),
            e.actor.clone(),
            about,
            e.reason.clone(),
        ]);
    }
    t
}

// ----- exchanges -----

/// A value as table text: bytes as `<N bytes>`, null as empty.
fn cell(v: Option<&proto::Value>) -> String {
    match v.and_then(|v| v.kind.as_ref()) {
        None => String::new(),
        Some(value::Kind::StringValue(s)) => s.clone(),
        Some(value::Kind::IntValue(i)) => i.to_string(),
        Some(value::Kind::DoubleValue(d)) => d.to_string(),
        Some(value::Kind::BoolValue(b)) => b.to_string(),
        Some(value::Kind::BytesValue(b)) => format!("<{} bytes>", b.len()),
    }
}

/// Rows as a table; columns in `order` first (the fields asked for), then the rest sorted.
pub(crate) fn rows_table(rows: &[Row], order: &[String]) -> Table {
    let mut columns: Vec<String> = order
        .iter()
        .filter(|c| rows.iter().any(|r| r.fields.contains_key(*c)))
        .cloned()
        .collect();
    let mut rest: Vec<String> = rows
        .iter()
        .flat_map(|r| r.fields.keys())
        .filter(|k| !columns.contains(k))
        .cloned()
        .collect();
    rest.sort();
    rest.dedup();
    columns.extend(rest);
    let mut t = Table::new(columns.iter().map(|c| c.to_uppercase()));
    for r in rows {
        t.row(columns.iter().map(|c| cell(r.fields.get(c))));
    }
    t
}

/// An exchange's state or outcome: a summary block, the rows, and the hop trail when asked.
pub(crate) fn exchange_block(r: &ExchangeResult, order: &[String], trail: bool) -> String {
    let error = r
        .error
        .as_ref()
        .map(|e| format!("{}: {}", govshare_client::code_name_i32(e.code), e.message))
        .unwrap_or_default();
    let mut out = key_values(&[
        ("exchange", r.exchange_id.clone()),
        ("state", short_name::<ExchangeState>(r.state)),
        ("error", error),
        ("dataset", r.dataset_id.clone()),
        ("grant", r.grant_id.clone()),
        ("trace", r.trace_id.clone()),
        ("accepted", format_opt(r.accepted_at.as_ref())),
        ("finished", format_opt(r.finished_at.as_ref())),
        ("masked", r.masked_fields.join(", ")),
        ("dropped", r.dropped_fields.join(", ")),
        (
            "rows",
            if r.state == ExchangeState::Answered as i32 {
                format!(
                    "{}{}",
                    r.rows.len(),
                    if r.truncated {
                        " (truncated: the provider had more)"
                    } else {
                        ""
                    }
                )
            } else {
                String::new()
            },
        ),
    ]);
    if !r.rows.is_empty() {
        out.push('\n');
        out.push_str(&rows_table(&r.rows, order).render());
    }
    if trail && !r.trail.is_empty() {
        out.push('\n');
        let mut t = Table::new(["HOP", "BROKER", "DECISION", "AT", "SIGNED"]);
        for h in &r.trail {
            t.row([
                h.hop.to_string(),
                h.broker.clone(),
                h.decision.clone(),
                format_opt(h.at.as_ref()),
                yes_no(!h.signature.is_empty()),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

// ----- administration -----

/// The dead-letter list.
pub(crate) fn dead_letters_table(letters: &[DeadLetter]) -> Table {
    let mut t = Table::new([
        "EXCHANGE",
        "DATASET",
        "CONSUMER",
        "DELIVERIES",
        "AT",
        "REASON",
    ]);
    for d in letters {
        let env = d.exchange.as_ref();
        t.row([
            env.map(|e| e.exchange_id.clone()).unwrap_or_default(),
            env.and_then(|e| e.request.as_ref())
                .map(|r| r.dataset_id.clone())
                .unwrap_or_default(),
            env.map(|e| e.consumer.clone()).unwrap_or_default(),
            d.deliveries.to_string(),
            format_opt(d.at.as_ref()),
            d.reason.clone(),
        ]);
    }
    t
}

/// The broker's status, its links and its queues.
pub(crate) fn status_block(s: &BrokerStatus, queues: &[QueueInfo]) -> String {
    let mut out = key_values(&[
        ("broker", s.broker_id.clone()),
        ("version", s.version.clone()),
        ("parent", or_dash(&s.parent)),
        ("started", format_opt(s.started_at.as_ref())),
        ("nodes", s.nodes.to_string()),
        ("datasets", s.datasets.to_string()),
        (
            "demands",
            format!(
                "{} pending, {} overdue",
                s.pending_demands, s.overdue_demands
            ),
        ),
        ("active grants", s.active_grants.to_string()),
        ("queued", s.queued.to_string()),
        ("dead letters", s.dead_letters.to_string()),
    ]);
    if !s.links.is_empty() {
        out.push('\n');
        let mut t = Table::new(["PEER", "DIRECTION", "STATE", "SINCE", "RTT"]);
        for l in &s.links {
            t.row([
                l.peer.clone(),
                l.direction.clone(),
                l.state.clone(),
                format_opt(l.since.as_ref()),
                format!("{:.1} ms", l.rtt_ms),
            ]);
        }
        out.push_str(&t.render());
    }
    if !queues.is_empty() {
        out.push('\n');
        let mut t = Table::new(["DESTINATION", "DEPTH", "BYTES", "IN FLIGHT"]);
        for q in queues {
            t.row([
                q.destination.clone(),
                q.depth.to_string(),
                q.bytes.to_string(),
                q.in_flight.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn rows_follow_the_fields_asked_for() {
        let s = |t: &str| proto::Value {
            kind: Some(value::Kind::StringValue(t.to_string())),
        };
        let row = Row {
            fields: HashMap::from([
                ("status".to_string(), s("PAID")),
                ("id_number".to_string(), s("330102********1234")),
                ("month".to_string(), s("2026-10")),
            ]),
        };
        let text = rows_table(&[row], &["status".to_string(), "nope".to_string()]).render();
        let header = text.lines().next().unwrap_or_default();
        assert_eq!(
            header.split_whitespace().collect::<Vec<_>>(),
            ["STATUS", "ID_NUMBER", "MONTH"]
        );
    }

    #[test]
    fn quiet_prints_the_ids_of_objects_and_lists() {
        use serde_json::json;
        assert_eq!(ids_of(&json!({"id": "dm-1", "state": "PENDING"})), ["dm-1"]);
        assert_eq!(
            ids_of(&json!([{"id": "gr-1"}, {"id": ""}, {"id": "gr-2"}, {"x": 1}])),
            ["gr-1", "gr-2"]
        );
        assert!(ids_of(&json!({"acked": 2})).is_empty());
        assert!(ids_of(&json!([])).is_empty());
        // The JSON views the commands print carry the id `--quiet` shows.
        let d = Demand {
            id: "dm-1".into(),
            state: DemandState::Pending as i32,
            ..Default::default()
        };
        assert_eq!(
            ids_of(&super::super::json::demand_with_grant(Some(&d), None)),
            ["dm-1"]
        );
    }

    #[test]
    fn demand_outcome_shows_grant_when_granted_at_once() {
        let d = Demand {
            id: "dm-1".into(),
            state: DemandState::Approved as i32,
            grant_id: "gr-1".into(),
            ..Default::default()
        };
        let text = demand_outcome(Some(&d), None);
        assert!(text.contains("demand:  dm-1"), "{text}");
        assert!(text.contains("state:   APPROVED"), "{text}");
        assert!(text.contains("grant:   gr-1"), "{text}");
    }
}
