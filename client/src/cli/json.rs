//! JSON views of the API's messages for `--json`: every object has an `id`, enums are short
//! names (`"PENDING"`, `null` when unset), times are RFC 3339 strings in UTC+8, bytes are base64.

use govshare_client::enums::{short_name, ProtoEnum};
use govshare_client::proto::{
    self, value, AuditEntry, BrokerStatus, DatasetState, DeadLetter, Demand, DemandState,
    ExchangeResult, ExchangeState, Grant, GrantState, GrantToken, HopReceipt, InfoItem, LinkStatus,
    Node, NodeRole, NodeState, OpenType, QueueInfo, Row, ShareType, SubmitResponse, UpdateCycle,
    WhoAmIResponse,
};
use prost_types::Timestamp;
use serde_json::{json, Map, Value as Json};

use super::parse::format_timestamp;

/// A timestamp as RFC 3339 (UTC+8), or null.
pub(crate) fn ts(t: Option<&Timestamp>) -> Json {
    t.map_or(Json::Null, |t| Json::String(format_timestamp(t, true)))
}

/// An enum field's short name, or null when unspecified.
pub(crate) fn enum_name<E: ProtoEnum>(n: i32) -> Json {
    let name = short_name::<E>(n);
    if name.is_empty() {
        Json::Null
    } else {
        Json::String(name)
    }
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A node.
pub(crate) fn node(n: &Node) -> Json {
    json!({
        "id": n.id,
        "name": n.name,
        "region": n.region,
        "role": enum_name::<NodeRole>(n.role),
        "credit_code": n.credit_code,
        "credit_code_valid": n.credit_code_valid,
        "contact": n.contact,
        "state": enum_name::<NodeState>(n.state),
        "registered_at": ts(n.registered_at.as_ref()),
        "registered_by": n.registered_by,
        "updated_at": ts(n.updated_at.as_ref()),
        "home_broker": n.home_broker,
        "certificate_sha256": n.certificate_sha256,
    })
}

/// The caller's identity as the broker sees it.
pub(crate) fn whoami(w: &WhoAmIResponse) -> Json {
    json!({
        "id": w.node_id,
        "node_id": w.node_id,
        "role": enum_name::<NodeRole>(w.role),
        "broker_id": w.broker_id,
        "node": w.node.as_ref().map_or(Json::Null, node),
    })
}

/// An information item, with the keys a catalog file uses.
pub(crate) fn item(i: &InfoItem) -> Json {
    json!({
        "name": i.name,
        "type": i.r#type,
        "description": i.description,
        "share_type": enum_name::<ShareType>(i.share_type),
        "sensitive": i.sensitive,
        "mask": i.mask,
    })
}

/// A dataset, with the keys a catalog file uses (so it can be edited and published again).
pub(crate) fn dataset(d: &proto::Dataset) -> Json {
    json!({
        "id": d.id,
        "code": d.code,
        "provider": d.provider,
        "name": d.name,
        "description": d.description,
        "share_type": enum_name::<ShareType>(d.share_type),
        "share_condition": d.share_condition,
        "open_type": enum_name::<OpenType>(d.open_type),
        "update_cycle": enum_name::<UpdateCycle>(d.update_cycle),
        "tags": d.tags,
        "items": d.items.iter().map(item).collect::<Vec<_>>(),
        "version": d.version,
        "state": enum_name::<DatasetState>(d.state),
        "published_at": ts(d.published_at.as_ref()),
        "updated_at": ts(d.updated_at.as_ref()),
        "home_broker": d.home_broker,
    })
}

/// A demand.
pub(crate) fn demand(d: &Demand) -> Json {
    json!({
        "id": d.id,
        "dataset_id": d.dataset_id,
        "consumer": d.consumer,
        "provider": d.provider,
        "fields": d.fields,
        "purpose": d.purpose,
        "legal_basis": d.legal_basis,
        "period_days": d.period_days,
        "state": enum_name::<DemandState>(d.state),
        "reason": d.reason,
        "filed_at": ts(d.filed_at.as_ref()),
        "respond_by": ts(d.respond_by.as_ref()),
        "decided_at": ts(d.decided_at.as_ref()),
        "decided_by": d.decided_by,
        "grant_id": d.grant_id,
        "overdue": d.overdue,
        "dataset_version": d.dataset_version,
    })
}

/// A demand with the grant issued for it (null when none), as `demand file` and `approve` answer.
pub(crate) fn demand_with_grant(d: Option<&Demand>, g: Option<&Grant>) -> Json {
    let mut obj = d.map_or_else(|| json!({"id": null, "state": null}), demand);
    if let Json::Object(map) = &mut obj {
        map.insert("grant".to_string(), g.map_or(Json::Null, grant));
    }
    obj
}

fn token(t: &GrantToken) -> Json {
    json!({
        "claims": base64(&t.claims),
        "signature": base64(&t.signature),
        "key_id": t.key_id,
    })
}

/// A grant.
pub(crate) fn grant(g: &Grant) -> Json {
    json!({
        "id": g.id,
        "dataset_id": g.dataset_id,
        "consumer": g.consumer,
        "provider": g.provider,
        "fields": g.fields,
        "purpose": g.purpose,
        "valid_from": ts(g.valid_from.as_ref()),
        "valid_until": ts(g.valid_until.as_ref()),
        "daily_quota": g.daily_quota,
        "issuer": g.issuer,
        "demand_id": g.demand_id,
        "state": enum_name::<GrantState>(g.state),
        "revoked_at": ts(g.revoked_at.as_ref()),
        "revoked_by": g.revoked_by,
        "revoke_reason": g.revoke_reason,
        "issued_at": ts(g.issued_at.as_ref()),
        "token": g.token.as_ref().map_or(Json::Null, token),
    })
}

/// An audit entry; its `id` is `BROKER#SEQ`, hashes are hex.
pub(crate) fn audit(e: &AuditEntry) -> Json {
    json!({
        "id": format!("{}#{}", e.broker, e.seq),
        "seq": e.seq,
        "at": ts(e.at.as_ref()),
        "decision": e.decision,
        "actor": e.actor,
        "subject": e.subject,
        "exchange_id": e.exchange_id,
        "dataset_id": e.dataset_id,
        "grant_id": e.grant_id,
        "demand_id": e.demand_id,
        "consumer": e.consumer,
        "provider": e.provider,
        "reason": e.reason,
        "broker": e.broker,
        "prev_hash": hex::encode(&e.prev_hash),
        "hash": hex::encode(&e.hash),
    })
}

/// One value of a row: string, number, bool, base64 text for bytes, or null.
pub(crate) fn value(v: Option<&proto::Value>) -> Json {
    match v.and_then(|v| v.kind.as_ref()) {
        None => Json::Null,
        Some(value::Kind::StringValue(s)) => Json::String(s.clone()),
        Some(value::Kind::IntValue(i)) => json!(i),
        Some(value::Kind::DoubleValue(d)) => json!(d),
        Some(value::Kind::BoolValue(b)) => json!(b),
        Some(value::Kind::BytesValue(b)) => Json::String(base64(b)),
    }
}

/// A row as an object, keys sorted.
pub(crate) fn row(r: &Row) -> Json {
    let mut keys: Vec<&String> = r.fields.keys().collect();
    keys.sort();
    let map: Map<String, Json> = keys
        .into_iter()
        .map(|k| (k.clone(), value(r.fields.get(k))))
        .collect();
    Json::Object(map)
}

fn receipt(h: &HopReceipt) -> Json {
    json!({
        "hop": h.hop,
        "broker": h.broker,
        "at": ts(h.at.as_ref()),
        "decision": h.decision,
        "key_id": h.key_id,
        "signature": base64(&h.signature),
    })
}

/// An exchange's state or outcome; `error.code` is the code's name.
pub(crate) fn exchange(r: &ExchangeResult) -> Json {
    json!({
        "id": r.exchange_id,
        "state": enum_name::<ExchangeState>(r.state),
        "dataset_id": r.dataset_id,
        "grant_id": r.grant_id,
        "trace_id": r.trace_id,
        "rows": r.rows.iter().map(row).collect::<Vec<_>>(),
        "truncated": r.truncated,
        "masked_fields": r.masked_fields,
        "dropped_fields": r.dropped_fields,
        "error": r.error.as_ref().map_or(Json::Null, |e| json!({
            "code": govshare_client::code_name_i32(e.code),
            "message": e.message,
        })),
        "accepted_at": ts(r.accepted_at.as_ref()),
        "finished_at": ts(r.finished_at.as_ref()),
        "trail": r.trail.iter().map(receipt).collect::<Vec<_>>(),
    })
}

/// A submit receipt.
pub(crate) fn submitted(s: &SubmitResponse) -> Json {
    json!({
        "id": s.exchange_id,
        "state": enum_name::<ExchangeState>(s.state),
        "duplicate": s.duplicate,
        "trace_id": s.trace_id,
    })
}

/// A dead letter, with its exchange's essentials.
pub(crate) fn dead_letter(d: &DeadLetter) -> Json {
    let env = d.exchange.as_ref();
    let req = env.and_then(|e| e.request.as_ref());
    json!({
        "id": env.map(|e| e.exchange_id.clone()).unwrap_or_default(),
        "dataset_id": req.map(|r| r.dataset_id.clone()).unwrap_or_default(),
        "consumer": env.map(|e| e.consumer.clone()).unwrap_or_default(),
        "provider": env.map(|e| e.provider.clone()).unwrap_or_default(),
        "origin_broker": env.map(|e| e.origin_broker.clone()).unwrap_or_default(),
        "deadline": ts(env.and_then(|e| e.deadline.as_ref())),
        "reason": d.reason,
        "at": ts(d.at.as_ref()),
        "deliveries": d.deliveries,
    })
}

fn link(l: &LinkStatus) -> Json {
    json!({
        "id": l.peer,
        "peer": l.peer,
        "direction": l.direction,
        "state": l.state,
        "since": ts(l.since.as_ref()),
        "rtt_ms": l.rtt_ms,
    })
}

/// A queue's figures.
pub(crate) fn queue(q: &QueueInfo) -> Json {
    json!({
        "id": q.destination,
        "destination": q.destination,
        "depth": q.depth,
        "bytes": q.bytes,
        "in_flight": q.in_flight,
    })
}

/// The broker's status, with its queues.
pub(crate) fn broker_status(s: &BrokerStatus, queues: &[QueueInfo]) -> Json {
    json!({
        "id": s.broker_id,
        "broker_id": s.broker_id,
        "version": s.version,
        "parent": s.parent,
        "started_at": ts(s.started_at.as_ref()),
        "nodes": s.nodes,
        "datasets": s.datasets,
        "pending_demands": s.pending_demands,
        "overdue_demands": s.overdue_demands,
        "active_grants": s.active_grants,
        "queued": s.queued,
        "dead_letters": s.dead_letters,
        "links": s.links.iter().map(link).collect::<Vec<_>>(),
        "queues": queues.iter().map(queue).collect::<Vec<_>>(),
    })
}

/// Whether an exchange state is an end without rows.
pub(crate) fn is_failure(state: i32) -> bool {
    matches!(
        ExchangeState::from_number(state),
        Some(
            ExchangeState::Failed
                | ExchangeState::Denied
                | ExchangeState::Expired
                | ExchangeState::DeadLettered
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_json_has_id_and_short_state() {
        let d = Demand {
            id: "dm-1".into(),
            dataset_id: "330000/hrss/pension-status".into(),
            consumer: "330100/mca".into(),
            fields: vec!["id_number".into(), "status".into()],
            purpose: "低保资格核验".into(),
            state: DemandState::Pending as i32,
            filed_at: Some(Timestamp {
                seconds: 1_790_812_800,
                nanos: 0,
            }),
            ..Default::default()
        };
        let j = demand(&d);
        assert_eq!(j["id"], "dm-1");
        assert_eq!(j["state"], "PENDING");
        assert_eq!(j["fields"], json!(["id_number", "status"]));
        assert_eq!(j["purpose"], "低保资格核验");
        assert_eq!(j["filed_at"], "2026-10-01T08:00:00+08:00");
        assert_eq!(j["decided_at"], Json::Null);

        let g = Grant {
            id: "gr-1".into(),
            state: GrantState::Active as i32,
            ..Default::default()
        };
        let d = Demand {
            state: DemandState::Approved as i32,
            grant_id: "gr-1".into(),
            ..d
        };
        let j = demand_with_grant(Some(&d), Some(&g));
        assert_eq!(j["state"], "APPROVED");
        assert_eq!(j["grant"]["id"], "gr-1");
        assert_eq!(j["grant"]["state"], "ACTIVE");
        // A list prints as an array of the same objects.
        let list = Json::Array(vec![demand(&d)]);
        assert_eq!(list[0]["id"], "dm-1");
    }

    #[test]
    fn dataset_json_round_trips_through_the_catalog_file_parser() {
        let d = proto::Dataset {
            id: "330000/hrss/pension-status".into(),
            code: "pension-status".into(),
            provider: "330000/hrss".into(),
            name: "城乡居民养老保险待遇发放".into(),
            share_type: ShareType::Conditional as i32,
            open_type: OpenType::NotOpen as i32,
            items: vec![InfoItem {
                name: "id_number".into(),
                sensitive: true,
                mask: "keep:6,4".into(),
                ..Default::default()
            }],
            version: 3,
            state: DatasetState::Published as i32,
            ..Default::default()
        };
        let text = dataset(&d).to_string();
        let parsed = govshare_client::catalog_file::parse_str(
            &text,
            govshare_client::catalog_file::Format::Json,
        )
        .unwrap();
        assert_eq!(parsed.dataset.code, d.code);
        assert_eq!(parsed.dataset.share_type, d.share_type);
        assert_eq!(parsed.dataset.items, d.items);
        assert_eq!(parsed.dataset.provider, "");
    }

    #[test]
    fn values_and_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let v = |k| proto::Value { kind: Some(k) };
        assert_eq!(value(Some(&v(value::Kind::IntValue(7)))), json!(7));
        assert_eq!(value(Some(&v(value::Kind::BoolValue(true)))), json!(true));
        assert_eq!(value(Some(&proto::Value { kind: None })), Json::Null);
        assert_eq!(value(None), Json::Null);
        assert_eq!(
            value(Some(&v(value::Kind::BytesValue(b"foo".to_vec())))),
            json!("Zm9v")
        );
    }
}
