//! Transform against a real nats-server, real ingest and real Delta tables.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use medallion_lake::{Lake, open_at, read_all};
use medallion_runtime::{EnvReader, Runtime};
use medallion_spec::TableRef;
use medallion_testkit::{NatsServer, eventually};

const PII_KEY: &str = "service-test-pii-key-0123456789";

fn vars(
    nats: &NatsServer,
    lake: &Path,
    products: &Path,
    addr_var: &str,
) -> BTreeMap<String, String> {
    [
        ("NATS_URL".to_string(), nats.url()),
        ("MEDALLION_LAKE".to_string(), lake.display().to_string()),
        (
            "MEDALLION_PRODUCTS".to_string(),
            products.display().to_string(),
        ),
        // No catalog in these tests: specs straight from the folder.
        ("MEDALLION_SPEC_SOURCE".to_string(), "folder".to_string()),
        ("MEDALLION_PII_KEY".to_string(), PII_KEY.to_string()),
        ("MEDALLION_BATCH_WAIT".to_string(), "50ms".to_string()),
        ("MEDALLION_RELOAD_INTERVAL".to_string(), "300ms".to_string()),
        // Port 0: the OS picks, so parallel tests never collide.
        (addr_var.to_string(), "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .collect()
}

fn init_logs() {
    medallion_runtime::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MEDALLION_LOG")
                .unwrap_or_else(|_| "warn,deltalake_core=error,buoyant_kernel=off".into()),
        )
        .with_test_writer()
        .try_init();
}

fn start_ingest(v: BTreeMap<String, String>) -> Runtime {
    let mut r = EnvReader::from_map(v);
    let c = medallion_ingest::IngestConfig::from_env(&mut r);
    r.finish().unwrap();
    let rt = Runtime::new("medallion-ingest");
    tokio::spawn(medallion_ingest::run(c, rt.clone()));
    rt
}

fn start_transform(
    v: BTreeMap<String, String>,
) -> (Runtime, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut r = EnvReader::from_map(v);
    let c = medallion_transform::TransformConfig::from_env(&mut r);
    r.finish().unwrap();
    let rt = Runtime::new("medallion-transform");
    let h = tokio::spawn(medallion_transform::run(c, rt.clone()));
    (rt, h)
}

async fn rows(lake: &Lake, t: &TableRef) -> Vec<RecordBatch> {
    match open_at(lake, t, None).await.unwrap() {
        Some(table) => read_all(t, &table).await.unwrap(),
        None => Vec::new(),
    }
}

fn count(b: &[RecordBatch]) -> usize {
    b.iter().map(|b| b.num_rows()).sum()
}

fn strings(b: &[RecordBatch], col: &str) -> Vec<String> {
    b.iter()
        .flat_map(|b| {
            let a = b.column_by_name(col).unwrap().as_string::<i32>().clone();
            (0..a.len()).map(move |i| {
                if a.is_null(i) {
                    "<null>".to_string()
                } else {
                    a.value(i).to_string()
                }
            })
        })
        .collect()
}

/// A nats-server with the streams, an empty lake and the shipped payments spec.
struct Setup {
    nats: NatsServer,
    lake_dir: tempfile::TempDir,
    products: tempfile::TempDir,
    lake: Lake,
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn setup() -> Setup {
    init_logs();
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
    Setup {
        nats,
        lake_dir,
        products,
        lake,
        client,
        js,
    }
}

fn payment(id: &str, amount: f64, currency: &str, country: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","ts":"2026-11-29T10:15:00Z","user_id":"u-{id}","amount":{amount},"currency":"{currency}","country":"{country}"}}"#
    )
}

async fn publish(js: &jetstream::Context, body: String) {
    js.publish("medallion.ingest.finance.payments", Bytes::from(body))
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silver_enforces_the_contract_end_to_end() {
    let Setup {
        nats,
        lake_dir,
        products,
        lake,
        client,
        js,
    } = setup().await;
    let mut silver_events = client
        .subscribe("medallion.silver.finance.payments")
        .await
        .unwrap();
    let mut quality_events = client
        .subscribe("medallion.quality.finance.payments")
        .await
        .unwrap();

    let ingest = start_ingest(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_INGEST_ADDR",
    ));
    let (transform, handle) = start_transform(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_TRANSFORM_ADDR",
    ));
    let silver = TableRef::silver("finance", "payments");
    let quarantine = TableRef::quarantine("finance", "payments");

    // Batch 1: 200 good rows in ndjson messages of 10, plus bad ones.
    for m in 0..20 {
        let lines: Vec<String> = (0..10)
            .map(|i| payment(&format!("e{}", m * 10 + i), 10.0, " eur", "FR"))
            .collect();
        publish(&js, lines.join("\n")).await;
    }
    publish(&js, payment("neg", -1.0, "EUR", "FR")).await;
    publish(&js, payment("cur", 5.0, "EURO", "FR")).await;
    publish(&js, "{not json".to_string()).await;
    publish(
        &js,
        r#"{"event_id":"nots","ts":"soon","amount":1,"currency":"EUR","country":"FR"}"#.to_string(),
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "200 silver rows and 4 quarantined",
        || async {
            count(&rows(&lake, &silver).await) == 200 && count(&rows(&lake, &quarantine).await) == 4
        },
    )
    .await;

    let s = rows(&lake, &silver).await;
    assert!(
        strings(&s, "currency").iter().all(|c| c == "EUR"),
        "standardized to upper"
    );
    let users = strings(&s, "user_id");
    assert!(
        users.iter().all(|u| u.len() == 64 && !u.starts_with("u-")),
        "PII hashed: {:?}",
        &users[..2]
    );
    let q = rows(&lake, &quarantine).await;
    let reasons: Vec<String> = q
        .iter()
        .flat_map(|b| {
            let errs = b.column_by_name("errors").unwrap().as_list::<i32>().clone();
            let failed = b
                .column_by_name("failed_expectations")
                .unwrap()
                .as_list::<i32>()
                .clone();
            (0..b.num_rows())
                .map(move |i| {
                    let e = errs.value(i);
                    let f = failed.value(i);
                    let mut all: Vec<String> = e
                        .as_string::<i32>()
                        .iter()
                        .flatten()
                        .map(str::to_string)
                        .collect();
                    all.extend(f.as_string::<i32>().iter().flatten().map(str::to_string));
                    all.join(";")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for want in [
        "positive_amount",
        "known_currency",
        "malformed JSON",
        "\"soon\" is not a valid timestamp",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "a quarantine reason mentions {want}: {reasons:?}"
        );
    }

    // Batch 2, a separate commit: old keys again + 5 new ones → only the new ones land.
    let lines: Vec<String> = (0..50)
        .map(|i| payment(&format!("e{i}"), 99.0, "USD", "US"))
        .chain((200..205).map(|i| payment(&format!("e{i}"), 1.0, "USD", "US")))
        .collect();
    publish(&js, lines.join("\n")).await;
    eventually(Duration::from_secs(60), "205 silver rows", || async {
        count(&rows(&lake, &silver).await) >= 205
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = rows(&lake, &silver).await;
    assert_eq!(count(&s), 205, "cross-batch duplicates dropped");
    let ids: HashSet<String> = strings(&s, "event_id").into_iter().collect();
    assert_eq!(ids.len(), 205);

    // Events: silver rows as Arrow IPC, quality counts as JSON.
    let m = tokio::time::timeout(Duration::from_secs(10), silver_events.next())
        .await
        .unwrap()
        .unwrap();
    let part =
        medallion_bus::EventPart::parse(&m.subject, m.headers.as_ref(), m.payload.clone()).unwrap();
    assert_eq!(part.table, silver);
    let (_, batches) = medallion_bus::codec::decode(&part.payload).unwrap();
    assert!(count(&batches) > 0);
    let q = tokio::time::timeout(Duration::from_secs(10), quality_events.next())
        .await
        .unwrap()
        .unwrap();
    let quality: serde_json::Value = serde_json::from_slice(&q.payload).unwrap();
    assert_eq!(quality["product"], "finance.payments");
    assert!(
        quality["counts"]["expectations"]["positive_amount"]["passed"]
            .as_u64()
            .is_some(),
        "{quality}"
    );

    // Restart transform: the dedupe state comes back (snapshot + tail), old keys stay out.
    transform.shutdown.cancel();
    handle.await.unwrap().unwrap();
    let (transform, handle) = start_transform(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_TRANSFORM_ADDR",
    ));
    publish(
        &js,
        [
            payment("e3", 1.0, "EUR", "FR"),
            payment("e999", 1.0, "EUR", "FR"),
        ]
        .join("\n"),
    )
    .await;
    eventually(Duration::from_secs(60), "206 silver rows", || async {
        count(&rows(&lake, &silver).await) >= 206
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        count(&rows(&lake, &silver).await),
        206,
        "e3 stayed deduplicated after the restart"
    );

    // Replay: a full refresh from Bronze, same rows, old versions still readable.
    let before = open_at(&lake, &silver, None)
        .await
        .unwrap()
        .unwrap()
        .version()
        .unwrap() as i64;
    let reply = client
        .request("medallion.control.replay", Bytes::from("finance.payments"))
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply.payload).to_string();
    assert!(reply.starts_with("ok:"), "{reply}");
    let after = open_at(&lake, &silver, None).await.unwrap().unwrap();
    assert!(after.version().unwrap() as i64 > before);
    assert_eq!(
        count(&read_all(&silver, &after).await.unwrap()),
        206,
        "replay rebuilds the same rows"
    );
    let old = open_at(&lake, &silver, Some(before))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        count(&read_all(&silver, &old).await.unwrap()),
        206,
        "time travel to the pre-replay version"
    );

    // Another Delta implementation reads Silver and quarantine.
    for (t, n) in [
        ("silver/finance/payments", 206),
        ("silver/finance/payments__quarantine", 4),
    ] {
        assert_eq!(
            medallion_testkit::rows_read_by_python_deltalake(&lake_dir.path().join(t)),
            n,
            "{t}"
        );
    }

    transform.shutdown.cancel();
    ingest.shutdown.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_expectation_halts_the_product_until_the_spec_changes() {
    init_logs();
    let nats = NatsServer::start();
    let lake_dir = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    let spec = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {name: ledger}
spec:
  domain: bank
  owner: t@example.com
  description: balances
  source: {format: json}
  schema:
    - {name: id, type: string, required: true}
    - {name: balance, type: int64}
  expectations:
    - {name: no_overdraft, rule: "balance >= 0", action: fail}
"#;
    std::fs::write(products.path().join("ledger.yaml"), spec).unwrap();
    let lake = Lake::from_location(&lake_dir.path().display().to_string()).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    let ingest = start_ingest(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_INGEST_ADDR",
    ));
    let (transform, handle) = start_transform(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_TRANSFORM_ADDR",
    ));
    let silver = TableRef::silver("bank", "ledger");
    let send = |b: &'static str| {
        let js = js.clone();
        async move {
            js.publish("medallion.ingest.bank.ledger", Bytes::from(b))
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    send(r#"{"id":"a","balance":1}"#).await;
    eventually(Duration::from_secs(30), "first row", || async {
        count(&rows(&lake, &silver).await) == 1
    })
    .await;
    send(r#"{"id":"b","balance":-5}"#).await;
    eventually(
        Duration::from_secs(30),
        "readiness names the failed expectation",
        || async {
            transform
                .health
                .problems()
                .values()
                .any(|p| p.contains("no_overdraft"))
        },
    )
    .await;
    send(r#"{"id":"c","balance":3}"#).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&rows(&lake, &silver).await),
        1,
        "nothing is written past the failing batch"
    );

    // The owner relaxes the rule to a warning: the product resumes where it stopped.
    std::fs::write(
        products.path().join("ledger.yaml"),
        spec.replace("action: fail", "action: warn"),
    )
    .unwrap();
    eventually(Duration::from_secs(30), "the product resumed", || async {
        count(&rows(&lake, &silver).await) == 3
    })
    .await;
    assert!(
        transform.health.is_ready(),
        "{:?}",
        transform.health.problems()
    );

    transform.shutdown.cancel();
    ingest.shutdown.cancel();
    handle.await.unwrap().unwrap();
}

/// `spec.dedupe.within`: a key re-sent within the horizon is a duplicate;
/// re-sent once the horizon (plus its quarter of slack) has passed, it is
/// new data — also for a transform restarted in between, which rebuilds
/// its keys from Silver's files and their `_ingested_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_forgotten_after_the_dedupe_horizon() {
    init_logs();
    let nats = NatsServer::start();
    let lake_dir = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../products/payments.yaml"
    ))
    .unwrap()
    .replace(
        "  key: [event_id]\n",
        "  key: [event_id]\n  dedupe: {within: 4s}\n",
    );
    assert!(spec.contains("dedupe"), "the spec fixture changed shape");
    std::fs::write(products.path().join("payments.yaml"), spec).unwrap();
    let lake = Lake::from_location(&lake_dir.path().display().to_string()).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    let v = |addr| vars(&nats, lake_dir.path(), products.path(), addr);
    let ingest = start_ingest(v("MEDALLION_INGEST_ADDR"));
    let (transform, handle) = start_transform(v("MEDALLION_TRANSFORM_ADDR"));
    let silver = TableRef::silver("finance", "payments");
    let ids = |b: &[RecordBatch]| {
        let mut v = strings(b, "event_id");
        v.sort();
        v
    };

    publish(&js, payment("a", 1.0, "EUR", "FR")).await;
    eventually(Duration::from_secs(60), "a in silver", || async {
        ids(&rows(&lake, &silver).await) == ["a"]
    })
    .await;
    // Within the horizon: a duplicate.
    publish(&js, payment("a", 2.0, "EUR", "FR")).await;
    publish(&js, payment("b", 1.0, "EUR", "FR")).await;
    eventually(Duration::from_secs(60), "b in silver", || async {
        count(&rows(&lake, &silver).await) == 2
    })
    .await;
    assert_eq!(ids(&rows(&lake, &silver).await), ["a", "b"]);

    // Past 1.25 × the horizon: `a` is new data again.
    tokio::time::sleep(Duration::from_millis(5_300)).await;
    publish(&js, payment("a", 3.0, "EUR", "FR")).await;
    eventually(Duration::from_secs(60), "a again", || async {
        count(&rows(&lake, &silver).await) == 3
    })
    .await;

    // A restart rebuilds the keys of the horizon: `b` (old) is forgotten,
    // the second `a` (recent) is remembered.
    transform.shutdown.cancel();
    handle.await.unwrap().unwrap();
    let (transform, handle) = start_transform(v("MEDALLION_TRANSFORM_ADDR"));
    publish(&js, payment("a", 4.0, "EUR", "FR")).await;
    publish(&js, payment("b", 2.0, "EUR", "FR")).await;
    eventually(Duration::from_secs(60), "b again", || async {
        count(&rows(&lake, &silver).await) == 4
    })
    .await;
    assert_eq!(ids(&rows(&lake, &silver).await), ["a", "a", "b", "b"]);
    transform.shutdown.cancel();
    handle.await.unwrap().unwrap();
    ingest.shutdown.cancel();
}

/// Keys beyond the memory budget spill to runs on local disk; a restart on
/// an empty local directory (another pod) fetches them from beside Silver
/// and still drops every duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_beyond_the_memory_budget_spill_to_disk_and_survive_a_move() {
    let Setup {
        nats,
        lake_dir,
        products,
        lake,
        js,
        ..
    } = setup().await;
    let keys_a = tempfile::tempdir().unwrap();
    let keys_b = tempfile::tempdir().unwrap();
    let v = |addr, keys: &Path| {
        let mut v = vars(&nats, lake_dir.path(), products.path(), addr);
        // The smallest budget: 896 keys in memory.
        v.insert("MEDALLION_DEDUPE_MEMORY".into(), "16384".into());
        v.insert("MEDALLION_DEDUPE_DIR".into(), keys.display().to_string());
        v
    };
    let ingest = start_ingest(v("MEDALLION_INGEST_ADDR", keys_a.path()));
    let (transform, handle) = start_transform(v("MEDALLION_TRANSFORM_ADDR", keys_a.path()));
    let silver = TableRef::silver("finance", "payments");
    let message = |ids: std::ops::Range<usize>| {
        ids.map(|i| payment(&format!("k{i}"), 1.0, "EUR", "FR"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // One commit per message: a run every second commit, merged four at a time.
    for m in 0..10 {
        publish(&js, message(m * 500..(m + 1) * 500)).await;
        eventually(
            Duration::from_secs(120),
            "the message in silver",
            || async { count(&rows(&lake, &silver).await) == (m + 1) * 500 },
        )
        .await;
    }
    let runs_on_disk = || {
        walk(keys_a.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "run"))
            .count()
    };
    assert!(runs_on_disk() > 0, "no key run spilled");
    transform.shutdown.cancel();
    handle.await.unwrap().unwrap();
    // The process's directory goes with it; the runs stay beside Silver.
    assert_eq!(runs_on_disk(), 0);
    let beside = walk(
        &lake_dir
            .path()
            .join("silver/finance/payments/_medallion/keys"),
    );
    assert!(!beside.is_empty(), "no key run uploaded");

    let (transform, handle) = start_transform(v("MEDALLION_TRANSFORM_ADDR", keys_b.path()));
    // Every 10th old key (spread over every run) and 500 new ones.
    let old: Vec<String> = (0..5_000)
        .step_by(10)
        .map(|i| payment(&format!("k{i}"), 2.0, "EUR", "FR"))
        .collect();
    publish(
        &js,
        format!("{}\n{}", old.join("\n"), message(5_000..5_500)),
    )
    .await;
    eventually(Duration::from_secs(120), "5500 rows in silver", || async {
        count(&rows(&lake, &silver).await) >= 5_500
    })
    .await;
    // Given time to (wrongly) land a duplicate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = strings(&rows(&lake, &silver).await, "event_id");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (5_500, 5_500));
    transform.shutdown.cancel();
    handle.await.unwrap().unwrap();
    ingest.shutdown.cancel();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
