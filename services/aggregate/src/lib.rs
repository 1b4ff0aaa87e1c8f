//! `medallion-aggregate`: Silver → Gold, each product's `gold` SQL maintained
//! incrementally.
//!
//! Every Silver commit is aggregated into partial results with the Gold SQL's
//! own group expressions and WHERE clause (DataFusion), merged per group key
//! into in-memory state (count and sum add, min/max compare, avg keeps sum and
//! count), and the buckets it touched are rewritten in one Delta commit whose
//! `txn.version` is the Silver version. The state is rebuilt from the Gold
//! table at start (Gold holds every partial it needs, incl. avg's hidden
//! `__<name>_sum` / `__<name>_count`), so a restart resumes exactly after
//! the last merged Silver version. A Silver commit that removed data (a
//! replay, an erasure) triggers a full refresh of Gold from Silver, except a
//! change feed's commit into a Gold plan of counts, sums and averages: its
//! replaced rows are taken out (`retract.rs`, hidden `__rows` and non-NULL
//! counts in Gold) and its new rows merged.

pub mod config;
mod merge;
pub mod poison;
mod retract;
mod service;
pub mod state;
mod tables;

pub use config::AggregateConfig;
pub use service::run;

/// Durable consumer name and Delta transaction app id.
pub const APP_ID: &str = "medallion-aggregate";
