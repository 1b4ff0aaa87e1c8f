//! Quality counts per product, folded from the transform's per-batch
//! events (`medallion.quality.<domain>.<product>`, kept 30 days): what the
//! catalog shows next to each product's tables.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use medallion_bus::quality::{ExpectationCount as ExpectationTotals, QualityCounts};

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
    pub rows_in: u64,
    pub rows_out: u64,
    pub quarantined: u64,
    pub dropped: u64,
    pub duplicates: u64,
    pub invalid: u64,
    pub dead_lettered: u64,
    pub expectations: BTreeMap<String, ExpectationTotals>,
    pub last_batch_at: Option<String>,
    pub last_silver_version: Option<i64>,
}

impl QualityTotals {
    fn add(&mut self, e: QualityEvent) {
        let c = e.counts;
        self.batches += 1;
        self.rows_in += c.rows_in;
        self.rows_out += c.rows_out;
        self.quarantined += c.quarantined;
        self.dropped += c.dropped;
        self.duplicates += c.duplicates;
        self.invalid += c.invalid;
        self.dead_lettered += c.dead_lettered;
        for (name, x) in c.expectations {
            let t = self.expectations.entry(name).or_default();
            t.action = x.action;
            t.passed += x.passed;
            t.failed += x.failed;
        }
        self.last_batch_at = Some(e.at);
        self.last_silver_version = Some(e.silver_version);
    }
}

pub type Quality = Arc<RwLock<BTreeMap<String, QualityTotals>>>;

/// Folds the quality stream into `quality`, from its start, forever; after
/// an interruption it starts over (the totals are rebuilt, not doubled).
pub fn follow(js: jetstream::Context) -> Quality {
    let quality: Quality = Default::default();
    let q = quality.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = fold(&js, &q).await {
                tracing::warn!(error = %e, "quality events interrupted; re-reading them");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    quality
}

async fn fold(js: &jetstream::Context, quality: &Quality) -> Result<(), String> {
    let stream = js
        .get_stream(medallion_bus::streams::QUALITY_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    quality.write().await.clear();
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        if let Ok(e) = serde_json::from_slice::<QualityEvent>(&m.payload) {
            quality
                .write()
                .await
                .entry(e.product.clone())
                .or_default()
                .add(e);
        }
    }
    Err("quality stream ended".into())
}
