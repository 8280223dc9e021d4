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
pub fn load_head(tree: &sled::Tree) -> Result<AuditHead> {
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

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Every entry verifies; the count.
    Ok(u64),
    /// The first entry that does not verify, and why.
    Broken {
        /// The entry's seq (or the key position where a seq was expected).
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Verifies the whole chain in a tree.
pub fn verify(tree: &sled::Tree) -> Result<VerifyOutcome> {
    let mut prev = vec![0u8; 32];
    let mut expected_seq = 1u64;
    for kv in tree.iter() {
        let (k, v) = kv?;
        let key_seq = k
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| BrokerError::internal("audit key is not 8 bytes"))?;
        let e = match AuditEntry::decode(v.as_ref()) {
            Ok(e) => e,
            Err(err) => {
                return Ok(VerifyOutcome::Broken {
                    seq: key_seq,
                    reason: format!("entry does not decode: {err}"),
                })
            }
        };
        let broken = |reason: String| {
            Ok(VerifyOutcome::Broken {
                seq: key_seq,
                reason,
            })
        };
        if key_seq != expected_seq || e.seq != key_seq {
            return broken(format!(
                "expected entry {expected_seq}, found key {key_seq} holding entry {}",
                e.seq
            ));
        }
        if e.prev_hash != prev {
            return broken("prev_hash does not match the previous entry's hash".into());
        }
        if entry_hash(&e) != e.hash {
            return broken("hash does not match the entry's contents (edited?)".into());
        }
        prev = e.hash;
        expected_seq += 1;
    }
    Ok(VerifyOutcome::Ok(expected_seq - 1))
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
