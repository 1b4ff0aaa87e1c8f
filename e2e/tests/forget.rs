//! Erasure of one data subject (`medallion forget`, asked of the catalog by
//! an admin through the CLI) against the real binaries, with compaction running (so older files hold the subject too)
//! and the transform killed twice in the middle of the erasure: once just
//! before its first rewrite commits, once after Silver is rewritten but
//! before the history is sealed; the aggregate is SIGKILLed while the
//! erasure waits for Gold.
//!
//! Expected: no layer, no old version and no file in the lake holds the
//! subject's key or raw record (every Parquet file decoded, every other file
//! read as bytes); Bronze keeps one row per message; Gold equals the
//! aggregate of everyone else; a full refresh afterwards cannot bring the
//! subject back; a record of the subject sent afterwards is new data.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use medallion_bus::erasures::{ErasureStatus, Erasures};
use medallion_e2e::{
    Service, gold_payments, payments_message, pipeline_vars, read_table, row_count, stop_all,
    unique_values,
};
use medallion_testkit::NatsServer;

const SUBJECT: &str = "subject-7f3a9c@example.org";
const KEY_PREFIX: &str = "forget-me-";
const NORMAL_MESSAGES: usize = 150;
const PER_MESSAGE: usize = 4;

fn vars(nats: &str, lake: &Path, addr: &str) -> BTreeMap<String, String> {
    let mut v = pipeline_vars(nats, lake, addr);
    for (k, val) in [
        ("MEDALLION_BATCH_ROWS", "60"),
        ("MEDALLION_ACK_WAIT", "5s"),
        ("MEDALLION_LEASE_TTL", "3s"),
        ("OTEL_SDK_DISABLED", "true"),
        ("MEDALLION_REPLICA_ID", "only"),
        // Compaction often, vacuum never within the test: older files that
        // hold the subject are the erasure's to delete.
        ("MEDALLION_MAINTENANCE_INTERVAL", "500ms"),
        ("MEDALLION_COMPACT_FANOUT", "4"),
        ("MEDALLION_TIME_TRAVEL", "1h"),
    ] {
        v.insert(k.into(), val.into());
    }
    v
}

fn subject_record(k: usize, amount: &str) -> String {
    format!(
        r#"{{"event_id":"{KEY_PREFIX}{k}","ts":"2026-11-29T10:00:00Z","user_id":"{SUBJECT}","amount":{amount},"currency":"EUR","country":"FR"}}"#
    )
}

