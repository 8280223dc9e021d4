//! Short and full names of the API's enums: `CONDITIONAL` for `SHARE_TYPE_CONDITIONAL`, and back.

use govshare_proto::v1::{
    DatasetState, DemandState, DemandView, ExchangeState, GrantState, GrantView, NodeRole,
    NodeState, OpenType, ShareType, UpdateCycle,
};

/// A generated protobuf enum whose value names share a prefix (`SHARE_TYPE_`).
pub trait ProtoEnum: Sized + Copy + 'static {
    /// The common prefix of the full names, e.g. `SHARE_TYPE_`.
    const PREFIX: &'static str;
    /// What the enum is, for messages ("share type").
    const WHAT: &'static str;
    /// Every value but `*_UNSPECIFIED`.
    const VALUES: &'static [Self];

    /// The full protobuf name, e.g. `SHARE_TYPE_CONDITIONAL`.
    fn full_name(self) -> &'static str;

    /// The enum's value from its wire number, if known.
    fn from_number(n: i32) -> Option<Self>;

    /// The name without the prefix, e.g. `CONDITIONAL`.
    fn short_name(self) -> &'static str {
        let full = self.full_name();
        full.strip_prefix(Self::PREFIX).unwrap_or(full)
    }

    /// Parses a short or full name, case-insensitively, `-` or space standing for `_`;
    /// `UNSPECIFIED` is refused. The error lists the accepted names.
    fn parse_name(text: &str) -> Result<Self, String> {
        let norm: String = text
            .trim()
            .chars()
            .map(|c| match c {
                '-' | ' ' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        let short = norm.strip_prefix(Self::PREFIX).unwrap_or(&norm);
        Self::VALUES
            .iter()
            .copied()
            .find(|v| v.short_name() == short)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::VALUES.iter().map(|v| v.short_name()).collect();
                format!(
                    "unknown {} {text:?}; expected one of {}",
                    Self::WHAT,
                    names.join(", ")
                )
            })
    }
}

macro_rules! proto_enum {
    ($ty:ty, $prefix:literal, $what:literal, [$($v:ident),+ $(,)?]) => {
        impl ProtoEnum for $ty {
            const PREFIX: &'static str = $prefix;
            const WHAT: &'static str = $what;
            const VALUES: &'static [Self] = &[$(<$ty>::$v),+];

            fn full_name(self) -> &'static str {
                self.as_str_name()
            }

            fn from_number(n: i32) -> Option<Self> {
                <$ty>::try_from(n).ok()
            }
        }
    };
}

proto_enum!(
    NodeRole,
    "NODE_ROLE_",
    "node role",
    [Department, Broker, Admin]
);
proto_enum!(NodeState, "NODE_STATE_", "node state", [Active, Suspended]);
proto_enum!(
    ShareType,
    "SHARE_TYPE_",
    "share type",
    [Unconditional, Conditional, NotShared]
);
proto_enum!(
    OpenType,
    "OPEN_TYPE_",
    "open type",
    [NotOpen, Conditional, Open]
);
proto_enum!(
    UpdateCycle,
    "UPDATE_CYCLE_",
    "update cycle",
    [RealTime, Daily, Weekly, Monthly, Quarterly, Yearly, Irregular]
);
proto_enum!(
    DatasetState,
    "DATASET_STATE_",
    "dataset state",
    [Published, Withdrawn]
);
proto_enum!(
    DemandState,
    "DEMAND_STATE_",
    "demand state",
    [Pending, Approved, Rejected, Withdrawn]
);
proto_enum!(
    DemandView,
    "DEMAND_VIEW_",
    "demand view",
    [Outgoing, Incoming, All]
);
proto_enum!(
    GrantState,
    "GRANT_STATE_",
    "grant state",
    [Active, Revoked, Expired]
);
proto_enum!(GrantView, "GRANT_VIEW_", "grant view", [Held, Issued, All]);
proto_enum!(
    ExchangeState,
    "EXCHANGE_STATE_",
    "exchange state",
    [
        Queued,
        InFlight,
        Answered,
        Failed,
        Denied,
        Expired,
        DeadLettered
    ]
);

/// The short name of an enum field's wire value: `""` for unspecified (0), the number for an unknown one.
pub fn short_name<E: ProtoEnum>(n: i32) -> String {
    match E::from_number(n) {
        _ if n == 0 => String::new(),
        Some(v) => v.short_name().to_string(),
        None => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_full_names_parse_case_insensitively() {
        assert_eq!(
            ShareType::parse_name("conditional"),
            Ok(ShareType::Conditional)
        );
        assert_eq!(
            ShareType::parse_name("SHARE_TYPE_NOT_SHARED"),
            Ok(ShareType::NotShared)
        );
        assert_eq!(
            ShareType::parse_name("share_type_unconditional"),
            Ok(ShareType::Unconditional)
        );
        assert_eq!(OpenType::parse_name("not-open"), Ok(OpenType::NotOpen));
        assert_eq!(
            UpdateCycle::parse_name("Real_Time"),
            Ok(UpdateCycle::RealTime)
        );
        let err = ShareType::parse_name("UNSPECIFIED").unwrap_err();
        assert!(
            err.contains("UNCONDITIONAL, CONDITIONAL, NOT_SHARED"),
            "{err}"
        );
        assert!(ShareType::parse_name("OPEN_TYPE_OPEN").is_err());
    }

    #[test]
    fn short_names_of_numbers() {
        assert_eq!(short_name::<DemandState>(1), "PENDING");
        assert_eq!(short_name::<DemandState>(0), "");
        assert_eq!(short_name::<DemandState>(99), "99");
        assert_eq!(ExchangeState::DeadLettered.short_name(), "DEAD_LETTERED");
    }
}
