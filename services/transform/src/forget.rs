//! Applying erasure requests (`medallion forget`, stored in the KV bucket
//! `medallion_erasures`): a background task of every transform replica
//! claims a pending request and takes the product through these steps.
//! Each one is idempotent, so a replica killed at any point leaves the
//! request pending, and whichever replica claims it next runs it from the
//! start: what is already erased is found erased.
//!
//! 1. Bronze: messages lose the subject's records (rows stay in place, so a
//!    replay still reads every old commit); the files that held them are
//!    deleted, and so are older files of the table that still do.
//! 2. Wait until Silver has every Bronze version up to that rewrite: the
//!    events of versions not yet transformed carry the old payloads.
//! 3. Quarantine and Silver lose the subject's rows. The Silver commit
//!    removes data, which makes every transform replica reload its dedupe
//!    keys from the table and the aggregate recompute Gold from Silver. The
//!    dedupe snapshots and key runs (hashes of the subject's keys) go.
//! 4. Wait until every Gold table has recomputed past that commit; then the
//!    history of Silver, quarantine and Gold before the erasure ends: a
//!    checkpoint, the older log entries (their statistics can hold the
//!    subject's values) and the files only they referenced are deleted.
//! 5. The product's events on the bus (Bronze, Silver, Gold) are purged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use medallion_bus::erasures::{CLAIM_TTL, Erasure, ErasureOutcome, ErasureStatus, Erasures};
use medallion_bus::registry::SpecSource;
use medallion_bus::streams::{BRONZE_STREAM, GOLD_STREAM, SILVER_STREAM};
use medallion_lake::erase::{
    RowEdit, delete_files, last_data_version, rewrite, seal, tombstones, unreferenced_files,
};
use medallion_lake::{Lake, LakeError, open_table, txn_version};
use medallion_spec::{Contract, TableRef};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::forget_match::Subject;
use crate::state::position;

/// Unreferenced files younger than this may be a commit in flight: only
/// files a commit removed are deleted sooner.
const IN_FLIGHT: Duration = Duration::from_secs(600);
/// How often pending requests are looked for.
const POLL: Duration = Duration::from_secs(1);

pub(crate) struct ForgetJob {
    pub lake: Lake,
    pub js: jetstream::Context,
    pub erasures: Erasures,
    pub specs: SpecSource,
    pub pii_key: Option<Vec<u8>>,
    pub replica: String,
}

/// Why a request stopped short.
enum Stop {
    /// Cannot be applied as asked: the request fails, with this reason.
    Refused(String),
    /// Try again later (lake or bus trouble; the claim was lost).
    Later(String),
}

impl From<LakeError> for Stop {
    fn from(e: LakeError) -> Self {
        Stop::Later(e.to_string())
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The claimed request: every progress report renews the claim, and fails
/// when another replica took the request over.
struct Claim<'a> {
    erasures: &'a Erasures,
    e: Erasure,
    revision: u64,
    replica: &'a str,
    last: Instant,
}

impl Claim<'_> {
    async fn report(&mut self, step: &str) -> Result<(), Stop> {
        self.e.progress = Some(step.to_string());
        self.e.claimed_by = Some(self.replica.to_string());
        self.e.claimed_at_ms = Some(now_ms());
        match self.erasures.update(&self.e, self.revision).await {
            Ok(Some(r)) => {
                self.revision = r;
                self.last = Instant::now();
                Ok(())
            }
            Ok(None) => Err(Stop::Later("another replica took the request over".into())),
            Err(e) => Err(Stop::Later(e.to_string())),
        }
    }

