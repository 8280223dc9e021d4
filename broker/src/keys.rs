//! The broker's signing key: grants are signed by the broker that issues them, so that any
//! hop can verify a grant locally with the issuer's public key (learned over federation
//! links), and a forged or altered grant is refused at the first hop that sees it.

use crate::error::{BrokerError, Result};
use crate::exchange::enforce::Denial;
use govshare_proto::v1::{
    Grant, GrantClaims, GrantRevocation, GrantToken, HopReceipt, KeyAnnouncement,
};
use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// The key file inside a data dir (PKCS#8, Ed25519).
pub const KEY_FILE: &str = "keys/signing.pk8";

/// A broker's signing key.
#[derive(Clone)]
pub struct SigningKey {
    /// The key for AWS-LC: every exchange is signed at each hop (see [`SigningKey::receipt`]),
    /// and AWS-LC signs in about half of ed25519-dalek's time and 40% of ring's on our 2-core
    /// VM (8.4 µs against 15.3 and 21.7, 20,000 signatures each), with the same
    /// (deterministic) signatures.
    pair: Arc<aws_lc_rs::signature::Ed25519KeyPair>,
    public: [u8; 32],
    key_id: String,
    broker_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("broker_id", &self.broker_id)
            .finish()
    }
}

/// The 32-byte seed inside an Ed25519 PKCS#8 document (RFC 8410: the private key is an
/// OCTET STRING holding an OCTET STRING of 32 bytes, right after the algorithm identifier).
fn pkcs8_seed(doc: &[u8]) -> Option<[u8; 32]> {
    const ALGORITHM: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    const PRIVATE_KEY: [u8; 4] = [0x04, 0x22, 0x04, 0x20];
    let at = doc.windows(ALGORITHM.len()).position(|w| w == ALGORITHM)? + ALGORITHM.len();
    let rest = doc.get(at..)?.strip_prefix(&PRIVATE_KEY[..])?;
    rest.get(..32)?.try_into().ok()
}

/// The id of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

impl SigningKey {
    /// Loads the data dir's key, creating it on first use.
    pub fn load_or_create(data_dir: &Path, broker_id: &str) -> Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| BrokerError::internal("cannot generate a signing key"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| BrokerError::internal(format!("{}: {e}", dir.display())))?;
                }
                std::fs::write(&path, doc.as_ref())
                    .map_err(|e| BrokerError::internal(format!("{}: {e}", path.display())))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
                }
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(BrokerError::internal(format!("{}: {e}", path.display()))),
        };
        let not_a_key =
            || BrokerError::invalid(format!("{} is not an Ed25519 PKCS#8 key", path.display()));
        // ring checks the document (and that its public key is the seed's); the seed is then
        // taken from it and checked again against that public key.
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| not_a_key())?;
        let seed = pkcs8_seed(&pkcs8).ok_or_else(not_a_key)?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| not_a_key())?;
        // AWS-LC checks the seed against the public key again.
        let signer = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(&seed, &public)
            .map_err(|_| not_a_key())?;
        Ok(Self {
            key_id: key_id(&public),
            pair: Arc::new(signer),
            public,
            broker_id: broker_id.to_string(),
        })
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The announcement other brokers verify with.
    pub fn announcement(&self) -> KeyAnnouncement {
        KeyAnnouncement {
            broker_id: self.broker_id.clone(),
            key_id: self.key_id.clone(),
            public_key: self.public.to_vec(),
        }
    }

    /// Signs bytes.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// A signed receipt for this broker's handling of one hop of an exchange.
    pub fn receipt(&self, exchange_id: &str, hop: u32, decision: &str, at_ms: i64) -> HopReceipt {
        let mut r = HopReceipt {
            broker: self.broker_id.clone(),
            at: Some(crate::time::ts(at_ms)),
            decision: decision.to_string(),
            hop,
            signature: Vec::new(),
            key_id: self.key_id.clone(),
        };
        r.signature = self.sign(&govshare_proto::receipt_bytes(exchange_id, &r));
        r
    }

    /// A signed revocation of one of this broker's grants, to flood through the cascade.
    pub fn revocation(&self, g: &Grant) -> GrantRevocation {
        let at = crate::time::ms(&g.revoked_at);
        GrantRevocation {
            grant_id: g.id.clone(),
            issuer: g.issuer.clone(),
            revoked_at: g.revoked_at,
            reason: g.revoke_reason.clone(),
            signature: self.sign(&revocation_bytes(&g.id, &g.issuer, at)),
            key_id: self.key_id.clone(),
        }
    }

    /// The signed terms of a grant.
    pub fn token_for(&self, g: &Grant) -> GrantToken {
        let claims = claims_of(g).encode_to_vec();
        GrantToken {
            signature: self.sign(&claims),
            claims,
            key_id: self.key_id.clone(),
        }
    }
}

