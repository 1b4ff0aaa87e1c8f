//! The dedupe key set alone, one configuration per process so its peak RSS
//! is its own: `bench/dedupe_keys_bench.py` runs it for each key count with
//! a memory budget (keys beyond it spill to runs on disk) and without one
//! (every key in memory, as before budgets existed), and writes the table.
//!
//!     cargo bench --workspace --bench dedupe_keys -- <keys> <budget bytes | unbounded> <work dir>
//!
//! Keys arrive as commits of 20,000 new keys, each looked up first as the
//! transform does; then 1M keys already present (duplicates) and 1M absent
//! ones are looked up, the set is snapshotted beside a table and loaded back
//! in another directory. Prints one JSON line.

use std::time::Instant;

use medallion_transform::dedupe::KeySet;
use medallion_transform::key_budget::KeyBudget;
use object_store::local::LocalFileSystem;
use xxhash_rust::xxh3::xxh3_128;

const COMMIT: u64 = 20_000;
const PROBES: u64 = 1_000_000;

fn key(i: u64) -> u128 {
    xxh3_128(&i.to_le_bytes())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [keys, budget, work] = args.as_slice() else {
        eprintln!("usage: dedupe_keys <keys> <budget bytes | unbounded> <work dir>");
        std::process::exit(2);
    };
    let n: u64 = keys.parse().expect("key count");
    let work = std::path::PathBuf::from(work);
    let budget = (budget != "unbounded").then(|| {
        KeyBudget::prepare(&work.join("local"), budget.parse().expect("budget bytes"))
            .expect("local dir")
    });
    let spill = || {
        budget
            .as_ref()
            .map(|b| b.product_dir("bench.keys").expect("product dir"))
    };
    let mut set = KeySet::default().with_spill(spill());

    let started = Instant::now();
    let mut dropped = 0u64;
    let mut i = 0;
    while i < n {
        let batch: Vec<u128> = (i..(i + COMMIT).min(n)).map(key).collect();
        let fresh: Vec<u128> = batch
            .iter()
            .copied()
            .filter(|k| !set.contains(*k))
            .collect();
        dropped += (batch.len() - fresh.len()) as u64;
        set.extend(fresh);
        i += COMMIT;
    }
    let insert_s = started.elapsed().as_secs_f64();
    assert_eq!(
        (dropped, set.len() as u64),
        (0, n),
        "a new key was taken for a duplicate"
    );

    let started = Instant::now();
    let step = (n / PROBES).max(1);
    let present = (0..PROBES.min(n))
        .filter(|j| set.contains(key((j * step) % n)))
        .count() as u64;
    let dup_s = started.elapsed().as_secs_f64();
    assert_eq!(present, PROBES.min(n), "a duplicate was missed");
    let started = Instant::now();
    let absent = (0..PROBES).filter(|j| set.contains(key(n + j))).count();
    let absent_s = started.elapsed().as_secs_f64();
    assert_eq!(absent, 0);

    let table = work.join("table");
    std::fs::create_dir_all(&table).unwrap();
    let store = LocalFileSystem::new_with_prefix(&table).unwrap();
    let started = Instant::now();
    set.save(&store, 1).await.expect("snapshot");
    let save_s = started.elapsed().as_secs_f64();
    let (in_memory, runs) = (set.in_memory(), set.runs());
    let local_bytes = dir_bytes(&work.join("local"));
    let rss_before_load = peak_rss_mib();
    drop(set);
    let started = Instant::now();
    let (_, back) = KeySet::load(&store, 1, || Ok(spill()))
        .await
        .expect("load")
        .expect("a snapshot");
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(back.len() as u64, n);
    assert!(back.contains(key(n / 2)) && !back.contains(key(n + 1)));
    println!(
        "{}",
        serde_json::json!({
            "keys": n,
            "budget": budget.as_ref().map(|_| args[1].clone()),
            "in_memory_keys": in_memory,
            "runs": runs,
            "insert_keys_per_s": n as f64 / insert_s,
            "duplicate_lookups_per_s": PROBES.min(n) as f64 / dup_s,
            "absent_lookups_per_s": PROBES as f64 / absent_s,
            "snapshot_s": save_s,
            "snapshot_bytes": dir_bytes(&table),
            "load_s": load_s,
            "local_disk_bytes": local_bytes,
            "peak_rss_mib": rss_before_load,
            "peak_rss_with_load_mib": peak_rss_mib(),
        })
    );
}
