//! Verifying an exchange's hop trail: each broker on the path signs a receipt over the
//! exchange id, its hop, its id, its decision and the time, with its Ed25519 key.

use crate::proto::{HopReceipt, KeyAnnouncement};
use ring::signature::{UnparsedPublicKey, ED25519};

/// The bytes a receipt's signature covers (the broker's `keys::receipt_bytes`).
pub fn receipt_bytes(exchange_id: &str, r: &HopReceipt) -> Vec<u8> {
    let at_ms =
        r.at.as_ref()
            .map(|t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos) / 1_000_000)
            })
            .unwrap_or(0);
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(b"govshare.v1.HopReceipt\0");
    for part in [exchange_id, r.broker.as_str(), r.decision.as_str()] {
        b.extend_from_slice(part.as_bytes());
        b.push(0);
    }
    b.extend_from_slice(&r.hop.to_be_bytes());
    b.extend_from_slice(&at_ms.to_be_bytes());
    b
}

/// Checks every receipt against the keys; the error names the first that fails.
pub fn verify(
    exchange_id: &str,
    trail: &[HopReceipt],
    keys: &[KeyAnnouncement],
) -> Result<(), String> {
    if trail.is_empty() {
        return Err(format!("exchange {exchange_id} has no hop receipts"));
    }
    for (i, r) in trail.iter().enumerate() {
        let key = keys
            .iter()
            .find(|k| k.key_id == r.key_id && k.broker_id == r.broker)
            .ok_or_else(|| format!("receipt {i} from {}: key {} is unknown", r.broker, r.key_id))?;
        UnparsedPublicKey::new(&ED25519, &key.public_key)
            .verify(&receipt_bytes(exchange_id, r), &r.signature)
            .map_err(|_| {
                format!(
                    "receipt {i} from {} ({}) does not verify",
                    r.broker, r.decision
                )
            })?;
    }
    Ok(())
}
