//! The catalog: datasets published by departments, and a character n-gram index for search.
//!
//! Names and descriptions are mostly Chinese, with no spaces between words, so a word index
//! would not find `养老` in `城乡居民养老保险待遇发放`. Every character and every pair of
//! adjacent characters is indexed instead (`gram ‖ 0 ‖ dataset id`). A query is split into its
//! pairs, whose sorted posting lists are intersected by leapfrogging with range seeks, so the
//! cost follows the rarest pair, not the catalog's size; each candidate is then checked for the
//! whole query as a substring.

use crate::audit;
use crate::auth::Caller;
use crate::error::{BrokerError, Result};
use crate::ids::{self, DatasetId};
use crate::mask::MaskRule;
use crate::registry::page_size;
use crate::store::{index_key, Store, Tx, T};
use crate::time::now_ts;
use govshare_proto::v1::{
    Dataset, DatasetState, OpenType, PublishDatasetResponse, SearchDatasetsRequest,
    SearchDatasetsResponse, ShareType, UpdateCycle,
};
use std::collections::BTreeSet;

/// Largest catalog entry taken from another broker, encoded: far above what the field limits
/// allow a publisher, so only a broken or hostile peer meets it.
const MAX_REMOTE_ENTRY_BYTES: usize = 1024 * 1024;
/// Most candidates one search call examines before it returns a partial page with a token,
/// so that no query can make the broker scan the whole national catalog in one call.
const MAX_EXAMINED: usize = 20_000;

