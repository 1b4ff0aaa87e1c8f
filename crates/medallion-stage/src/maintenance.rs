//! Table maintenance: every stage looks after the tables it writes, for the
//! products whose first partition it holds (one replica per product, so
//! two replicas never compact the same table at once).
//!
//! It runs on its own thread with its own single-threaded runtime, at low
//! CPU priority: merging files decodes and encodes Parquet for seconds, and
//! on the stage's runtime that would hold a worker the stream needs. Every
//! job is safe to kill at any point (see [`medallion_lake::maintenance`]):
//! the thread is simply abandoned at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medallion_bus::ownership::UnitId;
use medallion_lake::maintenance::{self as jobs, Compaction, Properties};
use medallion_lake::{Lake, open_table};
use medallion_runtime::EnvReader;
use medallion_runtime::metrics::MaintenanceMetrics;
use medallion_spec::layout::bronze;
use medallion_spec::products::ProductId;
use medallion_spec::{Contract, TableRef};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::OwnershipHandle;

/// The contracts a stage runs, as its spec reloads last left them.
pub type Contracts = BTreeMap<ProductId, Arc<Contract>>;

#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// `None`: maintenance is off.
    pub interval: Option<Duration>,
    pub vacuum_interval: Duration,
    pub compaction: Compaction,
    pub checkpoint_interval: u64,
    pub time_travel: Duration,
    pub log_retention: Duration,
    pub orphan_age: Duration,
}

impl MaintenanceSettings {
    pub fn from_env(env: &mut EnvReader) -> Self {
        let interval = env.duration("MEDALLION_MAINTENANCE_INTERVAL");
        MaintenanceSettings {
            interval: (!interval.is_zero()).then_some(interval),
            vacuum_interval: env.duration("MEDALLION_VACUUM_INTERVAL"),
            compaction: Compaction {
                target_file_size: env.usize("MEDALLION_COMPACT_TARGET_BYTES", 1 << 20) as u64,
                fanout: env.usize("MEDALLION_COMPACT_FANOUT", 2),
            },
            checkpoint_interval: env.usize("MEDALLION_CHECKPOINT_INTERVAL", 1) as u64,
            time_travel: at_least_a_second(env, "MEDALLION_TIME_TRAVEL"),
            log_retention: at_least_a_second(env, "MEDALLION_LOG_RETENTION"),
            orphan_age: at_least_a_second(env, "MEDALLION_ORPHAN_AGE"),
        }
    }
}

fn at_least_a_second(env: &mut EnvReader, name: &str) -> Duration {
    let d = env.duration(name);
    if d < Duration::from_secs(1) && env.optional(name).is_some() {
        env.invalid(name, "use at least 1s");
    }
    d.max(Duration::from_secs(1))
}

/// One table a stage writes, and what maintenance does to it.
#[derive(Debug, Clone)]
pub struct MaintainedTable {
    pub table: TableRef,
    /// Merge small files (not for tables laid out by the stage itself, as
    /// Gold's one file per bucket).
    pub compact: bool,
    /// Bronze: rows whose `received_at` is older than this are expired.
    pub expire_after: Option<Duration>,
    /// Bronze is append-only unless its rows expire.
    pub append_only: Option<bool>,
}

impl MaintainedTable {
    pub fn bronze(contract: &Contract) -> Self {
        MaintainedTable {
            table: TableRef::bronze(contract.domain(), contract.name()),
            compact: true,
            expire_after: contract.bronze_retention,
            append_only: Some(contract.bronze_retention.is_none()),
        }
    }

    pub fn appended(table: TableRef) -> Self {
        MaintainedTable {
            table,
            compact: true,
            expire_after: None,
            append_only: None,
        }
    }

    pub fn rewritten(table: TableRef) -> Self {
        MaintainedTable {
            table,
            compact: false,
            expire_after: None,
            append_only: None,
        }
    }
}

/// Which tables of a product a stage writes.
pub type TablesOf = Box<dyn Fn(&Contract) -> Vec<MaintainedTable> + Send + Sync>;

/// Starts the maintenance thread (unless maintenance is off). `contracts`
/// follows the stage's spec reloads.
pub fn start(
    stage: &'static str,
    settings: MaintenanceSettings,
    lake: Lake,
    ownership: OwnershipHandle,
    contracts: watch::Receiver<Contracts>,
    tables_of: TablesOf,
    metrics: MaintenanceMetrics,
) -> std::io::Result<()> {
    let Some(interval) = settings.interval else {
        info!(stage, "table maintenance is off");
        return Ok(());
    };
    let mut m = Maintainer {
        stage,
        settings,
        lake,
        ownership,
        tables_of,
        metrics,
        last_vacuum: HashMap::new(),
    };
    std::thread::Builder::new()
        .name(format!("{stage}-maintenance"))
        .spawn(move || {
            lower_priority();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "table maintenance cannot start its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let current = contracts.borrow().clone();
                    m.cycle(&current).await;
                }
            });
        })?;
    Ok(())
}

/// Maintenance yields the CPU to the stream: nice 10 for this thread only
/// (Linux schedules threads, and `setpriority` on a thread id applies to it).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure only leaves
    // the default priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

struct Maintainer {
    stage: &'static str,
    settings: MaintenanceSettings,
    lake: Lake,
    ownership: OwnershipHandle,
    tables_of: TablesOf,
    metrics: MaintenanceMetrics,
    last_vacuum: HashMap<TableRef, Instant>,
}