/// The terms of a grant that its signature covers.
pub fn claims_of(g: &Grant) -> GrantClaims {
    GrantClaims {
        grant_id: g.id.clone(),
        dataset_id: g.dataset_id.clone(),
        consumer: g.consumer.clone(),
        provider: g.provider.clone(),
        fields: g.fields.clone(),
        valid_from_ms: crate::time::ms(&g.valid_from),
        valid_until_ms: crate::time::ms(&g.valid_until),
        daily_quota: g.daily_quota,
        issuer: g.issuer.clone(),
    }
}

/// Signatures already verified, by the hash of (public key, signed bytes, signature): the
/// same grant is checked on every exchange, and an Ed25519 verification costs far more than a
/// hash. Bounded: cleared when full.
static VERIFIED: std::sync::Mutex<Option<std::collections::HashSet<[u8; 32]>>> =
    std::sync::Mutex::new(None);
/// Most remembered verifications.
const VERIFIED_MAX: usize = 100_000;

fn verified_key(public: &[u8], msg: &[u8], sig: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [public, msg, sig] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

fn already_verified(public: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let k = verified_key(public, msg, sig);
    VERIFIED
        .lock()
        .map(|g| g.as_ref().is_some_and(|s| s.contains(&k)))
        .unwrap_or(false)
}

fn remember_verified(public: &[u8], msg: &[u8], sig: &[u8]) {
    let k = verified_key(public, msg, sig);
    if let Ok(mut g) = VERIFIED.lock() {
        let set = g.get_or_insert_with(std::collections::HashSet::new);
        if set.len() >= VERIFIED_MAX {
            set.clear();
        }
        set.insert(k);
    }
}

/// Verifies a grant's token with the issuer's announced key and checks that the grant's
/// terms are exactly the signed ones. Fails closed: an unknown key, a bad signature or any
/// difference is a refusal under rule `grant_forged`.
pub fn verify_grant(
    g: &Grant,
    keys: &[KeyAnnouncement],
) -> std::result::Result<GrantClaims, Denial> {
    let token = g.token.as_ref().ok_or_else(|| Denial {
        rule: "grant_forged",
        detail: format!("grant {}: it carries no signature", g.id),
        exhausted: false,
    })?;
    let claims = verify_token(token, &g.issuer, keys)?;
    if claims != claims_of(g) {
        return Err(Denial {
            rule: "grant_forged",
            detail: format!("grant {}: its terms differ from the signed ones", g.id),
            exhausted: false,
        });
    }
    Ok(claims)
}

/// Verifies a grant token on its own (as a forwarding hop does, which holds no copy of the
/// grant): the issuer's key must be known here and the signature must hold. `issuer`, when not
/// empty, must be the broker the claims name.
pub fn verify_token(
    token: &GrantToken,
    issuer: &str,
    keys: &[KeyAnnouncement],
) -> std::result::Result<GrantClaims, Denial> {
    let forged = |why: String| Denial {
        rule: "grant_forged",
        detail: why,
        exhausted: false,
    };
    let claims = GrantClaims::decode(token.claims.as_slice())
        .map_err(|_| forged("the grant's signed terms do not decode".into()))?;
    if !issuer.is_empty() && claims.issuer != issuer {
        return Err(forged(format!(
            "grant {} names issuer {}, not {issuer}",
            claims.grant_id, claims.issuer
        )));
    }
    let key = keys
        .iter()
        .find(|k| k.key_id == token.key_id && k.broker_id == claims.issuer)
        .ok_or_else(|| {
            forged(format!(
                "grant {}: key {} of issuer {} is unknown here",
                claims.grant_id, token.key_id, claims.issuer
            ))
        })?;
    if !already_verified(&key.public_key, &token.claims, &token.signature) {
        UnparsedPublicKey::new(&ED25519, &key.public_key)
            .verify(&token.claims, &token.signature)
            .map_err(|_| {
                forged(format!(
                    "grant {}: the signature does not verify",
                    claims.grant_id
                ))
            })?;
        remember_verified(&key.public_key, &token.claims, &token.signature);
    }
    Ok(claims)
}

/// The grant a verified token stands for, as a hop without a stored copy checks it.
pub fn grant_of_claims(c: &GrantClaims, token: &GrantToken) -> Grant {
    Grant {
        id: c.grant_id.clone(),
        dataset_id: c.dataset_id.clone(),
        consumer: c.consumer.clone(),
        provider: c.provider.clone(),
        fields: c.fields.clone(),
        valid_from: Some(crate::time::ts(c.valid_from_ms)),
        valid_until: Some(crate::time::ts(c.valid_until_ms)),
        daily_quota: c.daily_quota,
        issuer: c.issuer.clone(),
        state: govshare_proto::v1::GrantState::Active as i32,
        token: Some(token.clone()),
        ..Default::default()
    }
}

/// The bytes a revocation's signature covers.
pub fn revocation_bytes(grant_id: &str, issuer: &str, revoked_at_ms: i64) -> Vec<u8> {
    let mut b = b"govshare.v1 revocation\0".to_vec();
    for part in [grant_id.as_bytes(), issuer.as_bytes()] {
        b.extend_from_slice(&(part.len() as u64).to_be_bytes());
        b.extend_from_slice(part);
    }
    b.extend_from_slice(&revoked_at_ms.to_be_bytes());
    b
}

/// Checks a revocation's signature with its issuer's announced key: only the broker that
/// issued a grant can revoke it anywhere in the cascade.
pub fn verify_revocation(r: &GrantRevocation, keys: &[KeyAnnouncement]) -> bool {
    let Some(key) = keys
        .iter()
        .find(|k| k.key_id == r.key_id && k.broker_id == r.issuer)
    else {
        return false;
    };
    let msg = revocation_bytes(&r.grant_id, &r.issuer, crate::time::ms(&r.revoked_at));
    UnparsedPublicKey::new(&ED25519, &key.public_key)
        .verify(&msg, &r.signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ts;

    fn grant() -> Grant {
        Grant {
            id: "g1".into(),
            dataset_id: "330000/hrss/p".into(),
            consumer: "330100/civil".into(),
            provider: "330000/hrss".into(),
            fields: vec!["status".into()],
            valid_from: Some(ts(1)),
            valid_until: Some(ts(2)),
            issuer: "330000/hub".into(),
            ..Default::default()
        }
    }

    #[test]
    fn any_change_to_a_signed_grant_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(BrokerError::internal)?;
        let key = SigningKey::load_or_create(dir.path(), "330000/hub")?;
        let again = SigningKey::load_or_create(dir.path(), "330000/hub")?;
        assert_eq!(key.key_id(), again.key_id(), "the key persists");
        let keys = vec![key.announcement()];
        let mut g = grant();
        g.token = Some(key.token_for(&g));
        assert!(verify_grant(&g, &keys).is_ok());
        // Widen the fields, extend the validity, swap the consumer: each is caught.
        let mut wider = g.clone();
        wider.fields.push("id_number".into());
        let mut longer = g.clone();
        longer.valid_until = Some(ts(999_999));
        let mut other = g.clone();
        other.consumer = "330200/other".into();
        for bad in [wider, longer, other] {
            assert_eq!(
                verify_grant(&bad, &keys).err().map(|d| d.rule),
                Some("grant_forged")
            );
        }
        // Flip any single byte of the signed bytes or the signature.
        let token = g.token.clone().unwrap_or_default();
        for i in 0..token.claims.len() {
            let mut t = token.clone();
            t.claims[i] ^= 1;
            let mut m = g.clone();
            m.token = Some(t);
            assert!(verify_grant(&m, &keys).is_err(), "claims byte {i}");
        }
        for i in 0..token.signature.len() {
            let mut t = token.clone();
            t.signature[i] ^= 0x80;
            let mut m = g.clone();
            m.token = Some(t);
            assert!(verify_grant(&m, &keys).is_err(), "signature byte {i}");
        }
        // Unsigned, or signed by a key nobody announced.
        let mut unsigned = g.clone();
        unsigned.token = None;
        assert!(verify_grant(&unsigned, &keys).is_err());
        let other_dir = tempfile::tempdir().map_err(BrokerError::internal)?;
        let stranger = SigningKey::load_or_create(other_dir.path(), "330000/hub")?;
        let mut forged = g.clone();
        forged.token = Some(stranger.token_for(&g));
        assert!(verify_grant(&forged, &keys).is_err());
        Ok(())
    }

    // The broker signs with AWS-LC, the key kept in ring's PKCS#8 file: its signatures
    // are ring's, byte for byte (Ed25519 is deterministic), and verify.
    #[test]
    fn signatures_are_those_of_the_key_file_and_a_damaged_file_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(BrokerError::internal)?;
        let key = SigningKey::load_or_create(dir.path(), "330000/hub")?;
        let pkcs8 = std::fs::read(dir.path().join(KEY_FILE)).map_err(BrokerError::internal)?;
        let ring_pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| BrokerError::internal("ring refuses the key file"))?;
        assert_eq!(
            key.announcement().public_key,
            ring_pair.public_key().as_ref()
        );
        for msg in [&b""[..], b"govshare", &[0xa5; 1000]] {
            let sig = key.sign(msg);
            assert_eq!(sig, ring_pair.sign(msg).as_ref(), "{msg:?}");
            assert!(
                UnparsedPublicKey::new(&ED25519, ring_pair.public_key().as_ref())
                    .verify(msg, &sig)
                    .is_ok()
            );
        }
        // A flipped seed byte no longer matches the public key in the file; a cut file, or
        // text, is no document at all. Each is refused, naming the file.
        let seed_at = pkcs8.len() - 32 - 5 - 32;
        let mut flipped = pkcs8.clone();
        flipped[seed_at] ^= 1;
        for bad in [flipped, pkcs8[..40].to_vec(), b"not a key".to_vec()] {
            let d = tempfile::tempdir().map_err(BrokerError::internal)?;
            let path = d.path().join(KEY_FILE);
            std::fs::create_dir_all(d.path().join("keys")).map_err(BrokerError::internal)?;
            std::fs::write(&path, &bad).map_err(BrokerError::internal)?;
            let err = SigningKey::load_or_create(d.path(), "330000/hub")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("is not an Ed25519 PKCS#8 key"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn the_seed_is_found_only_in_an_ed25519_private_key() {
        let mut doc = vec![0x30, 0x2e, 0x02, 0x01, 0x00];
        doc.extend([
            0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
        ]);
        doc.extend([7u8; 32]);
        assert_eq!(pkcs8_seed(&doc), Some([7u8; 32]));
        assert_eq!(pkcs8_seed(&doc[..doc.len() - 1]), None, "seed cut short");
        let mut other_alg = doc.clone();
        other_alg[11] = 0x71;
        assert_eq!(pkcs8_seed(&other_alg), None, "Ed448, not Ed25519");
        let mut not_octets = doc.clone();
        not_octets[12] = 0x05;
        assert_eq!(pkcs8_seed(&not_octets), None);
    }
}
