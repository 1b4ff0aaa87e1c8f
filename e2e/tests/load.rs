//! `medallion load` as a user runs it against a deployment: paced publishes
//! that ingest and the transform take exactly once, with a JSON report of
//! what NATS acknowledged.

use std::time::Duration;

use medallion_e2e::{
    binary, pipeline_vars, read_table, row_count, start_services, stop_all, unique_values,
};
use medallion_testkit::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_publishes_paced_events_the_pipeline_keeps() {
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let names = ["medallion-ingest", "medallion-transform"];
    let vars: Vec<_> = ["MEDALLION_INGEST_ADDR", "MEDALLION_TRANSFORM_ADDR"]
        .iter()
        .map(|a| pipeline_vars(&nats.url(), lake.path(), a))
        .collect();
    let (mut services, _js) = start_services(&names, &vars, logs.path(), nats.url()).await;

    let out = tokio::task::spawn_blocking({
        let url = nats.url();
        move || {
            std::process::Command::new(binary("medallion"))
                .args([
                    "--nats",
                    &url,
                    "load",
                    "finance.payments",
                    "--events",
                    "3000",
                    "--per-message",
                    "100",
                    "--rate",
                    "3000",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "medallion load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 3000, "{report}");
    assert_eq!(report["messages"], 30, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["subject"], "medallion.ingest.finance.payments");
    // Paced: 3,000 events at 3,000/s cannot be done in much under a second.
    assert!(report["seconds"].as_f64().unwrap() > 0.9, "{report}");
    assert!(report["ack_ms_p99"].as_f64().unwrap() >= report["ack_ms_p50"].as_f64().unwrap());

    // The generated events satisfy the shipped contract: every one in Silver, once.
    eventually(Duration::from_secs(120), "3000 rows in silver", || async {
        row_count(&read_table(lake.path(), "silver.finance.payments").await) == 3000
    })
    .await;
    let silver = read_table(lake.path(), "silver.finance.payments").await;
    assert_eq!(unique_values(&silver, "event_id").len(), 3000);
    assert_eq!(
        row_count(&read_table(lake.path(), "bronze.finance.payments").await),
        30
    );
    assert_eq!(
        row_count(&read_table(lake.path(), "silver.finance.payments__quarantine").await),
        0
    );

    // A user's own file, cycled; a bad setting is refused with the fix.
    let url = nats.url();
    let file = logs.path().join("events.ndjson");
    std::fs::write(&file, "{\"a\":1}\n{\"a\":2}\n").unwrap();
    let file_arg = file.display().to_string();
    let with_file = |extra: &[&str]| {
        let mut args = vec![
            "--nats",
            &url,
            "load",
            "finance.payments",
            "--per-message",
            "5",
        ];
        args.extend(["--file", &file_arg]);
        args.extend(extra);
        std::process::Command::new(binary("medallion"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = with_file(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--events N or --duration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_file(&["--events", "10"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["events"].as_u64(), report["messages"].as_u64()),
        (Some(10), Some(2))
    );
    eventually(
        Duration::from_secs(60),
        "the file's messages in bronze",
        || async { row_count(&read_table(lake.path(), "bronze.finance.payments").await) == 32 },
    )
    .await;
    stop_all(&mut services);
}