impl Maintainer {
    async fn cycle(&mut self, contracts: &Contracts) {
        for ((domain, product), contract) in contracts {
            if !self.ownership.holds(&UnitId::new(domain, product, 0)) {
                continue;
            }
            for t in (self.tables_of)(contract) {
                self.table(contract, &t).await;
            }
        }
    }

    async fn table(&mut self, contract: &Contract, t: &MaintainedTable) {
        let name = t.table.to_string();
        let table = match open_table(&self.lake, &t.table).await {
            Ok(Some(table)) => table,
            Ok(None) => return,
            Err(e) => return self.failed(&name, "open", &e),
        };
        let mut table = table;
        let time_travel = contract.time_travel.unwrap_or(self.settings.time_travel);
        let properties = Properties {
            checkpoint_interval: self.settings.checkpoint_interval,
            log_retention: self.settings.log_retention.max(time_travel),
            deleted_file_retention: time_travel,
            append_only: t.append_only,
        };
        let started = Instant::now();
        match jobs::ensure_properties(&t.table, &mut table, &properties).await {
            Ok(true) => {
                info!(stage = self.stage, table = %name, checkpoint_interval = properties.checkpoint_interval, time_travel_s = time_travel.as_secs(), append_only = ?properties.append_only, "table properties set")
            }
            Ok(false) => {}
            // The other jobs do not need the properties: they go on.
            Err(e) => self.failed(&name, "properties", &e),
        }
        if let Some(age) = t.expire_after {
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            let started = Instant::now();
            match jobs::expire(&t.table, &mut table, bronze::RECEIVED_AT, cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    self.observe("expire", started);
                    self.metrics
                        .expired_files
                        .with_label_values(&[&name])
                        .inc_by(n as u64);
                    info!(stage = self.stage, table = %name, files = n, cutoff = %cutoff.to_rfc3339(), "expired old Bronze files");
                }
                Err(e) => self.failed(&name, "expire", &e),
            }
        }
        if t.compact {
            let started = Instant::now();
            match jobs::compact(&t.table, &mut table, &self.settings.compaction).await {
                Ok(c) if c.files_removed > 0 => {
                    self.observe("compact", started);
                    self.metrics
                        .compacted_files
                        .with_label_values(&[&name])
                        .inc_by(c.files_removed as u64);
                    self.metrics
                        .last_compaction
                        .with_label_values(&[&name])
                        .set(chrono::Utc::now().timestamp());
                    info!(stage = self.stage, table = %name, version = c.version, files_removed = c.files_removed, files_added = c.files_added, bytes = c.bytes_rewritten, ms = started.elapsed().as_millis() as u64, "table compacted");
                }
                Ok(_) => {}
                Err(e) => self.failed(&name, "compact", &e),
            }
        }
        let due = self
            .last_vacuum
            .get(&t.table)
            .is_none_or(|at| at.elapsed() >= self.settings.vacuum_interval);
        if due {
            self.vacuum(&t.table, &mut table, time_travel).await;
        }
        match jobs::health(&t.table, &table, &self.settings.compaction).await {
            Ok(h) => {
                let l = [name.as_str()];
                self.metrics.files.with_label_values(&l).set(h.files as i64);
                self.metrics.bytes.with_label_values(&l).set(h.bytes);
                self.metrics
                    .small_files
                    .with_label_values(&l)
                    .set(h.small_files as i64);
                self.metrics
                    .log_since_checkpoint
                    .with_label_values(&l)
                    .set(h.log_since_checkpoint);
                self.metrics
                    .unreferenced_bytes
                    .with_label_values(&l)
                    .set(h.unreferenced_bytes);
            }
            Err(e) => self.failed(&name, "health", &e),
        }
        self.observe("cycle", started);
    }

    /// Files removed longer ago than the time-travel retention, and files no
    /// version references once older than the orphan age too (younger ones
    /// may be a commit in flight).
    async fn vacuum(&mut self, tref: &TableRef, table: &mut deltalake::DeltaTable, tt: Duration) {
        let name = tref.to_string();
        let started = Instant::now();
        let orphans = tt.max(self.settings.orphan_age);
        let deleted = match jobs::vacuum(tref, table, tt, orphans).await {
            Ok(v) => v.files_deleted,
            Err(e) => return self.failed(&name, "vacuum", &e),
        };
        self.last_vacuum.insert(tref.clone(), Instant::now());
        self.observe("vacuum", started);
        self.metrics
            .last_vacuum
            .with_label_values(&[&name])
            .set(chrono::Utc::now().timestamp());
        if deleted > 0 {
            self.metrics
                .vacuumed_files
                .with_label_values(&[&name])
                .inc_by(deleted as u64);
            info!(stage = self.stage, table = %name, files = deleted, ms = started.elapsed().as_millis() as u64, "table vacuumed");
        }
    }

    fn observe(&self, job: &str, started: Instant) {
        self.metrics
            .seconds
            .with_label_values(&[job])
            .observe(started.elapsed().as_secs_f64());
    }

    fn failed(&self, table: &str, job: &str, e: &medallion_lake::LakeError) {
        self.metrics.errors.with_label_values(&[table, job]).inc();
        warn!(stage = self.stage, table, job, error = %e, "table maintenance failed; trying again next cycle");
    }
}
