//! Scenario 5, poison messages, against the real binaries: among thousands
//! of good events, a few Bronze messages crash the transform every time
//! (fail point `transform.decode.panic_on`) and a few Silver rows crash the
//! aggregate every time (`aggregate.merge.panic_on`). Each is dead-lettered
//! after `MEDALLION_MAX_DELIVER` attempts, exactly once, even when a stage
//! crashes between parking and its commit and when both stages are
//! SIGKILLed and restarted, while everything else flows on.
//!
//! Exact accounting: Bronze = every message; Silver = every event of the
//! messages not dead-lettered (no quarantine, drops or duplicates here);
//! Gold = the aggregate of Silver minus the dead-lettered rows; the DLQ holds
//! exactly the poison messages and rows, with their headers; the metric and
//! the catalog count them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use futures::StreamExt;
use medallion_e2e::{Service, http_get, pipeline_vars, read_table, row_count as rows, stop_all};
use medallion_testkit::{NatsServer, eventually};

const GOOD_MESSAGES: usize = 1_000;
const PER_MESSAGE: usize = 5;
const MAX_DELIVER: &str = "3";
const T_MARKER: &str = "POISON-T";
const A_MARKER: &str = "POISON-A";
const JWT_SECRET: &str = "e2e-poison-test-secret-0123456789";

