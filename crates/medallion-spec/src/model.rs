//! The DataProduct document as users write it (YAML, Kubernetes-shaped).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::ColumnType;

// The JSON Schema derives (feature `schema`) exist for the catalog, which
// publishes the spec as a Kubernetes CRD; pipeline services build without them.

pub const API_VERSION: &str = "medallion.dev/v1alpha1";
pub const KIND: &str = "DataProduct";

/// One data product: the only declarative input of the platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataProduct {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: ProductSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSpec {
    pub domain: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub source: Source,
    pub schema: Vec<Column>,
    #[serde(default)]
    pub key: Vec<String>,
    #[serde(default)]
    pub expectations: Vec<Expectation>,
    #[serde(default)]
    pub derive: Vec<Derive>,
    #[serde(default)]
    pub gold: Vec<GoldTable>,
    #[serde(default)]
    pub access: Vec<Access>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    /// How long old versions and raw data are kept (platform defaults when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// How long a key is remembered for de-duplication (default: for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<Dedupe>,
    /// Units of work the product is spread over in every stage, 1 to 32
    /// (default 1); may change at any time.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[cfg_attr(
        feature = "schema",
        schemars(range(min = 1, max = 32), extend("format" = "int32"))
    )]
    pub partitions: u32,
}

/// The most partitions a product may have: ingest spreads keyed subjects over
/// this many slots, and each partition takes a share of them.
pub const MAX_PARTITIONS: u32 = 32;

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub format: SourceFormat,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// One JSON object per message.
    #[default]
    Json,
    /// Newline-delimited JSON objects, many per message.
    Ndjson,
    /// Header-less CSV lines, columns in schema order, many per message.
    Csv,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: ColumnType,
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii: Option<PiiMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<Standardize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiiMode {
    /// Keyed HMAC-SHA256 token: joinable across tables, not reversible without the key.
    Hash,
    /// The value is replaced by NULL.
    Redact,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standardize {
    /// Leading and trailing whitespace removed.
    Trim,
    /// Upper case.
    Upper,
    /// Lower case.
    Lower,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub name: String,
    pub rule: String,
    #[serde(default)]
    pub action: ExpectationAction,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExpectationAction {
    /// Keep the row and count the failure.
    #[default]
    Warn,
    /// Drop the row and count it.
    Drop,
    /// Move the row to the quarantine table with the failed rules.
    Quarantine,
    /// Stop the product's pipeline; nothing past the failing batch is written.
    Fail,
}

impl fmt::Display for ExpectationAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExpectationAction::Warn => "warn",
            ExpectationAction::Drop => "drop",
            ExpectationAction::Quarantine => "quarantine",
            ExpectationAction::Fail => "fail",
        })
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derive {
    pub name: String,
    pub expr: String,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldTable {
    pub name: String,
    pub sql: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    pub role: String,
    pub layers: Vec<Layer>,
    #[serde(default)]
    pub mask: Vec<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Bronze, Layer::Silver, Layer::Gold];

    pub fn as_str(&self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
        }
    }

    pub fn parse(s: &str) -> Option<Layer> {
        match s {
            "bronze" => Some(Layer::Bronze),
            "silver" => Some(Layer::Silver),
            "gold" => Some(Layer::Gold),
            _ => None,
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sla {
    /// How old the newest Silver commit may be before the product is stale, e.g. `60s`, `5m`, `1h`.
    pub freshness: String,
}

/// How long a product's history is kept.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Old versions of every layer stay readable (time travel) at least this
    /// long, e.g. `7d`; files no version within it needs are then deleted.
    /// Default: the platform's `MEDALLION_TIME_TRAVEL` (7d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_travel: Option<String>,
    /// Bronze rows older than this (by `received_at`) are deleted, e.g.
    /// `90d`. Default: raw data is kept for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bronze: Option<String>,
}

/// De-duplication on the key within a horizon.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedupe {
    /// A row is dropped as a duplicate only if its key was committed to
    /// Silver less than this long before (at least; up to a quarter more),
    /// e.g. `7d`. Bounds the transform's memory by the keys of that span.
    pub within: String,
}

impl DataProduct {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn domain(&self) -> &str {
        &self.spec.domain
    }

    /// `<domain>.<product>`, the form used on the command line and in KV keys.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.spec.domain, self.metadata.name)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.spec.schema.iter().find(|c| c.name == name)
    }
}
