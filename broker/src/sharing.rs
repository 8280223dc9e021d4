//! Supply-demand requests (demands) and the grants that approve them.

use crate::audit;
use crate::auth::Caller;
use crate::config::SharingSection;
use crate::error::{BrokerError, Result};
use crate::federation::{in_scope, link::Peer, Effect, Fed, Route};
use crate::ids::{self, DatasetId};
use crate::registry::page_size;
use crate::store::{index_key, Store, T};
use crate::time::{ms, now_ms, ts, DAY_MS};
use govshare_proto::v1::{link_frame::Body, DemandDecisionEnvelope, DemandEnvelope};
use govshare_proto::v1::{
    ApproveDemandRequest, ApproveDemandResponse, Dataset, DatasetState, Demand, DemandState,
    DemandView, FileDemandRequest, FileDemandResponse, Grant, GrantState, GrantView,
    ListDemandsRequest, ListDemandsResponse, ListGrantsRequest, ListGrantsResponse, ShareType,
};
use std::collections::BTreeSet;

/// Demand and grant operations. Blocking: call from blocking threads.
#[derive(Debug, Clone)]
pub struct Sharing {
    store: Store,
    cfg: SharingSection,
    /// Signs every grant issued here.
    key: crate::keys::SigningKey,
    /// Routes demands and decisions to other brokers.
    fed: Fed,
    /// Most fields one demand or decision may name (`[limits] max_demand_fields`).
    max_fields: usize,
}

/// Fills the fields computed at read time: a demand's `overdue`.
fn with_overdue(mut d: Demand, now: i64) -> Demand {
    d.overdue = d.state() == DemandState::Pending && now > ms(&d.respond_by);
    d
}

/// Fills the fields computed at read time: a grant's EXPIRED state.
fn with_expiry(mut g: Grant, now: i64) -> Grant {
    if g.state() == GrantState::Active && now > ms(&g.valid_until) {
        g.state = GrantState::Expired as i32;
    }
    g
}

