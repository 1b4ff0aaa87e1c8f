//! The CRD the chart ships is the one the code generates, and it is a
//! structural schema a Kubernetes API server accepts.
//! Regenerate after changing the spec types:
//! `UPDATE_CRD=1 cargo test --workspace --test crd`.

use medallion_catalog::kube::crd_yaml;
use serde_json::Value;

const SHIPPED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../charts/medallion/crds/dataproduct.yaml"
);

#[test]
fn shipped_crd_is_the_generated_one() {
    let generated = crd_yaml();
    if std::env::var("UPDATE_CRD").is_ok_and(|v| v == "1") {
        std::fs::write(SHIPPED, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(SHIPPED).unwrap_or_default();
    assert!(
        shipped == generated,
        "charts/medallion/crds/dataproduct.yaml differs from the CRD the code generates; run `UPDATE_CRD=1 cargo test --workspace --test crd` and commit the file"
    );
}

/// The rules of a structural schema (apiextensions.k8s.io/v1) that a
/// generated schema can break: every node has a type (unless it keeps
/// unknown fields or is int-or-string), no `$ref`/`definitions`, no
/// `additionalProperties` beside `properties`, and `anyOf`/`oneOf`/`allOf`
/// branches carry no type, description or default of their own.
fn structural_problems(path: &str, node: &Value, in_junction: bool, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: not an object"));
        return;
    };
    for banned in ["$ref", "definitions", "$defs", "$schema", "const"] {
        if obj.contains_key(banned) {
            out.push(format!("{path}: has {banned}"));
        }
    }
    let special = obj.contains_key("x-kubernetes-preserve-unknown-fields")
        || obj.contains_key("x-kubernetes-int-or-string");
    if in_junction {
        for k in ["type", "description", "default", "nullable"] {
            if obj.contains_key(k) {
                out.push(format!("{path}: {k} inside anyOf/oneOf/allOf"));
            }
        }
    } else if !obj.contains_key("type") && !special {
        out.push(format!("{path}: no type"));
    }
    if let Some(t) = obj.get("type").and_then(Value::as_str)
        && !["object", "array", "string", "integer", "number", "boolean"].contains(&t)
    {
        out.push(format!("{path}: type {t}"));
    }
    if obj
        .get("enum")
        .and_then(Value::as_array)
        .is_some_and(|e| e.contains(&Value::Null))
    {
        out.push(format!("{path}: null in enum"));
    }
    if let Some(f) = obj.get("format").and_then(Value::as_str)
        && ![
            "int32",
            "int64",
            "float",
            "double",
            "byte",
            "date",
            "date-time",
            "password",
        ]
        .contains(&f)
    {
        out.push(format!("{path}: format {f} is not one Kubernetes knows"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!("{path}: properties and additionalProperties"));
    }
    if obj.get("type").and_then(Value::as_str) == Some("array") && !obj.contains_key("items") {
        out.push(format!("{path}: array without items"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural_problems(&format!("{path}.{k}"), v, false, out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(&format!("{path}[]"), items, in_junction, out);
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_problems(&format!("{path}{{}}"), extra, false, out);
    }
    for j in ["anyOf", "oneOf", "allOf"] {
        for (i, branch) in obj
            .get(j)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            structural_problems(&format!("{path}.{j}[{i}]"), branch, true, out);
        }
    }
}

#[test]
fn crd_is_structural_and_names_what_users_see() {
    let crd: Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["metadata"]["name"], "dataproducts.medallion.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "DataProduct");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(
        version["subresources"]["status"].is_object(),
        "status subresource"
    );
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut problems = Vec::new();
    structural_problems("openAPIV3Schema", schema, false, &mut problems);
    assert!(
        problems.is_empty(),
        "not a structural schema:\n{}",
        problems.join("\n")
    );

    // The spec's fields are there, with the enums users may write.
    let spec = &schema["properties"]["spec"];
    for field in [
        "domain",
        "owner",
        "schema",
        "key",
        "expectations",
        "derive",
        "gold",
        "access",
        "sla",
        "source",
    ] {
        assert!(
            spec["properties"][field].is_object(),
            "spec.{field} missing: {spec}"
        );
    }
    assert_eq!(spec["required"], serde_json::json!(["domain", "schema"]));
    let column = &spec["properties"]["schema"]["items"];
    assert_eq!(column["properties"]["type"]["type"], "string");
    assert_eq!(
        column["properties"]["pii"]["enum"],
        serde_json::json!(["hash", "redact"])
    );
    let action = &spec["properties"]["expectations"]["items"]["properties"]["action"];
    assert_eq!(
        action["enum"],
        serde_json::json!(["warn", "drop", "quarantine", "fail"])
    );
}

/// The example resource under charts/medallion/examples is a valid product.
#[tokio::test]
async fn example_resource_is_a_valid_product() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/medallion/examples/dataproduct.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let dp: medallion_catalog::kube::DataProductResource = serde_yaml::from_str(&text).unwrap();
    let doc = medallion_catalog::kube::reconcile::document(&dp);
    medallion_spec::Contract::from_yaml(&doc).await.unwrap();
}
