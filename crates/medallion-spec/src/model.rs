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
    /// The source is a database change feed: Silver holds each key's
    /// current row (SCD1) or its history (SCD2) instead of appended rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc: Option<Cdc>,
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

/// A change feed (`spec.cdc`): each record is an insert, update or delete of
/// the row keyed by `spec.key`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cdc {
    pub format: CdcFormat,
    /// Orders the changes of a key, highest wins: an envelope field path for
    /// `debezium` (`source.lsn`, or a list such as `[source.file,
    /// source.pos, source.row]`), a declared column for `generic`.
    pub sequence_by: SequenceBy,
    #[serde(default)]
    pub stored_as: CdcStorage,
    /// `generic` only: the field holding the operation (`c`/`insert`,
    /// `u`/`update`, `d`/`delete`, `r`/`snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// How long a deleted key is remembered, so an older change arriving
    /// later does not bring it back, e.g. `7d` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_deletes_for: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CdcFormat {
    /// Debezium's change event envelope (`before`, `after`, `op`, `source`,
    /// `ts_ms`), with or without the `schema`/`payload` wrapper.
    Debezium,
    /// A flat record with an operation column and a sequence column.
    Generic,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CdcStorage {
    /// The latest row per key; deletes remove it.
    #[default]
    Scd1,
    /// Every version of a row, with `__start_at` / `__end_at`.
    Scd2,
}

impl CdcStorage {
    pub fn as_str(&self) -> &'static str {
        match self {
            CdcStorage::Scd1 => "scd1",
            CdcStorage::Scd2 => "scd2",
        }
    }
}

/// One field path, or several compared in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SequenceBy {
    One(String),
    Many(Vec<String>),
}

/// A string or a list of strings. Kubernetes takes no `anyOf` of two types
/// in a CRD (a structural schema has one type per field), so the API server
/// keeps the value as given and the spec validation checks it.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for SequenceBy {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SequenceBy".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An envelope field path (`source.lsn`) or a list of them compared in order (`[source.file, source.pos, source.row]`); a declared column for format: generic",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

impl SequenceBy {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            SequenceBy::One(p) => vec![p.as_str()],
            SequenceBy::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
    }
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
