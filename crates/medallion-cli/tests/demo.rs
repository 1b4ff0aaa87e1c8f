//! The `medallion` binary as a user runs it: the demo end to end, then
//! queries whose answers must agree across layers and with time travel.

use std::process::Command;

use medallion_testkit::free_port;

fn medallion(args: &[&str], nats: &str, lake: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(["--nats", nats, "--lake"])
        .arg(lake)
        .args([
            "--products",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../products"),
        ])
        .args(args)
        .env_remove("MEDALLION_LOG")
        // Not the default ports (a developer's `medallion up` may hold them): the OS picks.
        .env("MEDALLION_INGEST_ADDR", "127.0.0.1:0")
        .env("MEDALLION_TRANSFORM_ADDR", "127.0.0.1:0")
        .env("MEDALLION_AGGREGATE_ADDR", "127.0.0.1:0")
        .env("MEDALLION_CATALOG_ADDR", "127.0.0.1:0")
        .output()
        .expect("run medallion");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "medallion {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The single number in a one-cell result table.
fn cell(table: &str) -> i64 {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .nth(1)
        .and_then(|l| l.trim_matches('|').trim().parse().ok())
        .unwrap_or_else(|| panic!("no number in\n{table}"))
}

#[test]
fn demo_runs_end_to_end_and_layers_agree() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let out = medallion(&["demo", "--events", "3000"], &nats, &lake);
    assert!(
        out.contains("gold.finance.revenue_by_country_hourly"),
        "{out}"
    );
    assert!(
        out.contains("known_currency"),
        "quarantine reasons shown: {out}"
    );

    // The demo stopped its nats-server: queries read the lake alone.
    let bronze = cell(&medallion(
        &["query", "SELECT count(*) FROM bronze.finance.payments"],
        &nats,
        &lake,
    ));
    assert_eq!(bronze, 30, "3000 events in messages of 100");
    let silver = cell(&medallion(
        &["query", "SELECT count(*) FROM silver.finance.payments"],
        &nats,
        &lake,
    ));
    let distinct = cell(&medallion(
        &[
            "query",
            "SELECT count(DISTINCT event_id) FROM silver.finance.payments",
        ],
        &nats,
        &lake,
    ));
    assert_eq!(silver, distinct, "one row per key");
    let gold = cell(&medallion(
        &[
            "query",
            "SELECT sum(payments) FROM gold.finance.revenue_by_country_hourly",
        ],
        &nats,
        &lake,
    ));
    assert_eq!(gold, silver, "gold counts every silver row once");
    let quarantined = cell(&medallion(
        &[
            "query",
            "SELECT count(*) FROM silver.finance.payments__quarantine",
        ],
        &nats,
        &lake,
    ));
    // Every event is in Silver, in quarantine, or a re-send of an earlier id (1 in 50).
    assert_eq!(silver + quarantined + 3000 / 50, 3000);
    let at_zero = cell(&medallion(
        &[
            "query",
            "SELECT count(*) FROM silver.finance.payments",
            "--version",
            "0",
        ],
        &nats,
        &lake,
    ));
    assert_eq!(at_zero, 0, "time travel to the table's creation");
}
