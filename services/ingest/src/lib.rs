//! `medallion-ingest`: lands every message published on `medallion.ingest.<domain>.<product>`
//! in `bronze/<domain>/<product>`, exactly once, bytes untouched.
//!
//! # Exactly once, and why the cursor is the stream itself
//!
//! Messages are read with an *ordered* consumer, which delivers stream
//! sequences strictly in order and re-creates itself on any gap. Each micro-batch
//! is committed per product with a Delta `txn` action whose version is the
//! highest stream sequence committed to that table; only then is the stream
//! purged up to the batch's last sequence (the "ack"). After a crash, reading
//! resumes at the stream's first remaining sequence; anything at or below a
//! table's transaction version was already committed and is skipped.
//!
//! A durable consumer with acknowledgements cannot give this guarantee:
//! JetStream redelivers unacknowledged messages *after* newer ones once their
//! ack wait expires, so a per-table high-water mark would skip (lose) them,
//! and an "ack all" would acknowledge messages that were never committed.

mod bronze_rows;
pub mod config;
mod service;
mod unit;

pub use bronze_rows::RawMessage;
pub use config::IngestConfig;
pub use service::run;

/// Delta transaction app id prefix of ingest's commits.
pub const APP_ID: &str = "medallion-ingest";
