//! `medallion-catalog`: discovery, lineage, SQL with time travel, RBAC and
//! audit over every layer.
//!
//! Access is decided per table from each product's `access` section (plus the
//! `admin` role): a query runs in a DataFusion session that contains only the
//! caller's tables, with masked columns replaced by NULL before the session
//! sees them, so no SQL shape can reach what is not granted.

pub mod access;
mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod dead_letters;
pub mod flight_sql;
pub mod forget_api;
pub mod kube;
pub mod openlineage;
pub mod pg_wire;
mod pipeline_api;
pub mod quality;
pub mod seed;
mod service;
mod specs_api;
pub mod sql_gate;
pub mod sql_tls;
mod stream_fold;
mod web;

pub use config::CatalogConfig;
pub use service::run;
