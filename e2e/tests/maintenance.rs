//! Table maintenance against the real binaries: a stream of many small
//! commits with compaction, checkpoints and vacuum running every few hundred
//! milliseconds, ingest and transform crashing exactly between writing a
//! compacted file and committing it, and SIGKILLs at random moments (in the
//! middle of maintenance jobs, which run continuously here).
//!
//! Expected: every layer exact (Bronze every message once, Silver every event
//! once, Gold the aggregate of the input); the file count of every table
//! bounded while its version count grows; the crash leftovers and the files
//! compaction and Gold merges replaced deleted once the retention passes;
//! checkpoints written and old log entries removed; another Delta reader
//! (Python `deltalake`) reads every layer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use medallion_e2e::{
    Service, gold_payments, payments_message, pipeline_vars, read_table, row_count, stop_all,
};
use medallion_lake::maintenance::{Compaction, TableHealth, health};
use medallion_testkit::{NatsServer, rows_read_by_python_deltalake};

const MESSAGES: usize = 2_000;
const PER_MESSAGE: usize = 4;

const NAMES: [&str; 3] = [
    "medallion-ingest",
    "medallion-transform",
    "medallion-aggregate",
];
const ADDRS: [&str; 3] = [
    "MEDALLION_INGEST_ADDR",
    "MEDALLION_TRANSFORM_ADDR",
    "MEDALLION_AGGREGATE_ADDR",
];

const COMPACTION: Compaction = Compaction {
    target_file_size: 8 << 20,
    fanout: 4,
};

fn vars(nats: &str, lake: &Path, i: usize) -> BTreeMap<String, String> {
    let mut v = pipeline_vars(nats, lake, ADDRS[i]);
    for (k, val) in [
        // Small commits, many of them.
        ("MEDALLION_BATCH_ROWS", "40"),
        ("MEDALLION_BATCH_WAIT", "20ms"),
        ("MEDALLION_ACK_WAIT", "5s"),
        ("MEDALLION_LEASE_TTL", "3s"),
        ("OTEL_SDK_DISABLED", "true"),
        // Maintenance far more often than in production.
        ("MEDALLION_MAINTENANCE_INTERVAL", "300ms"),
        ("MEDALLION_VACUUM_INTERVAL", "1s"),
        ("MEDALLION_COMPACT_TARGET_BYTES", "8388608"),
        ("MEDALLION_COMPACT_FANOUT", "4"),
        ("MEDALLION_CHECKPOINT_INTERVAL", "10"),
        ("MEDALLION_TIME_TRAVEL", "4s"),
        // Longer than any stage falls behind here: a consumer reads commits
        // by their log entries.
        ("MEDALLION_LOG_RETENTION", "8s"),
        ("MEDALLION_ORPHAN_AGE", "4s"),
    ] {
        v.insert(k.into(), val.into());
    }
    v
}

async fn table_health(lake: &Path, name: &str) -> Option<TableHealth> {
    let l = medallion_lake::Lake::from_location(&lake.display().to_string()).unwrap();
    let t = medallion_spec::TableRef::parse(name).unwrap();
    let table = medallion_lake::open_table(&l, &t).await.ok()??;
    health(&t, &table, &COMPACTION).await.ok()
}

