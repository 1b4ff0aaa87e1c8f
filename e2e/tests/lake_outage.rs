//! Scenario 6, the lake unwritable for a while, against the real binaries.
//!
//! Tests run as root, where `chmod` stops nothing, so the outage is made the
//! way a lost mount or a broken volume looks to a writer: the directory is
//! moved away and a regular file put in its place (every write below it
//! fails with "not a directory"), then moved back. First the whole Bronze
//! layer, then the Silver table's `_delta_log`, then Gold's, each while
//! producers publish.
//!
//! Expected: the stage that cannot commit backs off, reports not-ready on
//! `/readyz` naming the lake, does not acknowledge (ingest keeps the
//! messages in its stream until they are committed), and once the lake is
//! back every layer holds every message exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use medallion_e2e::{gold_payments, metric, read_table, readyz, row_count, stop_all};
use medallion_testkit::{NatsServer, eventually};

const MESSAGES: usize = 600;
const PER_MESSAGE: usize = 5;

fn message(wave: usize, m: usize) -> Vec<u8> {
    medallion_e2e::payments_message("l", (wave * MESSAGES + m) * PER_MESSAGE, PER_MESSAGE)
}

fn produce(js: async_nats::jetstream::Context, wave: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for m in 0..MESSAGES {
            js.publish("medallion.ingest.finance.payments", message(wave, m).into())
                .await
                .unwrap()
                .await
                .unwrap();
            if m % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

/// Replaces `dir` by a regular file; returns where the directory went.
fn break_dir(dir: &Path) -> PathBuf {
    let away = dir.with_extension("away");
    std::fs::rename(dir, &away).unwrap();
    std::fs::write(dir, b"the lake is unwritable for this test").unwrap();
    away
}

fn restore_dir(dir: &Path, away: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(away, dir).unwrap();
}

async fn settle(lake: &Path, waves: usize, what: &str) {
    let want = (waves * MESSAGES * PER_MESSAGE) as i64;
    let l = lake.to_path_buf();
    eventually(Duration::from_secs(180), what, || {
        let l = l.clone();
        async move { gold_payments(&l).await == want }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_lake_delays_but_loses_and_duplicates_nothing() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let vars = medallion_e2e::lake_fault_vars(&nats.url(), lake.path());
    let ingest_addr = vars[0]["MEDALLION_INGEST_ADDR"].clone();
    let transform_addr = vars[1]["MEDALLION_TRANSFORM_ADDR"].clone();
    let aggregate_addr = vars[2]["MEDALLION_AGGREGATE_ADDR"].clone();
    let (mut services, js) =
        medallion_e2e::start_services(&medallion_e2e::PIPELINE, &vars, logs.path(), nats.url())
            .await;

    // Wave 1 with a healthy lake.
    produce(js.clone(), 0).await.unwrap();
    settle(lake.path(), 1, "wave 1 reaches gold").await;

    // Outage A: the Bronze layer directory becomes a file.
    let bronze_dir = lake.path().join("bronze");
    let away = break_dir(&bronze_dir);
    let errors_before = metric(
        &ingest_addr,
        "medallion_errors_total",
        &[("stage", "ingest"), ("kind", "commit")],
    )
    .await;
    let producer = produce(js.clone(), 1);
    eventually(
        Duration::from_secs(30),
        "ingest reports the lake on /readyz",
        || async {
            let (code, body) = readyz(&ingest_addr).await;
            code == 503 && body.contains("lake") && body.contains("bronze.finance.payments")
        },
    )
    .await;
    let outage = Duration::from_secs(5);
    tokio::time::sleep(outage).await;
    producer.await.unwrap();
    // Nothing acknowledged: every message of wave 2 is still in the stream.
    let held = js
        .get_stream("MEDALLION_INGEST")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(
        held, MESSAGES as u64,
        "ingest purged messages it could not commit"
    );
    let attempts = metric(
        &ingest_addr,
        "medallion_errors_total",
        &[("stage", "ingest"), ("kind", "commit")],
    )
    .await
        - errors_before;
    println!(
        "lake outage A (bronze layer): {attempts} commit attempts failed in {outage:?}; {held} messages held in the stream"
    );
    assert!(
        attempts >= 2.0 && attempts <= 20.0,
        "ingest retried {attempts} times in {outage:?}: it must retry, with back-off"
    );
    restore_dir(&bronze_dir, &away);
    let back = Instant::now();
    settle(lake.path(), 2, "wave 2 reaches gold after bronze is back").await;
    let recovery_a = back.elapsed();
    eventually(Duration::from_secs(30), "ingest ready again", || async {
        readyz(&ingest_addr).await.0 == 200
    })
    .await;

    // Outage B: the Silver table's log becomes a file.
    let log_dir = lake.path().join("silver/finance/payments/_delta_log");
    let away = break_dir(&log_dir);
    let producer = produce(js.clone(), 2);
    eventually(
        Duration::from_secs(30),
        "transform reports the lake on /readyz",
        || async {
            let (code, body) = readyz(&transform_addr).await;
            code == 503 && body.contains("lake finance.payments")
        },
    )
    .await;
    producer.await.unwrap();
    // The layers are independent: Bronze takes all of wave 3 meanwhile.
    eventually(
        Duration::from_secs(60),
        "bronze lands wave 3 while silver is down",
        || async {
            row_count(&read_table(lake.path(), "bronze.finance.payments").await) == 3 * MESSAGES
        },
    )
    .await;
    tokio::time::sleep(outage).await;
    let (code, _) = readyz(&transform_addr).await;
    assert_eq!(
        code, 503,
        "transform still not ready while silver is unwritable"
    );
    assert_eq!(
        gold_payments(lake.path()).await,
        (2 * MESSAGES * PER_MESSAGE) as i64,
        "nothing of wave 3 got past the unwritable silver"
    );
    restore_dir(&log_dir, &away);
    // Back-off, not a hot loop: each retry of the unwritable Silver is a log line.
    let retries = services[1]
        .logs()
        .matches("cannot open the product's tables")
        .count();
    println!("lake outage B (silver _delta_log): transform retried opening silver {retries} times");
    assert!(
        (1..=10).contains(&retries),
        "transform retried {retries} times in about {outage:?}"
    );
    let back = Instant::now();
    settle(lake.path(), 3, "wave 3 reaches gold after silver is back").await;
    let recovery_b = back.elapsed();
    eventually(Duration::from_secs(30), "transform ready again", || async {
        readyz(&transform_addr).await.0 == 200
    })
    .await;

    // Outage C: the Gold table's log becomes a file.
    let gold_log = lake
        .path()
        .join("gold/finance/revenue_by_country_hourly/_delta_log");
    let away = break_dir(&gold_log);
    let producer = produce(js.clone(), 3);
    producer.await.unwrap();
    eventually(
        Duration::from_secs(60),
        "silver lands wave 4 while gold is down",
        || async {
            row_count(&read_table(lake.path(), "silver.finance.payments").await)
                == 4 * MESSAGES * PER_MESSAGE
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "aggregate reports gold on /readyz",
        || async {
            let (code, body) = readyz(&aggregate_addr).await;
            code == 503 && body.contains("lake finance.payments")
        },
    )
    .await;
    tokio::time::sleep(outage).await;
    restore_dir(&gold_log, &away);
    let logs = services[2].logs();
    let retries = logs.matches("cannot open the product's tables").count()
        + logs
            .matches("commit failed; retrying from the tables")
            .count();
    println!("lake outage C (gold _delta_log): aggregate retried {retries} times");
    assert!(
        (1..=10).contains(&retries),
        "aggregate retried {retries} times in about {outage:?}"
    );
    let back = Instant::now();
    settle(lake.path(), 4, "wave 4 reaches gold after gold is back").await;
    let recovery_c = back.elapsed();
    eventually(Duration::from_secs(30), "aggregate ready again", || async {
        readyz(&aggregate_addr).await.0 == 200
    })
    .await;

    // Exact accounting.
    let published = 4 * MESSAGES;
    let events = published * PER_MESSAGE;
    let bronze = row_count(&read_table(lake.path(), "bronze.finance.payments").await);
    let silver = read_table(lake.path(), "silver.finance.payments").await;
    let quarantine =
        row_count(&read_table(lake.path(), "silver.finance.payments__quarantine").await);
    let mut ids = BTreeSet::new();
    let mut duplicates = 0;
    for b in &silver {
        let c = b
            .column(b.schema().index_of("event_id").unwrap())
            .as_string::<i32>();
        for i in 0..c.len() {
            if !ids.insert(c.value(i).to_string()) {
                duplicates += 1;
            }
        }
    }
    let gold = gold_payments(lake.path()).await;
    let lost = events - ids.len();
    println!(
        "lake outage: published {published} messages ({events} events); bronze {bronze}, silver {}, quarantine {quarantine}, gold payments {gold} \
         (expected {published}, {events}, 0, {events}); lost {lost}, duplicated {duplicates}; \
         recovery after the lake came back: bronze layer {:.1} s, silver log {:.1} s, gold log {:.1} s",
        row_count(&silver),
        recovery_a.as_secs_f64(),
        recovery_b.as_secs_f64(),
        recovery_c.as_secs_f64()
    );
    assert_eq!(bronze, published);
    assert_eq!(duplicates, 0);
    assert_eq!(lost, 0);
    assert_eq!(row_count(&silver), events);
    assert_eq!(quarantine, 0);
    assert_eq!(gold, events as i64);
    stop_all(&mut services);
}
