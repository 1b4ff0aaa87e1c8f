//! The Prometheus metrics of the pipeline stages. One set of names for every
//! service, labelled by `layer` and `product` (`domain.product`) or `table`;
//! no label ever carries an event id, so cardinality is bounded by the number
//! of products.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    exponential_buckets,
};

#[derive(Clone)]
pub struct PipelineMetrics {
    /// Messages (ingest) or rows (transform, aggregate) read, per layer and product.
    pub rows_in: IntCounterVec,
    /// Rows committed to a table.
    pub rows_out: IntCounterVec,
    pub bytes_in: IntCounterVec,
    /// Input already committed (a redelivery after a crash) and skipped.
    pub skipped: IntCounterVec,
    /// Rows sent to quarantine, per product and reason (`parse`, `cast`, `required`, or an expectation name).
    pub quarantined: IntCounterVec,
    /// Rows dropped by a `drop` expectation, per expectation.
    pub dropped: IntCounterVec,
    /// Rows removed as duplicates of an earlier key.
    pub deduplicated: IntCounterVec,
    /// Rows failing a `warn` expectation (kept), per expectation.
    pub warned: IntCounterVec,
    pub commit_seconds: HistogramVec,
    /// Publish (JetStream store time) to commit in this layer.
    pub latency_seconds: HistogramVec,
    pub table_version: IntGaugeVec,
    pub last_commit_timestamp: IntGaugeVec,
    /// Messages the consumer has not received yet.
    pub consumer_pending: IntGaugeVec,
    pub redeliveries: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub errors: IntCounterVec,
    /// Products stopped by a `fail` expectation (1) or running (0).
    pub product_failed: IntGaugeVec,
    /// Dedupe keys the transform holds per product, `place` = memory or disk.
    pub dedupe_keys: IntGaugeVec,
    pub events_published: IntCounterVec,
    /// Commits read back from a table because their event was missing or too large.
    pub catch_up_commits: IntCounterVec,
    pub batch_rows: Histogram,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    // Fine around 0.1–1 s, where latency objectives sit (a p99 < 1 s goal
    // needs a bucket bound at 1 s), coarse beyond.
    let buckets = vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
        2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl PipelineMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new("medallion_batch_rows", "Rows per micro-batch")
                .buckets(exponential_buckets(1.0, 4.0, 10)?),
        )?;
        r.register(Box::new(batch_rows.clone()))?;
        Ok(PipelineMetrics {
            rows_in: counter(
                r,
                "medallion_rows_in_total",
                "Messages or rows read by a stage",
                &["layer", "product"],
            )?,
            rows_out: counter(
                r,
                "medallion_rows_out_total",
                "Rows committed to a table",
                &["layer", "product"],
            )?,
            bytes_in: counter(
                r,
                "medallion_bytes_in_total",
                "Payload bytes read by a stage",
                &["layer", "product"],
            )?,
            skipped: counter(
                r,
                "medallion_already_committed_total",
                "Redelivered input skipped because it was already committed",
                &["layer", "product"],
            )?,
            quarantined: counter(
                r,
                "medallion_quarantined_rows_total",
                "Rows sent to quarantine",
                &["product", "reason"],
            )?,
            dropped: counter(
                r,
                "medallion_dropped_rows_total",
                "Rows dropped by a drop expectation",
                &["product", "expectation"],
            )?,
            deduplicated: counter(
                r,
                "medallion_deduplicated_rows_total",
                "Rows whose key was already in Silver",
                &["product"],
            )?,
            warned: counter(
                r,
                "medallion_expectation_warnings_total",
                "Rows failing a warn expectation (kept)",
                &["product", "expectation"],
            )?,
            commit_seconds: histogram(
                r,
                "medallion_commit_duration_seconds",
                "Time to write and commit a batch",
                &["layer"],
            )?,
            latency_seconds: histogram(
                r,
                "medallion_publish_to_commit_seconds",
                "Time from the producer's publish to the commit in this layer",
                &["layer"],
            )?,
            table_version: gauge(
                r,
                "medallion_table_version",
                "Current Delta version of a table",
                &["table"],
            )?,
            last_commit_timestamp: gauge(
                r,
                "medallion_last_commit_timestamp_seconds",
                "Unix time of the last commit to a table",
                &["table"],
            )?,
            consumer_pending: gauge(
                r,
                "medallion_consumer_pending_messages",
                "Messages not yet delivered to the consumer",
                &["consumer"],
            )?,
            redeliveries: counter(
                r,
                "medallion_redeliveries_total",
                "Messages delivered more than once",
                &["consumer"],
            )?,
            dead_lettered: counter(
                r,
                "medallion_dead_lettered_total",
                "Messages parked in MEDALLION_DLQ",
                &["stage", "reason"],
            )?,
            errors: counter(
                r,
                "medallion_errors_total",
                "Errors by stage and kind (each retried unless dead-lettered)",
                &["stage", "kind"],
            )?,
            product_failed: gauge(
                r,
                "medallion_product_failed",
                "1 while a product is stopped by a fail expectation",
                &["product"],
            )?,
            dedupe_keys: gauge(
                r,
                "medallion_dedupe_keys",
                "Dedupe keys the transform holds per product, in memory or in runs on local disk",
                &["product", "place"],
            )?,
            events_published: counter(
                r,
                "medallion_events_published_total",
                "Stage event messages published",
                &["layer"],
            )?,
            catch_up_commits: counter(
                r,
                "medallion_catch_up_commits_total",
                "Commits read back from the source table instead of the event",
                &["layer"],
            )?,
            batch_rows,
        })
    }

    /// Observes, for each committed row, the time since ingest received its
    /// message (`received_us`, microseconds since the epoch).
    pub fn observe_latency(&self, layer: &str, received_us: &[i64]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // One observation per row: a local histogram adds them up without an
        // atomic update each and publishes once.
        let h = self.latency_seconds.with_label_values(&[layer]).local();
        for r in received_us {
            h.observe((now - r).max(0) as f64 / 1e6);
        }
        h.flush();
    }

    /// Records a commit of `table` at `version` now.
    pub fn committed(&self, table: &str, version: i64) {
        self.table_version.with_label_values(&[table]).set(version);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.last_commit_timestamp
            .with_label_values(&[table])
            .set(now);
    }
}