const TABLES: [&str; 4] = [
    "bronze.finance.payments",
    "silver.finance.payments",
    "silver.finance.payments__quarantine",
    "gold.finance.revenue_by_country_hourly",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_stay_small_and_exact_under_crashes_in_maintenance() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let start = |i: usize, fail: bool| {
        let mut v = vars(&nats.url(), lake.path(), i);
        if fail {
            // Exit (as kill -9 would) right after writing the first
            // compacted files, before committing them.
            v.insert(
                "MEDALLION_FAIL_POINTS".into(),
                "lake.compact.before_commit=exit".into(),
            );
        }
        Service::start(NAMES[i], &v, logs.path())
    };
    let mut services: Vec<Service> = vec![start(0, true), start(1, true), start(2, false)];

    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for m in 0..MESSAGES {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("m{m}").as_str());
            medallion_e2e::publish_until_stored(
                &js,
                "medallion.ingest.finance.payments",
                h,
                payments_message("e", m * PER_MESSAGE, PER_MESSAGE),
            )
            .await;
            // A steady trickle: ~150 messages a second, one small commit each batch.
            if m % 15 == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // The first compaction of ingest and of the transform dies before its
    // commit; they come back without the fault.
    let mut crashed = [false; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !crashed.iter().all(|c| *c) {
        for i in 0..2 {
            if !crashed[i] && !services[i].is_running() {
                assert!(
                    services[i]
                        .logs()
                        .contains("fail point lake.compact.before_commit"),
                    "{} stopped for another reason:\n{}",
                    NAMES[i],
                    services[i].logs()
                );
                eprintln!(
                    "{} crashed mid-compaction at {:.1}s",
                    NAMES[i],
                    started.elapsed().as_secs_f64()
                );
                crashed[i] = true;
                services[i] = start(i, false);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no compaction within 60 s:\n{}",
            medallion_e2e::services_logs(&services)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGKILL at arbitrary moments while maintenance runs continuously.
    for (round, i) in [2, 1, 0, 2].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(1_700 + 300 * round as u64)).await;
        eprintln!(
            "kill -9 {} at {:.1}s",
            NAMES[i],
            started.elapsed().as_secs_f64()
        );
        services[i].kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        services[i] = start(i, false);
    }
    producer.await.unwrap();
    eprintln!(
        "published {MESSAGES} messages in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Exact, every layer.
    let events = MESSAGES * PER_MESSAGE;
    let deadline = Instant::now() + Duration::from_secs(120);
    while gold_payments(lake.path()).await != events as i64
        || row_count(&read_table(lake.path(), "bronze.finance.payments").await) != MESSAGES
    {
        assert!(
            Instant::now() < deadline,
            "the lake did not settle: bronze {} of {MESSAGES}, gold {} of {events}\n{}",
            row_count(&read_table(lake.path(), "bronze.finance.payments").await),
            gold_payments(lake.path()).await,
            medallion_e2e::services_logs(&services)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let silver = read_table(lake.path(), "silver.finance.payments").await;
    let ids = medallion_e2e::unique_values(&silver, "event_id");
    assert_eq!(ids.len(), events, "silver: each event exactly once");
    assert_eq!(
        row_count(&read_table(lake.path(), "bronze.finance.payments").await),
        MESSAGES,
        "bronze: each message once"
    );
    assert_eq!(gold_payments(lake.path()).await, events as i64);

    // Bounded: once the last maintenance cycles ran, every table is a few
    // files however many commits it took, nothing unreferenced is left
    // (crash leftovers, merged-away files and replaced Gold buckets are
    // past the retention), a checkpoint is recent and old log entries are gone.
    let logs_of = || medallion_e2e::services_logs(&services);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut settled = true;
        let mut report = Vec::new();
        for name in TABLES {
            let Some(h) = table_health(lake.path(), name).await else {
                continue;
            };
            // Gold: one file per group bucket (9 groups here); the others
            // fewer than `fanout` files per size class.
            let bound = if name.starts_with("gold") {
                9
            } else {
                2 * COMPACTION.fanout
            };
            settled &= h.files <= bound
                && h.unreferenced_files == 0
                && (h.version < 10 || h.checkpoint_version.is_some())
                && h.log_since_checkpoint <= 12;
            report.push(format!("{name}: {h:?}"));
        }
        if settled {
            for r in &report {
                eprintln!("{r}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tables did not settle within 60 s after the stream:\n{}\n{}",
            report.join("\n"),
            logs_of()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for name in ["bronze.finance.payments", "silver.finance.payments"] {
        let h = table_health(lake.path(), name).await.unwrap();
        assert!(
            h.version >= 100,
            "{name}: only {} commits, the test needs many",
            h.version
        );
        let first_entry = lake
            .path()
            .join(name.replace('.', "/"))
            .join("_delta_log/00000000000000000000.json");
        assert!(
            !first_entry.exists(),
            "{name}: log entries older than the log retention are still there"
        );
    }
    for (i, n) in NAMES.iter().enumerate().take(2) {
        assert!(
            services[i].logs().contains("table compacted"),
            "{n} never compacted:\n{}",
            services[i].logs()
        );
    }
    assert!(
        services[2].logs().contains("table vacuumed"),
        "aggregate never vacuumed Gold"
    );
    // Another Delta implementation reads the maintained tables.
    let dir = |t: &str| lake.path().join(t.replace('.', "/"));
    assert_eq!(
        rows_read_by_python_deltalake(&dir("bronze.finance.payments")),
        MESSAGES
    );
    assert_eq!(
        rows_read_by_python_deltalake(&dir("silver.finance.payments")),
        events
    );
    stop_all(&mut services);
}
