//! The lake: every layer's Delta Lake tables, written with idempotent commits.

pub mod commits;
pub mod dictionary;
pub mod erase;
mod error;
mod location;
pub mod maintenance;
mod masked_table;
mod moved;
mod object_stores;
pub mod query;
pub mod writer;

pub use commits::{
    CommitRows, CommitSummary, commit_metadata, commit_summary, open_at, read_all, read_commit,
    read_parquet, read_parquet_columns,
};
pub use error::LakeError;
pub use location::Lake;
pub use writer::{
    CommitOutcome, FileInfo, TableCache, TableOptions, TableWriter, WriteMode, list_files,
    open_table, table_schema, txn_version,
};

pub use deltalake;
