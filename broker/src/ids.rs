//! Identifiers and their validation: node ids, dataset ids and codes, item names, credit codes.

use crate::error::BrokerError;

/// Longest node NAME part, as DESIGN.md fixes it (`[a-z0-9-]{1,63}`).
const MAX_NODE_NAME: usize = 63;

/// A validated node id, `REGION/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    /// Parses and validates `REGION/NAME`; `what` names the field in the error.
    pub fn parse(s: &str, what: &str) -> Result<Self, BrokerError> {
        let bad = |why: &str| {
            BrokerError::invalid(format!(
                "{what} {s:?} is not a node id: {why} (expected REGION/NAME, e.g. 330000/hrss)"
            ))
        };
        let (region, name) = s.split_once('/').ok_or_else(|| bad("no '/'"))?;
        if !is_region(region) {
            return Err(bad("REGION must be a 6-digit administrative division code"));
        }
        if name.is_empty()
            || name.len() > MAX_NODE_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("NAME must be 1 to 63 of a-z, 0-9 and '-'"));
        }
        Ok(Self(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 6-digit region code.
    pub fn region(&self) -> &str {
        &self.0[..6]
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// True for a 6-digit GB/T 2260 style code.
pub fn is_region(s: &str) -> bool {
    s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Validates a region prefix used in filters: 1 to 6 digits, or empty.
pub fn check_region_prefix(s: &str) -> Result<(), BrokerError> {
    if s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(BrokerError::invalid(format!(
            "region prefix {s:?} must be up to 6 digits, e.g. 33 or 3301"
        )))
    }
}

/// Validates a dataset code, `[a-z0-9][a-z0-9-]{0,63}`.
pub fn check_dataset_code(code: &str) -> Result<(), BrokerError> {
    let ok = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !code.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(format!(
            "dataset code {code:?} must be 1 to 64 of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// A validated dataset id, `REGION/NAME/CODE`: the provider node id plus the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetId {
    /// The provider node.
    pub provider: NodeId,
    /// The provider's code for the dataset.
    pub code: String,
}

impl DatasetId {
    /// Parses `PROVIDER_NODE/CODE`.
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        let shape = || {
            BrokerError::invalid(format!(
                "dataset id {s:?} must be PROVIDER_NODE/CODE, e.g. 330000/hrss/pension-status"
            ))
        };
        if s.matches('/').count() != 2 {
            return Err(shape());
        }
        let (provider, code) = s.rsplit_once('/').ok_or_else(shape)?;
        let provider = NodeId::parse(provider, "dataset id's provider")?;
        check_dataset_code(code)?;
        Ok(Self {
            provider,
            code: code.to_string(),
        })
    }

    /// The id as text.
    pub fn to_id(&self) -> String {
        format!("{}/{}", self.provider, self.code)
    }
}

/// Validates an information item name, `[a-z][a-z0-9_]{0,63}`.
pub fn check_item_name(name: &str) -> Result<(), BrokerError> {
    let mut bytes = name.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_lowercase())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(format!(
            "item name {name:?} must be 1 to 64 of a-z, 0-9 and '_', starting with a letter"
        )))
    }
}

/// Checks that a text field is present (if required) and not longer than `max` characters.
pub fn check_text(what: &str, s: &str, required: bool, max: usize) -> Result<(), BrokerError> {
    if required && s.trim().is_empty() {
        return Err(BrokerError::invalid(format!("{what} is required")));
    }
    let n = s.chars().count();
    if n > max {
        return Err(BrokerError::invalid(format!(
            "{what} is {n} characters long; at most {max} are allowed"
        )));
    }
    Ok(())
}

/// Checks an opaque id given by a caller (demand, grant, exchange ids): non-empty, short, printable.
pub fn check_opaque_id(what: &str, s: &str) -> Result<(), BrokerError> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BrokerError::invalid(format!(
            "{what} {s:?} is not a valid id (1 to 128 printable ASCII characters)"
        )));
    }
    Ok(())
}

/// The 31 characters of GB 32100, in value order (no I, O, Z, S, V).
const CREDIT_CHARSET: &str = "0123456789ABCDEFGHJKLMNPQRTUWXY";
/// GB 32100 weights for the first 17 characters.
const CREDIT_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// What a unified social credit code check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditCodeCheck {
    /// Well-formed and the check digit verifies.
    Valid,
    /// Well-formed but the check digit does not verify (kept, with a warning).
    BadCheckDigit,
}

/// Checks an 18-character unified social credit code (GB 32100).
///
/// A wrong length or character is an error (the code cannot be one at all); a wrong check
/// digit is only reported, because registries do hold codes with typos that admins must keep.
pub fn check_credit_code(code: &str) -> Result<CreditCodeCheck, BrokerError> {
    let values: Option<Vec<u32>> = code
        .chars()
        .map(|c| CREDIT_CHARSET.find(c).map(|i| i as u32))
        .collect();
    let values = match values {
        Some(v) if v.len() == 18 => v,
        _ => {
            return Err(BrokerError::invalid(format!(
                "credit code {code:?} must be 18 characters of 0-9 and A-Y without I, O, Z, S, V (GB 32100)"
            )))
        }
    };
    let sum: u32 = values
        .iter()
        .zip(CREDIT_WEIGHTS.iter())
        .map(|(v, w)| v * w)
        .sum();
    let check = (31 - sum % 31) % 31;
    if values[17] == check {
        Ok(CreditCodeCheck::Valid)
    } else {
        Ok(CreditCodeCheck::BadCheckDigit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(NodeId::parse("330000/hrss", "id").is_ok());
        assert_eq!(
            NodeId::parse("000000/hub", "id").map(|n| n.region().to_string()),
            Ok("000000".to_string())
        );
        for bad in [
            "",
            "330000",
            "33000/hrss",
            "330000/",
            "330000/HRSS",
            "330000/a b",
            "abcdef/x",
            "330000/hrss/x",
        ] {
            assert!(NodeId::parse(bad, "id").is_err(), "{bad}");
        }
        let long = format!("330000/{}", "a".repeat(64));
        assert!(NodeId::parse(&long, "id").is_err());
    }

    #[test]
    fn dataset_ids() {
        let d = DatasetId::parse("330000/hrss/pension-status");
        assert_eq!(
            d.map(|d| d.to_id()),
            Ok("330000/hrss/pension-status".into())
        );
        assert!(DatasetId::parse("330000/hrss").is_err());
        assert!(DatasetId::parse("330000/hrss/Bad").is_err());
    }

    #[test]
    fn credit_codes() {
        assert_eq!(
            check_credit_code("91350100M000100Y43"),
            Ok(CreditCodeCheck::Valid)
        );
        assert_eq!(
            check_credit_code("91350100M000100Y44"),
            Ok(CreditCodeCheck::BadCheckDigit)
        );
        assert!(check_credit_code("91350100M000100Y4").is_err());
        assert!(check_credit_code("91350100M000100YI3").is_err());
    }

    #[test]
    fn item_names() {
        assert!(check_item_name("id_number").is_ok());
        assert!(check_item_name("1abc").is_err());
        assert!(check_item_name("").is_err());
        assert!(check_item_name("Name").is_err());
    }
}
