//! docs/configuration.md is generated from the settings registry
//! (`env::VARS`), so the page cannot drift from what the services read.
//! Regenerate after changing a setting:
//! `UPDATE_DOCS=1 cargo test --workspace --test configuration_doc`.

use std::path::Path;

const HEADER: &str = "# Configuration

Every service reads its settings from environment variables, and only these:
a service refuses to start on an unknown `MEDALLION_*` name (with the nearest
known one as a hint) and lists every invalid setting at once, so one restart
fixes them all. Durations take a unit (`250ms`, `30s`, `5m`, `1h`); switches
are `true` or `false`. The Helm chart sets these from
`values.yaml`; `docker/compose.yaml` sets them for the local stack.

This page is generated from the registry in
`crates/medallion-runtime/src/env.rs`; do not edit it by hand (see
`crates/medallion-runtime/tests/configuration_doc.rs`).

";

#[test]
fn configuration_page_is_the_generated_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    let generated = format!("{HEADER}{}", medallion_runtime::env::markdown_reference());
    if std::env::var("UPDATE_DOCS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == generated,
        "docs/configuration.md differs from the settings registry; run `UPDATE_DOCS=1 cargo test --workspace --test configuration_doc` and commit the file"
    );
}
