//! Ingest against a real nats-server and real Delta tables in temp dirs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use medallion_bus::{EventPart, assemble};
use medallion_ingest::IngestConfig;
use medallion_lake::{Lake, open_at, read_all};
use medallion_runtime::{EnvReader, Runtime};
use medallion_spec::TableRef;
use medallion_testkit::{KillOnDrop, NatsServer, eventually};

fn env(
    nats: &NatsServer,
    lake: &std::path::Path,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [
        ("NATS_URL", nats.url()),
        ("MEDALLION_LAKE", lake.display().to_string()),
        ("MEDALLION_INGEST_ADDR", "127.0.0.1:0".to_string()),
        ("MEDALLION_BATCH_WAIT", "100ms".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

fn start_in_process(
    vars: BTreeMap<String, String>,
) -> (Runtime, tokio::task::JoinHandle<anyhow::Result<()>>) {
    medallion_runtime::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MEDALLION_LOG")
                .unwrap_or_else(|_| "warn,deltalake_core=error,buoyant_kernel=off".into()),
        )
        .with_test_writer()
        .try_init();
    let mut reader = EnvReader::from_map(vars);
    let config = IngestConfig::from_env(&mut reader);
    reader.finish().expect("valid test configuration");
    let rt = Runtime::new("medallion-ingest");
    let handle = tokio::spawn(medallion_ingest::run(config, rt.clone()));
    (rt, handle)
}

/// `(stream_seq, payload, msg_id)` of every Bronze row.
async fn bronze_rows(lake: &Lake, tref: &TableRef) -> Vec<(i64, Vec<u8>, Option<String>)> {
    let Some(table) = open_at(lake, tref, None).await.expect("open bronze") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for b in read_all(tref, &table).await.expect("read bronze") {
        out.extend(rows_of(&b));
    }
    out
}

fn rows_of(b: &RecordBatch) -> Vec<(i64, Vec<u8>, Option<String>)> {
    let seq = b
        .column_by_name("stream_seq")
        .unwrap()
        .as_primitive::<Int64Type>();
    let payload = b.column_by_name("payload").unwrap().as_binary::<i32>();
    let msg_id = b.column_by_name("msg_id").unwrap().as_string::<i32>();
    (0..b.num_rows())
        .map(|i| {
            (
                seq.value(i),
                payload.value(i).to_vec(),
                (!msg_id.is_null(i)).then(|| msg_id.value(i).to_string()),
            )
        })
        .collect()
}

async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>, msg_id: Option<&str>) {
    let mut h = HeaderMap::new();
    if let Some(id) = msg_id {
        h.insert("Nats-Msg-Id", id);
    }
    // Publishers retry until the stream stores the message: the bus may be
    // briefly unavailable while ingest restarts.
    loop {
        match js
            .publish_with_headers(subject.to_string(), h.clone(), Bytes::from(payload.clone()))
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn declare(nats: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    (client, js)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lands_every_message_once_with_bytes_untouched() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(&dir.path().display().to_string()).unwrap();
    let (client, js) = declare(&nats).await;

    // Listen to the Bronze events before anything is published.
    let mut events = client.subscribe("medallion.bronze.>").await.unwrap();

    let (rt, handle) = start_in_process(env(&nats, dir.path(), &[]));

    let orders = TableRef::bronze("shop", "orders");
    let clicks = TableRef::bronze("web", "clicks");
    let mut expected: HashMap<TableRef, Vec<Vec<u8>>> = HashMap::new();
    for i in 0..10_000u32 {
        let (subject, tref) = if i % 3 == 0 {
            ("medallion.ingest.web.clicks", clicks.clone())
        } else {
            ("medallion.ingest.shop.orders", orders.clone())
        };
        let payload = format!("{{\"i\":{i}}}\n").into_bytes();
        publish(&js, subject, payload.clone(), Some(&format!("m-{i}"))).await;
        expected.entry(tref).or_default().push(payload);
    }
    // 500 re-sends of already-published ids (a producer retrying): JetStream's
    // duplicate window drops them.
    for i in (0..1000u32).step_by(2) {
        let subject = if i % 3 == 0 {
            "medallion.ingest.web.clicks"
        } else {
            "medallion.ingest.shop.orders"
        };
        publish(
            &js,
            subject,
            format!("{{\"i\":{i}}}\n").into_bytes(),
            Some(&format!("m-{i}")),
        )
        .await;
    }
    // Payloads Bronze must keep byte for byte, whatever they are.
    let odd: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00, 0x80, b'\n'],
        Vec::new(),
        (0..900 * 1024).map(|i| (i % 251) as u8).collect(),
    ];
    for p in &odd {
        publish(&js, "medallion.ingest.shop.orders", p.clone(), None).await;
        expected.get_mut(&orders).unwrap().push(p.clone());
    }
    // A subject that names no valid product goes to the dead-letter stream.
    publish(&js, "medallion.ingest.Shop.Orders", b"{}".to_vec(), None).await;

    for (tref, want) in &expected {
        let n = want.len();
        eventually(
            Duration::from_secs(120),
            &format!("{n} rows in {tref}"),
            || async { bronze_rows(&lake, tref).await.len() >= n },
        )
        .await;
    }
    for (tref, want) in &expected {
        let rows = bronze_rows(&lake, tref).await;
        assert_eq!(
            rows.len(),
            want.len(),
            "{tref}: exactly the published messages"
        );
        let seqs: HashSet<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(seqs.len(), rows.len(), "{tref}: no stream sequence twice");
        let mut got: Vec<Vec<u8>> = rows.into_iter().map(|r| r.1).collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        assert!(
            got == want,
            "{tref}: payload bytes differ from what was published"
        );
    }

    // The stream was purged up to what Bronze holds (the acknowledgement).
    eventually(Duration::from_secs(10), "ingest stream drained", || {
        let js = js.clone();
        async move {
            match js.get_stream("MEDALLION_INGEST").await {
                Ok(mut s) => s
                    .info()
                    .await
                    .map(|i| i.state.messages == 0)
                    .unwrap_or(false),
                Err(_) => false,
            }
        }
    })
    .await;

    // The dead-lettered message keeps its payload and says why.
    let dlq = js.get_stream("MEDALLION_DLQ").await.unwrap();
    let msg = dlq
        .get_last_raw_message_by_subject("medallion.dlq.ingest")
        .await
        .unwrap();
    assert_eq!(&msg.payload[..], b"{}");
    let reason = msg
        .headers
        .get("Medallion-Dlq-Reason")
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("medallion.ingest.<domain>.<product>"),
        "reason: {reason}"
    );

    // Bronze events carry exactly the committed rows as Arrow IPC.
    let mut parts = Vec::new();
    let mut seen_rows = 0usize;
    let total: usize = expected.values().map(Vec::len).sum();
    while seen_rows < total {
        let m = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("bronze events keep coming")
            .unwrap();
        assert!(
            m.payload.len() <= client.server_info().max_payload,
            "event fits max_payload"
        );
        let part = EventPart::parse(&m.subject, m.headers.as_ref(), m.payload.clone())
            .expect("well-formed event");
        parts.push(part);
        let assembled = assemble(parts.clone());
        seen_rows = assembled
            .values()
            .flat_map(|v| v.values())
            .filter_map(|c| c.batches.as_ref())
            .flatten()
            .map(|b| b.num_rows())
            .sum();
    }
    let assembled = assemble(parts);
    for (tref, commits) in &assembled {
        let table = open_at(&lake, tref, None).await.unwrap().unwrap();
        for (version, c) in commits {
            let from_event: Vec<_> = c
                .batches
                .as_ref()
                .unwrap()
                .iter()
                .flat_map(rows_of)
                .collect();
            let rows = medallion_lake::read_commit(tref, &table, *version)
                .await
                .unwrap()
                .unwrap();
            let from_table: Vec<_> = rows.batches.iter().flat_map(rows_of).collect();
            assert_eq!(
                from_event, from_table,
                "{tref}@{version}: event rows == committed rows"
            );
        }
    }

    // Another Delta implementation reads the same rows.
    let n =
        medallion_testkit::rows_read_by_python_deltalake(&dir.path().join("bronze/shop/orders"));
    assert_eq!(n, expected[&orders].len());

    rt.shutdown.cancel();
    handle.await.unwrap().unwrap();
}

