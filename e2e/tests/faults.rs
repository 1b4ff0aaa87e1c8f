//! Faults against the real binaries, checked by exact accounting against
//! the input (computed here): with two replicas of every stage, each replica
//! is SIGKILLed in turn while a producer publishes and then re-sends
//! everything, half with `Nats-Msg-Id` and half without.
//!
//! Expected: Bronze holds every *message* once (a re-send with the same id is
//! one message to JetStream; one without an id is a new message); Silver
//! holds each event once (dedupe on `event_id`); Gold equals the aggregate
//! of the input.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use medallion_e2e::{Service, pipeline_vars, stop_all};
use medallion_testkit::{NatsServer, free_port};

/// `MEDALLION_E2E_LONG=1` runs the long variant: 200,000 events and 20
/// SIGKILLs (each service in turn, then at random) instead of 20,000 and 6.
fn long() -> bool {
    std::env::var("MEDALLION_E2E_LONG").is_ok_and(|v| v == "1")
}

fn events() -> usize {
    if long() { 200_000 } else { 20_000 }
}
const PER_MESSAGE: usize = 10;

fn event(i: usize) -> (String, f64, &'static str) {
    let country = ["FR", "DE", "US"][i % 3];
    (format!("f{i}"), (i % 97 + 1) as f64, country)
}