/// Good message `m` of `wave`; every 250th carries one record whose country
/// crashes the aggregate.
fn good(wave: usize, m: usize) -> Vec<u8> {
    (0..PER_MESSAGE)
        .map(|k| {
            let i = (wave * GOOD_MESSAGES + m) * PER_MESSAGE + k;
            let country = if k == 2 && m % 250 == 7 {
                format!("ZZ-{A_MARKER}-{i}")
            } else {
                ["FR", "DE", "US"][i % 3].to_string()
            };
            format!(
                r#"{{"event_id":"p{i}","ts":"2026-11-29T1{}:00:00Z","user_id":"u{}","amount":{},"currency":"EUR","country":"{country}"}}"#,
                i % 3,
                i % 11,
                i % 40 + 1
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// A one-record message the transform cannot survive.
fn poison(wave: usize, n: usize) -> Vec<u8> {
    format!(
        r#"{{"event_id":"bad-{wave}-{n}","ts":"2026-11-29T10:00:00Z","user_id":"{T_MARKER}-{wave}-{n}","amount":5,"currency":"EUR","country":"FR"}}"#
    )
    .into_bytes()
}

async fn table(lake: &std::path::Path, layer: &str, name: &str) -> Vec<arrow::array::RecordBatch> {
    read_table(lake, &format!("{layer}.finance.{name}")).await
}

fn gold_payments(gold: &[arrow::array::RecordBatch]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for b in gold {
        let c = b
            .column(b.schema().index_of("country").unwrap())
            .as_string::<i32>();
        let p = b
            .column(b.schema().index_of("payments").unwrap())
            .as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            *out.entry(c.value(r).to_string()).or_default() += p.value(r);
        }
    }
    out
}

/// `medallion_dead_lettered_total{stage}` on a service's /metrics.
async fn dead_lettered_metric(addr: &str, stage: &str) -> f64 {
    medallion_e2e::metric(addr, "medallion_dead_lettered_total", &[("stage", stage)]).await
}

struct Dlq {
    subject: String,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

async fn read_dlq(js: &async_nats::jetstream::Context) -> Vec<Dlq> {
    let mut stream = js.get_stream("MEDALLION_DLQ").await.unwrap();
    let n = stream.info().await.unwrap().state.messages as usize;
    if n == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap().take(n);
    let mut out = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.unwrap();
        let headers = m
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|(k, v)| (k.to_string(), v[0].as_str().to_string()))
            .collect();
        out.push(Dlq {
            subject: m.subject.to_string(),
            headers,
            payload: m.payload.to_vec(),
        });
    }
    out
}

fn vars(nats: &NatsServer, lake: &std::path::Path, addr: &str) -> BTreeMap<String, String> {
    let mut v = pipeline_vars(&nats.url(), lake, addr);
    v.insert("MEDALLION_BATCH_ROWS".into(), "2000".into());
    v.insert("MEDALLION_MAX_DELIVER".into(), MAX_DELIVER.into());
    v.insert("OTEL_SDK_DISABLED".into(), "true".into());
    v.insert(
        "MEDALLION_FAIL_POINTS".into(),
        format!(
            "transform.decode.panic_on={T_MARKER},aggregate.merge.panic_on={A_MARKER},\
             transform.after_park=exit,aggregate.after_park=exit"
        ),
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_once_and_the_rest_flows() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let names = [
        "medallion-ingest",
        "medallion-transform",
        "medallion-aggregate",
        "medallion-catalog",
    ];
    let mut all_vars: Vec<BTreeMap<String, String>> = [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
        "MEDALLION_CATALOG_ADDR",
    ]
    .iter()
    .map(|a| vars(&nats, lake.path(), a))
    .collect();
    all_vars[3].insert("MEDALLION_JWT_SECRET".into(), JWT_SECRET.into());
    all_vars[3].remove("MEDALLION_FAIL_POINTS");
    let (mut services, js) =
        medallion_e2e::start_services(&names, &all_vars, logs.path(), nats.url()).await;

    let publish = |wave: usize, poisons: usize| {
        let js = js.clone();
        async move {
            for m in 0..GOOD_MESSAGES {
                js.publish("medallion.ingest.finance.payments", good(wave, m).into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                // Poison messages spread among the good ones.
                if m % (GOOD_MESSAGES / poisons) == GOOD_MESSAGES / poisons / 2 {
                    let n = m / (GOOD_MESSAGES / poisons);
                    js.publish("medallion.ingest.finance.payments", poison(wave, n).into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            }
        }
    };

    // Wave 1: 1,000 good messages (5,000 events, 4 aggregate-poison rows)
    // and 4 transform-poison messages. Each stage first crashes (exit 137)
    // right after parking poison and before the commit that covers it; the
    // restart finds the same poison, sees it parked, and parks nothing twice.
    let started = Instant::now();
    publish(0, 4).await;
    for i in [1, 2] {
        let status = services[i]
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|| {
                panic!(
                    "{} did not crash after parking:\n{}",
                    names[i],
                    services[i].logs()
                )
            });
        assert_eq!(status.code(), Some(137), "{}", services[i].logs());
        let mut v = all_vars[i].clone();
        v.insert(
            "MEDALLION_FAIL_POINTS".into(),
            format!("transform.decode.panic_on={T_MARKER},aggregate.merge.panic_on={A_MARKER}"),
        );
        all_vars[i] = v;
        services[i] = Service::start(names[i], &all_vars[i], logs.path());
    }
    let (t_poison, a_poison) = (4usize, 4usize);
    check(lake.path(), &js, 1, t_poison, a_poison).await;
    let settled_1 = started.elapsed();
    for s in &services[1..3] {
        assert!(
            s.logs().contains("dead letter already parked"),
            "{} re-found the poison it parked before crashing:\n{}",
            s.name,
            s.logs()
        );
    }

    // The metric on each stage, and the catalog.
    let t_addr = all_vars[1]["MEDALLION_TRANSFORM_ADDR"].clone();
    let a_addr = all_vars[2]["MEDALLION_AGGREGATE_ADDR"].clone();
    assert_eq!(
        dead_lettered_metric(&t_addr, "transform").await,
        t_poison as f64
    );
    assert_eq!(
        dead_lettered_metric(&a_addr, "aggregate").await,
        a_poison as f64
    );
    let token = medallion_e2e::hs256(
        JWT_SECRET,
        &serde_json::json!({
            "sub": "e2e", "roles": ["admin"],
            "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600,
        }),
    );
    let catalog = format!(
        "http://{}/v1/products/finance/payments",
        all_vars[3]["MEDALLION_CATALOG_ADDR"]
    );
    let fetch = || async {
        match http_get(&catalog, Some(&token)).await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    };
    eventually(
        Duration::from_secs(60),
        "the catalog shows the dead letters",
        || async {
            let shown: serde_json::Value = fetch().await;
            shown["dead_letters"]["total"] == (t_poison + a_poison) as u64
                && shown["quality"]["dead_lettered"] == t_poison as u64
        },
    )
    .await;
    let shown = fetch().await;
    let d = &shown["dead_letters"];
    assert_eq!(d["by_stage"]["transform"], t_poison as u64, "{d}");
    assert_eq!(d["by_stage"]["aggregate"], a_poison as u64, "{d}");
    assert!(
        d["last"]["reason"].as_str().unwrap().contains("panicked"),
        "{d}"
    );
    println!("poison: catalog shows dead_letters = {d}");

    // SIGKILL transform and aggregate, restart them, then a second wave:
    // what is dead-lettered stays dead-lettered once.
    services[1].kill();
    services[2].kill();
    let restarted = Instant::now();
    services[1] = Service::start(names[1], &all_vars[1], logs.path());
    services[2] = Service::start(names[2], &all_vars[2], logs.path());
    publish(1, 2).await;
    check(lake.path(), &js, 2, t_poison + 2, a_poison + 4).await;
    println!(
        "poison: wave 1 settled {:.1} s after the first publish; wave 2 settled {:.1} s after the restart",
        settled_1.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    // The restarted processes count only what they parked themselves.
    assert_eq!(dead_lettered_metric(&t_addr, "transform").await, 2.0);
    assert_eq!(dead_lettered_metric(&a_addr, "aggregate").await, 4.0);
    stop_all(&mut services);
}

/// Waits for Gold to settle on `waves` waves, then checks every layer and
/// the DLQ exactly.
async fn check(
    lake: &std::path::Path,
    js: &async_nats::jetstream::Context,
    waves: usize,
    t_poison: usize,
    a_poison: usize,
) {
    let good_events = waves * GOOD_MESSAGES * PER_MESSAGE;
    let want_gold = (good_events - a_poison) as i64;
    let l = lake.to_path_buf();
    eventually(Duration::from_secs(180), "gold settles", || {
        let l = l.clone();
        async move {
            gold_payments(&table(&l, "gold", "revenue_by_country_hourly").await)
                .values()
                .sum::<i64>()
                == want_gold
        }
    })
    .await;
    // Gold could still be moving: give it a moment and check it stays.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let bronze = rows(&table(lake, "bronze", "payments").await);
    let silver = table(lake, "silver", "payments").await;
    let quarantine = rows(&table(lake, "silver", "payments__quarantine").await);
    let gold = gold_payments(&table(lake, "gold", "revenue_by_country_hourly").await);
    let published = waves * GOOD_MESSAGES + t_poison;
    println!(
        "poison after {waves} wave(s): published {published} messages ({good_events} good events, {t_poison} transform-poison messages, {a_poison} aggregate-poison rows); \
         bronze {bronze}, silver {}, quarantine {quarantine}, gold payments {} (expected bronze {published}, silver {good_events}, gold {want_gold})",
        rows(&silver),
        gold.values().sum::<i64>()
    );
    assert_eq!(bronze, published, "bronze: every message once");
    assert_eq!(quarantine, 0);
    let mut ids = BTreeSet::new();
    for b in &silver {
        let c = b
            .column(b.schema().index_of("event_id").unwrap())
            .as_string::<i32>();
        for i in 0..c.len() {
            assert!(
                ids.insert(c.value(i).to_string()),
                "duplicate {}",
                c.value(i)
            );
            assert!(!c.value(i).starts_with("bad-"), "poison in silver");
        }
    }
    assert_eq!(ids.len(), good_events, "silver: every good event once");
    assert!(
        gold.keys().all(|c| !c.contains(A_MARKER)),
        "poison rows in gold: {gold:?}"
    );
    assert_eq!(gold.values().sum::<i64>(), want_gold);

    let dlq = read_dlq(js).await;
    let t: Vec<&Dlq> = dlq
        .iter()
        .filter(|d| {
            d.subject
                .starts_with("medallion.dlq.transform.finance.payments.")
        })
        .collect();
    let a: Vec<&Dlq> = dlq
        .iter()
        .filter(|d| {
            d.subject
                .starts_with("medallion.dlq.aggregate.finance.payments.revenue_by_country_hourly.")
        })
        .collect();
    assert_eq!(dlq.len(), t.len() + a.len(), "nothing else in the DLQ");
    assert_eq!(t.len(), t_poison, "transform DLQ: each poison message once");
    assert_eq!(a.len(), a_poison, "aggregate DLQ: each poison row once");
    for d in &t {
        let body = String::from_utf8_lossy(&d.payload);
        assert!(
            body.contains(T_MARKER),
            "DLQ holds the poison payload: {body}"
        );
        assert_eq!(d.headers["Medallion-Dlq-Stream"], "MEDALLION_INGEST");
        assert!(d.headers["Medallion-Dlq-Sequence"].parse::<u64>().unwrap() > 0);
        assert_eq!(
            d.headers["Medallion-Dlq-Subject"],
            "medallion.ingest.finance.payments"
        );
        assert_eq!(d.headers["Medallion-Dlq-Table"], "bronze.finance.payments");
        assert_eq!(d.headers["Medallion-Dlq-Deliveries"], MAX_DELIVER);
        assert!(
            d.headers["Medallion-Dlq-Reason"].contains(&format!("contains {T_MARKER}")),
            "{:?}",
            d.headers
        );
    }
    let parked: BTreeSet<String> = t
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).to_string())
        .collect();
    assert_eq!(parked.len(), t_poison, "distinct poison messages");
    for d in &a {
        let row: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        assert!(row["country"].as_str().unwrap().contains(A_MARKER), "{row}");
        assert_eq!(d.headers["Medallion-Dlq-Table"], "silver.finance.payments");
        assert_eq!(d.headers["Medallion-Dlq-Stream"], "MEDALLION_INGEST");
        assert!(d.headers["Medallion-Dlq-Sequence"].parse::<u64>().unwrap() > 0);
        assert_eq!(d.headers["Medallion-Dlq-Deliveries"], MAX_DELIVER);
        assert!(d.headers["Medallion-Dlq-Reason"].contains("aggregate panicked"));
    }
}

/// A record that kills the transform process outright (abort: no unwinding,
/// as a stack overflow, a segfault in native code or the OOM killer would)
/// costs one crash of the service: the restarted process finds in the
/// attempts ledger that its predecessor died in the same step, runs that
/// step's Bronze records in child processes, dead-letters the ones that kill
/// a child `MEDALLION_MAX_DELIVER` times, and the rest flows on. The test
/// restarts the service when it dies, as Kubernetes would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_kills_the_transform_costs_one_crash_and_is_dead_lettered() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let names = [
        "medallion-ingest",
        "medallion-transform",
        "medallion-aggregate",
    ];
    let all_vars: Vec<BTreeMap<String, String>> = [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
    ]
    .iter()
    .map(|a| {
        let mut v = vars(&nats, lake.path(), a);
        v.insert(
            "MEDALLION_FAIL_POINTS".into(),
            format!("transform.decode.abort_on={T_MARKER},aggregate.merge.panic_on={A_MARKER}"),
        );
        v
    })
    .collect();
    let (mut services, js) =
        medallion_e2e::start_services(&names, &all_vars, logs.path(), nats.url()).await;

    // The supervisor: restarts the transform whenever it dies.
    let transform = services.remove(1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let supervisor = {
        let stop = stop.clone();
        let vars = all_vars[1].clone();
        let logs = logs.path().to_path_buf();
        std::thread::spawn(move || {
            let mut t = transform;
            let mut deaths = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(status) = t.wait_exit(Duration::from_millis(100)) {
                    deaths.push((status, t.logs()));
                    t = Service::start("medallion-transform", &vars, &logs);
                }
            }
            t.stop();
            (deaths, t.logs())
        })
    };

    let started = Instant::now();
    let (t_poison, a_poison) = (2usize, 4usize);
    for m in 0..GOOD_MESSAGES {
        js.publish("medallion.ingest.finance.payments", good(0, m).into())
            .await
            .unwrap()
            .await
            .unwrap();
        if m % (GOOD_MESSAGES / t_poison) == GOOD_MESSAGES / t_poison / 2 {
            let n = m / (GOOD_MESSAGES / t_poison);
            js.publish("medallion.ingest.finance.payments", poison(0, n).into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    check(lake.path(), &js, 1, t_poison, a_poison).await;
    let settled = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (deaths, last_logs) = supervisor.join().unwrap();

    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        !deaths.is_empty() && deaths.len() <= t_poison,
        "each killer record costs the service at most one crash; deaths: {:?}\nlast logs:\n{last_logs}",
        deaths.iter().map(|d| d.0).collect::<Vec<_>>()
    );
    for (status, logs) in &deaths {
        assert_eq!(status.signal(), Some(6), "died by SIGABRT:\n{logs}");
    }
    let all_logs = deaths.iter().map(|d| d.1.as_str()).collect::<String>() + &last_logs;
    assert!(
        all_logs.contains("an earlier process died on these bronze versions"),
        "the restarted service used the attempts ledger:\n{all_logs}"
    );
    let dlq = read_dlq(&js).await;
    for d in dlq
        .iter()
        .filter(|d| d.subject.starts_with("medallion.dlq.transform."))
    {
        assert!(
            d.headers["Medallion-Dlq-Reason"].contains("killed by signal 6 (SIGABRT)"),
            "{:?}",
            d.headers
        );
    }
    println!(
        "poison (abort): {} messages + {t_poison} killer records; the service died {} time(s), every layer exact {:.1} s after the first publish",
        GOOD_MESSAGES,
        deaths.len(),
        settled.as_secs_f64()
    );
    stop_all(&mut services);
}