fn spawn_binary(vars: &BTreeMap<String, String>, fail_points: Option<&str>) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medallion-ingest"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars)
        .env("MEDALLION_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(fp) = fail_points {
        cmd.env("MEDALLION_FAIL_POINTS", fp);
    }
    KillOnDrop(cmd.spawn().expect("start medallion-ingest"))
}

/// Kills ingest with SIGKILL at arbitrary points (and once exactly between a
/// Delta commit and the purge) while 50k messages stream in: Bronze must end
/// with every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_kill_9_without_loss_or_duplicates() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(&dir.path().display().to_string()).unwrap();
    let (_client, js) = declare(&nats).await;
    let vars = env(&nats, dir.path(), &[("MEDALLION_BATCH_ROWS", "700")]);
    const N: u32 = 50_000;

    let producer = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..N {
                publish(
                    &js,
                    "medallion.ingest.shop.orders",
                    format!("{{\"i\":{i}}}").into_bytes(),
                    None,
                )
                .await;
            }
        })
    };
    let tref = TableRef::bronze("shop", "orders");

    // First life ends exactly between a commit and its purge.
    let mut child = spawn_binary(&vars, Some("ingest.after_commit=exit"));
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "the fail point ended the first run");
    assert!(
        !bronze_rows(&lake, &tref).await.is_empty(),
        "the first run committed before exiting"
    );

    // Then SIGKILL at arbitrary moments.
    for round in 0..4u64 {
        let mut child = spawn_binary(&vars, None);
        tokio::time::sleep(Duration::from_millis(700 + round * 450)).await;
        child.kill();
    }
    let mut child = spawn_binary(&vars, None);
    producer.await.unwrap();
    eventually(
        Duration::from_secs(180),
        "all messages in bronze",
        || async { bronze_rows(&lake, &tref).await.len() >= N as usize },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = bronze_rows(&lake, &tref).await;
    child.kill();

    let mut seen = HashSet::new();
    for (seq, payload, _) in &rows {
        assert!(seen.insert(*seq), "stream sequence {seq} landed twice");
        let text = String::from_utf8(payload.clone()).unwrap();
        assert!(text.starts_with("{\"i\":"), "payload intact: {text}");
    }
    let ids: HashSet<String> = rows
        .iter()
        .map(|r| String::from_utf8(r.1.clone()).unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        N as usize,
        "every published message exactly once"
    );
    assert_eq!(rows.len(), N as usize);
}

