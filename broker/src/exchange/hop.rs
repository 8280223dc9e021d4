//! Exchanges crossing brokers: what a hop does with an exchange or a result that arrives over
//! a federation link, and the last check before one leaves through a link.
//!
//! Every hop checks the grant itself (fail closed) from the signed token the exchange carries:
//! the issuer's signature with the key learned over the links, the consumer, the dataset, the
//! validity window, the fields, and the revocations flooded through the cascade. The provider's
//! home broker checks again against its own copy of the grant and counts the quota.

use super::enforce::{self, Denial};
use super::record::StoredExchange;
use super::{exchange_entry, Engine};
use crate::error::Result;
use crate::federation::{in_scope, Effect, Route};
use crate::ids::DatasetId;
use crate::store::{Tx, T};
use crate::time::{ms, now_ms, ts};
use govshare_proto::v1::AuditEntry;
use govshare_proto::v1::{
    link_frame, DatasetState, ErrorStatus, ExchangeEnvelope, ExchangeResult, ExchangeState, Grant,
    GrantRevocation, GrantState, ResultEnvelope,
};
use prost::Message;

/// A refusal at this hop, with the gRPC code the consumer sees.
struct HopDenial {
    denial: Denial,
    code: tonic::Code,
}

impl From<Denial> for HopDenial {
    fn from(d: Denial) -> Self {
        let code = if d.exhausted {
            tonic::Code::ResourceExhausted
        } else {
            tonic::Code::PermissionDenied
        };
        Self { denial: d, code }
    }
}

fn deny(rule: &'static str, detail: String, code: tonic::Code) -> HopDenial {
    HopDenial {
        denial: Denial {
            rule,
            detail,
            exhausted: false,
        },
        code,
    }
}

/// What a hop makes of an exchange or a result from a link: its effects at once, or a write
/// grouped with those of the link's other frames (one transaction for many) and what follows.
pub(crate) enum Hop {
    /// Nothing (more) to write: these effects follow.
    Done(Vec<Effect>),
    /// Nothing written for this frame at all: its effects follow with no flush here first
    /// (a result reaching its consumer's home broker, whose end the dispatcher makes durable
    /// before the link may acknowledge it).
    Pass(Vec<Effect>),
    /// A write to group with others, then what follows from it.
    Write(HopWrite),
}

