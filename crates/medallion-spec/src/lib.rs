//! The DataProduct spec: the one declarative input of Medallion.
//!
//! [`model`] is the document users write; [`Contract::compile`] validates it and
//! derives what the services run (Arrow schemas, compiled SQL expressions,
//! incremental Gold plans). Every service and the catalog validate through the
//! same function, so a spec accepted anywhere works everywhere.

pub mod compat;
pub mod contract;
pub mod error;
pub mod gold;
pub mod layout;
pub mod model;
pub mod names;
pub mod products;
pub mod types;

pub use compat::breaking_changes;
pub use contract::{
    BRONZE_SEQ_COLUMN, CDC_END_COLUMN, CDC_SEQUENCE_COLUMN, CDC_START_COLUMN, CdcPlan, Contract,
    INGESTED_AT_COLUMN, ingested_at_micros, is_valid_name, parse_yaml,
};
pub use error::{SpecError, SpecErrors};
pub use gold::{AggKind, GoldPlan, OutputColumn, ROWS_COLUMN, Retraction};
pub use model::*;
pub use names::{
    INGEST_SLOTS, IngestSlot, TableRef, ingest_slot_subject, ingest_subject, parse_ingest_slot,
    parse_ingest_subject, version_partition,
};
pub use types::ColumnType;

#[cfg(test)]
mod tests;
