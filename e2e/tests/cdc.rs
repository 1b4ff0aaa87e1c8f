//! Change feeds (`spec.cdc`) against the real binaries, checked by an
//! independent Python computation (`e2e/clients/cdc_fixtures.py`) that
//! applies the same events in sequence order.
//!
//! - Debezium events of a Postgres table (ndjson, `source.lsn`) and a MySQL
//!   table (one per message, binlog `[file, pos, row]`), half of them
//!   schema-wrapped, with a snapshot phase, updates, deletes with their
//!   tombstones, re-inserts and malformed changes; and a generic feed. Each
//!   Debezium feed goes to an SCD1 and an SCD2 product.
//! - Published in order, then (on a fresh lake) shuffled across messages
//!   and with duplicates: both give the reference tables, Gold included.
//! - 50,000 changes while transform and aggregate are SIGKILLed in turn:
//!   the same tables, and Gold equals the aggregate of the final state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use medallion_e2e::{Service, read_table, row_count, stop_all};
use medallion_testkit::NatsServer;

const NAMES: [&str; 3] = [
    "medallion-ingest",
    "medallion-transform",
    "medallion-aggregate",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/cdc_fixtures.py")
}

fn products() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/products/cdc").to_string()
}

fn python(args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .expect("run python3");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const SECRET: &str = "cdc-e2e-secret-0123456789abcdef0123456789";

/// Settings of the pipeline services, then the catalog's.
fn vars(nats: &str, lake: &Path) -> Vec<BTreeMap<String, String>> {
    medallion_e2e::platform_vars(nats, lake)
        .into_iter()
        .map(|mut v| {
            v.insert("MEDALLION_PRODUCTS".into(), products());
            v.insert("MEDALLION_BATCH_ROWS".into(), "2000".into());
            v.insert("MEDALLION_ACK_WAIT".into(), "5s".into());
            v.insert("MEDALLION_JWT_SECRET".into(), SECRET.into());
            v
        })
        .collect()
}

/// Message bodies of one fixture file.
fn bodies(dir: &Path, file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(file)).expect("fixture file");
    serde_json::from_str(&text).expect("a JSON list of message bodies")
}

