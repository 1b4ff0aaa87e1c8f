//! The whole pipeline against a real nats-server: producers → ingest →
//! transform → aggregate (the real binary, killed with SIGKILL mid-stream) →
//! Gold equals the aggregate computed independently from the input.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use async_nats::jetstream;
use bytes::Bytes;
use medallion_lake::{Lake, open_at, read_all};
use medallion_runtime::{EnvReader, Runtime};
use medallion_spec::TableRef;
use medallion_testkit::{KillOnDrop, NatsServer, eventually};

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
        (
            "MEDALLION_PII_KEY".to_string(),
            "pipeline-test-pii-key-0123456789".to_string(),
        ),
        ("MEDALLION_BATCH_WAIT".to_string(), "50ms".to_string()),
        ("MEDALLION_RELOAD_INTERVAL".to_string(), "300ms".to_string()),
        // Port 0: the OS picks, so parallel tests never collide.
        (addr_var.to_string(), "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .collect()
}

fn spawn_aggregate(v: &BTreeMap<String, String>) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_medallion-aggregate"))
            .env_clear()
            .envs(v)
            .env_remove("MEDALLION_PII_KEY")
            .env("MEDALLION_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `(id, hour, amount, currency, country)`: the input, with re-sends and bad rows.
fn events() -> Vec<(String, i64, f64, &'static str, Option<&'static str>)> {
    let countries = [Some("FR"), Some("DE"), Some("US"), None];
    let mut out = Vec::new();
    for i in 0..3000i64 {
        let amount = if i % 97 == 0 {
            -1.0
        } else {
            (i % 40) as f64 * 0.25 + 1.0
        };
        let currency = if i % 113 == 0 { "euro" } else { "eur" };
        out.push((
            format!("p{i}"),
            i % 5,
            amount,
            currency,
            countries[(i % 7 % 4) as usize],
        ));
        if i % 10 == 0 {
            out.push(out.last().unwrap().clone());
        }
    }
    out
}

fn expected() -> BTreeMap<(String, i64), (i64, f64)> {
    expected_of(events(), 0.0)
}

/// The Gold rows of `evs` under the product's query plus `WHERE amount >= min_amount`.
fn expected_of(
    evs: Vec<(String, i64, f64, &'static str, Option<&'static str>)>,
    min_amount: f64,
) -> BTreeMap<(String, i64), (i64, f64)> {
    let mut seen = HashSet::new();
    let mut gold = BTreeMap::new();
    for (id, hour, amount, currency, country) in evs {
        let valid = amount > 0.0
            && amount >= min_amount
            && currency.trim().to_uppercase().len() == 3
            && country.is_some();
        if !valid || !seen.insert(id) {
            continue;
        }
        let e = gold
            .entry((country.unwrap().to_string(), hour))
            .or_insert((0, 0.0));
        e.0 += 1;
        e.1 += amount;
    }
    gold
}

async fn gold_rows(lake: &Lake, t: &TableRef) -> BTreeMap<(String, i64), (i64, f64)> {
    let Some(table) = open_at(lake, t, None).await.unwrap() else {
        return BTreeMap::new();
    };
    let batches: Vec<RecordBatch> = read_all(t, &table).await.unwrap();
    let mut out = BTreeMap::new();
    for b in &batches {
        let country = b
            .column_by_name("country")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let hour = b
            .column_by_name("hour")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>()
            .clone();
        let n = b
            .column_by_name("payments")
            .unwrap()
            .as_primitive::<Int64Type>()
            .clone();
        let rev = b
            .column_by_name("revenue")
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone();
        for r in 0..b.num_rows() {
            let h = (hour.value(r) - 1_796_083_200_000_000) / 3_600_000_000;
            let key = (country.value(r).to_string(), h);
            assert!(
                out.insert(
                    key,
                    (n.value(r), if rev.is_null(r) { 0.0 } else { rev.value(r) })
                )
                .is_none(),
                "one row per group"
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gold_equals_an_independent_aggregate_after_kill_9() {
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

    let mut r = EnvReader::from_map(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_INGEST_ADDR",
    ));
    let ic = medallion_ingest::IngestConfig::from_env(&mut r);
    r.finish().unwrap();
    let ingest = Runtime::new("medallion-ingest");
    tokio::spawn(medallion_ingest::run(ic, ingest.clone()));
    let mut r = EnvReader::from_map(vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_TRANSFORM_ADDR",
    ));
    let tc = medallion_transform::TransformConfig::from_env(&mut r);
    r.finish().unwrap();
    let transform = Runtime::new("medallion-transform");
    tokio::spawn(medallion_transform::run(tc, transform.clone()));
    let avars = vars(
        &nats,
        lake_dir.path(),
        products.path(),
        "MEDALLION_AGGREGATE_ADDR",
    );
    let mut aggregate = spawn_aggregate(&avars);

    let evs = events();
    for (i, chunk) in evs.chunks(50).enumerate() {
        publish(&js, chunk).await;
        if i == 20 || i == 45 {
            aggregate.kill();
            tokio::time::sleep(Duration::from_millis(200)).await;
            aggregate = spawn_aggregate(&avars);
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let want = expected();
    let gold = TableRef::gold("finance", "revenue_by_country_hourly");
    eventually(
        Duration::from_secs(120),
        "gold equals the independent aggregate",
        || async { gold_rows(&lake, &gold).await == want },
    )
    .await;

    // Another Delta implementation reads Gold.
    let n = medallion_testkit::rows_read_by_python_deltalake(
        &lake_dir
            .path()
            .join("gold/finance/revenue_by_country_hourly"),
    );
    assert_eq!(n, want.len());

    // Replay Silver: Gold is refreshed from it and still equal.
    let before = open_at(&lake, &gold, None)
        .await
        .unwrap()
        .unwrap()
        .version()
        .unwrap();
    let reply = client
        .request("medallion.control.replay", Bytes::from("finance.payments"))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).starts_with("ok:"));
    eventually(
        Duration::from_secs(60),
        "gold refreshed after the replay",
        || async {
            open_at(&lake, &gold, None)
                .await
                .unwrap()
                .unwrap()
                .version()
                .unwrap()
                > before
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gold_rows(&lake, &gold).await, want);

    // Same columns, another query: the stored groups were computed by the old
    // one, so the aggregate rebuilds Gold from Silver instead of merging.
    let spec = std::fs::read_to_string(products.path().join("payments.yaml")).unwrap();
    let edited = spec.replace(
        "FROM silver GROUP BY",
        "FROM silver WHERE amount >= 5 GROUP BY",
    );
    assert_ne!(spec, edited);
    std::fs::write(products.path().join("payments.yaml"), edited).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let extra: Vec<_> = (0..20i64)
        .map(|i| (format!("x{i}"), 1, 2.5 + i as f64, "eur", Some("FR")))
        .collect();
    publish(&js, &extra).await;
    let mut all = events();
    all.extend(extra);
    let want = expected_of(all, 5.0);
    eventually(
        Duration::from_secs(60),
        "gold rebuilt under the new query",
        || async { gold_rows(&lake, &gold).await == want },
    )
    .await;

    aggregate.kill();
    transform.shutdown.cancel();
    ingest.shutdown.cancel();
}

async fn publish(
    js: &jetstream::Context,
    events: &[(String, i64, f64, &'static str, Option<&'static str>)],
) {
    let base = "2026-12-01T";
    let body: Vec<String> = events
        .iter()
        .map(|(id, hour, amount, currency, country)| {
            let country = country.map(|c| format!("\"{c}\"")).unwrap_or("null".into());
            format!(
                r#"{{"event_id":"{id}","ts":"{base}{:02}:{:02}:00Z","user_id":"u{id}","amount":{amount},"currency":"{currency}","country":{country}}}"#,
                hour,
                (id.len() * 7) % 60
            )
        })
        .collect();
    js.publish(
        "medallion.ingest.finance.payments",
        Bytes::from(body.join("\n")),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}