/// Every file under the lake that still shows `needle`: Parquet files are
/// decoded (their pages are compressed) and every value searched as text;
/// any other file (log entries, checkpoints' siblings, state) as bytes.
fn files_holding(lake: &Path, needles: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![lake.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            if p.extension().is_some_and(|e| e == "parquet") {
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                    bytes::Bytes::from(bytes),
                    1024,
                )
                .unwrap();
                for b in reader {
                    let b = b.unwrap();
                    for c in b.columns() {
                        text.push_str(&values_as_text(c));
                    }
                }
            }
            if needles.iter().any(|n| text.contains(n)) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

fn values_as_text(c: &dyn Array) -> String {
    use arrow::array::StructArray;
    match c.data_type() {
        DataType::Binary => c
            .as_binary::<i32>()
            .iter()
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect(),
        DataType::Struct(_) => {
            let s: &StructArray = c.as_struct();
            s.columns().iter().map(|c| values_as_text(c)).collect()
        }
        _ => match arrow::compute::cast(c, &DataType::Utf8) {
            Ok(s) => s.as_string::<i32>().iter().flatten().collect(),
            Err(_) => format!("{c:?}"),
        },
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, services: &[Service], mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "{what} not within {timeout:?}:\n{}",
            medallion_e2e::services_logs(services)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn revenue(batches: &[arrow::array::RecordBatch]) -> f64 {
    batches
        .iter()
        .map(|b| {
            let c = b.column(b.schema().index_of("revenue").unwrap());
            let c = arrow::compute::cast(c, &DataType::Float64).unwrap();
            c.as_primitive::<Float64Type>()
                .iter()
                .flatten()
                .sum::<f64>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_is_erased_from_every_layer_and_file_across_crashes() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let v_ingest = vars(&nats.url(), lake.path(), "MEDALLION_INGEST_ADDR");
    let v_transform = vars(&nats.url(), lake.path(), "MEDALLION_TRANSFORM_ADDR");
    let v_aggregate = vars(&nats.url(), lake.path(), "MEDALLION_AGGREGATE_ADDR");
    let transform_failing = |point: &str, log: &str| {
        let mut v = v_transform.clone();
        v.insert("MEDALLION_FAIL_POINTS".into(), format!("{point}=exit"));
        Service::start_named("medallion-transform", log, &v, logs.path())
    };
    let mut v_catalog = vars(&nats.url(), lake.path(), "MEDALLION_CATALOG_ADDR");
    v_catalog.insert("MEDALLION_JWT_SECRET".into(), JWT_SECRET.into());
    let catalog = format!("http://{}", v_catalog["MEDALLION_CATALOG_ADDR"]);
    let mut services = vec![
        Service::start("medallion-ingest", &v_ingest, logs.path()),
        transform_failing("lake.erase.before_commit", "transform-1"),
        Service::start_named(
            "medallion-aggregate",
            "aggregate-1",
            &v_aggregate,
            logs.path(),
        ),
        Service::start("medallion-catalog", &v_catalog, logs.path()),
    ];
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());

    // Everyone else's events, and the subject's: two records in each of 20
    // messages shared with someone else, 10 messages of the subject alone,
    // and one record of theirs the contract rejects (to quarantine).
    let subject = "medallion.ingest.finance.payments";
    let publish = |id: String, body: Vec<u8>| {
        let js = js.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            medallion_e2e::publish_until_stored(&js, subject, h, body).await;
        }
    };
    let mut messages = 0;
    let mut others = 0;
    let mut other_revenue = 0.0;
    for m in 0..NORMAL_MESSAGES {
        publish(
            format!("n{m}"),
            payments_message("e", m * PER_MESSAGE, PER_MESSAGE),
        )
        .await;
        for i in m * PER_MESSAGE..(m + 1) * PER_MESSAGE {
            other_revenue += (i % 30 + 1) as f64;
        }
        messages += 1;
        others += PER_MESSAGE;
        if m % 5 == 0 && m / 5 < 20 {
            let k = m / 5;
            let body = format!(
                "{}\n{}\n{}",
                subject_record(2 * k, "5"),
                String::from_utf8(payments_message("s", 2 * k, 2)).unwrap(),
                subject_record(2 * k + 1, "7"),
            );
            publish(format!("shared{k}"), body.into_bytes()).await;
            for i in 2 * k..2 * k + 2 {
                other_revenue += (i % 30 + 1) as f64;
            }
            messages += 1;
            others += 2;
        }
        if m % 15 == 0 {
            let k = 100 + m / 15;
            publish(format!("alone{k}"), subject_record(k, "9").into_bytes()).await;
            messages += 1;
        }
    }
    publish("bad".into(), subject_record(999, "\"lots\"").into_bytes()).await;
    messages += 1;
    let subject_rows = 20 * 2 + 10;

    let l = lake.path().to_path_buf();
    wait_for(
        "everything in Silver and Gold",
        Duration::from_secs(120),
        &services,
        || {
            let l = l.clone();
            async move {
                row_count(&read_table(&l, "silver.finance.payments").await) == others + subject_rows
                    && gold_payments(&l).await == (others + subject_rows) as i64
            }
        },
    )
    .await;
    assert!(
        !files_holding(lake.path(), &[SUBJECT]).is_empty(),
        "the subject is in the lake before the erasure"
    );

    // An admin asks through the CLI, which waits for the outcome while the
    // stages die around the erasure.
    let admin = medallion_e2e::hs256(
        JWT_SECRET,
        &serde_json::json!({"sub": "dpo", "roles": ["admin"], "exp": 4_102_444_800u64}),
    );
    let cli = std::process::Command::new(medallion_e2e::binary("medallion"))
        .args(["forget", "finance.payments", "--subject"])
        .arg(format!("user_id={SUBJECT}"))
        .args(["--catalog", &catalog, "--token", &admin, "--wait", "240"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cli = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap());

    // Dies as its Bronze rewrite is about to commit.
    assert!(
        services[1].wait_exit(Duration::from_secs(60)).is_some(),
        "transform did not reach the erasure commit:\n{}",
        services[1].logs()
    );
    // The aggregate dies too; the erasure waits for Gold while it is down.
    services[2].kill();
    services[1] = transform_failing("transform.forget.before_history", "transform-2");
    tokio::time::sleep(Duration::from_secs(4)).await;
    services[2] = Service::start_named(
        "medallion-aggregate",
        "aggregate-2",
        &v_aggregate,
        logs.path(),
    );
    assert!(
        services[1].wait_exit(Duration::from_secs(90)).is_some(),
        "transform did not reach the history step:\n{}",
        medallion_e2e::services_logs(&services)
    );
    services[1] = Service::start_named(
        "medallion-transform",
        "transform-3",
        &v_transform,
        logs.path(),
    );

    let out = cli.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "medallion forget failed: {stderr}\n{}",
        medallion_e2e::services_logs(&services)
    );
    let outcome: medallion_bus::erasures::ErasureOutcome =
        serde_json::from_slice(&out.stdout).expect("the outcome as JSON on stdout");
    let streams = medallion_bus::StreamSettings {
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        event_max_age: Duration::from_secs(3600),
        ingest_max_bytes: -1,
    };
    let erasures = Erasures::open(&js, &streams).await.unwrap();
    let all = erasures.list(None).await.unwrap();
    assert_eq!(all.len(), 1);
    let done = all[0].1.clone();
    assert_eq!(done.status, ErasureStatus::Done);
    assert_eq!(done.outcome.as_ref(), Some(&outcome));
    assert_eq!(done.value, None, "a finished request keeps no value");
    assert_eq!(
        outcome.rows_removed.get("bronze"),
        Some(&(subject_rows as u64 + 1)),
        "{outcome:?}"
    );
    assert_eq!(
        outcome.rows_removed.get("quarantine"),
        Some(&1),
        "{outcome:?}"
    );
    assert!(
        outcome.files_deleted > 0 && outcome.log_entries_deleted > 0,
        "{outcome:?}"
    );

    // Every layer: Bronze keeps a row per message, the others lose the rows.
    let bronze = read_table(lake.path(), "bronze.finance.payments").await;
    assert_eq!(row_count(&bronze), messages);
    let silver = read_table(lake.path(), "silver.finance.payments").await;
    let ids = unique_values(&silver, "event_id");
    assert_eq!(ids.len(), others);
    assert!(!ids.iter().any(|i| i.starts_with(KEY_PREFIX)));
    let gold = read_table(lake.path(), "gold.finance.revenue_by_country_hourly").await;
    assert_eq!(gold_payments(lake.path()).await, others as i64);
    assert!(
        (revenue(&gold) - other_revenue).abs() < 1e-6,
        "gold revenue {} vs {other_revenue}",
        revenue(&gold)
    );
    // No file, current or old, and no log entry holds the subject.
    let left = files_holding(lake.path(), &[SUBJECT, KEY_PREFIX]);
    assert!(
        left.is_empty(),
        "files still holding the subject: {left:#?}"
    );
    // Time travel cannot go back before the erasure.
    let l = medallion_lake::Lake::from_location(&lake.path().display().to_string()).unwrap();
    let silver_ref = medallion_spec::TableRef::parse("silver.finance.payments").unwrap();
    assert!(
        medallion_lake::open_at(&l, &silver_ref, Some(1))
            .await
            .is_err(),
        "version 1 of Silver still readable"
    );

    // A full refresh from Bronze cannot bring the subject back, and the
    // emptied messages are not quarantined as empty.
    let quarantined =
        row_count(&read_table(lake.path(), "silver.finance.payments__quarantine").await);
    let reply = client
        .request(
            medallion_bus::streams::REPLAY_SUBJECT,
            "finance.payments".into(),
        )
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply.payload).into_owned();
    assert!(!reply.starts_with("error"), "{reply}");
    let l = lake.path().to_path_buf();
    wait_for(
        "the full refresh",
        Duration::from_secs(90),
        &services,
        || {
            let l = l.clone();
            async move {
                row_count(&read_table(&l, "silver.finance.payments").await) == others
                    && gold_payments(&l).await == others as i64
            }
        },
    )
    .await;
    let silver = read_table(lake.path(), "silver.finance.payments").await;
    assert!(
        !unique_values(&silver, "event_id")
            .iter()
            .any(|i| i.starts_with(KEY_PREFIX))
    );
    assert_eq!(
        row_count(&read_table(lake.path(), "silver.finance.payments__quarantine").await),
        quarantined
    );

    // The subject's key was forgotten: the same record sent again is new.
    publish("again".into(), subject_record(1, "5").into_bytes()).await;
    let l = lake.path().to_path_buf();
    wait_for(
        "the new record in Silver",
        Duration::from_secs(60),
        &services,
        || {
            let l = l.clone();
            async move { row_count(&read_table(&l, "silver.finance.payments").await) == others + 1 }
        },
    )
    .await;
    // The audit log names who erased what and when, never the subject.
    let (status, audit) = medallion_e2e::http_get(
        &format!("{catalog}/v1/audit?product=finance.payments"),
        Some(&admin),
    )
    .await
    .expect("the catalog answers");
    assert_eq!(status, 200, "{audit}");
    assert!(
        audit.contains("\"forget\"") && audit.contains("\"dpo\""),
        "{audit}"
    );
    assert!(!audit.contains(SUBJECT), "{audit}");
    stop_all(&mut services);
}

const JWT_SECRET: &str = "e2e-forget-test-secret-0123456789";