/// What table maintenance keeps up to date, per table (`layer.domain.table`).
#[derive(Clone)]
pub struct MaintenanceMetrics {
    pub files: IntGaugeVec,
    pub bytes: IntGaugeVec,
    pub small_files: IntGaugeVec,
    pub log_since_checkpoint: IntGaugeVec,
    pub unreferenced_bytes: IntGaugeVec,
    pub last_compaction: IntGaugeVec,
    pub last_vacuum: IntGaugeVec,
    /// Files merged away by compaction.
    pub compacted_files: IntCounterVec,
    pub vacuumed_files: IntCounterVec,
    /// Bronze files removed by retention.
    pub expired_files: IntCounterVec,
    /// Maintenance jobs that failed (retried next cycle), per job.
    pub errors: IntCounterVec,
    pub seconds: HistogramVec,
}

impl MaintenanceMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let t = &["table"];
        Ok(MaintenanceMetrics {
            files: gauge(
                r,
                "medallion_table_files",
                "Data files of the table's current version",
                t,
            )?,
            bytes: gauge(
                r,
                "medallion_table_bytes",
                "Bytes of the table's current data files",
                t,
            )?,
            small_files: gauge(
                r,
                "medallion_table_small_files",
                "Data files below half the compaction target",
                t,
            )?,
            log_since_checkpoint: gauge(
                r,
                "medallion_table_log_since_checkpoint",
                "Log entries a reader replays after the last checkpoint",
                t,
            )?,
            unreferenced_bytes: gauge(
                r,
                "medallion_table_unreferenced_bytes",
                "Bytes on storage the current version does not reference (time travel, or reclaimable)",
                t,
            )?,
            last_compaction: gauge(
                r,
                "medallion_table_last_compaction_timestamp_seconds",
                "When this replica last compacted the table",
                t,
            )?,
            last_vacuum: gauge(
                r,
                "medallion_table_last_vacuum_timestamp_seconds",
                "When this replica last vacuumed the table",
                t,
            )?,
            compacted_files: counter(
                r,
                "medallion_compacted_files_total",
                "Small files merged away by compaction",
                t,
            )?,
            vacuumed_files: counter(
                r,
                "medallion_vacuumed_files_total",
                "Files deleted by vacuum",
                t,
            )?,
            expired_files: counter(
                r,
                "medallion_expired_files_total",
                "Bronze files removed by retention",
                t,
            )?,
            errors: counter(
                r,
                "medallion_maintenance_errors_total",
                "Maintenance jobs that failed (tried again next cycle)",
                &["table", "job"],
            )?,
            seconds: histogram(
                r,
                "medallion_maintenance_seconds",
                "Time one maintenance job took",
                &["job"],
            )?,
        })
    }
}
