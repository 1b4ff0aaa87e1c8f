//! kill -9 of the transform binary mid-stream (once exactly between the
//! quarantine and the Silver commit): Silver and quarantine end identical to
//! what an uninterrupted run produces.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use arrow::array::AsArray;
use async_nats::jetstream;
use bytes::Bytes;
use medallion_lake::{Lake, open_at, read_all};
use medallion_runtime::{EnvReader, Runtime};
use medallion_spec::TableRef;
use medallion_testkit::{KillOnDrop, NatsServer, eventually};

fn spawn(vars: &BTreeMap<String, String>, fail_points: Option<&str>) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medallion-transform"));
    cmd.env_clear()
        .envs(vars)
        .env("MEDALLION_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(fp) = fail_points {
        cmd.env("MEDALLION_FAIL_POINTS", fp);
    }
    KillOnDrop(cmd.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silver_is_identical_after_kill_9() {
    medallion_runtime::install_crypto_provider();
    let nats = NatsServer::start();
    let lake_dir = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../products/payments.yaml"),
        products.path().join("payments.yaml"),
    )
    .unwrap();
    let lake = Lake::from_location(&lake_dir.path().display().to_string()).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    let vars: BTreeMap<String, String> = [
        ("NATS_URL", nats.url()),
        ("MEDALLION_LAKE", lake_dir.path().display().to_string()),
        ("MEDALLION_PRODUCTS", products.path().display().to_string()),
        ("MEDALLION_SPEC_SOURCE", "folder".to_string()),
        (
            "MEDALLION_PII_KEY",
            "crash-test-pii-key-0123456789".to_string(),
        ),
        ("MEDALLION_BATCH_WAIT", "20ms".to_string()),
        ("MEDALLION_BATCH_ROWS", "400".to_string()),
        ("MEDALLION_RELOAD_INTERVAL", "200ms".to_string()),
        ("MEDALLION_INGEST_ADDR", "127.0.0.1:0".to_string()),
        ("MEDALLION_TRANSFORM_ADDR", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut r = EnvReader::from_map(vars.clone());
    let ic = medallion_ingest::IngestConfig::from_env(&mut r);
    r.finish().unwrap();
    let ingest = Runtime::new("medallion-ingest");
    tokio::spawn(medallion_ingest::run(ic, ingest.clone()));

    // 4,000 events in 200 messages; 1 in 10 re-sent, 1 in 37 invalid.
    let mut expected_silver = BTreeSet::new();
    let mut seen = HashSet::new();
    let mut expected_quarantine = 0;
    let mut messages = Vec::new();
    for m in 0..200 {
        let mut lines = Vec::new();
        for k in 0..20 {
            let i = m * 20 + k;
            let id = if i % 10 == 9 { i - 1 } else { i };
            let amount = if i % 37 == 0 { -1 } else { 1 + i % 90 };
            lines.push(format!(r#"{{"event_id":"e{id}","ts":"2026-11-29T10:00:00Z","amount":{amount},"currency":"EUR","country":"FR"}}"#));
            if amount < 0 {
                expected_quarantine += 1;
            } else if seen.insert(id) {
                expected_silver.insert((format!("e{id}"), amount as i64));
            }
        }
        messages.push(lines.join("\n"));
    }

    let mut child = spawn(&vars, Some("transform.between_commits=exit"));
    for (n, body) in messages.into_iter().enumerate() {
        js.publish("medallion.ingest.finance.payments", Bytes::from(body))
            .await
            .unwrap()
            .await
            .unwrap();
        if n % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        if n == 60 || n == 130 {
            // The first life may already have exited at the fail point.
            child.kill();
            child = spawn(&vars, None);
        }
    }
    let silver = TableRef::silver("finance", "payments");
    let quarantine = TableRef::quarantine("finance", "payments");
    let rows = |t: TableRef| {
        let lake = lake.clone();
        async move {
            match open_at(&lake, &t, None).await.unwrap() {
                Some(table) => read_all(&t, &table).await.unwrap(),
                None => Vec::new(),
            }
        }
    };
    eventually(Duration::from_secs(120), "silver complete", || async {
        rows(silver.clone())
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>()
            >= expected_silver.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got = BTreeSet::new();
    let mut n = 0;
    for b in rows(silver.clone()).await {
        let ids = b
            .column_by_name("event_id")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let amounts = b
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>()
            .clone();
        for r in 0..b.num_rows() {
            n += 1;
            got.insert((ids.value(r).to_string(), amounts.value(r) as i64));
        }
    }
    assert_eq!(n, expected_silver.len(), "no silver row twice");
    assert_eq!(got, expected_silver);
    let q: usize = rows(quarantine).await.iter().map(|b| b.num_rows()).sum();
    assert_eq!(q, expected_quarantine, "quarantine rows exactly once");
    child.kill();
    ingest.shutdown.cancel();
}
