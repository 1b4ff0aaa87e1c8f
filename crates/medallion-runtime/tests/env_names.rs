//! Every `MEDALLION_*`, `NATS_*` and `OTEL_*` variable the Helm chart or the
//! compose file sets is one the services know (`env::VARS`): a misspelt or
//! retired name in a deployment file would otherwise be ignored (NATS_/OTEL_)
//! or stop the service at start (MEDALLION_).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medallion_runtime::env::VARS;
use regex::Regex;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "tpl")
        ) {
            out.push(p);
        }
    }
}

/// The names a file mentions. A name built in a template from the component
/// (`MEDALLION_{{ upper $name }}_ADDR`) is expanded for every component in
/// values.yaml.
fn names_in(text: &str, components: &[String]) -> BTreeSet<String> {
    let templated =
        Regex::new(r"\b((?:MEDALLION|NATS|OTEL)_)\{\{\s*upper \$name\s*\}\}([A-Z0-9_]*)").unwrap();
    let plain = Regex::new(r"\b(?:MEDALLION|NATS|OTEL)_[A-Z0-9_]*[A-Z0-9]\b").unwrap();
    let mut names = BTreeSet::new();
    for c in templated.captures_iter(text) {
        for comp in components {
            names.insert(format!("{}{}{}", &c[1], comp.to_uppercase(), &c[2]));
        }
    }
    let stripped = templated.replace_all(text, "");
    for m in plain.find_iter(&stripped) {
        names.insert(m.as_str().to_string());
    }
    names
}

fn components() -> Vec<String> {
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("charts/medallion/values.yaml")).unwrap(),
    )
    .unwrap();
    values["services"]
        .as_mapping()
        .expect("values.yaml has services")
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deployment_files_set_only_known_variables() {
    let comps = components();
    let mut paths = Vec::new();
    files(&root().join("charts/medallion/templates"), &mut paths);
    paths.push(root().join("docker/compose.yaml"));
    let known: BTreeSet<&str> = VARS.iter().map(|v| v.name).collect();
    let mut unknown = Vec::new();
    let mut seen = BTreeSet::new();
    for p in &paths {
        let text = std::fs::read_to_string(p).unwrap();
        for name in names_in(&text, &comps) {
            if !known.contains(name.as_str()) {
                unknown.push(format!(
                    "{}: {name}",
                    p.strip_prefix(root()).unwrap_or(p).display()
                ));
            }
            seen.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "variables not in medallion_runtime::env::VARS:\n{}",
        unknown.join("\n")
    );
    // The scan finds what is there (a broken regex would pass vacuously).
    for expected in [
        "NATS_URL",
        "MEDALLION_CATALOG_ADDR",
        "MEDALLION_INGEST_ADDR",
        "OTEL_SERVICE_NAME",
        "MEDALLION_KUBE_CONTROLLER",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} not found in the chart/compose files: {seen:?}"
        );
    }
}

#[test]
fn the_scan_catches_an_unknown_name() {
    let comps = vec!["ingest".to_string()];
    let names = names_in(
        "- {name: MEDALLION_{{ upper $name }}_ADR, value: x}\n  NATS_ULR: y",
        &comps,
    );
    assert!(
        names.contains("MEDALLION_INGEST_ADR") && names.contains("NATS_ULR"),
        "{names:?}"
    );
    assert!(VARS.iter().all(|v| v.name != "MEDALLION_INGEST_ADR"));
}
