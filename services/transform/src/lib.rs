//! `medallion-transform`: Bronze → Silver, enforcing each product's contract.
//!
//! For every product with a spec in `MEDALLION_PRODUCTS`, each Bronze version
//! is decoded by `source.format` with arrow's JSON/CSV decoders, typed,
//! standardized, PII-masked, derived, checked against the expectations and
//! de-duplicated on the key; rows that fail go to `<product>__quarantine`
//! with the raw record and every reason.
//!
//! # Effectively once
//!
//! Silver and quarantine commits carry a Delta `txn` whose version is
//! `generation << 40 | last Bronze version`; the cursor lives in the table, so
//! a restart resumes exactly after the last committed Bronze version.
//! Quarantine is committed first and skipped on a retry (same `txn`), Silver
//! second. Bronze events are a fast path for the rows: any version not
//! announced (lost event, crash, retention) is read from the Bronze table by
//! the reconcile tick.

pub mod cdc_apply;
#[cfg(test)]
mod cdc_apply_tests;
pub mod cdc_envelope;
pub mod cdc_records;
pub mod cdc_tombstones;
pub mod cleanse;
mod commit;
pub mod config;
pub mod crash_check;
pub mod decode;
pub mod dedupe;
pub mod dedupe_snapshot;
pub mod flat_json;
mod forget;
pub mod forget_match;
pub mod key_budget;
pub mod key_run;
pub mod pipeline;
pub mod poison;
pub mod rfc3339;
mod service;
mod state;
mod step;

pub use config::TransformConfig;
pub use service::run;

/// Durable consumer name and Delta transaction app id.
pub const APP_ID: &str = "medallion-transform";
/// Request subject of `medallion replay <domain>.<product>` (payload: the product).
pub use medallion_bus::streams::REPLAY_SUBJECT;
