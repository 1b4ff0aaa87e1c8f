//! The stage runtime: what ingest, transform and aggregate share beyond the
//! service runtime.
//!
//! - [`lease`]: which units (product partitions) this replica holds, as
//!   leases in NATS KV, spread evenly over the live replicas ([`assign`]).
//! - [`feed`]: one durable consumer per held unit, pulled in fetches.
//! - [`runner`]: the loop of a stage downstream of a table — events or the
//!   table itself, back-off, the timer — calling the stage for its own work.
//! - [`chain`]: when a replica may commit versions other replicas also feed.
//! - [`poison`]: finding the rows whose processing panics every time.
//! - [`maintenance`]: compaction, checkpoints, vacuum and retention of the
//!   tables a stage writes, on a thread of its own.
//! - [`settings`]: the settings every stage reads and what it connects to at start.

pub mod assign;
pub mod chain;
pub mod feed;
pub mod lease;
pub mod maintenance;
pub mod poison;
pub mod runner;
pub mod settings;

pub use chain::{Partitions, Run};
pub use lease::{Change, Ownership, OwnershipHandle, OwnershipSettings};
pub use runner::{Advance, Progress, Reply, Stage, StageDeps, StageSpec};
pub use settings::{Connected, StageSettings};