/// Runs the reference check until it passes (the pipeline catches up) or
/// `within` runs out; the last report is the failure message.
async fn wait_check(args: &[&str], within: Duration, services: &[Service]) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (ok, report) = python(args);
        if ok {
            return report;
        }
        if Instant::now() > deadline {
            panic!(
                "tables differ from the reference after {within:?}:\n{report}\n{}",
                medallion_e2e::services_logs(services)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One fresh platform; each product's messages (`variant`: `messages` or
/// `shuffled`) published; every table checked against the reference.
async fn run_variant(fixtures: &Path, variant: &str) {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let vars = vars(&nats.url(), lake.path());
    let catalog = vars[3]["MEDALLION_CATALOG_ADDR"].clone();
    let (mut services, js) =
        medallion_e2e::start_services(&medallion_e2e::PLATFORM, &vars, logs.path(), nats.url())
            .await;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("manifest.json")).unwrap())
            .unwrap();
    let started = Instant::now();
    let mut published = 0;
    // In four waves a second apart: Silver takes several commits, so later
    // ones update and delete rows earlier ones wrote, and Gold takes them out.
    let feeds: Vec<(String, Vec<String>)> = manifest["products"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| {
            (
                p["subject"].as_str().unwrap().to_string(),
                bodies(fixtures, p[variant].as_str().unwrap()),
            )
        })
        .collect();
    const WAVES: usize = 4;
    for wave in 0..WAVES {
        for (subject, bodies) in &feeds {
            let (from, to) = (
                bodies.len() * wave / WAVES,
                bodies.len() * (wave + 1) / WAVES,
            );
            for body in &bodies[from..to] {
                medallion_e2e::publish_until_stored(
                    &js,
                    subject,
                    async_nats::HeaderMap::new(),
                    body.clone().into_bytes(),
                )
                .await;
                published += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let lake_arg = lake.path().to_str().unwrap();
    let fixtures_arg = fixtures.to_str().unwrap();
    let report = wait_check(
        &["check", "--fixtures", fixtures_arg, "--lake", lake_arg],
        Duration::from_secs(180),
        &services,
    )
    .await;
    eprintln!(
        "{variant}: {published} messages, tables equal to the reference {:.1}s after the first publish\n{report}",
        started.elapsed().as_secs_f64()
    );
    if variant == "messages" {
        // The catalog shows the feed, its changes by kind and its lineage.
        let token = medallion_e2e::role_token(SECRET, "ada", &["admin"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let product = loop {
            let got = medallion_e2e::http_get(
                &format!("http://{catalog}/v1/products/crm/customers"),
                Some(&token),
            )
            .await;
            if let Some((200, body)) = &got {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                let changes = &v["quality"]["changes"];
                if changes["inserts"].as_u64().unwrap_or(0)
                    + changes["updates"].as_u64().unwrap_or(0)
                    + changes["deletes"].as_u64().unwrap_or(0)
                    + changes["stale"].as_u64().unwrap_or(0)
                    == manifest["products"]["crm.customers"]["changes"]
                        .as_u64()
                        .unwrap()
                {
                    break v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the catalog's counts of crm.customers: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(product["spec"]["spec"]["cdc"]["stored_as"], "scd1");
        let changes = &product["quality"]["changes"];
        assert_eq!(
            changes["tombstones"],
            manifest["products"]["crm.customers"]["tombstones"]
        );
        assert!(changes["deletes"].as_u64().unwrap() > 0, "{changes}");
        let (status, lineage) = medallion_e2e::http_get(
            &format!("http://{catalog}/v1/products/crm/customers/lineage"),
            Some(&token),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{lineage}");
        assert!(lineage.contains("gold.crm.customers_by_tier"), "{lineage}");
        // Every malformed change is in quarantine, with its envelope.
        for (product, info) in manifest["products"].as_object().unwrap() {
            let (domain, name) = product.split_once('.').unwrap();
            let q = read_table(lake.path(), &format!("silver.{domain}.{name}__quarantine")).await;
            assert_eq!(
                row_count(&q) as u64,
                info["invalid_records"].as_u64().unwrap(),
                "quarantined changes of {product}"
            );
        }
    }
    stop_all(&mut services);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_generic_feeds_equal_the_reference_in_order_and_shuffled_with_duplicates() {
    let fixtures = tempfile::tempdir().unwrap();
    let (ok, out) = python(&["fixtures", "--out", fixtures.path().to_str().unwrap()]);
    assert!(ok, "fixtures: {out}");
    run_variant(fixtures.path(), "messages").await;
    run_variant(fixtures.path(), "shuffled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_transform_and_aggregate_during_50k_changes_changes_nothing() {
    let fixtures = tempfile::tempdir().unwrap();
    let (ok, out) = python(&[
        "stream",
        "--out",
        fixtures.path().to_str().unwrap(),
        "--changes",
        "50000",
        "--keys",
        "5000",
    ]);
    assert!(ok, "stream fixtures: {out}");
    let messages = bodies(fixtures.path(), "stream.json");

    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let vars = vars(&nats.url(), lake.path());
    // Each start logs to its own file: a failure shows every run's log.
    let runs = std::cell::Cell::new(0);
    let start = |i: usize| {
        runs.set(runs.get() + 1);
        Service::start_named(
            NAMES[i],
            &format!("{}-{}", NAMES[i], runs.get()),
            &vars[i],
            logs.path(),
        )
    };
    let mut services: Vec<Service> = (0..3).map(start).collect();
    let js = medallion_e2e::streams_declared(nats.url(), &services).await;

    let producer = {
        let js = js.clone();
        tokio::spawn(async move {
            for (i, body) in messages.into_iter().enumerate() {
                medallion_e2e::publish_until_stored(
                    &js,
                    "medallion.ingest.crm.customers",
                    async_nats::HeaderMap::new(),
                    body.into_bytes(),
                )
                .await;
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
        })
    };
    let started = Instant::now();
    // transform, aggregate, transform, aggregate, transform, aggregate.
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let i = 1 + round % 2;
        eprintln!(
            "kill -9 {} at {:.1}s",
            NAMES[i],
            started.elapsed().as_secs_f64()
        );
        services[i].kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        services[i] = start(i);
    }
    producer.await.unwrap();
    let report = wait_check(
        &[
            "check",
            "--fixtures",
            fixtures.path().to_str().unwrap(),
            "--lake",
            lake.path().to_str().unwrap(),
            "--stream",
        ],
        Duration::from_secs(240),
        &services,
    )
    .await;
    eprintln!(
        "50,000 changes, 6 SIGKILLs: tables equal to the reference {:.1}s after the first publish\n{report}",
        started.elapsed().as_secs_f64()
    );
    stop_all(&mut services);
}
