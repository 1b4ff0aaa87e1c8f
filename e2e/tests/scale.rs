//! Scale-out against the real binaries: three replicas of each pipeline
//! stage share six products, one of them spread over four partitions whose
//! keys are published to every partition and re-sent across partitions;
//! replicas are killed with SIGKILL and new ones started while producers
//! publish. Checked against an independent computation from Bronze: every
//! message once, Silver the first occurrence of each key in Bronze order,
//! Gold the one-shot aggregate, and no unit ever committed by two replicas
//! (in each table's Delta log, every transaction app id only moves forward).
//! Measured on the way: how fast a dead replica's units move (failover) and a
//! new replica gets its share (join); then one replica per stage is stopped
//! gracefully during a second wave: it hands its leases back and leaves
//! nothing to be redelivered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use medallion_e2e::{Service, pipeline_vars, stop_all};
use medallion_testkit::NatsServer;

const PRODUCTS: usize = 6;
/// The product spread over partitions.
const HOT: usize = 0;
const HOT_PARTITIONS: u32 = 4;
const EVENTS: usize = 100_000;
const PER_MESSAGE: usize = 20;
const KILLS: usize = 10;
const STAGES: [(&str, &str); 3] = [
    ("medallion-ingest", "MEDALLION_INGEST_ADDR"),
    ("medallion-transform", "MEDALLION_TRANSFORM_ADDR"),
    ("medallion-aggregate", "MEDALLION_AGGREGATE_ADDR"),
];

fn product(p: usize) -> String {
    format!("p{p}")
}

fn spec(p: usize) -> String {
    spec_with(p, if p == HOT { HOT_PARTITIONS } else { 1 })
}

fn spec_with(p: usize, partitions: u32) -> String {
    format!(
        r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {{name: {name}}}
spec:
  domain: scale
  partitions: {partitions}
  source: {{format: ndjson}}
  schema:
    - {{name: id, type: string, required: true}}
    - {{name: grp, type: string}}
    - {{name: n, type: int64}}
  key: [id]
  gold:
    - name: {name}_by_grp
      sql: SELECT grp, count(*) AS rows, sum(n) AS total FROM silver GROUP BY grp
"#,
        name = product(p)
    )
}

/// Event `i` of a product: a key, a group and a value. Keys repeat (one in
/// seven is an earlier key again, with another value), so which copy Silver
/// keeps matters.
fn event(i: usize) -> (String, String, i64) {
    let key = if i % 7 == 6 { i / 3 } else { i };
    (format!("k{key}"), format!("g{}", i % 11), (i % 101) as i64)
}

fn line(i: usize) -> String {
    let (id, grp, n) = event(i);
    format!(r#"{{"id":"{id}","grp":"{grp}","n":{n}}}"#)
}

/// The settings of one replica.
fn replica_vars(
    nats: &str,
    lake: &Path,
    specs: &Path,
    stage: usize,
    n: usize,
) -> BTreeMap<String, String> {
    let (name, addr) = STAGES[stage];
    let mut v = pipeline_vars(nats, lake, addr);
    v.insert("MEDALLION_PRODUCTS".into(), specs.display().to_string());
    v.insert("MEDALLION_REPLICA_ID".into(), format!("{name}-{n}"));
    v.insert("MEDALLION_LEASE_TTL".into(), "3s".into());
    v.insert("MEDALLION_ACK_WAIT".into(), "5s".into());
    v.insert("MEDALLION_BATCH_ROWS".into(), "2000".into());
    v.insert("OTEL_SDK_DISABLED".into(), "true".into());
    v
}

/// Publishes every product's events; the hot product's messages go to keyed
/// subjects (spread over its partitions) and every tenth is published again
/// later under another key token, so the same keys reach other partitions.
fn produce(url: String, waves: std::ops::Range<usize>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let messages = EVENTS / PRODUCTS / PER_MESSAGE;
        let mut published = 0;
        for m in waves.start * messages..waves.end * messages {
            for p in 0..PRODUCTS {
                let body = (m * PER_MESSAGE..(m + 1) * PER_MESSAGE)
                    .map(line)
                    .collect::<Vec<_>>()
                    .join("\n");
                let mut sends = vec![(
                    format!("medallion.ingest.scale.{}", product(p)),
                    format!("{p}-{m}"),
                )];
                if p == HOT {
                    sends[0].0 =
                        format!("medallion.ingest.scale.{}.producer{}", product(p), m % 13);
                    if m % 10 == 3 && m >= 10 {
                        // An earlier message's events again, under another key token.
                        let again = m - 10;
                        let body = (again * PER_MESSAGE..(again + 1) * PER_MESSAGE)
                            .map(line)
                            .collect::<Vec<_>>()
                            .join("\n");
                        publish(
                            &js,
                            &format!("medallion.ingest.scale.{}.resend{}", product(p), m % 5),
                            &format!("{p}-r{m}"),
                            body,
                        )
                        .await;
                        published += 1;
                    }
                }
                for (subject, id) in sends {
                    publish(&js, &subject, &id, body.clone()).await;
                    published += 1;
                }
            }
            if m % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        published
    })
}

