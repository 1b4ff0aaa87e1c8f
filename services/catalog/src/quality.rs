//! Quality counts per product, folded from the transform's per-batch
//! events (`medallion.quality.<domain>.<product>`, kept 30 days): what the
//! catalog shows next to each product's tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use medallion_bus::quality::QualityCounts;

#[derive(Deserialize)]
struct QualityEvent {
    product: String,
    silver_version: i64,
    at: String,
    counts: QualityCounts,
}

/// Totals over the retained events, plus the last batch's time and version.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QualityTotals {
    pub batches: u64,
    #[serde(flatten)]
    pub counts: QualityCounts,
    pub last_batch_at: Option<String>,
    pub last_silver_version: Option<i64>,
}

impl QualityTotals {
    fn add(&mut self, e: QualityEvent) {
        self.batches += 1;
        self.counts.add(&e.counts);
        self.last_batch_at = Some(e.at);
        self.last_silver_version = Some(e.silver_version);
    }
}

pub type Quality = Arc<RwLock<BTreeMap<String, QualityTotals>>>;

/// Folds the quality stream into totals per product (see [`crate::stream_fold`]).
pub fn follow(js: jetstream::Context) -> Quality {
    crate::stream_fold::follow(
        js,
        medallion_bus::streams::QUALITY_STREAM,
        false,
        |q: &mut BTreeMap<String, QualityTotals>, m| {
            if let Ok(e) = serde_json::from_slice::<QualityEvent>(&m.payload) {
                q.entry(e.product.clone()).or_default().add(e);
            }
        },
    )
}