fn message(m: usize) -> Vec<u8> {
    (m * PER_MESSAGE..(m + 1) * PER_MESSAGE)
        .map(|i| {
            let (id, amount, country) = event(i);
            format!(
                r#"{{"event_id":"{id}","ts":"2026-11-29T1{}:00:00Z","user_id":"u{}","amount":{amount},"currency":"EUR","country":"{country}"}}"#,
                i % 4,
                i % 13
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

async fn table(lake: &std::path::Path, layer: &str, name: &str) -> Vec<arrow::array::RecordBatch> {
    let lake = medallion_lake::Lake::from_location(lake.to_str().unwrap()).unwrap();
    let t = medallion_spec::TableRef::parse(&format!("{layer}.finance.{name}")).unwrap();
    match medallion_lake::open_at(&lake, &t, None).await {
        Ok(Some(table)) => medallion_lake::read_all(&t, &table)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn rows(b: &[arrow::array::RecordBatch]) -> usize {
    b.iter().map(|b| b.num_rows()).sum()
}

const NAMES: [&str; 3] = [
    "medallion-ingest",
    "medallion-transform",
    "medallion-aggregate",
];

fn service_vars(nats_url: &str, lake: &std::path::Path) -> Vec<BTreeMap<String, String>> {
    [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
    ]
    .iter()
    .map(|addr| {
        let mut v = pipeline_vars(nats_url, lake, addr);
        v.insert("MEDALLION_BATCH_ROWS".into(), "300".into());
        v.insert("MEDALLION_ACK_WAIT".into(), "5s".into());
        v.insert("OTEL_SDK_DISABLED".into(), "true".into());
        v
    })
    .collect()
}

/// Publishes every message, then re-sends all of them: the first half with
/// the same ids (JetStream drops them), the second half without ids.
fn produce(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let messages = events() / PER_MESSAGE;
        for pass in 0..2 {
            for m in 0..messages {
                let mut h = async_nats::HeaderMap::new();
                if pass == 0 || m < messages / 2 {
                    h.insert("Nats-Msg-Id", format!("msg-{m}").as_str());
                }
                medallion_e2e::publish_until_stored(
                    &js,
                    "medallion.ingest.finance.payments",
                    h,
                    message(m),
                )
                .await;
                if m % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_each_service_while_producers_resend_everything() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // Two replicas of each stage, as the chart runs them: a kill costs the
    // stage half its replicas until the other takes the units over.
    let names: Vec<&'static str> = NAMES.iter().flat_map(|n| [*n, *n]).collect();
    let vars: Vec<BTreeMap<String, String>> = service_vars(&nats.url(), lake.path())
        .into_iter()
        .zip(service_vars(&nats.url(), lake.path()))
        .zip(NAMES)
        .flat_map(|((a, b), name)| {
            [(a, 0), (b, 1)].map(|(mut v, copy)| {
                v.insert("MEDALLION_REPLICA_ID".into(), format!("{name}-{copy}"));
                v.insert("MEDALLION_LEASE_TTL".into(), "3s".into());
                v
            })
        })
        .collect();
    let start = |i: usize| {
        Service::start_named(
            names[i],
            &vars[i]["MEDALLION_REPLICA_ID"],
            &vars[i],
            logs.path(),
        )
    };
    let mut services: Vec<Service> = (0..names.len()).map(start).collect();
    let producer = produce(nats.url());

    // SIGKILL each service in turn, then (long variant) at random, while the
    // producer runs.
    let wanted = if long() { 20 } else { 6 };
    let started = std::time::Instant::now();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("kill order seed {seed}");
    let mut kills = 0;
    for round in 0..wanted {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let i = if round < names.len() {
            // Each replica once, alternating stages.
            (round % 3) * 2 + round / 3
        } else {
            // xorshift: a different order each run (the seed is printed).
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % names.len() as u64) as usize
        };
        eprintln!(
            "kill -9 {} at {:.1}s",
            names[i],
            started.elapsed().as_secs_f64()
        );
        services[i].kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        services[i] = start(i);
    }
    producer.await.unwrap();
    let published = started.elapsed();
    assert_eq!(kills, wanted);
    check_exact(lake.path(), &services).await;
    eprintln!(
        "{} events ({} messages, every one sent twice), {kills} SIGKILLs: published in {:.1}s, \
         every layer exact {:.1}s after the last publish",
        events(),
        events() / PER_MESSAGE,
        published.as_secs_f64(),
        (started.elapsed() - published).as_secs_f64()
    );
    stop_all(&mut services);
}

/// Three nats-servers on loopback with every stream at three replicas: the
/// services start when only one node is up (as a Helm install starts them
/// with the NATS pods: nothing can place three replicas yet) and wait for the
/// cluster; then one node is killed mid-stream and the pipeline carries on
/// through the other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_under_r3_streams_loses_and_duplicates_nothing() {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let node = |i: usize| {
        let others: Vec<String> = routes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        NatsServer::start_with_config(Some(&format!(
            "server_name: n{i}\ncluster {{\n  name: medallion-e2e\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}",
            routes[i],
            others.join(", ")
        )))
    };
    let mut nodes = vec![node(0)];
    let urls = nodes[0].url();

    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut vars = service_vars(&urls, lake.path());
    for v in &mut vars {
        v.insert("MEDALLION_STREAM_REPLICAS".into(), "3".into());
    }
    let mut early: Vec<Service> = NAMES
        .iter()
        .zip(&vars)
        .map(|(n, v)| Service::start(n, v, logs.path()))
        .collect();
    // A JetStream request times out after 5 s when no meta leader answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !early
        .iter()
        .all(|s| s.logs().contains("waiting for the cluster"))
    {
        for s in &mut early {
            assert!(
                s.is_running(),
                "{} gave up on a cluster that is still forming:\n{}",
                s.name,
                s.logs()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every service should say it waits for the cluster:\n{}",
            medallion_e2e::services_logs(&early)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes.push(node(1));
    nodes.push(node(2));
    let client = async_nats::ConnectOptions::new()
        .connect(nodes[0].url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let waited = std::time::Instant::now();
    let mut services = early;
    let ingest = loop {
        if let Ok(s) = js.get_stream("MEDALLION_INGEST").await {
            break s;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(90),
            "the streams were not declared once the cluster formed:\n{}",
            medallion_e2e::services_logs(&services)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "cluster formed; streams declared {:.1}s after the other two nodes started",
        waited.elapsed().as_secs_f64()
    );
    assert_eq!(ingest.cached_info().config.num_replicas, 3);

    let started = std::time::Instant::now();
    let producer = produce(nodes[0].url());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[2].kill();
    let killed_at = started.elapsed();
    producer.await.unwrap();
    let published = started.elapsed();
    check_exact(lake.path(), &services).await;
    eprintln!(
        "3-node cluster, R3: node n2 killed at {:.1}s; {} events published by {:.1}s; every layer exact {:.1}s after the last publish",
        killed_at.as_secs_f64(),
        events(),
        published.as_secs_f64(),
        (started.elapsed() - published).as_secs_f64()
    );
    stop_all(&mut services);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_and_a_paused_transform_lose_and_duplicate_nothing() {
    let mut nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut vars = service_vars(&nats.url(), lake.path());
    for v in &mut vars {
        // Shorter than the pause below: JetStream redelivers to the paused consumer.
        v.insert("MEDALLION_ACK_WAIT".into(), "2s".into());
    }
    let mut services: Vec<Service> = NAMES
        .iter()
        .zip(&vars)
        .map(|(n, v)| Service::start(n, v, logs.path()))
        .collect();
    let producer = produce(nats.url());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // SIGSTOP transform longer than the ack wait, then resume.
    services[1].signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    services[1].signal("CONT");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Restart nats-server (same port and store) while everything runs.
    nats.restart();
    producer.await.unwrap();
    check_exact(lake.path(), &services).await;
    stop_all(&mut services);
}

/// Bronze = every message once, Silver = every event once, no quarantine,
/// Gold = the aggregate of the input.
async fn check_exact(lake: &std::path::Path, services: &[Service]) {
    let messages = events() / PER_MESSAGE;
    // Independent expectation, from the input.
    let mut want_gold: BTreeMap<&str, (i64, f64)> = BTreeMap::new();
    for i in 0..events() {
        let (_, amount, country) = event(i);
        let g = want_gold.entry(country).or_default();
        g.0 += 1;
        g.1 += amount;
    }
    let gold_events = |gold: &[arrow::array::RecordBatch]| {
        gold.iter()
            .map(|b| {
                b.column(b.schema().index_of("payments").unwrap())
                    .as_primitive::<Int64Type>()
                    .values()
                    .iter()
                    .sum::<i64>()
            })
            .sum::<i64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    // Gold can be complete before Bronze: the last messages published are
    // re-sends without an id, whose events Silver already has.
    while gold_events(&table(lake, "gold", "revenue_by_country_hourly").await) != events() as i64
        || rows(&table(lake, "bronze", "payments").await) < messages + messages / 2
    {
        if std::time::Instant::now() > deadline {
            panic!(
                "the lake did not settle within 180 s: bronze {} rows of {}, silver {}, \
                 gold counts {} of {} events\n{}",
                rows(&table(lake, "bronze", "payments").await),
                messages + messages / 2,
                rows(&table(lake, "silver", "payments").await),
                gold_events(&table(lake, "gold", "revenue_by_country_hourly").await),
                events(),
                medallion_e2e::services_logs(services)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let bronze = table(lake, "bronze", "payments").await;
    assert_eq!(
        rows(&bronze),
        messages + messages / 2,
        "bronze: every message once (re-sends with an id deduplicated, without an id kept)"
    );
    let silver = table(lake, "silver", "payments").await;
    let ids = medallion_e2e::unique_values(&silver, "event_id");
    assert_eq!(ids.len(), events(), "silver: each event exactly once");
    assert_eq!(
        rows(&table(lake, "silver", "payments__quarantine").await),
        0
    );

    let gold = table(lake, "gold", "revenue_by_country_hourly").await;
    let mut got: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for b in &gold {
        let country = b
            .column(b.schema().index_of("country").unwrap())
            .as_string::<i32>();
        let payments = b
            .column(b.schema().index_of("payments").unwrap())
            .as_primitive::<Int64Type>();
        let revenue = b
            .column(b.schema().index_of("revenue").unwrap())
            .as_primitive::<arrow::datatypes::Float64Type>();
        for r in 0..b.num_rows() {
            let g = got.entry(country.value(r).to_string()).or_default();
            g.0 += payments.value(r);
            g.1 += revenue.value(r);
        }
    }
    for (country, (n, sum)) in &want_gold {
        let (gn, gsum) = got[*country];
        assert_eq!(gn, *n, "{country} payments");
        assert!(
            (gsum - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{country} revenue {gsum} vs {sum}"
        );
    }
}