async fn publish(js: &async_nats::jetstream::Context, subject: &str, id: &str, body: String) {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    medallion_e2e::publish_until_stored(js, subject, h, body.into_bytes()).await;
}

struct Replicas {
    nats: String,
    lake: std::path::PathBuf,
    specs: std::path::PathBuf,
    logs: std::path::PathBuf,
    /// (stage, replica id, process)
    running: Vec<(usize, String, Service)>,
    /// Replica id → its HTTP address (metrics).
    addrs: HashMap<String, String>,
    started: usize,
}

impl Replicas {
    /// `per_stage` replicas of each stage, started.
    fn new(nats: String, lake: &Path, specs: &Path, logs: &Path, per_stage: usize) -> Self {
        let mut r = Replicas {
            nats,
            lake: lake.to_path_buf(),
            specs: specs.to_path_buf(),
            logs: logs.to_path_buf(),
            running: Vec::new(),
            addrs: HashMap::new(),
            started: 0,
        };
        for stage in 0..3 {
            for _ in 0..per_stage {
                r.start(stage);
            }
        }
        r
    }

    fn start(&mut self, stage: usize) {
        self.started += 1;
        let vars = replica_vars(&self.nats, &self.lake, &self.specs, stage, self.started);
        let id = vars["MEDALLION_REPLICA_ID"].clone();
        let s = Service::start_named(STAGES[stage].0, &id, &vars, &self.logs);
        self.addrs.insert(id.clone(), vars[STAGES[stage].1].clone());
        self.running.push((stage, id, s));
    }

    fn services(&self) -> Vec<&Service> {
        self.running.iter().map(|(_, _, s)| s).collect()
    }

    fn live(&self, stage: usize) -> Vec<String> {
        self.running
            .iter()
            .filter(|(st, _, _)| *st == stage)
            .map(|(_, id, _)| id.clone())
            .collect()
    }
}

/// The lease holder of every unit of `stage` (by the stage's name in the
/// owners bucket).
async fn holders(js: &async_nats::jetstream::Context, stage: usize) -> BTreeMap<String, String> {
    let name = STAGES[stage].0.trim_start_matches("medallion-");
    let Ok(Some(o)) = medallion_bus::ownership::Owners::open_existing(js).await else {
        return BTreeMap::new();
    };
    let Ok(view) = o.view().await else {
        return BTreeMap::new();
    };
    view.leases
        .into_iter()
        .filter(|(st, _, _)| st == name)
        .map(|(_, u, l)| (u.to_string(), l.replica))
        .collect()
}

/// The units of `stage`: every product partition (ingest also has its
/// dead-letter unit).
fn units_of(stage: usize) -> usize {
    (PRODUCTS - 1) + HOT_PARTITIONS as usize + usize::from(stage == 0)
}

/// Waits until the holders of `stage`'s units (unit → replica) are `done`;
/// how long that took.
async fn until_holders(
    js: &async_nats::jetstream::Context,
    stage: usize,
    not_yet: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let h = holders(js, stage).await;
        if done(&h) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} units {not_yet}: {h:?}",
            STAGES[stage].0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every unit of `stage` is held by one of `live`, however
/// unevenly; how long that took.
async fn held_by_live(
    js: &async_nats::jetstream::Context,
    stage: usize,
    live: &[String],
) -> Duration {
    let not_yet = format!("without a live holder among {live:?}");
    until_holders(js, stage, &not_yet, |h| {
        h.len() == units_of(stage) && h.values().all(|r| live.contains(r))
    })
    .await
}

