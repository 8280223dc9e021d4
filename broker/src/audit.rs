//! The hash-chained audit log: every decision, in order, each entry hashing the one before.
//!
//! An entry's hash is SHA-256 over its protobuf encoding with `hash` empty (prost encodes
//! fields in tag order, so the encoding is canonical). Editing, removing or reordering any
//! stored entry breaks the chain at that entry, which `govshare-broker audit verify` names.

use crate::error::{BrokerError, Result};
use crate::time::now_ts;
use govshare_proto::v1::AuditEntry;
use prost::Message;
use sha2::{Digest, Sha256};

/// The end of the chain: the last seq and its hash.
#[derive(Debug, Clone, Default)]
pub struct AuditHead {
    /// The last entry's seq (0 when empty).
    pub seq: u64,
    /// The last entry's hash (32 zero bytes when empty).
    pub hash: Vec<u8>,
}

/// Reads the chain's head from the audit tree.
pub fn load_head(tree: &crate::kv::Tree) -> Result<AuditHead> {
    match tree.last()? {
        Some((_, v)) => {
            let e = AuditEntry::decode(v.as_ref())?;
            Ok(AuditHead {
                seq: e.seq,
                hash: e.hash,
            })
        }
        None => Ok(AuditHead {
            seq: 0,
            hash: vec![0; 32],
        }),
    }
}

/// Computes an entry's hash.
pub fn entry_hash(e: &AuditEntry) -> Vec<u8> {
    let mut unhashed = e.clone();
    unhashed.hash.clear();
    Sha256::digest(unhashed.encode_to_vec()).to_vec()
}

/// Links an entry to the head and advances the head.
pub fn chain(head: &mut AuditHead, mut e: AuditEntry, broker: &str) -> AuditEntry {
    e.seq = head.seq + 1;
    if e.at.is_none() {
        e.at = Some(now_ts());
    }
    e.broker = broker.to_string();
    e.prev_hash = if head.hash.is_empty() {
        vec![0; 32]
    } else {
        head.hash.clone()
    };
    e.hash = entry_hash(&e);
    head.seq = e.seq;
    head.hash = e.hash.clone();
    e
}

/// Builds an entry with the fields most decisions share.
pub fn entry(decision: &str, actor: &str) -> AuditEntry {
    AuditEntry {
        decision: decision.to_string(),
        actor: actor.to_string(),
        ..Default::default()
    }
}

/// The decision of an entry recording entries that never reached the disk: a run that did
/// not stop cleanly left a gap (sled, the storage before 2026-11-29, could keep a later write
/// and lose an earlier one after a full disk; data dirs converted from it can hold such gaps), which the next start records rather than leave it looking like
/// an edit. `lost_from` and `lost_to` name the gap.
pub const ENTRIES_LOST: &str = "audit_entries_lost";

/// Entries missing from the chain, lost in a run that did not stop cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The first missing seq.
    pub from: u64,
    /// The last missing seq.
    pub to: u64,
    /// The `audit_entries_lost` entry recording the loss; None until the broker next starts.
    pub recorded_at: Option<u64>,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.from == self.to {
            format!("entry {}", self.from)
        } else {
            format!("entries {}-{}", self.from, self.to)
        };
        match self.recorded_at {
            Some(at) => write!(
                f,
                "{what} lost before reaching the disk (recorded at entry {at})"
            ),
            None => write!(
                f,
                "{what} lost before reaching the disk by the last run, which did not stop \
                 cleanly (not recorded yet: the broker records the loss when it next starts)"
            ),
        }
    }
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Every entry verifies; the count.
    Ok(u64),
    /// Every entry present verifies, and each one missing is a recorded loss (see
    /// [`ENTRIES_LOST`]) or was lost by a run that did not stop cleanly.
    OkWithLosses {
        /// Entries verified.
        entries: u64,
        /// The gaps, in order.
        losses: Vec<Loss>,
    },
    /// The first entry that does not verify, and why.
    Broken {
        /// The entry's seq (or the key position where a seq was expected).
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Verifies the whole chain in a tree. `unclean_from` is the first seq of a run that did not
/// stop cleanly (see `Store::begin_run`), if the database holds one: a gap from there on is
/// a loss not recorded yet, where anywhere else an unrecorded gap breaks the chain.
pub fn verify(tree: &crate::kv::Tree, unclean_from: Option<u64>) -> Result<VerifyOutcome> {
    verify_from(tree, 1, unclean_from)
}

/// Verifies the chain from entry `from` on, linking it to the entry before it.
pub fn verify_from(
    tree: &crate::kv::Tree,
    from: u64,
    unclean_from: Option<u64>,
) -> Result<VerifyOutcome> {
    let from = from.max(1);
    let mut prev = vec![0u8; 32];
    if from > 1 {
        let anchor = from - 1;
        match tree.get(anchor.to_be_bytes())? {
            Some(v) => match AuditEntry::decode(v.as_ref()) {
                Ok(e) if e.seq == anchor && entry_hash(&e) == e.hash => prev = e.hash,
                _ => {
                    return Ok(VerifyOutcome::Broken {
                        seq: anchor,
                        reason: "entry does not verify".into(),
                    })
                }
            },
            None => {
                return Ok(VerifyOutcome::Broken {
                    seq: anchor,
                    reason: "entry is missing".into(),
                })
            }
        }
    }
    let mut expected_seq = from;
    let mut entries = 0u64;
    let mut losses: Vec<Loss> = Vec::new();
    // A break at `seq`, unless an earlier gap that no later entry can excuse comes first.
    let excused = |g: &Loss| g.recorded_at.is_some() || unclean_from.is_some_and(|u| g.from >= u);
    let first_break = |losses: &[Loss], seq: u64, reason: String| {
        let (seq, reason) = match losses.iter().find(|g| !excused(g)) {
            Some(g) => (g.to + 1, unrecorded(g)),
            None => (seq, reason),
        };
        Ok(VerifyOutcome::Broken { seq, reason })
    };
    for kv in tree.range(from.to_be_bytes()..) {
        let (k, v) = kv?;
        let key_seq = k
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| BrokerError::internal("audit key is not 8 bytes"))?;
        let e = match AuditEntry::decode(v.as_ref()) {
            Ok(e) => e,
            Err(err) => {
                return first_break(&losses, key_seq, format!("entry does not decode: {err}"))
            }
        };
        if e.seq != key_seq {
            return first_break(
                &losses,
                key_seq,
                format!("key {key_seq} holds entry {}", e.seq),
            );
        }
        if key_seq > expected_seq {
            // Its prev_hash names a lost entry, so only its own hash can be checked.
            losses.push(Loss {
                from: expected_seq,
                to: key_seq - 1,
                recorded_at: None,
            });
        } else if e.prev_hash != prev {
            return first_break(
                &losses,
                key_seq,
                "prev_hash does not match the previous entry's hash".into(),
            );
        }
        if entry_hash(&e) != e.hash {
            return first_break(
                &losses,
                key_seq,
                "hash does not match the entry's contents (edited?)".into(),
            );
        }
        if e.decision == ENTRIES_LOST {
            let gap = losses
                .iter_mut()
                .find(|g| g.recorded_at.is_none() && g.from == e.lost_from && g.to == e.lost_to);
            match gap {
                Some(g) => g.recorded_at = Some(key_seq),
                None => {
                    return first_break(
                        &losses,
                        key_seq,
                        format!(
                            "records entries {}-{} as lost, but they are not a gap before it",
                            e.lost_from, e.lost_to
                        ),
                    )
                }
            }
        }
        prev = e.hash;
        expected_seq = key_seq + 1;
        entries += 1;
    }
    if let Some(g) = losses.iter().find(|g| !excused(g)) {
        return Ok(VerifyOutcome::Broken {
            seq: g.to + 1,
            reason: unrecorded(g),
        });
    }
    Ok(if losses.is_empty() {
        VerifyOutcome::Ok(entries)
    } else {
        VerifyOutcome::OkWithLosses { entries, losses }
    })
}

