//! Verifying an exchange's hop trail: each broker on the path signs a receipt over the
//! exchange id, its hop, its id, its decision and the time, with its Ed25519 key.

use crate::proto::{HopReceipt, KeyAnnouncement};
use ring::signature::{UnparsedPublicKey, ED25519};

pub use govshare_proto::receipt_bytes;

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