    /// Renews the claim while waiting, at most every few seconds.
    async fn waiting(&mut self, step: &str) -> Result<(), Stop> {
        if self.last.elapsed() >= CLAIM_TTL / 4 {
            self.report(step).await?;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        Ok(())
    }
}

impl ForgetJob {
    pub fn start(self, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
                if let Err(e) = self.pass().await {
                    warn!(error = %e, "erasure requests not read; trying again");
                }
            }
        });
    }

    async fn pass(&self) -> Result<(), medallion_bus::BusError> {
        for (revision, e) in self.erasures.list(None).await? {
            if e.status != ErasureStatus::Pending {
                continue;
            }
            let fresh = e
                .claimed_at_ms
                .is_some_and(|at| now_ms() - at < CLAIM_TTL.as_millis() as i64);
            if fresh && e.claimed_by.as_deref() != Some(self.replica.as_str()) {
                continue;
            }
            let product = format!("{}.{}", e.domain, e.product);
            let span = info_span!("transform.forget", product = %product, erasure = %e.id);
            let mut claim = Claim {
                erasures: &self.erasures,
                e,
                revision,
                replica: &self.replica,
                last: Instant::now(),
            };
            if claim.report("claimed").await.is_err() {
                continue;
            }
            let started = Instant::now();
            match self.apply(&mut claim).instrument(span.clone()).await {
                Ok(mut outcome) => {
                    outcome.millis += started.elapsed().as_millis() as u64;
                    let _g = span.enter();
                    info!(rows = ?outcome.rows_removed, files_deleted = outcome.files_deleted, log_entries_deleted = outcome.log_entries_deleted, ms = outcome.millis, "erasure done");
                    claim.e.value = None;
                    claim.e.status = ErasureStatus::Done;
                    claim.e.outcome = Some(outcome);
                    claim.e.finished_at = Some(chrono::Utc::now().to_rfc3339());
                    let _ = claim.report("done").await;
                }
                Err(Stop::Refused(why)) => {
                    let _g = span.enter();
                    warn!(reason = %why, "erasure refused");
                    claim.e.value = None;
                    claim.e.status = ErasureStatus::Failed;
                    claim.e.finished_at = Some(chrono::Utc::now().to_rfc3339());
                    let _ = claim.report(&why).await;
                }
                Err(Stop::Later(why)) => {
                    if let Some(o) = claim.e.outcome.as_mut() {
                        o.millis += started.elapsed().as_millis() as u64;
                    }
                    let _g = span.enter();
                    warn!(reason = %why, "erasure interrupted; trying again");
                    // Leave the claim to expire rather than racing to drop
                    // it: the next pass (here or elsewhere) starts over.
                    let _ = claim.report(&format!("interrupted: {why}")).await;
                }
            }
        }
        Ok(())
    }

    async fn contract(&self, d: &str, p: &str) -> Result<Arc<Contract>, Stop> {
        let documents = self
            .specs
            .documents()
            .await
            .map_err(|e| Stop::Later(e.to_string()))?;
        let mut products = medallion_spec::products::Products::new();
        products.sync(&documents, |_| Ok(()), 0).await;
        products
            .contracts
            .get(&(d.to_string(), p.to_string()))
            .cloned()
            .ok_or_else(|| Stop::Refused(format!("{d}.{p} is not a registered product")))
    }

    async fn apply(&self, claim: &mut Claim<'_>) -> Result<ErasureOutcome, Stop> {
        let (d, p, id) = (
            claim.e.domain.clone(),
            claim.e.product.clone(),
            claim.e.id.clone(),
        );
        let contract = self.contract(&d, &p).await?;
        let value = claim
            .e
            .value
            .clone()
            .ok_or_else(|| Stop::Refused("the request holds no value".into()))?;
        let subject = Subject::new(
            &contract,
            &claim.e.column,
            &value,
            self.pii_key.as_deref(),
            &id,
        )
        .map_err(|e| Stop::Refused(e.to_string()))?;
        // What earlier attempts did (a redo finds nothing left to remove).
        let mut out = claim.e.outcome.clone().unwrap_or_default();

        // 1. Bronze.
        claim.report("bronze").await?;
        let bronze_ref = TableRef::bronze(&d, &p);
        let mut bronze_through = -1;
        if let Some(mut bronze) = open_table(&self.lake, &bronze_ref).await? {
            let r = rewrite(&bronze_ref, &mut bronze, &id, RowEdit::InPlace, |b| {
                Ok(subject.erase_bronze(b))
            })
            .await?;
            *out.rows_removed.entry("bronze".into()).or_default() += r.removed_count;
            out.bytes_rewritten += r.bytes_written;
            // Older files (time travel, compaction inputs, expired rows)
            // that still hold the subject; compaction recorded where their
            // rows went, so old commits stay readable.
            let tombstones = tombstones(&bronze_ref, &bronze).await?;
            let store = bronze.log_store().object_store(None);
            let mut doomed: Vec<String> = r.removed.clone();
            let young = now_ms() - IN_FLIGHT.as_millis() as i64;
            for (path, modified) in unreferenced_files(&bronze_ref, &bronze).await? {
                if modified >= young && !tombstones.contains(&path) {
                    continue;
                }
                let batches = match medallion_lake::read_parquet(&store, &path).await {
                    Err(e) if e.is_not_found() => continue,
                    r => r?,
                };
                if batches.iter().any(|b| subject.erase_bronze(b).is_some()) {
                    doomed.push(path);
                }
            }
            out.files_deleted += delete_files(store.as_ref(), doomed).await?;
            bronze_through = last_data_version(&bronze_ref, &bronze).await?;
        }
        claim.e.outcome = Some(out.clone());

        // 2. Silver has transformed everything the rewrite saw.
        let silver_ref = TableRef::silver(&d, &p);
        let step = format!("waiting for the transform to reach Bronze version {bronze_through}");
        loop {
            let Some(silver) = open_table(&self.lake, &silver_ref).await? else {
                break;
            };
            let txn = txn_version(&silver_ref, &silver, crate::APP_ID).await?;
            if position(txn).0 >= bronze_through {
                break;
            }
            claim.waiting(&step).await?;
        }
        purge_events(&self.js, BRONZE_STREAM, &bronze_ref).await;

        // 3. Quarantine and Silver.
        claim.report("quarantine and silver").await?;
        let quarantine_ref = TableRef::quarantine(&d, &p);
        let mut quarantine_at = None;
        if let Some(mut q) = open_table(&self.lake, &quarantine_ref).await? {
            let r = rewrite(&quarantine_ref, &mut q, &id, RowEdit::Drop, |b| {
                Ok(subject.erase_quarantine(b))
            })
            .await?;
            *out.rows_removed.entry("quarantine".into()).or_default() += r.removed_count;
            out.bytes_rewritten += r.bytes_written;
            quarantine_at = Some(match r.version {
                Some(v) => v,
                None => medallion_lake::erase::find_erasure(&quarantine_ref, &q, &id)
                    .await?
                    .unwrap_or(q.version().map(|v| v as i64).unwrap_or(0)),
            });
        }
        let mut silver_at = None;
        if let Some(mut s) = open_table(&self.lake, &silver_ref).await? {
            let r = rewrite(&silver_ref, &mut s, &id, RowEdit::Drop, |b| {
                Ok(subject.erase_silver(b))
            })
            .await?;
            *out.rows_removed.entry("silver".into()).or_default() += r.removed_count;
            out.bytes_rewritten += r.bytes_written;
            silver_at = match r.version {
                Some(v) => Some(v),
                // A rewrite made before a restart.
                None => medallion_lake::erase::find_erasure(&silver_ref, &s, &id).await?,
            };
            // The dedupe keys' caches: hashes of the subject's keys. Every
            // replica reloads its keys from Silver when it meets the commit.
            out.files_deleted += delete_key_caches(&s).await?;
        }
        claim.e.outcome = Some(out.clone());
        claim.report("quarantine and silver rewritten").await?;

        // 4. Gold recomputed; then the history before the erasure goes.
        if let Some(at) = silver_at {
            for plan in &contract.gold {
                let gold_ref = TableRef::gold(&d, &plan.name);
                let step = format!("waiting for the aggregate to recompute {gold_ref}");
                loop {
                    let Some(g) = open_table(&self.lake, &gold_ref).await? else {
                        break;
                    };
                    let txn = txn_version(&gold_ref, &g, AGGREGATE_APP_ID).await?;
                    if txn.unwrap_or(-1) >= at {
                        break;
                    }
                    claim.waiting(&step).await?;
                }
            }
            medallion_runtime::failpoint::hit("transform.forget.before_history");
            claim.report("history").await?;
            if let Some(s) = open_table(&self.lake, &silver_ref).await? {
                count_sealed(&mut out, seal(&silver_ref, &s, at, IN_FLIGHT).await?);
            }
            for plan in &contract.gold {
                let gold_ref = TableRef::gold(&d, &plan.name);
                if let Some(g) = open_table(&self.lake, &gold_ref).await? {
                    let at = g.version().map(|v| v as i64).unwrap_or(0);
                    count_sealed(&mut out, seal(&gold_ref, &g, at, IN_FLIGHT).await?);
                    purge_events(&self.js, GOLD_STREAM, &gold_ref).await;
                }
            }
        }
        if let (Some(at), Some(q)) = (
            quarantine_at,
            open_table(&self.lake, &quarantine_ref).await?,
        ) {
            count_sealed(&mut out, seal(&quarantine_ref, &q, at, IN_FLIGHT).await?);
        }
        purge_events(&self.js, SILVER_STREAM, &silver_ref).await;
        Ok(out)
    }
}