#[test]
fn bad_configuration_is_reported_all_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_medallion-ingest"))
        .env_clear()
        .env("MEDALLION_BATCH_ROWS", "lots")
        .env("MEDALLION_BATCH_WAIT", "soon")
        .env("MEDALLION_LAKE_DIR", "/tmp/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "MEDALLION_BATCH_ROWS",
        "MEDALLION_BATCH_WAIT",
        "MEDALLION_LAKE_DIR",
    ] {
        assert!(err.contains(needle), "error names {needle}: {err}");
    }
}

#[test]
fn unreachable_nats_and_unwritable_lake_are_one_line_errors() {
    let run = |vars: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_medallion-ingest"))
            .env_clear()
            .env("MEDALLION_INGEST_ADDR", "127.0.0.1:0")
            .env("MEDALLION_LOG_FORMAT", "text")
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let first = err.lines().next().unwrap_or_default().to_string();
        assert!(!err.contains("panicked"), "{err}");
        first
    };
    let lake = tempfile::tempdir().unwrap();
    let first = run(&[
        ("NATS_URL", "nats://127.0.0.1:1"),
        ("MEDALLION_LAKE", &lake.path().display().to_string()),
    ]);
    assert!(
        first.contains("cannot connect to NATS at nats://127.0.0.1:1")
            && first.contains("NATS_URL"),
        "{first}"
    );
    let first = run(&[
        ("NATS_URL", "nats://127.0.0.1:1"),
        ("MEDALLION_LAKE", "/proc/medallion-lake"),
    ]);
    assert!(
        first.contains("MEDALLION_LAKE") && first.contains("writable directory"),
        "{first}"
    );
}