/// Waits until every unit of `stage` is held by one of `live` and their loads
/// differ by at most one; how long that took.
async fn rebalanced(
    js: &async_nats::jetstream::Context,
    stage: usize,
    live: &[String],
) -> Duration {
    let not_yet = format!("not rebalanced over {live:?}");
    until_holders(js, stage, &not_yet, |h| {
        let mut load: BTreeMap<&str, usize> = live.iter().map(|l| (l.as_str(), 0)).collect();
        let mut all_live = h.len() == units_of(stage);
        for r in h.values() {
            match load.get_mut(r.as_str()) {
                Some(n) => *n += 1,
                None => all_live = false,
            }
        }
        let (min, max) = (
            load.values().min().copied().unwrap_or(0),
            load.values().max().copied().unwrap_or(0),
        );
        all_live && max - min <= 1
    })
    .await
}

/// The tests of this file run one at a time: each runs up to nine replicas
/// on a two-core machine, and both time their rebalances.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_per_stage_survive_ten_kills_and_every_layer_is_exact() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let specs = tempfile::tempdir().unwrap();
    for p in 0..PRODUCTS {
        std::fs::write(specs.path().join(format!("{}.yaml", product(p))), spec(p)).unwrap();
    }
    let mut r = Replicas::new(nats.url(), lake.path(), specs.path(), logs.path(), 3);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for stage in 0..3 {
        let t = rebalanced(&js, stage, &r.live(stage)).await;
        eprintln!(
            "{}: {} units spread over 3 replicas in {:.1}s",
            STAGES[stage].0,
            units_of(stage),
            t.as_secs_f64()
        );
    }
    let started = Instant::now();
    let producer = produce(nats.url(), 0..1);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("kill order seed {seed}");
    // Per kill: how long until every unit has a live holder again (the dead
    // replica's leases expire, the survivors take them: the promise), until
    // the loads are even again, and until a new replica has its fair share
    // (units move between live replicas, each finishing its step in hand:
    // on this loaded machine that takes what it takes, so it is measured,
    // not bounded beyond the 60 s of `rebalanced`).
    let (mut failovers, mut evened, mut joins) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = (seed % r.running.len() as u64) as usize;
        let (stage, _, mut s) = r.running.remove(i);
        let at = started.elapsed();
        s.kill();
        let held = held_by_live(&js, stage, &r.live(stage)).await;
        let even = held + rebalanced(&js, stage, &r.live(stage)).await;
        r.start(stage);
        let join = rebalanced(&js, stage, &r.live(stage)).await;
        eprintln!(
            "kill -9 #{k}: {} at {:.1}s: its units held again {:.1}s later, loads even {:.1}s later; a new replica had its share in {:.1}s",
            s.name,
            at.as_secs_f64(),
            held.as_secs_f64(),
            even.as_secs_f64(),
            join.as_secs_f64()
        );
        failovers.push(held);
        evened.push(even);
        joins.push(join);
    }
    let orphaned = failovers.iter().max().copied().unwrap();
    for (what, mut t) in [
        ("units without a live holder after kill -9", failovers),
        ("loads even again after kill -9", evened),
        ("a new replica has its share", joins),
    ] {
        t.sort();
        eprintln!(
            "{what}: p50 {:.1}s, max {:.1}s over {} (lease TTL 3s)",
            t[t.len() / 2].as_secs_f64(),
            t[t.len() - 1].as_secs_f64(),
            t.len()
        );
    }
    // The lease TTL, a renewal period to notice, and the take-over.
    assert!(
        orphaned <= Duration::from_secs(10),
        "a killed replica's units were without a live holder for {orphaned:?}"
    );
    let published = producer.await.unwrap();
    eprintln!(
        "{published} messages published in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let settled = wait_settled(lake.path(), published, &r.services()).await;
    eprintln!(
        "every layer settled {:.1}s after the last publish",
        settled.as_secs_f64()
    );
    check(lake.path(), published).await;

    // A graceful stop (SIGTERM, as a rolling update or a drain does) of one
    // replica per stage while a second wave is published: its units move at
    // once, without waiting for the leases to expire, and what it pulled is
    // processed and acked before it goes, so nothing is delivered twice.
    let leaving: Vec<String> = (0..3).map(|stage| r.live(stage)[0].clone()).collect();
    let staying: Vec<String> = r
        .running
        .iter()
        .map(|(_, id, _)| id.clone())
        .filter(|id| !leaving.contains(id))
        .collect();
    let redelivered = async |r: &Replicas| {
        let mut n = 0.0;
        for id in &staying {
            n += medallion_e2e::metric(&r.addrs[id], "medallion_redeliveries_total", &[]).await;
        }
        n
    };
    // What the kills left unacked comes back once the ack wait (5 s) is over.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = redelivered(&r).await;
    let producer = produce(nats.url(), 1..2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut stopped = Vec::new();
    for (stage, id) in leaving.iter().enumerate() {
        let i = r.running.iter().position(|(_, x, _)| x == id).unwrap();
        let (_, _, mut s) = r.running.remove(i);
        let t0 = Instant::now();
        let status = s.stop();
        stopped.push(s);
        let s = stopped.last().unwrap();
        let stopped = t0.elapsed();
        assert!(
            status.success(),
            "{id} did not stop cleanly: {status}\n{}",
            tail(&s.logs(), 40)
        );
        let still: Vec<String> = holders(&js, stage)
            .await
            .into_iter()
            .filter(|(_, r)| r == id)
            .map(|(u, _)| u)
            .collect();
        assert!(
            still.is_empty(),
            "{id} stopped gracefully but still holds {still:?}"
        );
        let moved = rebalanced(&js, stage, &r.live(stage)).await;
        eprintln!(
            "graceful stop of {id}: exited {:.1}s after SIGTERM, its units held by the others {:.1}s later",
            stopped.as_secs_f64(),
            moved.as_secs_f64()
        );
    }
    let published = published + producer.await.unwrap();
    wait_settled(lake.path(), published, &r.services()).await;
    check(lake.path(), published).await;
    let after = redelivered(&r).await;
    // Redeliveries to the others also come from their own acks running past
    // the 5 s ack wait on this loaded machine; what a graceful stop must not
    // do is leave anything it pulled unacked, which the stage reports as it
    // exits (ingest acknowledges by purging after each commit).
    eprintln!(
        "messages redelivered while the replicas stopped (any cause): {}",
        after - before
    );
    for s in &stopped {
        let logs = s.logs();
        if s.name == "medallion-ingest" {
            continue;
        }
        let last = logs
            .lines()
            .rfind(|l| l.contains("\"stage stopped\""))
            .unwrap_or_else(|| panic!("{} did not report its stop:\n{}", s.name, tail(&logs, 30)));
        assert!(
            last.contains("\"left_unacked\":0"),
            "{} left events unacked when it stopped: {last}",
            s.name
        );
    }

    let mut all: Vec<Service> = r.running.drain(..).map(|(_, _, s)| s).collect();
    stop_all(&mut all);
}

/// `spec.partitions` changed twice while producers publish (1 → 4 → 2),
/// with two replicas per stage: keyed slots move between partitions with
/// messages waiting, upstream versions are dealt by the new count, and every
/// layer stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_change_under_load_and_every_layer_stays_exact() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let specs = tempfile::tempdir().unwrap();
    let write = |partitions: u32| {
        for p in 0..PRODUCTS {
            let n = if p == HOT { partitions } else { 1 };
            // Written aside and renamed: the services never read half a file.
            let tmp = specs.path().join(format!(".{}.yaml.tmp", product(p)));
            std::fs::write(&tmp, spec_with(p, n)).unwrap();
            std::fs::rename(&tmp, specs.path().join(format!("{}.yaml", product(p)))).unwrap();
        }
    };
    write(1);
    let mut r = Replicas::new(nats.url(), lake.path(), specs.path(), logs.path(), 2);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    // Three waves, so both changes land while producers publish.
    let producer = produce(nats.url(), 0..3);
    for (partitions, after) in [(4u32, 3), (2, 1)] {
        tokio::time::sleep(Duration::from_secs(after)).await;
        assert!(
            !producer.is_finished(),
            "the producer ended before the change to {partitions} partitions"
        );
        write(partitions);
        // Every stage's units follow the new count.
        let t0 = Instant::now();
        for stage in 0..3 {
            loop {
                let hot: BTreeSet<String> = holders(&js, stage)
                    .await
                    .into_keys()
                    .filter(|u| u.starts_with(&format!("scale.{}#", product(HOT))))
                    .collect();
                let want: BTreeSet<String> = (0..partitions)
                    .map(|k| format!("scale.{}#{k}", product(HOT)))
                    .collect();
                if hot == want {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "{}: {} units {hot:?}, want {want:?}",
                    STAGES[stage].0,
                    product(HOT)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        eprintln!(
            "{} partitions: {partitions} at {:.1}s, held by every stage {:.1}s later",
            product(HOT),
            started.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    let published = producer.await.unwrap();
    eprintln!(
        "{published} messages published in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let settled = wait_settled(lake.path(), published, &r.services()).await;
    eprintln!(
        "every layer settled {:.1}s after the last publish",
        settled.as_secs_f64()
    );
    check(lake.path(), published).await;
    let mut all: Vec<Service> = r.running.drain(..).map(|(_, _, s)| s).collect();
    stop_all(&mut all);
}

/// Rows of a table at its latest version (empty before it exists).
async fn table(lake: &Path, name: &str) -> Vec<RecordBatch> {
    medallion_e2e::read_table(lake, name).await
}

fn rows(b: &[RecordBatch]) -> usize {
    b.iter().map(|b| b.num_rows()).sum()
}

/// Waits until Bronze holds every message and Silver and Gold stopped moving
/// for a while with every Bronze version processed.
async fn wait_settled(lake: &Path, published: usize, services: &[&Service]) -> Duration {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300);
    loop {
        let mut bronze = 0;
        let mut done = true;
        for p in 0..PRODUCTS {
            bronze += rows(&table(lake, &format!("bronze.scale.{}", product(p))).await);
            let (b, s) = (
                version(lake, &format!("bronze.scale.{}", product(p))).await,
                silver_position(lake, &product(p)).await,
            );
            done &= b >= 0 && s == b;
            let g = gold_position(lake, &product(p)).await;
            let sv = version(lake, &format!("silver.scale.{}", product(p))).await;
            done &= g == sv;
        }
        if bronze == published && done {
            return t0.elapsed();
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = services
                .iter()
                .map(|s| format!("--- {} ---\n{}", s.name, tail(&s.logs(), 60)))
                .collect();
            panic!(
                "the lake did not settle within 300 s: bronze {bronze} of {published} messages\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn open(lake: &Path, name: &str) -> Option<deltalake::DeltaTable> {
    let lake = medallion_lake::Lake::from_location(&lake.display().to_string()).unwrap();
    let t = medallion_spec::TableRef::parse(name).unwrap();
    medallion_lake::open_at(&lake, &t, None)
        .await
        .ok()
        .flatten()
}

async fn version(lake: &Path, name: &str) -> i64 {
    match open(lake, name).await {
        Some(t) => t.version().map(|v| v as i64).unwrap_or(-1),
        None => -1,
    }
}

/// Transaction actions of every commit of a table, in log order.
async fn txns(lake: &Path, name: &str) -> Vec<(i64, Vec<(String, i64)>)> {
    let Some(t) = open(lake, name).await else {
        return Vec::new();
    };
    let tref = medallion_spec::TableRef::parse(name).unwrap();
    let mut out = Vec::new();
    for v in 0..=t.version().unwrap_or(0) as i64 {
        if let Some(s) = medallion_lake::commit_summary(&tref, &t, v).await.unwrap() {
            out.push((v, s.txns));
        }
    }
    out
}

async fn silver_position(lake: &Path, p: &str) -> i64 {
    txns(lake, &format!("silver.scale.{p}"))
        .await
        .into_iter()
        .flat_map(|(_, t)| t)
        .filter(|(a, _)| a == "medallion-transform")
        .map(|(_, v)| v & ((1 << 40) - 1))
        .max()
        .unwrap_or(-1)
}

async fn gold_position(lake: &Path, p: &str) -> i64 {
    txns(lake, &format!("gold.scale.{p}_by_grp"))
        .await
        .into_iter()
        .flat_map(|(_, t)| t)
        .filter(|(a, _)| a == "medallion-aggregate")
        .map(|(_, v)| v)
        .max()
        .unwrap_or(-1)
}

/// Every layer against what Bronze says, and the logs' transaction order.
async fn check(lake: &Path, published: usize) {
    let mut bronze_messages = 0;
    for p in 0..PRODUCTS {
        let name = product(p);
        // Bronze in commit order: every message once.
        let bref = format!("bronze.scale.{name}");
        let bt = open(lake, &bref).await.unwrap();
        let tref = medallion_spec::TableRef::parse(&bref).unwrap();
        let mut seqs = BTreeSet::new();
        let mut ids = BTreeSet::new();
        // (key) → (grp, n) of its first occurrence, in Bronze order.
        let mut first: HashMap<String, (String, i64)> = HashMap::new();
        for v in 0..=bt.version().unwrap() as i64 {
            let Some(c) = medallion_lake::read_commit(&tref, &bt, v).await.unwrap() else {
                continue;
            };
            for b in &c.batches {
                let payload = b
                    .column(b.schema().index_of("payload").unwrap())
                    .as_binary::<i32>();
                let seq = b
                    .column(b.schema().index_of("stream_seq").unwrap())
                    .as_primitive::<Int64Type>();
                let msg_id = b
                    .column(b.schema().index_of("msg_id").unwrap())
                    .as_string::<i32>();
                for r in 0..b.num_rows() {
                    assert!(
                        seqs.insert(seq.value(r)),
                        "{bref}: stream seq {} twice",
                        seq.value(r)
                    );
                    assert!(
                        ids.insert(msg_id.value(r).to_string()),
                        "{bref}: message {} twice",
                        msg_id.value(r)
                    );
                    for l in std::str::from_utf8(payload.value(r)).unwrap().lines() {
                        let j: serde_json::Value = serde_json::from_str(l).unwrap();
                        first
                            .entry(j["id"].as_str().unwrap().to_string())
                            .or_insert((
                                j["grp"].as_str().unwrap().to_string(),
                                j["n"].as_i64().unwrap(),
                            ));
                    }
                }
            }
        }
        bronze_messages += ids.len();

        // Silver: exactly the first occurrence of each key.
        let silver = table(lake, &format!("silver.scale.{name}")).await;
        let mut got: HashMap<String, (String, i64)> = HashMap::new();
        for b in &silver {
            let id = b
                .column(b.schema().index_of("id").unwrap())
                .as_string::<i32>();
            let grp = b
                .column(b.schema().index_of("grp").unwrap())
                .as_string::<i32>();
            let n = b
                .column(b.schema().index_of("n").unwrap())
                .as_primitive::<Int64Type>();
            for r in 0..b.num_rows() {
                let prev = got.insert(
                    id.value(r).to_string(),
                    (grp.value(r).to_string(), n.value(r)),
                );
                assert!(
                    prev.is_none(),
                    "silver.scale.{name}: key {} twice",
                    id.value(r)
                );
            }
        }
        assert_eq!(
            got.len(),
            first.len(),
            "silver.scale.{name}: one row per key"
        );
        for (k, v) in &first {
            assert_eq!(
                got.get(k),
                Some(v),
                "silver.scale.{name}: key {k} is not its first occurrence"
            );
        }
        assert_eq!(
            rows(&table(lake, &format!("silver.scale.{name}__quarantine")).await),
            0
        );

        // Gold: the one-shot aggregate of that Silver.
        let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (grp, n) in first.values() {
            let g = want.entry(grp.clone()).or_default();
            g.0 += 1;
            g.1 += n;
        }
        let gold = table(lake, &format!("gold.scale.{name}_by_grp")).await;
        let mut got_gold: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for b in &gold {
            let grp = b
                .column(b.schema().index_of("grp").unwrap())
                .as_string::<i32>();
            let cnt = b
                .column(b.schema().index_of("rows").unwrap())
                .as_primitive::<Int64Type>();
            let total = b
                .column(b.schema().index_of("total").unwrap())
                .as_primitive::<Int64Type>();
            for r in 0..b.num_rows() {
                assert!(
                    got_gold
                        .insert(grp.value(r).to_string(), (cnt.value(r), total.value(r)))
                        .is_none()
                );
            }
        }
        assert_eq!(got_gold, want, "gold.scale.{name}_by_grp");

        // No unit committed twice, none went backwards: in every table, each
        // transaction app id only moves forward, commit after commit.
        for t in [
            bref.clone(),
            format!("silver.scale.{name}"),
            format!("silver.scale.{name}__quarantine"),
            format!("gold.scale.{name}_by_grp"),
        ] {
            let mut last: HashMap<String, i64> = HashMap::new();
            for (v, ts) in txns(lake, &t).await {
                for (app, txn) in ts {
                    if let Some(prev) = last.insert(app.clone(), txn) {
                        assert!(
                            txn > prev,
                            "{t} version {v}: {app} went from {prev} to {txn}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        bronze_messages, published,
        "bronze: every published message exactly once"
    );
}