fn check_fields(fields: &[String], max_fields: usize) -> Result<()> {
    if fields.len() > max_fields {
        return Err(BrokerError::invalid(format!(
            "{} fields given; at most {max_fields} are allowed ([limits] max_demand_fields)",
            fields.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for f in fields {
        ids::check_item_name(f)?;
        if !seen.insert(f) {
            return Err(BrokerError::invalid(format!("field {f:?} is listed twice")));
        }
    }
    Ok(())
}

impl Sharing {
    /// Sharing over the store, with the configured rules.
    pub fn new(
        store: Store,
        cfg: SharingSection,
        key: crate::keys::SigningKey,
        fed: Fed,
        max_fields: usize,
    ) -> Self {
        Self {
            store,
            cfg,
            key,
            fed,
            max_fields,
        }
    }

    /// Files a demand; decides it at once for UNCONDITIONAL and NOT_SHARED datasets.
    pub fn file(&self, caller: &Caller, req: FileDemandRequest) -> Result<FileDemandResponse> {
        caller.require_department("file demands")?;
        self.store.check_room()?;
        let did = DatasetId::parse(&req.dataset_id)?;
        if req.fields.is_empty() {
            return Err(BrokerError::invalid(
                "fields: name at least one information item",
            ));
        }
        check_fields(&req.fields, self.max_fields)?;
        ids::check_text("purpose", &req.purpose, true, 1000)?;
        ids::check_text("legal_basis", &req.legal_basis, false, 1000)?;
        let period = match req.period_days {
            0 => self.cfg.default_period_days,
            n if n > self.cfg.max_period_days => {
                return Err(BrokerError::invalid(format!(
                    "period_days {n} is longer than this broker allows ({} days)",
                    self.cfg.max_period_days
                )))
            }
            n => n,
        };
        let dataset: Dataset = self
            .store
            .get(T::Datasets, &req.dataset_id)?
            .ok_or_else(|| {
                BrokerError::not_found(format!("dataset {} is not in the catalog", req.dataset_id))
            })?;
        if dataset.state() != DatasetState::Published {
            return Err(BrokerError::precondition(format!(
                "dataset {} is withdrawn; no new demands",
                dataset.id
            )));
        }
        for f in &req.fields {
            if !dataset.items.iter().any(|i| &i.name == f) {
                return Err(BrokerError::invalid(format!(
                    "field {f:?} is not an item of dataset {}; its items are: {}",
                    dataset.id,
                    dataset
                        .items
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let now = now_ms();
        let mut demand = Demand {
            id: uuid::Uuid::now_v7().to_string(),
            dataset_id: dataset.id.clone(),
            consumer: caller.id.to_string(),
            provider: did.provider.to_string(),
            fields: req.fields.clone(),
            purpose: req.purpose.trim().to_string(),
            legal_basis: req.legal_basis.trim().to_string(),
            period_days: period,
            state: DemandState::Pending as i32,
            filed_at: Some(ts(now)),
            respond_by: Some(ts(now.saturating_add(self.cfg.response_ms()))),
            dataset_version: dataset.version,
            ..Default::default()
        };
        let route = self.fed.route(&demand.provider)?;
        let grant = match &route {
            Some(Route::Local) => self.decide(&dataset, &mut demand, now),
            Some(Route::Via(_)) => None,
            None => {
                return Err(BrokerError::not_found(format!(
                    "provider {} is not reachable from this broker (no route)",
                    demand.provider
                )))
            }
        };
        self.store.write(|tx| {
            let mut entries = self.store_new(tx, &demand, grant.as_ref())?;
            if let Some(Route::Via(peer)) = &route {
                self.fed.put_outbox(
                    tx,
                    peer,
                    Body::Demand(DemandEnvelope {
                        demand: Some(demand.clone()),
                        origin_broker: self.store.broker_id().to_string(),
                    }),
                )?;
                entries[0].reason = format!(
                    "sent toward {}, the provider's home broker",
                    dataset.home_broker
                );
            }
            Ok(((), entries))
        })?;
        Ok(FileDemandResponse {
            demand: Some(with_overdue(demand, now)),
            grant,
        })
    }

    /// Applies the catalog's sharing rules to a new demand at the provider's home broker:
    /// UNCONDITIONAL approves at once (returning the grant), NOT_SHARED refuses at once.
    fn decide(&self, dataset: &Dataset, demand: &mut Demand, now: i64) -> Option<Grant> {
        let period = demand.period_days;
        let not_shared_item = dataset
            .items
            .iter()
            .find(|i| demand.fields.contains(&i.name) && i.share_type() == ShareType::NotShared);
        let mut grant = None;
        let mut decision = None;
        if dataset.share_type() == ShareType::NotShared {
            let cond = if dataset.share_condition.is_empty() {
                "the provider does not share it".to_string()
            } else {
                dataset.share_condition.clone()
            };
            decision = Some(format!("dataset {} is NOT_SHARED: {cond}", dataset.id));
        } else if let Some(item) = not_shared_item {
            decision = Some(format!(
                "item {:?} of dataset {} is NOT_SHARED and cannot be demanded",
                item.name, dataset.id
            ));
        } else if dataset.share_type() == ShareType::Unconditional {
            let g = self.new_grant(demand, &demand.fields, period, 0, now);
            demand.state = DemandState::Approved as i32;
            demand.grant_id = g.id.clone();
            demand.decided_at = Some(ts(now));
            demand.decided_by = self.store.broker_id().to_string();
            demand.reason = "UNCONDITIONAL dataset: approved at once".into();
            grant = Some(g);
        }
        if let Some(reason) = decision {
            demand.state = DemandState::Rejected as i32;
            demand.decided_at = Some(ts(now));
            demand.decided_by = self.store.broker_id().to_string();
            demand.reason = reason;
        }
        grant
    }

    /// Stores a new demand (and the grant deciding it), with its audit entries, the first of
    /// which records the filing.
    fn store_new(
        &self,
        tx: &crate::store::Tx<'_>,
        demand: &Demand,
        grant: Option<&Grant>,
    ) -> Result<Vec<govshare_proto::v1::AuditEntry>> {
        {
            tx.put(T::Demands, &demand.id, demand)?;
            tx.mark(
                T::DemandsByConsumer,
                &index_key(&demand.consumer, &demand.id),
            )?;
            tx.mark(
                T::DemandsByProvider,
                &index_key(&demand.provider, &demand.id),
            )?;
            let mut entries = vec![demand_entry("demand_filed", &demand.consumer, demand)];
            match demand.state() {
                DemandState::Rejected => {
                    let mut e = demand_entry("demand_rejected", self.store.broker_id(), demand);
                    e.reason = demand.reason.clone();
                    entries.push(e);
                }
                DemandState::Approved => {
                    entries.push(demand_entry(
                        "demand_approved",
                        self.store.broker_id(),
                        demand,
                    ));
                    if let Some(g) = grant {
                        self.put_grant(tx, g)?;
                        entries.push(grant_entry("grant_issued", self.store.broker_id(), g));
                    }
                }
                _ => {}
            }
            Ok(entries)
        }
    }

    /// Sends a decision back toward a consumer on another broker, inside the deciding
    /// transaction.
    fn send_decision(
        &self,
        tx: &crate::store::Tx<'_>,
        d: &Demand,
        grant: Option<&Grant>,
        back: &Option<Route>,
    ) -> Result<()> {
        if let Some(Route::Via(peer)) = back {
            self.fed.put_outbox(
                tx,
                peer,
                Body::Decision(DemandDecisionEnvelope {
                    demand: Some(d.clone()),
                    grant: grant.cloned(),
                }),
            )?;
        }
        Ok(())
    }

    /// Where a stored demand's consumer or provider is reached, looked up before a
    /// transaction, which holds up every other writer while it runs.
    fn route_of(&self, id: &str, node: impl Fn(&Demand) -> &String) -> Result<Option<Route>> {
        match self.store.get::<Demand>(T::Demands, id)? {
            Some(d) => self.fed.route(node(&d)),
            None => Ok(None),
        }
    }

    /// A demand that arrived over a link: decided here when the provider is local (and the
    /// decision sent back), passed on otherwise. A consumer's withdrawal arrives the same way.
    pub fn receive_demand(
        &self,
        fed: &Fed,
        peer: &Peer,
        env: DemandEnvelope,
    ) -> Result<Vec<Effect>> {
        let Some(mut d) = env.demand.clone() else {
            return Ok(vec![]);
        };
        ids::check_opaque_id("demand id", &d.id)?;
        if let Some(scope) = &peer.scope {
            if !in_scope(scope, &d.consumer) {
                let mut e = demand_entry("demand_refused", &peer.id, &d);
                e.reason = format!(
                    "hop_scope: consumer {} is outside the scope of {} ({})",
                    d.consumer,
                    peer.id,
                    scope.join(", ")
                );
                self.store.write(|_| Ok(((), vec![e.clone()])))?;
                return Ok(vec![]);
            }
        }
        let now = now_ms();
        match fed.route(&d.provider)? {
            Some(Route::Via(p)) if p != peer.key => {
                let e = demand_entry("demand_forwarded", &peer.id, &d);
                self.store.write(|tx| {
                    fed.put_outbox(tx, &p, Body::Demand(env.clone()))?;
                    Ok(((), vec![e.clone()]))
                })?;
                Ok(vec![Effect::Wake(p)])
            }
            Some(Route::Local) => {
                if self.store.get::<Demand>(T::Demands, &d.id)?.is_some() {
                    if d.state() == DemandState::Withdrawn {
                        // Read again inside the transaction: a decision may have come first.
                        self.store.write(|tx| {
                            let Some(mut old) = tx.get::<Demand>(T::Demands, &d.id)? else {
                                return Ok(((), vec![]));
                            };
                            if old.state() != DemandState::Pending || old.consumer != d.consumer {
                                return Ok(((), vec![]));
                            }
                            old.state = DemandState::Withdrawn as i32;
                            old.decided_at = Some(ts(now));
                            old.decided_by = d.consumer.clone();
                            tx.put(T::Demands, &old.id, &old)?;
                            Ok((
                                (),
                                vec![demand_entry("demand_withdrawn", &old.consumer, &old)],
                            ))
                        })?;
                    }
                    return Ok(vec![]);
                }
                if d.state() != DemandState::Pending {
                    return Ok(vec![]);
                }
                let dataset: Option<Dataset> = self.store.get(T::Datasets, &d.dataset_id)?;
                let problem = match &dataset {
                    None => Some(format!(
                        "dataset {} is not in the catalog of its provider's broker",
                        d.dataset_id
                    )),
                    Some(ds) if ds.state() != DatasetState::Published => {
                        Some(format!("dataset {} is withdrawn; no new demands", ds.id))
                    }
                    Some(ds) => d
                        .fields
                        .iter()
                        .find(|f| !ds.items.iter().any(|i| &i.name == *f))
                        .map(|f| format!("field {f:?} is not an item of dataset {}", ds.id)),
                };
                let grant = match (&problem, &dataset) {
                    (None, Some(ds)) => self.decide(ds, &mut d, now),
                    _ => {
                        d.state = DemandState::Rejected as i32;
                        d.decided_at = Some(ts(now));
                        d.decided_by = self.store.broker_id().to_string();
                        d.reason = problem.clone().unwrap_or_default();
                        None
                    }
                };
                let back = fed.route(&d.consumer)?;
                self.store.write(|tx| {
                    let mut entries = self.store_new(tx, &d, grant.as_ref())?;
                    entries[0].reason = format!("arrived from {}", peer.id);
                    if d.state() != DemandState::Pending {
                        self.send_decision(tx, &d, grant.as_ref(), &back)?;
                    }
                    Ok(((), entries))
                })?;
                Ok(match back {
                    Some(Route::Via(p)) => vec![Effect::Wake(p)],
                    _ => vec![],
                })
            }
            _ => {
                d.state = DemandState::Rejected as i32;
                d.decided_at = Some(ts(now));
                d.decided_by = self.store.broker_id().to_string();
                d.reason = format!("provider {} is not known in the cascade", d.provider);
                let mut e = demand_entry("demand_rejected", self.store.broker_id(), &d);
                e.reason = d.reason.clone();
                self.store.write(|tx| {
                    fed.put_outbox(
                        tx,
                        &peer.key,
                        Body::Decision(DemandDecisionEnvelope {
                            demand: Some(d.clone()),
                            grant: None,
                        }),
                    )?;
                    Ok(((), vec![e.clone()]))
                })?;
                Ok(vec![Effect::Wake(peer.key.clone())])
            }
        }
    }

    /// A decision that arrived over a link: stored with its grant at the consumer's home
    /// broker (the grant's signature checked first), passed on otherwise.
    pub fn receive_decision(
        &self,
        fed: &Fed,
        peer: &Peer,
        env: DemandDecisionEnvelope,
    ) -> Result<Vec<Effect>> {
        let Some(d) = env.demand.clone() else {
            return Ok(vec![]);
        };
        ids::check_opaque_id("demand id", &d.id)?;
        let refuse = |why: String| -> Result<Vec<Effect>> {
            let mut e = demand_entry("decision_refused", &peer.id, &d);
            e.reason = why;
            self.store.write(|_| Ok(((), vec![e.clone()])))?;
            Ok(vec![])
        };
        let named = DatasetId::parse(&d.dataset_id).map(|x| x.provider.to_string());
        if named.as_deref().ok() != Some(d.provider.as_str()) {
            return refuse(format!(
                "the decision names provider {} for dataset {}",
                d.provider, d.dataset_id
            ));
        }
        if let Some(scope) = &peer.scope {
            if !in_scope(scope, &d.provider)
                || env
                    .grant
                    .as_ref()
                    .is_some_and(|g| !in_scope(scope, &g.issuer))
            {
                return refuse(format!(
                    "hop_scope: provider {} is outside the scope of {} ({})",
                    d.provider,
                    peer.id,
                    scope.join(", ")
                ));
            }
        }
        match fed.route(&d.consumer)? {
            Some(Route::Local) => {
                if let Some(g) = &env.grant {
                    if let Err(x) = crate::keys::verify_grant(g, &self.store.keys()?) {
                        return refuse(format!("{}: {}", x.rule, x.detail));
                    }
                    if g.consumer != d.consumer
                        || g.dataset_id != d.dataset_id
                        || g.demand_id != d.id
                    {
                        return refuse(format!("grant {} does not match demand {}", g.id, d.id));
                    }
                }
                self.store.write(|tx| {
                    if let Some(old) = tx.get::<Demand>(T::Demands, &d.id)? {
                        if old.state() != DemandState::Pending {
                            return Ok(((), vec![]));
                        }
                    }
                    tx.put(T::Demands, &d.id, &d)?;
                    tx.mark(T::DemandsByConsumer, &index_key(&d.consumer, &d.id))?;
                    tx.mark(T::DemandsByProvider, &index_key(&d.provider, &d.id))?;
                    let decision = match d.state() {
                        DemandState::Approved => "demand_approved",
                        DemandState::Rejected => "demand_rejected",
                        _ => "demand_decided",
                    };
                    let mut e = demand_entry(decision, &d.decided_by, &d);
                    e.reason = format!(
                        "decided at the provider's broker, learned from {}: {}",
                        peer.id, d.reason
                    );
                    let mut entries = vec![e];
                    if let Some(g) = &env.grant {
                        self.put_grant(tx, g)?;
                        entries.push(grant_entry("grant_received", &g.issuer, g));
                    }
                    Ok(((), entries))
                })?;
                Ok(vec![])
            }
            Some(Route::Via(p)) if p != peer.key => {
                let e = demand_entry("decision_forwarded", &peer.id, &d);
                self.store.write(|tx| {
                    fed.put_outbox(tx, &p, Body::Decision(env.clone()))?;
                    Ok(((), vec![e.clone()]))
                })?;
                Ok(vec![Effect::Wake(p)])
            }
            _ => Ok(vec![]),
        }
    }

    fn new_grant(&self, d: &Demand, fields: &[String], days: u32, quota: u64, now: i64) -> Grant {
        let mut g = Grant {
            id: uuid::Uuid::now_v7().to_string(),
            dataset_id: d.dataset_id.clone(),
            consumer: d.consumer.clone(),
            provider: d.provider.clone(),
            fields: fields.to_vec(),
            purpose: d.purpose.clone(),
            valid_from: Some(ts(now)),
            valid_until: Some(ts(now + i64::from(days) * DAY_MS)),
            daily_quota: quota,
            issuer: self.store.broker_id().to_string(),
            demand_id: d.id.clone(),
            state: GrantState::Active as i32,
            issued_at: Some(ts(now)),
            ..Default::default()
        };
        g.token = Some(self.key.token_for(&g));
        g
    }

    fn put_grant(&self, tx: &crate::store::Tx<'_>, g: &Grant) -> Result<()> {
        tx.put(T::Grants, &g.id, g)?;
        // The dataset, so that finding a consumer's grant on one dataset decodes no other
        // (see `Engine::resolve_grant`).
        tx.put_raw(
            T::GrantsByConsumer,
            &index_key(&g.consumer, &g.id),
            g.dataset_id.as_bytes(),
        )?;
        tx.mark(T::GrantsByProvider, &index_key(&g.provider, &g.id))
    }

    /// Returns one demand, if the caller may see it.
    pub fn get_demand(&self, caller: &Caller, id: &str) -> Result<Demand> {
        ids::check_opaque_id("demand id", id)?;
        let d: Demand = self
            .store
            .get(T::Demands, id)?
            .ok_or_else(|| BrokerError::not_found(format!("demand {id} does not exist")))?;
        if !caller.is_admin()
            && d.consumer != caller.id.as_str()
            && d.provider != caller.id.as_str()
        {
            return Err(BrokerError::denied(format!(
                "demand {id} is between {} and {}; {} may not see it",
                d.consumer, d.provider, caller.id
            )));
        }
        Ok(with_overdue(d, now_ms()))
    }

    /// Lists demands in a view.
    pub fn list_demands(
        &self,
        caller: &Caller,
        req: &ListDemandsRequest,
    ) -> Result<ListDemandsResponse> {
        let view = DemandView::try_from(req.view)
            .map_err(|_| BrokerError::invalid(format!("view {} is not a DemandView", req.view)))?;
        let state = DemandState::try_from(req.state).map_err(|_| {
            BrokerError::invalid(format!("state {} is not a DemandState", req.state))
        })?;
        let index = match view {
            DemandView::Unspecified | DemandView::Outgoing => Some(T::DemandsByConsumer),
            DemandView::Incoming => Some(T::DemandsByProvider),
            DemandView::All => {
                caller.require_admin("list every demand")?;
                None
            }
        };
        let size = page_size(req.page_size, 100, 1000);
        let now = now_ms();
        let keep = |d: &Demand| {
            (state == DemandState::Unspecified || d.state() == state)
                && (!req.overdue_only || d.overdue)
        };
        let (demands, next) = self.page(
            index,
            caller.id.as_str(),
            T::Demands,
            &req.page_token,
            size,
            |d: Demand| {
                let d = with_overdue(d, now);
                keep(&d).then_some(d)
            },
        )?;
        Ok(ListDemandsResponse {
            demands,
            next_page_token: next,
        })
    }

    /// Pages through records, via a per-node index or (None) the whole tree, in id order.
    #[allow(clippy::too_many_arguments)]
    fn page<M: prost::Message + Default>(
        &self,
        index: Option<T>,
        node: &str,
        records: T,
        token: &str,
        size: usize,
        mut keep: impl FnMut(M) -> Option<M>,
    ) -> Result<(Vec<M>, String)> {
        let mut out: Vec<(String, M)> = Vec::new();
        let mut next = String::new();
        let mut start = token.as_bytes().to_vec();
        if !start.is_empty() {
            start.push(0);
        }
        let mut visit = |id: String| -> Result<bool> {
            if out.len() == size {
                next = out.last().map(|(id, _)| id.clone()).unwrap_or_default();
                return Ok(false);
            }
            if let Some(m) = self.store.get::<M>(records, &id)? {
                if let Some(m) = keep(m) {
                    out.push((id, m));
                }
            }
            Ok(true)
        };
        match index {
            Some(ix) => {
                let prefix = index_key(node, "");
                let mut lo = prefix.clone();
                lo.extend_from_slice(&start);
                for kv in self.store.tree(ix).range(lo..) {
                    let (k, _) = kv?;
                    let Some(id) = k.strip_prefix(prefix.as_slice()) else {
                        break;
                    };
                    if !visit(String::from_utf8_lossy(id).into_owned())? {
                        break;
                    }
                }
            }
            None => {
                for kv in self.store.tree(records).range(start..) {
                    let (k, _) = kv?;
                    if !visit(String::from_utf8_lossy(&k).into_owned())? {
                        break;
                    }
                }
            }
        }
        Ok((out.into_iter().map(|(_, m)| m).collect(), next))
    }

    /// Approves a pending demand on one of the caller's datasets and issues its grant.
    pub fn approve(
        &self,
        caller: &Caller,
        req: &ApproveDemandRequest,
    ) -> Result<ApproveDemandResponse> {
        ids::check_opaque_id("demand id", &req.id)?;
        check_fields(&req.fields, self.max_fields)?;
        ids::check_text("note", &req.note, false, 1000)?;
        let now = now_ms();
        let back = self.route_of(&req.id, |d| &d.consumer)?;
        self.store.write(|tx| {
            let mut d = self.decidable(tx, caller, &req.id)?;
            let fields = if req.fields.is_empty() {
                d.fields.clone()
            } else {
                if let Some(f) = req.fields.iter().find(|f| !d.fields.contains(f)) {
                    return Err(BrokerError::invalid(format!(
                        "field {f:?} was not asked for; an approval may only narrow the demand's fields ({})",
                        d.fields.join(", ")
                    )));
                }
                req.fields.clone()
            };
            let days = match req.period_days {
                0 => d.period_days,
                n if n > d.period_days => {
                    return Err(BrokerError::invalid(format!(
                        "period_days {n} is longer than the {} days asked for; an approval may only shorten it",
                        d.period_days
                    )))
                }
                n => n,
            };
            let g = self.new_grant(&d, &fields, days, req.daily_quota, now);
            d.state = DemandState::Approved as i32;
            d.grant_id = g.id.clone();
            d.decided_at = Some(ts(now));
            d.decided_by = caller.id.to_string();
            d.reason = req.note.clone();
            tx.put(T::Demands, &d.id, &d)?;
            self.put_grant(tx, &g)?;
            self.send_decision(tx, &d, Some(&g), &back)?;
            let entries = vec![
                demand_entry("demand_approved", caller.id.as_str(), &d),
                grant_entry("grant_issued", caller.id.as_str(), &g),
            ];
            Ok((
                ApproveDemandResponse {
                    demand: Some(with_overdue(d, now)),
                    grant: Some(g),
                },
                entries,
            ))
        })
    }

    /// Loads a demand the caller may decide now, inside a transaction.
    fn decidable(&self, tx: &crate::store::Tx<'_>, caller: &Caller, id: &str) -> Result<Demand> {
        let d: Demand = tx
            .get(T::Demands, id)?
            .ok_or_else(|| BrokerError::not_found(format!("demand {id} does not exist")))?;
        if d.provider != caller.id.as_str() {
            return Err(BrokerError::denied(format!(
                "demand {id} is on a dataset of {}; only that provider may decide it",
                d.provider
            )));
        }
        if d.state() != DemandState::Pending {
            return Err(BrokerError::precondition(format!(
                "demand {id} is {}, not PENDING",
                short(d.state().as_str_name())
            )));
        }
        Ok(d)
    }

    /// Rejects a pending demand on one of the caller's datasets.
    pub fn reject(&self, caller: &Caller, id: &str, reason: &str) -> Result<Demand> {
        ids::check_opaque_id("demand id", id)?;
        ids::check_text("reason", reason, true, 1000)?;
        let now = now_ms();
        let back = self.route_of(id, |d| &d.consumer)?;
        self.store.write(|tx| {
            let mut d = self.decidable(tx, caller, id)?;
            d.state = DemandState::Rejected as i32;
            d.decided_at = Some(ts(now));
            d.decided_by = caller.id.to_string();
            d.reason = reason.trim().to_string();
            tx.put(T::Demands, &d.id, &d)?;
            self.send_decision(tx, &d, None, &back)?;
            let mut e = demand_entry("demand_rejected", caller.id.as_str(), &d);
            e.reason = d.reason.clone();
            Ok((with_overdue(d, now), vec![e]))
        })
    }

    /// Withdraws one of the caller's own pending demands.
    pub fn withdraw(&self, caller: &Caller, id: &str) -> Result<Demand> {
        ids::check_opaque_id("demand id", id)?;
        let now = now_ms();
        let toward = self.route_of(id, |d| &d.provider)?;
        self.store.write(|tx| {
            let mut d: Demand = tx
                .get(T::Demands, id)?
                .ok_or_else(|| BrokerError::not_found(format!("demand {id} does not exist")))?;
            if d.consumer != caller.id.as_str() {
                return Err(BrokerError::denied(format!(
                    "demand {id} was filed by {}; only it may withdraw it",
                    d.consumer
                )));
            }
            if d.state() != DemandState::Pending {
                return Err(BrokerError::precondition(format!(
                    "demand {id} is {}, not PENDING",
                    short(d.state().as_str_name())
                )));
            }
            d.state = DemandState::Withdrawn as i32;
            d.decided_at = Some(ts(now));
            d.decided_by = caller.id.to_string();
            tx.put(T::Demands, &d.id, &d)?;
            if let Some(Route::Via(peer)) = &toward {
                // The provider's broker holds the pending copy: tell it, so it is not decided.
                self.fed.put_outbox(
                    tx,
                    peer,
                    Body::Demand(DemandEnvelope {
                        demand: Some(d.clone()),
                        origin_broker: self.store.broker_id().to_string(),
                    }),
                )?;
            }
            Ok((
                d.clone(),
                vec![demand_entry("demand_withdrawn", caller.id.as_str(), &d)],
            ))
        })
    }

    /// Returns one grant, if the caller may see it.
    pub fn get_grant(&self, caller: &Caller, id: &str) -> Result<Grant> {
        ids::check_opaque_id("grant id", id)?;
        let g: Grant = self
            .store
            .get(T::Grants, id)?
            .ok_or_else(|| BrokerError::not_found(format!("grant {id} does not exist")))?;
        if !caller.is_admin()
            && g.consumer != caller.id.as_str()
            && g.provider != caller.id.as_str()
        {
            return Err(BrokerError::denied(format!(
                "grant {id} is between {} and {}; {} may not see it",
                g.consumer, g.provider, caller.id
            )));
        }
        Ok(with_expiry(g, now_ms()))
    }

    /// Lists grants in a view.
    pub fn list_grants(
        &self,
        caller: &Caller,
        req: &ListGrantsRequest,
    ) -> Result<ListGrantsResponse> {
        let view = GrantView::try_from(req.view)
            .map_err(|_| BrokerError::invalid(format!("view {} is not a GrantView", req.view)))?;
        if !req.dataset_id.is_empty() {
            DatasetId::parse(&req.dataset_id)?;
        }
        let index = match view {
            GrantView::Unspecified | GrantView::Held => Some(T::GrantsByConsumer),
            GrantView::Issued => Some(T::GrantsByProvider),
            GrantView::All => {
                caller.require_admin("list every grant")?;
                None
            }
        };
        let size = page_size(req.page_size, 100, 1000);
        let now = now_ms();
        let (grants, next) = self.page(
            index,
            caller.id.as_str(),
            T::Grants,
            &req.page_token,
            size,
            |g: Grant| {
                let g = with_expiry(g, now);
                let keep = (req.include_inactive || g.state() == GrantState::Active)
                    && (req.dataset_id.is_empty() || g.dataset_id == req.dataset_id);
                keep.then_some(g)
            },
        )?;
        Ok(ListGrantsResponse {
            grants,
            next_page_token: next,
        })
    }

    /// Revokes a grant (its provider or an admin).
    pub fn revoke(&self, caller: &Caller, id: &str, reason: &str) -> Result<Grant> {
        ids::check_opaque_id("grant id", id)?;
        ids::check_text("reason", reason, false, 1000)?;
        let now = now_ms();
        self.store.write(|tx| {
            let mut g: Grant = tx
                .get(T::Grants, id)?
                .ok_or_else(|| BrokerError::not_found(format!("grant {id} does not exist")))?;
            if !caller.is_admin() && g.provider != caller.id.as_str() {
                return Err(BrokerError::denied(format!(
                    "grant {id} is on a dataset of {}; only that provider or an admin may revoke it",
                    g.provider
                )));
            }
            if g.state() == GrantState::Revoked {
                return Err(BrokerError::precondition(format!("grant {id} is already revoked")));
            }
            g.state = GrantState::Revoked as i32;
            g.revoked_at = Some(ts(now));
            g.revoked_by = caller.id.to_string();
            g.revoke_reason = reason.trim().to_string();
            tx.put(T::Grants, &g.id, &g)?;
            if g.issuer == self.store.broker_id() {
                // Signed, so that every broker in the cascade can trust it; flooded by the caller.
                tx.put(
                    T::Revoked,
                    &crate::federation::revoked_key(&g.issuer, &g.id),
                    &self.key.revocation(&g),
                )?;
            }
            let mut e = grant_entry("grant_revoked", caller.id.as_str(), &g);
            e.reason = g.revoke_reason.clone();
            Ok((g, vec![e]))
        })
    }

    /// Counts (pending, overdue) demands and active grants, for status and metrics.
    pub fn counts(&self) -> Result<(u64, u64, u64)> {
        let c = self.census()?;
        Ok((c.pending, c.overdue, c.active))
    }

    /// Demands by state (lower-case names), overdue demands and active grants, in one scan.
    pub fn census(&self) -> Result<Census> {
        let now = now_ms();
        let mut c = Census::default();
        for s in ["pending", "approved", "rejected", "withdrawn"] {
            c.demands.insert(s, 0);
        }
        for kv in self.store.tree(T::Demands).iter() {
            let (_, v) = kv?;
            let d = with_overdue(prost::Message::decode(v.as_ref())?, now);
            let state = match d.state() {
                DemandState::Pending => "pending",
                DemandState::Approved => "approved",
                DemandState::Rejected => "rejected",
                DemandState::Withdrawn => "withdrawn",
                DemandState::Unspecified => continue,
            };
            *c.demands.entry(state).or_default() += 1;
            if d.state() == DemandState::Pending {
                c.pending += 1;
                if d.overdue {
                    c.overdue += 1;
                }
            }
        }
        for kv in self.store.tree(T::Grants).iter() {
            let (_, v) = kv?;
            let g = with_expiry(prost::Message::decode(v.as_ref())?, now);
            if g.state() == GrantState::Active {
                c.active += 1;
            }
        }
        Ok(c)
    }
}

/// Demand and grant figures for status and metrics.
#[derive(Debug, Default, Clone)]
pub struct Census {
    /// Demands by state.
    pub demands: std::collections::BTreeMap<&'static str, u64>,
    /// Pending demands.
    pub pending: u64,
    /// Pending demands past their response deadline.
    pub overdue: u64,
    /// Grants in force.
    pub active: u64,
}

/// "DEMAND_STATE_PENDING" → "PENDING".
pub fn short(name: &str) -> &str {
    name.split_once("_STATE_").map(|(_, s)| s).unwrap_or(name)
}

fn demand_entry(decision: &str, actor: &str, d: &Demand) -> govshare_proto::v1::AuditEntry {
    let mut e = audit::entry(decision, actor);
    e.demand_id = d.id.clone();
    e.dataset_id = d.dataset_id.clone();
    e.consumer = d.consumer.clone();
    e.provider = d.provider.clone();
    e.grant_id = d.grant_id.clone();
    e
}

fn grant_entry(decision: &str, actor: &str, g: &Grant) -> govshare_proto::v1::AuditEntry {
    let mut e = audit::entry(decision, actor);
    e.grant_id = g.id.clone();
    e.dataset_id = g.dataset_id.clone();
    e.consumer = g.consumer.clone();
    e.provider = g.provider.clone();
    e.demand_id = g.demand_id.clone();
    e
}
