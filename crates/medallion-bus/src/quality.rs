//! The quality counts the transform publishes per Silver commit on
//! `medallion.quality.<domain>.<product>` and the catalog folds into totals.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per-batch quality counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityCounts {
    /// Records read from Bronze (lines for ndjson/csv, messages for json).
    pub rows_in: u64,
    pub rows_out: u64,
    pub quarantined: u64,
    pub dropped: u64,
    pub duplicates: u64,
    /// Records that could not be parsed or typed.
    pub invalid: u64,
    /// Bronze messages parked in the DLQ (their records are in no other
    /// count); absent in events older than dead-lettering.
    #[serde(default)]
    pub dead_lettered: u64,
    #[serde(default)]
    pub expectations: BTreeMap<String, ExpectationCount>,
    /// What a change feed's commit did (products with `spec.cdc` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeCounts>,
}

/// Changes applied to a change-feed Silver table, by operation; `stale`
/// ones were older than (or the same as) what the table already held for
/// their key and changed nothing; `tombstones` are the null records
/// Debezium sends after a delete.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeCounts {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub stale: u64,
    pub tombstones: u64,
}

impl ChangeCounts {
    pub fn add(&mut self, o: &ChangeCounts) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.stale += o.stale;
        self.tombstones += o.tombstones;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExpectationCount {
    pub action: String,
    pub passed: u64,
    pub failed: u64,
}

impl QualityCounts {
    pub fn add(&mut self, o: &QualityCounts) {
        self.rows_in += o.rows_in;
        self.rows_out += o.rows_out;
        self.quarantined += o.quarantined;
        self.dropped += o.dropped;
        self.duplicates += o.duplicates;
        self.invalid += o.invalid;
        self.dead_lettered += o.dead_lettered;
        for (k, v) in &o.expectations {
            let e = self.expectations.entry(k.clone()).or_default();
            e.action = v.action.clone();
            e.passed += v.passed;
            e.failed += v.failed;
        }
        if let Some(c) = &o.changes {
            self.changes.get_or_insert_default().add(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_without_dead_letters_still_read() {
        let c: QualityCounts = serde_json::from_str(
            r#"{"rows_in":3,"rows_out":2,"quarantined":1,"dropped":0,"duplicates":0,"invalid":1}"#,
        )
        .unwrap();
        assert_eq!((c.rows_in, c.dead_lettered), (3, 0));
    }
}