/// Lower-cases text and drops control characters (which can also never be typed in a query).
fn normalize(s: &str) -> Vec<char> {
    s.to_lowercase()
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// The grams of one text: every character and every adjacent pair.
fn grams_of(text: &str, out: &mut BTreeSet<String>) {
    let chars = normalize(text);
    // A long text repeats most of its grams: look each up before allocating it.
    let mut gram = String::new();
    let add = |gram: &String, out: &mut BTreeSet<String>| {
        if !out.contains(gram.as_str()) {
            out.insert(gram.clone());
        }
    };
    for c in &chars {
        if !c.is_whitespace() {
            gram.clear();
            gram.push(*c);
            add(&gram, out);
        }
    }
    for w in chars.windows(2) {
        gram.clear();
        gram.extend(w);
        add(&gram, out);
    }
}

/// The index grams of a dataset (name and description indexed apart, so no pair spans them).
fn dataset_grams(d: &Dataset) -> BTreeSet<String> {
    let mut g = BTreeSet::new();
    grams_of(&d.name, &mut g);
    grams_of(&d.description, &mut g);
    g
}

/// The grams a query needs: its pairs, or the character itself for a one-character query.
fn query_grams(q: &[char]) -> BTreeSet<String> {
    if q.len() == 1 {
        return q.iter().map(|c| c.to_string()).collect();
    }
    q.windows(2).map(|w| w.iter().collect()).collect()
}

fn check_enum<E: TryFrom<i32>>(what: &str, v: i32) -> Result<()> {
    E::try_from(v)
        .map(|_| ())
        .map_err(|_| BrokerError::invalid(format!("{what} {v} is not a known value")))
}

/// Validates a dataset as published; returns it normalised (trimmed, provider and id set).
fn validate(caller: &Caller, mut d: Dataset, limits: &CatalogLimits) -> Result<Dataset> {
    let (max_items, max_tags) = (limits.max_items, limits.max_tags);
    ids::check_dataset_code(&d.code)?;
    ids::check_text("name", &d.name, true, 200)?;
    ids::check_text("description", &d.description, false, 4000)?;
    ids::check_text("share_condition", &d.share_condition, false, 2000)?;
    check_enum::<ShareType>("share_type", d.share_type)?;
    check_enum::<OpenType>("open_type", d.open_type)?;
    check_enum::<UpdateCycle>("update_cycle", d.update_cycle)?;
    if d.share_type() == ShareType::Unspecified {
        return Err(BrokerError::invalid(
            "share_type is required: UNCONDITIONAL, CONDITIONAL or NOT_SHARED",
        ));
    }
    if d.tags.len() > max_tags {
        return Err(BrokerError::invalid(format!(
            "{} tags given; at most {max_tags} are allowed ([limits] max_dataset_tags)",
            d.tags.len()
        )));
    }
    for t in &mut d.tags {
        *t = t.trim().to_string();
        ids::check_text("tag", t, true, 64)?;
        if t.chars().any(char::is_control) {
            return Err(BrokerError::invalid(format!(
                "tag {t:?} has control characters"
            )));
        }
    }
    d.tags.sort();
    d.tags.dedup();
    if d.items.is_empty() {
        return Err(BrokerError::invalid(
            "a dataset needs at least one information item",
        ));
    }
    if d.items.len() > max_items {
        return Err(BrokerError::invalid(format!(
            "{} items given; at most {max_items} are allowed ([limits] max_dataset_items)",
            d.items.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for item in &d.items {
        ids::check_item_name(&item.name)?;
        if !seen.insert(item.name.clone()) {
            return Err(BrokerError::invalid(format!(
                "item {:?} appears twice",
                item.name
            )));
        }
        ids::check_text(&format!("item {} type", item.name), &item.r#type, false, 32)?;
        ids::check_text(
            &format!("item {} description", item.name),
            &item.description,
            false,
            1000,
        )?;
        check_enum::<ShareType>(&format!("item {} share_type", item.name), item.share_type)?;
        MaskRule::parse(&item.mask)
            .map_err(|e| BrokerError::invalid(format!("item {}: {e}", item.name)))?;
    }
    d.name = d.name.trim().to_string();
    d.provider = caller.id.to_string();
    d.id = format!("{}/{}", caller.id, d.code);
    Ok(d)
}

/// Catalog operations. Blocking: call from blocking threads.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Store,
    limits: CatalogLimits,
}

/// How large a dataset may be (`[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    /// Most information items per dataset.
    pub max_items: usize,
    /// Most tags per dataset.
    pub max_tags: usize,
}

impl CatalogLimits {
    /// The limits `[limits]` sets.
    pub fn from_config(l: &crate::config::LimitsSection) -> Self {
        Self {
            max_items: usize::try_from(l.max_dataset_items).unwrap_or(usize::MAX),
            max_tags: usize::try_from(l.max_dataset_tags).unwrap_or(usize::MAX),
        }
    }
}

impl Catalog {
    /// A catalog over the store.
    pub fn new(store: Store, limits: CatalogLimits) -> Self {
        Self { store, limits }
    }

    /// Checks the size of an entry another broker sends (its publisher's broker validated the
    /// rest): a peer cannot fill this broker's catalog with entries larger than it allows.
    pub fn check_remote_size(&self, d: &Dataset) -> Result<()> {
        let bytes = prost::Message::encoded_len(d);
        if d.items.len() > self.limits.max_items
            || d.tags.len() > self.limits.max_tags
            || bytes > MAX_REMOTE_ENTRY_BYTES
        {
            return Err(BrokerError::invalid(format!(
                "dataset {} is larger than this broker takes: {} items (at most {}), {} tags (at most {}), {bytes} bytes (at most {MAX_REMOTE_ENTRY_BYTES})",
                d.id,
                d.items.len(),
                self.limits.max_items,
                d.tags.len(),
                self.limits.max_tags
            )));
        }
        Ok(())
    }

    /// Publishes a dataset of the caller's, or a new version of it.
    pub fn publish(&self, caller: &Caller, d: Option<Dataset>) -> Result<PublishDatasetResponse> {
        caller.require_department("publish datasets")?;
        self.store.check_room()?;
        let d = d.ok_or_else(|| BrokerError::invalid("dataset is required"))?;
        let mut d = validate(caller, d, &self.limits)?;
        d.home_broker = self.store.broker_id().to_string();
        let salt: [u8; 32] = rand::random();
        let grams = dataset_grams(&d);
        self.store.write(|tx| {
            let old: Option<Dataset> = tx.get(T::Datasets, &d.id)?;
            let mut d = d.clone();
            let now = now_ts();
            d.state = DatasetState::Published as i32;
            d.updated_at = Some(now);
            let created = old.is_none();
            match &old {
                Some(o) => {
                    d.version = o.version + 1;
                    d.published_at = o.published_at;
                }
                None => {
                    d.version = 1;
                    d.published_at = Some(now);
                    // The secret salt for `hash` masking: per dataset, never leaves the broker.
                    tx.put_raw(T::Meta, format!("salt/{}", d.id).as_bytes(), &salt[..])?;
                }
            }
            reindex(tx, old.as_ref(), &d, &grams)?;
            tx.put(T::Datasets, &d.id, &d)?;
            let mut e = audit::entry("dataset_published", caller.id.as_str());
            e.dataset_id = d.id.clone();
            e.provider = d.provider.clone();
            e.reason = format!("version {}", d.version);
            Ok((
                PublishDatasetResponse {
                    dataset: Some(d),
                    created,
                },
                vec![e],
            ))
        })
    }

    /// Withdraws one of the caller's datasets.
    pub fn withdraw(&self, caller: &Caller, id: &str, reason: &str) -> Result<Dataset> {
        let did = DatasetId::parse(id)?;
        ids::check_text("reason", reason, false, 1000)?;
        if did.provider != caller.id {
            return Err(BrokerError::denied(format!(
                "dataset {id} belongs to {}; only its provider may withdraw it",
                did.provider
            )));
        }
        self.store.write(|tx| {
            let mut d: Dataset = tx.get(T::Datasets, id)?.ok_or_else(|| {
                BrokerError::not_found(format!("dataset {id} is not in the catalog"))
            })?;
            if d.state() == DatasetState::Withdrawn {
                return Err(BrokerError::precondition(format!(
                    "dataset {id} is already withdrawn"
                )));
            }
            d.state = DatasetState::Withdrawn as i32;
            d.updated_at = Some(now_ts());
            tx.put(T::Datasets, id, &d)?;
            let mut e = audit::entry("dataset_withdrawn", caller.id.as_str());
            e.dataset_id = id.to_string();
            e.provider = d.provider.clone();
            e.reason = reason.to_string();
            Ok((d, vec![e]))
        })
    }

    /// Takes in a catalog entry cascaded from another broker; true when it was news (a new
    /// entry, a newer version, or a withdrawal), so that it floods on.
    pub fn apply_remote(&self, d: &Dataset, from: &str) -> Result<bool> {
        let did = DatasetId::parse(&d.id)?;
        if did.provider.as_str() != d.provider {
            return Err(BrokerError::invalid(format!(
                "cascaded dataset {} names provider {}",
                d.id, d.provider
            )));
        }
        if d.home_broker == self.store.broker_id() {
            return Ok(false); // our own entry coming back
        }
        let grams = dataset_grams(d);
        self.store.write(|tx| {
            let old: Option<Dataset> = tx.get(T::Datasets, &d.id)?;
            if let Some(o) = &old {
                let newer = d.version > o.version
                    || (d.version == o.version
                        && d.state != o.state
                        && crate::time::ms(&d.updated_at) >= crate::time::ms(&o.updated_at));
                if !newer || o.home_broker == self.store.broker_id() {
                    return Ok((false, vec![]));
                }
            }
            reindex(tx, old.as_ref(), d, &grams)?;
            tx.put(T::Datasets, &d.id, d)?;
            let mut e = audit::entry(
                if d.state() == DatasetState::Withdrawn {
                    "dataset_withdrawn"
                } else {
                    "dataset_cascaded"
                },
                from,
            );
            e.dataset_id = d.id.clone();
            e.provider = d.provider.clone();
            e.reason = format!("version {} from {}", d.version, d.home_broker);
            Ok((true, vec![e]))
        })
    }

    /// Every dataset this broker knows, for a link's initial catalog sync.
    pub fn all(&self) -> Result<Vec<Dataset>> {
        self.store
            .tree(T::Datasets)
            .iter()
            .map(|kv| Ok(prost::Message::decode(kv?.1.as_ref())?))
            .collect()
    }

    /// Returns one dataset.
    pub fn get(&self, id: &str) -> Result<Dataset> {
        DatasetId::parse(id)?;
        self.store
            .get(T::Datasets, id)?
            .ok_or_else(|| BrokerError::not_found(format!("dataset {id} is not in the catalog")))
    }

    /// Searches the catalog.
    pub fn search(&self, req: &SearchDatasetsRequest) -> Result<SearchDatasetsResponse> {
        ids::check_text("search text", &req.text, false, 200)?;
        ids::check_region_prefix(&req.region_prefix)?;
        if !req.provider.is_empty() {
            ids::NodeId::parse(&req.provider, "provider")?;
        }
        ids::check_text("tag", &req.tag, false, 64)?;
        check_enum::<ShareType>("share_type", req.share_type)?;
        let size = page_size(req.page_size, 50, 500);
        let query: Vec<char> = normalize(req.text.trim());
        let query_str: String = query.iter().collect();
        let matches = |d: &Dataset| -> bool {
            (req.include_withdrawn || d.state() == DatasetState::Published)
                && (req.provider.is_empty() || d.provider == req.provider)
                && d.id.starts_with(&req.region_prefix)
                && (req.tag.is_empty() || d.tags.contains(&req.tag))
                && (req.share_type == 0 || d.share_type == req.share_type)
                && (query.is_empty()
                    || normalize(&d.name)
                        .iter()
                        .collect::<String>()
                        .contains(&query_str)
                    || normalize(&d.description)
                        .iter()
                        .collect::<String>()
                        .contains(&query_str))
        };
        let mut out = Vec::new();
        let mut next = String::new();
        let mut examined = 0usize;
        let mut visit = |id: &str| -> Result<bool> {
            examined += 1;
            if out.len() == size {
                next = out
                    .last()
                    .map(|d: &Dataset| d.id.clone())
                    .unwrap_or_default();
                return Ok(false);
            }
            if examined > MAX_EXAMINED {
                next = id.to_string();
                return Ok(false);
            }
            if let Some(d) = self.store.get::<Dataset>(T::Datasets, id)? {
                if matches(&d) {
                    out.push(d);
                }
            }
            Ok(true)
        };
        // Ids strictly after the token: appending a NUL gives the least larger key.
        let mut start = req.page_token.as_bytes().to_vec();
        if !start.is_empty() {
            start.push(0);
        }
        if !query.is_empty() {
            self.leapfrog(&query_grams(&query), start, &mut visit)?;
        } else if !req.tag.is_empty() {
            let prefix = index_key(&req.tag, "");
            scan_ids(&self.store.tree(T::CatTag), &prefix, &start, &mut visit)?;
        } else {
            let prefix = if req.provider.is_empty() {
                req.region_prefix.clone()
            } else {
                format!("{}/", req.provider)
            };
            // Dataset keys are the ids themselves: start at the later of prefix and token.
            let lo = if start.as_slice() > prefix.as_bytes() {
                start.clone()
            } else {
                prefix.as_bytes().to_vec()
            };
            for kv in self.store.tree(T::Datasets).range(lo..) {
                let (k, _) = kv?;
                if !k.starts_with(prefix.as_bytes()) || !visit(&String::from_utf8_lossy(&k))? {
                    break;
                }
            }
        }
        Ok(SearchDatasetsResponse {
            datasets: out,
            next_page_token: next,
        })
    }

    /// Visits, in id order from `start`, every dataset id present under all the grams.
    fn leapfrog(
        &self,
        grams: &BTreeSet<String>,
        start: Vec<u8>,
        visit: &mut dyn FnMut(&str) -> Result<bool>,
    ) -> Result<()> {
        let tree = self.store.tree(T::CatGram);
        let seek = |gram: &str, from: &[u8]| -> Result<Option<Vec<u8>>> {
            let prefix = index_key(gram, "");
            let mut lo = prefix.clone();
            lo.extend_from_slice(from);
            match tree.range(lo..).next() {
                Some(kv) => {
                    let (k, _) = kv?;
                    Ok(k.strip_prefix(prefix.as_slice()).map(<[u8]>::to_vec))
                }
                None => Ok(None),
            }
        };
        let mut cand = start;
        'outer: loop {
            for g in grams {
                match seek(g, &cand)? {
                    None => return Ok(()),
                    Some(id) if id > cand => {
                        cand = id;
                        continue 'outer;
                    }
                    Some(_) => {}
                }
            }
            let id = String::from_utf8_lossy(&cand).into_owned();
            if !visit(&id)? {
                return Ok(());
            }
            cand.push(0);
        }
    }

    /// The secret salt of a dataset, for `hash` masking.
    pub fn salt(&self, id: &str) -> Result<Vec<u8>> {
        Ok(self
            .store
            .tree(T::Meta)
            .get(format!("salt/{id}").as_bytes())?
            .map(|v| v.to_vec())
            .unwrap_or_default())
    }

    /// How many datasets are in the catalog (withdrawn included).
    pub fn count(&self) -> usize {
        self.store.tree(T::Datasets).len()
    }
}

/// Visits the ids under a prefix of an index (`prefix ‖ id` keys), from id `start` on.
fn scan_ids(
    tree: &crate::kv::Tree,
    prefix: &[u8],
    start: &[u8],
    visit: &mut dyn FnMut(&str) -> Result<bool>,
) -> Result<()> {
    let mut lo = prefix.to_vec();
    lo.extend_from_slice(start);
    for kv in tree.range(lo..) {
        let (k, _) = kv?;
        let Some(id) = k.strip_prefix(prefix) else {
            break;
        };
        if !visit(&String::from_utf8_lossy(id))? {
            break;
        }
    }
    Ok(())
}

/// Updates the gram and tag indexes from an old version of a dataset to a new one.
///
/// `new_grams` are `new`'s, taken before the transaction: a long description has thousands,
/// and every writer waits while a transaction runs. The old entry's are taken only when its
/// text changed.
fn reindex(
    tx: &Tx<'_>,
    old: Option<&Dataset>,
    new: &Dataset,
    new_grams: &BTreeSet<String>,
) -> Result<()> {
    if !old.is_some_and(|o| o.name == new.name && o.description == new.description) {
        let old_grams = old.map(dataset_grams).unwrap_or_default();
        for g in old_grams.difference(new_grams) {
            tx.unmark(T::CatGram, &index_key(g, &new.id))?;
        }
        for g in new_grams.difference(&old_grams) {
            tx.mark(T::CatGram, &index_key(g, &new.id))?;
        }
    }
    let old_tags: BTreeSet<&String> = old.map(|o| o.tags.iter().collect()).unwrap_or_default();
    let new_tags: BTreeSet<&String> = new.tags.iter().collect();
    for t in old_tags.difference(&new_tags) {
        tx.unmark(T::CatTag, &index_key(t, &new.id))?;
    }
    for t in new_tags.difference(&old_tags) {
        tx.mark(T::CatTag, &index_key(t, &new.id))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grams_cover_every_run() {
        let mut g = BTreeSet::new();
        grams_of("城乡居民养老保险待遇发放", &mut g);
        let q = normalize("养老保险");
        assert!(query_grams(&q).iter().all(|x| g.contains(x)));
        assert!(g.contains("养"));
        let mut g2 = BTreeSet::new();
        grams_of("Pension STATUS", &mut g2);
        assert!(g2.contains("st"));
    }
}