/// The gaps among the entries from `from` on, found from their keys alone: cheap enough for
/// every start after an unclean stop, when the last run may have written a million entries.
/// Hashes are left to `audit verify`.
pub fn gaps_from(tree: &crate::kv::Tree, from: u64) -> Result<Vec<Loss>> {
    let mut expected = from.max(1);
    let mut gaps = Vec::new();
    for k in tree.range(expected.to_be_bytes()..).keys() {
        let k = k?;
        let seq = k
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| BrokerError::internal("audit key is not 8 bytes"))?;
        if seq > expected {
            gaps.push(Loss {
                from: expected,
                to: seq - 1,
                recorded_at: None,
            });
        }
        expected = seq + 1;
    }
    Ok(gaps)
}

/// Why an unexcused gap breaks the chain.
fn unrecorded(g: &Loss) -> String {
    format!(
        "expected entry {}, found entry {}: entries {}-{} are missing and no entry records \
         their loss",
        g.from,
        g.to + 1,
        g.from,
        g.to
    )
}

/// Lists audit entries the caller may see: all for admins, else those naming the caller as
/// consumer, provider, actor or subject.
pub fn list(
    store: &crate::store::Store,
    caller: &crate::auth::Caller,
    req: &govshare_proto::v1::ListAuditRequest,
) -> Result<govshare_proto::v1::ListAuditResponse> {
    use crate::time::ms;
    if !req.dataset_id.is_empty() {
        crate::ids::DatasetId::parse(&req.dataset_id)?;
    }
    for (what, v) in [
        ("grant id", &req.grant_id),
        ("exchange id", &req.exchange_id),
    ] {
        if !v.is_empty() {
            crate::ids::check_opaque_id(what, v)?;
        }
    }
    let start: u64 = if req.page_token.is_empty() {
        1
    } else {
        req.page_token
            .parse::<u64>()
            .map_err(|_| BrokerError::invalid("page_token is not one this broker gave"))?
    };
    let size = crate::registry::page_size(req.page_size, 100, 1000);
    let since = ms(&req.since);
    let me = caller.id.as_str();
    let mut entries = Vec::new();
    let mut next = String::new();
    for kv in store
        .tree(crate::store::T::Audit)
        .range(start.to_be_bytes()..)
    {
        let (_, v) = kv?;
        let e = AuditEntry::decode(v.as_ref())?;
        let visible = caller.is_admin()
            || e.consumer == me
            || e.provider == me
            || e.actor == me
            || e.subject == me;
        let wanted = (req.dataset_id.is_empty() || e.dataset_id == req.dataset_id)
            && (req.grant_id.is_empty() || e.grant_id == req.grant_id)
            && (req.exchange_id.is_empty() || e.exchange_id == req.exchange_id)
            && (since == 0 || ms(&e.at) >= since);
        if visible && wanted {
            if entries.len() == size {
                next = e.seq.to_string();
                break;
            }
            entries.push(e);
        }
    }
    Ok(govshare_proto::v1::ListAuditResponse {
        entries,
        next_page_token: next,
    })
}
