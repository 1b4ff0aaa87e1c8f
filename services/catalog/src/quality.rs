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
    /// The same counts per hour (UTC, the hour's start in RFC 3339), over
    /// the stream's retention: quality over time, for one product's page.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_hour: BTreeMap<String, HourCounts>,
}

/// One hour's counts (expectations are in the totals only).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HourCounts {
    pub batches: u64,
    #[serde(flatten)]
    pub counts: QualityCounts,
}

/// The start of the hour of an RFC 3339 instant, in UTC.
fn hour_of(at: &str) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(at)
        .ok()?
        .with_timezone(&chrono::Utc);
    Some(t.format("%Y-%m-%dT%H:00:00Z").to_string())
}

impl QualityTotals {
    fn add(&mut self, e: QualityEvent) {
        self.batches += 1;
        self.counts.add(&e.counts);
        if let Some(hour) = hour_of(&e.at) {
            let h = self.by_hour.entry(hour).or_default();
            h.batches += 1;
            h.counts.add(&QualityCounts {
                expectations: Default::default(),
                ..e.counts.clone()
            });
        }
        self.last_batch_at = Some(e.at);
        self.last_silver_version = Some(e.silver_version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fold_into_totals_and_hours() {
        let mut q = QualityTotals::default();
        for (at, rows) in [
            ("2026-12-07T08:59:59Z", 10),
            ("2026-12-07T09:00:00+00:00", 5),
            ("2026-12-07T10:30:00+01:00", 7),
        ] {
            q.add(QualityEvent {
                product: "d.p".into(),
                silver_version: 1,
                at: at.into(),
                counts: QualityCounts {
                    rows_in: rows,
                    rows_out: rows - 1,
                    quarantined: 1,
                    ..Default::default()
                },
            });
        }
        assert_eq!(q.counts.rows_in, 22);
        let hours: Vec<(&str, u64, u64)> = q
            .by_hour
            .iter()
            .map(|(h, c)| (h.as_str(), c.counts.rows_in, c.batches))
            .collect();
        assert_eq!(
            hours,
            [
                ("2026-12-07T08:00:00Z", 10, 1),
                ("2026-12-07T09:00:00Z", 12, 2)
            ]
        );
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
