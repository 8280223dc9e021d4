//! Catalog entry files: a dataset described in JSON or TOML, keyed by the proto's field names.
//!
//! Enums are given by name, short (`CONDITIONAL`) or full (`SHARE_TYPE_CONDITIONAL`), in any case.
//! The keys the broker sets (`id`, `provider`, `version`, `state`, `published_at`, `updated_at`,
//! `home_broker`) are accepted and ignored, so that `catalog show --json` output can be edited and
//! published again; any other unknown key is an error naming it.

use std::path::{Path, PathBuf};

use govshare_proto::v1::{Dataset, InfoItem, OpenType, ShareType, UpdateCycle};
use serde::de::{Deserializer, IgnoredAny};
use serde::Deserialize;

use crate::enums::ProtoEnum;

/// The syntax of a catalog file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON, for `*.json`.
    Json,
    /// TOML, for `*.toml`.
    Toml,
}

impl Format {
    /// The format for a path's extension (`.json` or `.toml`, any case).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }
}

/// Why a catalog file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct CatalogFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the line and key where the parser knows them.
    pub reason: String,
}

/// A dataset read from a file, and notes for the user (ignored keys and the like).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedDataset {
    /// The dataset to publish; id, provider, version, state and times are left for the broker.
    pub dataset: Dataset,
    /// Non-fatal remarks, e.g. that a `provider` key was ignored.
    pub notes: Vec<String>,
}

/// Reads and parses a catalog file, choosing JSON or TOML by its extension.
pub fn load(path: &Path) -> Result<ParsedDataset, CatalogFileError> {
    let err = |reason: String| CatalogFileError {
        path: path.to_path_buf(),
        reason,
    };
    let format = Format::from_path(path)
        .ok_or_else(|| err("unknown file type; name it *.json or *.toml".to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    parse_str(&text, format).map_err(err)
}

/// Parses catalog file text; the error says what is wrong and where.
pub fn parse_str(text: &str, format: Format) -> Result<ParsedDataset, String> {
    let file: DatasetFile = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string())?,
        Format::Toml => toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?,
    };
    file.into_dataset()
}

/// The file's shape: the proto's `Dataset` field names, enums as names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetFile {
    code: String,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(deserialize_with = "de_enum")]
    share_type: ShareType,
    #[serde(default)]
    share_condition: String,
    #[serde(default, deserialize_with = "de_opt_enum")]
    open_type: Option<OpenType>,
    #[serde(default, deserialize_with = "de_opt_enum")]
    update_cycle: Option<UpdateCycle>,
    #[serde(default)]
    tags: Vec<String>,
    items: Vec<ItemFile>,
    // Set by the broker: accepted so that `catalog show --json` output round-trips, then ignored.
    id: Option<String>,
    provider: Option<String>,
    #[allow(dead_code)]
    version: Option<IgnoredAny>,
    #[allow(dead_code)]
    state: Option<IgnoredAny>,
    #[allow(dead_code)]
    published_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    updated_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    home_broker: Option<IgnoredAny>,
}

/// One information item: the proto's `InfoItem` field names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemFile {
    name: String,
    #[serde(default, rename = "type")]
    ty: String,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "de_opt_enum")]
    share_type: Option<ShareType>,
    #[serde(default)]
    sensitive: bool,
    #[serde(default)]
    mask: String,
}

impl DatasetFile {
    fn into_dataset(self) -> Result<ParsedDataset, String> {
        if self.items.is_empty() {
            return Err("items: at least one information item is required".to_string());
        }
        let mut notes = Vec::new();
        if let Some(p) = self.provider.filter(|p| !p.is_empty()) {
            notes.push(format!(
                "key `provider` ({p}) ignored: the provider is always the publishing node"
            ));
        }
        if let Some(id) = self.id.filter(|id| !id.is_empty()) {
            notes.push(format!(
                "key `id` ({id}) ignored: the broker derives it from the provider and `code`"
            ));
        }
        let items = self
            .items
            .into_iter()
            .map(|i| InfoItem {
                name: i.name,
                r#type: i.ty,
                description: i.description,
                share_type: i.share_type.map_or(0, |s| s as i32),
                sensitive: i.sensitive,
                mask: i.mask,
            })
            .collect();
        let dataset = Dataset {
            code: self.code,
            name: self.name,
            description: self.description,
            share_type: self.share_type as i32,
            share_condition: self.share_condition,
            open_type: self.open_type.map_or(0, |v| v as i32),
            update_cycle: self.update_cycle.map_or(0, |v| v as i32),
            tags: self.tags,
            items,
            ..Dataset::default()
        };
        Ok(ParsedDataset { dataset, notes })
    }
}

fn de_enum<'de, D: Deserializer<'de>, E: ProtoEnum>(d: D) -> Result<E, D::Error> {
    let text = String::deserialize(d)?;
    E::parse_name(&text).map_err(serde::de::Error::custom)
}

