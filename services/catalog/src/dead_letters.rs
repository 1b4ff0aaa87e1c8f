//! Dead letters per product, folded from `MEDALLION_DLQ`: how many messages
//! (transform) and rows (aggregate) each stage parked, and the latest one,
//! shown next to the product's quality counts.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream;
use medallion_bus::headers;
use serde::Serialize;
use tokio::sync::RwLock;

/// The newest dead letter of a product.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LastDeadLetter {
    pub stage: String,
    /// Its subject in `MEDALLION_DLQ` (one per message or row).
    pub dlq_subject: String,
    pub dlq_sequence: u64,
    pub reason: String,
    /// Where it came from: `layer.domain.table` and version.
    pub table: String,
    pub table_version: String,
    /// The ingest stream sequence of the original message.
    pub source_sequence: String,
    pub deliveries: String,
    pub at: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DeadLetters {
    pub total: u64,
    pub by_stage: BTreeMap<String, u64>,
    pub last: Option<LastDeadLetter>,
}

pub type DeadLetterMap = Arc<RwLock<BTreeMap<String, DeadLetters>>>;

/// `medallion.dlq.<stage>.<domain>.<product>.…` → (stage, `domain.product`).
/// Ingest's `medallion.dlq.ingest` names no product (its messages have none).
fn product_of(subject: &str) -> Option<(&str, String)> {
    let mut parts = subject.strip_prefix("medallion.dlq.")?.split('.');
    let stage = parts.next()?;
    let domain = parts.next()?;
    let product = parts.next()?;
    Some((stage, format!("{domain}.{product}")))
}

/// Folds the DLQ stream into dead letters per product (see
/// [`crate::stream_fold`]); counting needs only the headers.
pub fn follow(js: jetstream::Context) -> DeadLetterMap {
    crate::stream_fold::follow(js, medallion_bus::streams::DLQ_STREAM, true, add)
}

fn add(map: &mut BTreeMap<String, DeadLetters>, m: &jetstream::Message) {
    let Some((stage, product)) = product_of(m.subject.as_str()) else {
        return;
    };
    let h = |name: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    let info = m.info().ok();
    let last = LastDeadLetter {
        stage: stage.to_string(),
        dlq_subject: m.subject.to_string(),
        dlq_sequence: info.as_ref().map(|i| i.stream_sequence).unwrap_or(0),
        reason: h(headers::DLQ_REASON),
        table: h(headers::DLQ_TABLE),
        table_version: h(headers::DLQ_TABLE_VERSION),
        source_sequence: h(headers::DLQ_SEQUENCE),
        deliveries: h(headers::DLQ_DELIVERIES),
        at: info
            .map(|i| {
                chrono::DateTime::from_timestamp_nanos(i.published.unix_timestamp_nanos() as i64)
                    .to_rfc3339()
            })
            .unwrap_or_default(),
    };
    let d = map.entry(product).or_default();
    d.total += 1;
    *d.by_stage.entry(stage.to_string()).or_default() += 1;
    d.last = Some(last);
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_name_stage_and_product() {
        assert_eq!(
            super::product_of("medallion.dlq.transform.finance.payments.3.17"),
            Some(("transform", "finance.payments".to_string()))
        );
        assert_eq!(super::product_of("medallion.dlq.ingest"), None);
    }
}
