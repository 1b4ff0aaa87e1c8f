//! Whether a new version of a spec can take over from the running one
//! without rebuilding its tables.
//!
//! Rows already in Silver and Gold were written under the old version. A
//! change they can absorb (a new optional column, new expectations, a new
//! Gold table, different owners, tags or grants) is compatible. A change
//! they cannot (a removed, renamed or retyped column, a column that becomes
//! required, a different key, a changed Gold table shape) is breaking: it
//! needs a full refresh from Bronze.

use arrow::datatypes::SchemaRef;

use crate::Contract;

/// Each breaking change from `old` to `new`, as a sentence naming the column
/// or table; empty when the change is compatible.
pub fn breaking_changes(old: &Contract, new: &Contract) -> Vec<String> {
    let mut out = columns("silver", &old.silver_schema, &new.silver_schema);
    if old.key() != new.key() {
        out.push(format!(
            "key changes from [{}] to [{}] (rows were deduplicated on the old key)",
            old.key().join(", "),
            new.key().join(", ")
        ));
    }
    for g in &old.gold {
        match new.gold.iter().find(|n| n.name == g.name) {
            None => out.push(format!(
                "gold table {} is removed (its readers would see it frozen)",
                g.name
            )),
            Some(n) => {
                let shape = columns(
                    &format!("gold table {}", g.name),
                    &g.output_schema,
                    &n.output_schema,
                );
                let reshaped = !shape.is_empty();
                out.extend(shape);
                if !reshaped && normalize(&g.sql) != normalize(&n.sql) {
                    out.push(format!(
                        "gold table {}: its SQL changes, so its rows no longer match it",
                        g.name
                    ));
                }
            }
        }
    }
    out
}

fn normalize(sql: &str) -> String {
    sql.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn columns(table: &str, old: &SchemaRef, new: &SchemaRef) -> Vec<String> {
    let mut out = Vec::new();
    let added: Vec<_> = new
        .fields()
        .iter()
        .filter(|f| old.field_with_name(f.name()).is_err())
        .collect();
    for f in old.fields() {
        match new.field_with_name(f.name()) {
            Err(_) => {
                let renamed = added
                    .iter()
                    .filter(|a| a.data_type() == f.data_type())
                    .map(|a| a.name().as_str())
                    .collect::<Vec<_>>();
                let hint = if renamed.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (renamed to {}? a rename is a removal plus an addition)",
                        renamed.join(" or ")
                    )
                };
                out.push(format!("{table}: column {} is removed{hint}", f.name()));
            }
            Ok(n) if n.data_type() != f.data_type() => out.push(format!(
                "{table}: column {} changes type from {} to {}",
                f.name(),
                f.data_type(),
                n.data_type()
            )),
            Ok(n) if f.is_nullable() && !n.is_nullable() => out.push(format!(
                "{table}: column {} becomes required (existing rows may hold NULL)",
                f.name()
            )),
            Ok(_) => {}
        }
    }
    for a in added {
        if !a.is_nullable() {
            out.push(format!(
                "{table}: new column {} is required (existing rows have no value; add it as optional)",
                a.name()
            ));
        }
    }
    out
}