/// A hop's write: run in a grouped transaction, perhaps more than once, so it only writes.
pub(crate) type HopTx = Box<dyn Fn(&Tx<'_>) -> Result<(Written, Vec<AuditEntry>)> + Send>;

/// What follows a hop's write once it has committed (blocking).
pub(crate) type HopThen = Box<dyn FnOnce(&Engine, Written) -> Result<Vec<Effect>> + Send>;

/// A write run in a grouped transaction and what follows once it has committed.
pub(crate) struct HopWrite {
    /// The write; its outcome goes to `then`.
    pub write: HopTx,
    /// What follows once the write has committed.
    pub then: HopThen,
}

/// What a grouped hop write did.
pub(crate) enum Written {
    /// Written: these effects follow.
    Effects(Vec<Effect>),
    /// Nothing written: an earlier frame of the same exchange was taken first.
    Duplicate,
    /// Nothing written: the grant's quota is spent, so the exchange is refused.
    QuotaSpent(Denial),
}

impl HopWrite {
    /// A write whose effects need nothing more once committed.
    fn plain(
        write: impl Fn(&Tx<'_>) -> Result<(Written, Vec<AuditEntry>)> + Send + 'static,
    ) -> Hop {
        Hop::Write(HopWrite {
            write: Box::new(write),
            then: Box::new(|_, w| {
                Ok(match w {
                    Written::Effects(e) => e,
                    Written::Duplicate | Written::QuotaSpent(_) => vec![],
                })
            }),
        })
    }
}

/// True when this hop has taken the exchange already, as seen inside a transaction: two
/// frames of one exchange in one grouped transaction are written once.
fn taken(tx: &Tx<'_>, id: &str) -> Result<bool> {
    Ok(tx
        .get_raw(T::Dedup, &super::record::hop_mark_key(id))?
        .is_some()
        || tx.get_raw(T::Exchanges, id.as_bytes())?.is_some())
}

impl Engine {
    /// True when this hop has handled the exchange before (a frame resent after a lost ack).
    fn seen(&self, id: &str) -> Result<bool> {
        let store = self.store();
        Ok(store
            .tree(T::Dedup)
            .contains_key(super::record::hop_mark_key(id))?
            || store.tree(T::Exchanges).contains_key(id.as_bytes())?)
    }

    /// The grant an exchange's token stands for, checked without a stored copy: signature,
    /// revocations known here, and the exchange's terms against it.
    fn check_token(&self, env: &ExchangeEnvelope, now: i64) -> std::result::Result<Grant, Denial> {
        let req = env.request.clone().unwrap_or_default();
        let token = env.grant.as_ref().ok_or_else(|| Denial {
            rule: "grant_forged",
            detail: "the exchange carries no grant token".into(),
            exhausted: false,
        })?;
        let keys = self.store().keys().map_err(|e| Denial {
            rule: "grant_forged",
            detail: format!("cannot read the issuers' keys: {e}"),
            exhausted: false,
        })?;
        let claims = crate::keys::verify_token(token, "", &keys)?;
        if claims.grant_id != req.grant_id {
            return Err(Denial {
                rule: "grant_forged",
                detail: format!(
                    "the token is for grant {}, the request names {}",
                    claims.grant_id, req.grant_id
                ),
                exhausted: false,
            });
        }
        let did = DatasetId::parse(&req.dataset_id).map_err(|e| Denial {
            rule: "grant_dataset",
            detail: e.to_string(),
            exhausted: false,
        })?;
        if claims.provider != env.provider || did.provider.as_str() != env.provider {
            return Err(Denial {
                rule: "grant_dataset",
                detail: format!(
                    "the exchange names provider {}, its grant {} and its dataset {}",
                    env.provider, claims.provider, req.dataset_id
                ),
                exhausted: false,
            });
        }
        let mut grant = crate::keys::grant_of_claims(&claims, token);
        // Fail closed: a revocation that cannot be read counts as one.
        let revoked = self.store().get::<GrantRevocation>(
            T::Revoked,
            &crate::federation::revoked_key(&claims.issuer, &claims.grant_id),
        );
        match revoked {
            Ok(None) => {}
            Ok(Some(r)) => {
                grant.state = GrantState::Revoked as i32;
                grant.revoked_by = r.issuer;
            }
            Err(e) => {
                return Err(Denial {
                    rule: "grant_revoked",
                    detail: format!("cannot read the revocations: {e}"),
                    exhausted: false,
                })
            }
        }
        enforce::check_grant(
            &grant,
            &env.consumer,
            &req.dataset_id,
            &req.query.unwrap_or_default(),
            now,
        )?;
        Ok(grant)
    }

    /// Handles an exchange that arrived over the link `from` (blocking). `scope` is the
    /// child's scope for a child link, `None` for the parent link.
    pub(crate) fn receive_exchange(
        &self,
        from: &str,
        scope: Option<&[String]>,
        mut env: ExchangeEnvelope,
    ) -> Result<Hop> {
        let id = env.exchange_id.clone();
        if crate::ids::check_opaque_id("exchange_id", &id).is_err() {
            tracing::warn!(peer = %from, "exchange frame with a malformed id dropped");
            return Ok(Hop::Done(vec![]));
        }
        if self.seen(&id)? {
            return Ok(Hop::Done(vec![]));
        }
        // The consumer's trace id follows the exchange: every hop's logs carry it.
        let trace_id = env
            .request
            .as_ref()
            .map(|r| r.trace_id.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("hop", exchange = %id, trace_id = %trace_id, from = %from);
        crate::telemetry::link_trace(&span, &trace_id);
        let _span = span.entered();
        let me = self.store().broker_id().to_string();
        let now = now_ms();
        let hop = env.trail.len() as u32;
        if let Some(prev) = env.trail.last() {
            // From the previous broker's receipt to this one: the link and its outbox.
            self.record_stage("hop", now.saturating_sub(ms(&prev.at)));
        }
        if now > ms(&env.deadline) {
            // The consumer's home broker reports the expiry; this hop only records it.
            let mut e = exchange_entry("exchange_expired", &me, &env);
            e.reason = format!("arrived from {from} after its deadline");
            self.store().write(|tx| {
                mark_seen(tx, &id, now, ms(&env.deadline))?;
                Ok(((), vec![e.clone()]))
            })?;
            return Ok(Hop::Done(vec![]));
        }
        let checked = self.hop_checks(from, scope, &env, now);
        let route = match &checked {
            Ok(_) => match self.fed().route(&env.provider)? {
                Some(Route::Via(p)) if p == from => Err(deny(
                    "hop_limit",
                    format!("{me} would send the exchange back to where it came from"),
                    tonic::Code::FailedPrecondition,
                )),
                Some(r) => Ok(r),
                None => Err(deny(
                    "no_route",
                    format!("node {} is not known anywhere below {me}", env.provider),
                    tonic::Code::NotFound,
                )),
            },
            Err(_) => Ok(Route::Local),
        };
        let refusal = match (checked, route) {
            (Err(d), _) | (Ok(_), Err(d)) => Some(d),
            (Ok(grant), Ok(Route::Via(peer))) => {
                env.trail
                    .push(self.key().receipt(&id, hop, "forwarded", now));
                env.hops_left = env.hops_left.saturating_sub(1);
                let mut e = exchange_entry("exchange_forwarded", &me, &env);
                e.reason = format!(
                    "grant {} checked at hop {hop}: ok; from {from}, next hop {}",
                    grant.id,
                    crate::federation::peer_label(&peer)
                );
                let fed = self.fed().clone();
                tracing::debug!(next = %peer, "exchange forwarded");
                return Ok(HopWrite::plain(move |tx| {
                    if taken(tx, &id)? {
                        return Ok((Written::Duplicate, vec![]));
                    }
                    mark_seen(tx, &id, now, ms(&env.deadline))?;
                    fed.put_outbox(tx, &peer, link_frame::Body::Exchange(env.clone()))?;
                    Ok((
                        Written::Effects(vec![Effect::Wake(peer.clone())]),
                        vec![e.clone()],
                    ))
                }));
            }
            (Ok(_), Ok(Route::Local)) => match self.accept_forwarded(from, &mut env, now)? {
                Ok(hop) => return Ok(hop),
                Err(d) => Some(d),
            },
        };
        match refusal {
            Some(d) => self.refuse_at_hop(from, env, d, now).map(Hop::Done),
            None => Ok(Hop::Done(vec![])),
        }
    }

    /// The checks every forwarding hop makes: scope, loops, hop limit, the grant token.
    fn hop_checks(
        &self,
        from: &str,
        scope: Option<&[String]>,
        env: &ExchangeEnvelope,
        now: i64,
    ) -> std::result::Result<Grant, HopDenial> {
        let me = self.store().broker_id();
        if let Some(scope) = scope {
            if !in_scope(scope, &env.consumer) {
                return Err(deny(
                    "hop_scope",
                    format!(
                        "consumer {} is outside the scope of child broker {from} ({})",
                        env.consumer,
                        scope.join(", ")
                    ),
                    tonic::Code::PermissionDenied,
                ));
            }
        }
        if env.trail.iter().skip(1).any(|r| r.broker == me) || env.origin_broker == me {
            return Err(deny(
                "hop_limit",
                format!("the exchange came back to {me}: a routing loop"),
                tonic::Code::FailedPrecondition,
            ));
        }
        if env.hops_left == 0 {
            return Err(deny(
                "hop_limit",
                format!("the exchange reached {me} with no hops left"),
                tonic::Code::FailedPrecondition,
            ));
        }
        self.check_token(env, now).map_err(HopDenial::from)
    }

    /// At the provider's home broker: checks the grant against the stored copy, counts the
    /// quota, and takes custody of the exchange for the local provider.
    fn accept_forwarded(
        &self,
        from: &str,
        env: &mut ExchangeEnvelope,
        now: i64,
    ) -> Result<std::result::Result<Hop, HopDenial>> {
        let store = self.store();
        let me = store.broker_id().to_string();
        let id = env.exchange_id.clone();
        let req = env.request.clone().unwrap_or_default();
        let Some(grant) = store.get::<Grant>(T::Grants, &req.grant_id)? else {
            return Ok(Err(deny(
                "grant_missing",
                format!(
                    "grant {} is not on {me}, the provider's home broker",
                    req.grant_id
                ),
                tonic::Code::PermissionDenied,
            )));
        };
        let keys = store.keys()?;
        if let Err(d) = crate::keys::verify_grant(&grant, &keys).and_then(|_| {
            enforce::check_grant(
                &grant,
                &env.consumer,
                &req.dataset_id,
                &req.query.clone().unwrap_or_default(),
                now,
            )
        }) {
            return Ok(Err(d.into()));
        }
        let published = self
            .catalog()
            .get(&req.dataset_id)
            .map(|d| d.state() == DatasetState::Published)
            .unwrap_or(false);
        if !published {
            return Ok(Err(deny(
                "dataset_withdrawn",
                format!("dataset {} is not published on {me}", req.dataset_id),
                tonic::Code::PermissionDenied,
            )));
        }
        let hop = env.trail.len() as u32;
        env.trail
            .push(self.key().receipt(&id, hop, "received", now));
        env.hops_left = env.hops_left.saturating_sub(1);
        let dest = env.provider.clone();
        let mut record = StoredExchange {
            envelope: Some(env.clone()),
            state: ExchangeState::Queued as i32,
            queue_seq: store.next_id()?,
            dest: dest.clone(),
            purpose: grant.purpose.clone(),
            ..Default::default()
        };
        record.bytes = record.encoded_len() as u64;
        let bytes = record.bytes;
        let quota_key = super::quota_key(&grant.id, now);
        let mut accepted = exchange_entry("exchange_accepted", &me, env);
        accepted.reason = format!(
            "from {from}: grant {} checked at the provider's home broker: ok",
            grant.id
        );
        let enqueue = Effect::Enqueue {
            id: id.clone(),
            dest: dest.clone(),
            dataset: req.dataset_id.clone(),
            deadline_ms: ms(&env.deadline),
        };
        let write = move |tx: &Tx<'_>| {
            if taken(tx, &id)? {
                return Ok((Written::Duplicate, vec![]));
            }
            if let Some(d) = super::take_quota(tx, &grant, &quota_key)? {
                return Ok((Written::QuotaSpent(d), vec![]));
            }
            tx.put(T::Exchanges, &id, &record)?;
            Ok((
                Written::Effects(vec![enqueue.clone()]),
                vec![accepted.clone()],
            ))
        };
        let (from, env, dest, dataset) = (
            from.to_string(),
            env.clone(),
            env.provider.clone(),
            req.dataset_id,
        );
        Ok(Ok(Hop::Write(HopWrite {
            write: Box::new(write),
            then: Box::new(move |engine, w| match w {
                Written::Effects(e) => {
                    engine.force_reserve(&dest, bytes);
                    engine.record_outcome(&dataset, "accepted");
                    Ok(e)
                }
                Written::Duplicate => Ok(vec![]),
                Written::QuotaSpent(d) => engine.refuse_at_hop(&from, env, d.into(), now),
            }),
        })))
    }

    /// Refuses an exchange at this hop: audits the rule, and sends the refusal back toward
    /// the consumer's home broker.
    fn refuse_at_hop(
        &self,
        from: &str,
        env: ExchangeEnvelope,
        d: HopDenial,
        now: i64,
    ) -> Result<Vec<Effect>> {
        tracing::info!(rule = d.denial.rule, detail = %d.denial.detail, "exchange refused at this hop");
        let me = self.store().broker_id().to_string();
        let id = env.exchange_id.clone();
        let req = env.request.clone().unwrap_or_default();
        let hop = env.trail.len() as u32;
        let mut trail = env.trail.clone();
        trail.push(self.key().receipt(&id, hop, "denied", now));
        let result = ExchangeResult {
            exchange_id: id.clone(),
            state: ExchangeState::Denied as i32,
            error: Some(ErrorStatus {
                code: d.code as i32,
                message: format!(
                    "denied at {me} by rule {}: {}",
                    d.denial.rule, d.denial.detail
                ),
            }),
            dataset_id: req.dataset_id.clone(),
            grant_id: req.grant_id.clone(),
            trace_id: req.trace_id.clone(),
            accepted_at: env.accepted_at,
            finished_at: Some(ts(now)),
            trail,
            ..Default::default()
        };
        self.record_denial(&d.denial, &env.consumer, &req.dataset_id);
        let back = self.fed().route(&env.consumer)?;
        let mut e = exchange_entry("exchange_denied", &me, &env);
        e.reason = format!(
            "{}: {} (arrived from {from})",
            d.denial.rule, d.denial.detail
        );
        self.store().write(|tx| {
            mark_seen(tx, &id, now, ms(&env.deadline))?;
            if let Some(Route::Via(p)) = &back {
                self.fed().put_outbox(
                    tx,
                    p,
                    link_frame::Body::Result(ResultEnvelope {
                        result: Some(result.clone()),
                        origin_broker: env.origin_broker.clone(),
                        consumer: env.consumer.clone(),
                    }),
                )?;
            }
            Ok(((), vec![e.clone()]))
        })?;
        Ok(match back {
            Some(Route::Via(p)) => vec![Effect::Wake(p)],
            Some(Route::Local) => vec![Effect::Result(result)],
            None => vec![],
        })
    }

    /// Handles a result that arrived over the link `from`: the consumer's home broker ends
    /// its exchange with it; any other hop passes it on toward that broker.
    pub(crate) fn receive_result(
        &self,
        from: &str,
        scope: Option<&[String]>,
        env: ResultEnvelope,
    ) -> Result<Hop> {
        let Some(result) = env.result.clone() else {
            return Ok(Hop::Done(vec![]));
        };
        let me = self.store().broker_id().to_string();
        if let Some(scope) = scope {
            // A child answers only for providers inside its scope.
            let provider = DatasetId::parse(&result.dataset_id)
                .map(|d| d.provider.to_string())
                .unwrap_or_default();
            if !in_scope(scope, &provider) {
                let mut e = crate::audit::entry("result_refused", from);
                e.exchange_id = result.exchange_id.clone();
                e.reason = format!(
                    "hop_scope: a result for {} came from child {from}, whose scope ({}) does not hold its provider",
                    result.dataset_id,
                    scope.join(", ")
                );
                self.store().write(|_| Ok(((), vec![e.clone()])))?;
                return Ok(Hop::Done(vec![]));
            }
        }
        match self.fed().route(&env.consumer)? {
            Some(Route::Local) => Ok(Hop::Pass(vec![Effect::Result(result)])),
            Some(Route::Via(peer)) if peer != from => {
                let mut e = crate::audit::entry("result_forwarded", &me);
                e.exchange_id = result.exchange_id.clone();
                e.consumer = env.consumer.clone();
                e.dataset_id = result.dataset_id.clone();
                e.reason = format!(
                    "from {from} toward {}",
                    crate::federation::peer_label(&peer)
                );
                let fed = self.fed().clone();
                Ok(HopWrite::plain(move |tx| {
                    fed.put_outbox(tx, &peer, link_frame::Body::Result(env.clone()))?;
                    Ok((
                        Written::Effects(vec![Effect::Wake(peer.clone())]),
                        vec![e.clone()],
                    ))
                }))
            }
            _ => {
                tracing::warn!(exchange = %result.exchange_id, consumer = %env.consumer, "result for a consumer this broker cannot route to; dropped");
                let mut e = crate::audit::entry("result_dropped", &me);
                e.exchange_id = result.exchange_id.clone();
                e.consumer = env.consumer.clone();
                e.dataset_id = result.dataset_id.clone();
                e.reason = format!(
                    "no route from {me} to consumer {} (arrived from {from})",
                    env.consumer
                );
                self.store().write(|_| Ok(((), vec![e.clone()])))?;
                Ok(Hop::Done(vec![]))
            }
        }
    }

    /// The last check before an exchange leaves through a link: true to send it. One past its
    /// deadline or under a grant revoked meanwhile is dropped here (and a refusal goes back).
    pub(crate) fn before_send(&self, peer: &str, env: &ExchangeEnvelope) -> Result<bool> {
        let now = now_ms();
        let me = self.store().broker_id().to_string();
        let req = env.request.clone().unwrap_or_default();
        if now > ms(&env.deadline) {
            let mut e = exchange_entry("exchange_expired", &me, env);
            e.reason = format!(
                "its deadline passed while it waited for the link to {}",
                crate::federation::peer_label(peer)
            );
            self.store().write(|_| Ok(((), vec![e.clone()])))?;
            return Ok(false);
        }
        let issuer = env
            .grant
            .as_ref()
            .and_then(|t| govshare_proto::v1::GrantClaims::decode(t.claims.as_slice()).ok())
            .map(|c| c.issuer)
            .unwrap_or_default();
        if let Some(r) = self.store().get::<GrantRevocation>(
            T::Revoked,
            &crate::federation::revoked_key(&issuer, &req.grant_id),
        )? {
            let d = HopDenial {
                denial: Denial {
                    rule: "grant_revoked",
                    detail: format!(
                        "grant {} was revoked by {} while the exchange waited for the link",
                        r.grant_id, r.issuer
                    ),
                    exhausted: false,
                },
                code: tonic::Code::PermissionDenied,
            };
            if env.origin_broker == me {
                // The dispatcher ends it as denied when it learns of the revocation.
                let mut e = exchange_entry("exchange_denied", &me, env);
                e.reason = format!("{}: {}", d.denial.rule, d.denial.detail);
                self.store().write(|_| Ok(((), vec![e.clone()])))?;
            } else {
                let effects = self.refuse_at_hop(peer, env.clone(), d, now)?;
                for f in effects {
                    if let Effect::Wake(p) = f {
                        self.fed().wake(&p);
                    }
                }
            }
            return Ok(false);
        }
        Ok(true)
    }
}

/// Marks an exchange id as handled by this hop (swept with the idempotency keys, not before
/// its deadline).
pub(super) fn mark_seen(
    tx: &crate::store::Tx<'_>,
    id: &str,
    now: i64,
    deadline_ms: i64,
) -> Result<()> {
    tx.put_raw(
        T::Dedup,
        &super::record::hop_mark_key(id),
        &super::record::hop_mark(id, now, deadline_ms),
    )
}