fn de_opt_enum<'de, D: Deserializer<'de>, E: ProtoEnum>(d: D) -> Result<Option<E>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) => E::parse_name(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"code": "pension-status", "name": "城乡居民养老保险待遇发放",
        "description": "monthly pension payment status",
        "share_type": "CONDITIONAL", "open_type": "not_open", "update_cycle": "UPDATE_CYCLE_DAILY",
        "tags": ["social-security"], "provider": "110000/someone-else", "id": "x/y/z",
        "items": [{"name": "id_number", "type": "string", "description": "resident id number", "sensitive": true, "mask": "keep:6,4"},
                  {"name": "status", "type": "string", "description": "payment status", "share_type": "share_type_unconditional"}]}"#;

    #[test]
    fn json_with_short_and_full_enum_names() {
        let parsed = parse_str(JSON, Format::Json).unwrap();
        let d = &parsed.dataset;
        assert_eq!(d.code, "pension-status");
        assert_eq!(d.name, "城乡居民养老保险待遇发放");
        assert_eq!(d.share_type, ShareType::Conditional as i32);
        assert_eq!(d.open_type, OpenType::NotOpen as i32);
        assert_eq!(d.update_cycle, UpdateCycle::Daily as i32);
        assert_eq!(d.tags, vec!["social-security"]);
        assert_eq!(d.items.len(), 2);
        assert!(d.items[0].sensitive);
        assert_eq!(d.items[0].mask, "keep:6,4");
        assert_eq!(d.items[0].r#type, "string");
        assert_eq!(d.items[0].share_type, 0);
        assert_eq!(d.items[1].share_type, ShareType::Unconditional as i32);
        // The broker decides these, whatever the file says.
        assert_eq!(d.provider, "");
        assert_eq!(d.id, "");
        assert_eq!(parsed.notes.len(), 2);
        assert!(parsed.notes[0].contains("provider"));
    }

    #[test]
    fn toml_file() {
        let text = r#"
code = "death-registration"
name = "死亡登记信息"
share_type = "share_type_unconditional"
update_cycle = "Daily"
tags = ["civil-affairs"]

[[items]]
name = "id_number"
type = "string"
sensitive = true
mask = "id_number"

[[items]]
name = "death_date"
type = "date"
"#;
        let parsed = parse_str(text, Format::Toml).unwrap();
        let d = parsed.dataset;
        assert_eq!(d.code, "death-registration");
        assert_eq!(d.share_type, ShareType::Unconditional as i32);
        assert_eq!(d.update_cycle, UpdateCycle::Daily as i32);
        assert_eq!(d.open_type, 0);
        assert_eq!(d.items[1].name, "death_date");
        assert!(parsed.notes.is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse_str(
            r#"{"code": "a", "name": "b", "share_type": "CONDITIONAL", "colour": "red", "items": [{"name": "x"}]}"#,
            Format::Json,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");

        let err = parse_str(
            "code = \"a\"\nname = \"b\"\nshare_type = \"CONDITIONAL\"\n[[items]]\nname = \"x\"\nsensitve = true\n",
            Format::Toml,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `sensitve`"), "{err}");
    }

    #[test]
    fn bad_enum_and_missing_items() {
        let err = parse_str(
            r#"{"code": "a", "name": "b", "share_type": "SOMETIMES", "items": [{"name": "x"}]}"#,
            Format::Json,
        )
        .unwrap_err();
        assert!(err.contains("unknown share type \"SOMETIMES\""), "{err}");
        assert!(
            err.contains("UNCONDITIONAL, CONDITIONAL, NOT_SHARED"),
            "{err}"
        );

        let err = parse_str(
            r#"{"code": "a", "name": "b", "share_type": "CONDITIONAL", "items": []}"#,
            Format::Json,
        )
        .unwrap_err();
        assert!(err.contains("at least one"), "{err}");

        let err =
            parse_str(r#"{"code": "a", "name": "b", "items": []}"#, Format::Json).unwrap_err();
        assert!(err.contains("missing field `share_type`"), "{err}");
    }

    #[test]
    fn format_by_extension() {
        assert_eq!(Format::from_path(Path::new("a/b.JSON")), Some(Format::Json));
        assert_eq!(Format::from_path(Path::new("b.toml")), Some(Format::Toml));
        assert_eq!(Format::from_path(Path::new("b.yaml")), None);
        assert_eq!(Format::from_path(Path::new("b")), None);
    }

    #[test]
    fn example_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let p = load(&dir.join("pension-status.json")).unwrap();
        assert_eq!(p.dataset.code, "pension-status");
        let names: Vec<&str> = p.dataset.items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["id_number", "name", "status", "month"]);
        let d = load(&dir.join("death-registration.toml")).unwrap();
        assert_eq!(d.dataset.code, "death-registration");
        assert_eq!(d.dataset.share_type, ShareType::Unconditional as i32);
        assert_eq!(d.dataset.items.len(), 4);
    }
}