fn count_sealed(out: &mut ErasureOutcome, s: medallion_lake::erase::Sealed) {
    out.files_deleted += s.files_deleted;
    out.log_entries_deleted += s.log_entries_deleted;
}

/// The aggregate's app id, whose transaction version in a Gold table is the
/// Silver version it has folded in.
const AGGREGATE_APP_ID: &str = "medallion-aggregate";

/// Deletes the dedupe snapshots and uploaded key runs beside Silver.
async fn delete_key_caches(silver: &deltalake::DeltaTable) -> Result<u64, LakeError> {
    use futures::StreamExt;
    let store = silver.log_store().object_store(None);
    let prefix = object_store::path::Path::from(crate::dedupe_snapshot::SNAPSHOT_DIR);
    let mut doomed = Vec::new();
    let mut listing = store.list(Some(&prefix));
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let name = meta.location.filename().unwrap_or_default();
        if name.starts_with("dedupe-") || name.ends_with(".run") {
            doomed.push(meta.location.to_string());
        }
    }
    delete_files(store.as_ref(), doomed).await
}

/// Purges a table's events (every partition's subject): a consumer that had
/// not read them reads the table instead.
async fn purge_events(js: &jetstream::Context, stream: &str, table: &TableRef) {
    let Ok(s) = js.get_stream(stream).await else {
        return;
    };
    for subject in [
        table.event_subject(),
        format!("{}.*", table.event_subject()),
    ] {
        if let Err(e) = s.purge().filter(subject.clone()).await {
            warn!(subject, error = %e, "events of an erased table not purged; they expire with MEDALLION_EVENT_MAX_AGE");
        }
    }
}
