//! Data products as Kubernetes custom resources: the CRD, the reconcile
//! logic and the controller that runs it inside the catalog.

pub mod controller;
pub mod crd;
pub mod reconcile;

pub use crd::{DataProductResource, DataProductSpec, DataProductStatus, crd_yaml};
