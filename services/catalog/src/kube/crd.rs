//! The `DataProduct` custom resource (`medallion.dev/v1alpha1`): the same
//! spec as a file in `MEDALLION_PRODUCTS`, applied with `kubectl`. The CRD
//! shipped in `charts/medallion/crds/dataproduct.yaml` is generated from
//! these types (`tests/crd.rs` fails when the two differ).

use kube::CustomResource;
use kube::core::CustomResourceExt;
use medallion_spec::ProductSpec;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The spec of a DataProduct resource: its schema is the JSON Schema of
/// [`ProductSpec`], the type files are read into, so the file and the
/// resource cannot drift apart. The value is kept as JSON, not parsed into
/// `ProductSpec`: a resource the API server accepted but our validation
/// refuses (an unknown column type, `decimal(39,2)`) must still reach the
/// reconciler, which reports it in the status — a typed field would make the
/// watch itself fail on that one resource, for every resource.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "medallion.dev",
    version = "v1alpha1",
    kind = "DataProduct",
    root = "DataProductResource",
    plural = "dataproducts",
    shortname = "dp",
    category = "medallion",
    namespaced,
    status = "DataProductStatus",
    doc = "A Medallion data product: its Silver contract, Gold aggregates, grants and SLA",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revision"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct DataProductSpec(pub serde_json::Value);

impl JsonSchema for DataProductSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DataProductSpec".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = ProductSpec::json_schema(generator);
        if let Some(o) = schema.as_object_mut() {
            o.values_mut().for_each(drop_empty_string_defaults);
        }
        schema
    }
}

/// Kubernetes 1.20's API server refuses a CRD whose schema defaults a string
/// to `""` ("must be of type string: \"null\""), and the default adds
/// nothing: a missing `owner` or `description` reads as empty anyway.
fn drop_empty_string_defaults(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.get("default") == Some(&serde_json::Value::String(String::new())) {
                o.remove("default");
            }
            o.values_mut().for_each(drop_empty_string_defaults);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_empty_string_defaults),
        _ => {}
    }
}

// No `deny_unknown_fields` here: the status is our output, and an older
// controller must still read a status a newer one wrote.
/// What the catalog's controller last saw and did.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataProductStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (registered and current) and `Invalid` (the spec does not compile).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The registry key, `<domain>.<product>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// The registry revision of the registered spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The product's tables as the lake has them now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableStatus>,
}

/// A Kubernetes-style condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339; changes only when `status` does.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableStatus {
    /// SQL name, `<layer>.<domain>.<table>`.
    pub name: String,
    /// Delta table version (absent until the first commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// RFC 3339 time of the last commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<String>,
    /// `fresh` or `stale` against `sla.freshness` (absent without an SLA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<String>,
}

/// The CRD as the chart ships it (YAML).
pub fn crd_yaml() -> String {
    let crd = DataProductResource::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated from services/catalog/src/kube/crd.rs — do not edit.\n# Regenerate: UPDATE_CRD=1 cargo test --workspace --test crd\n{body}"
    )
}
