//! Masking rules for information items: `keep:N,M`, `redact`, `hash`, and named presets.

use crate::error::BrokerError;
use sha2::{Digest, Sha256};

/// A parsed masking rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    /// No masking.
    None,
    /// Keep the first `head` and last `tail` characters, replace the rest by `*`.
    Keep {
        /// Characters kept at the start.
        head: usize,
        /// Characters kept at the end.
        tail: usize,
    },
    /// Replace the whole value by `***`.
    Redact,
    /// Replace the value by a salted SHA-256 (hex), so equal values still join without being readable.
    Hash,
}

/// Presets named in the catalog, with the rule each stands for.
const PRESETS: &[(&str, MaskRule)] = &[
    // 330102********1234: region and last four, the usual display of a resident id.
    ("id_number", MaskRule::Keep { head: 6, tail: 4 }),
    // 138****5678.
    ("mobile", MaskRule::Keep { head: 3, tail: 4 }),
    // 张**: the family name only.
    ("name", MaskRule::Keep { head: 1, tail: 0 }),
    // 622202******1234.
    ("bank_card", MaskRule::Keep { head: 6, tail: 4 }),
    // 浙江省杭州市****: down to the city.
    ("address", MaskRule::Keep { head: 6, tail: 0 }),
];

impl MaskRule {
    /// Parses a rule as written in a catalog item's `mask`.
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::None);
        }
        if s == "redact" {
            return Ok(Self::Redact);
        }
        if s == "hash" {
            return Ok(Self::Hash);
        }
        if let Some((_, rule)) = PRESETS.iter().find(|(name, _)| *name == s) {
            return Ok(*rule);
        }
        if let Some(rest) = s.strip_prefix("keep:") {
            let parsed = rest
                .split_once(',')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
            if let Some((head, tail)) = parsed {
                if head <= 64 && tail <= 64 {
                    return Ok(Self::Keep { head, tail });
                }
            }
        }
        Err(BrokerError::invalid(format!(
            "mask {s:?} is not a masking rule; use keep:N,M, redact, hash, or one of id_number, mobile, name, bank_card, address"
        )))
    }

    /// Applies the rule to a text value; `salt` is the dataset's secret for `hash`.
    pub fn apply(&self, value: &str, salt: &[u8]) -> String {
        match *self {
            Self::None => value.to_string(),
            Self::Redact => "***".to_string(),
            Self::Hash => {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(value.as_bytes());
                hex::encode(h.finalize())
            }
            Self::Keep { head, tail } => {
                let chars: Vec<char> = value.chars().collect();
                let n = chars.len();
                if head + tail >= n {
                    // Too short to keep anything safely: hide all but the head's share.
                    let keep = head.min(n.saturating_sub(1));
                    return chars[..keep]
                        .iter()
                        .copied()
                        .chain(std::iter::repeat_n('*', n - keep))
                        .collect();
                }
                chars[..head]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n('*', n - head - tail))
                    .chain(chars[n - tail..].iter().copied())
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_keep() -> Result<(), BrokerError> {
        assert_eq!(
            MaskRule::parse("id_number")?.apply("330102199001011234", b""),
            "330102********1234"
        );
        assert_eq!(
            MaskRule::parse("mobile")?.apply("13812345678", b""),
            "138****5678"
        );
        assert_eq!(MaskRule::parse("name")?.apply("张三丰", b""), "张**");
        assert_eq!(MaskRule::parse("keep:1,1")?.apply("abcd", b""), "a**d");
        assert_eq!(MaskRule::parse("keep:6,4")?.apply("short", b""), "shor*");
        assert_eq!(MaskRule::parse("redact")?.apply("x", b""), "***");
        assert_eq!(MaskRule::parse("")?, MaskRule::None);
        Ok(())
    }

    #[test]
    fn hash_is_salted() -> Result<(), BrokerError> {
        let r = MaskRule::parse("hash")?;
        assert_ne!(r.apply("a", b"s1"), r.apply("a", b"s2"));
        assert_eq!(r.apply("a", b"s1"), r.apply("a", b"s1"));
        Ok(())
    }

    #[test]
    fn bad_rules() {
        for bad in ["keep:", "keep:1", "keep:a,b", "mask", "keep:100,1"] {
            assert!(MaskRule::parse(bad).is_err(), "{bad}");
        }
    }
}
