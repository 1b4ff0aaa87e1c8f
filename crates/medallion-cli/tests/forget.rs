//! `medallion forget` against a real catalog, with this test standing in for
//! the transform: it marks requests done the way the transform does.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use medallion_bus::erasures::{ErasureOutcome, ErasureStatus, Erasures};
use medallion_runtime::{EnvReader, Runtime};
use medallion_testkit::{NatsServer, free_port};

const SECRET: &str = "cli-forget-test-secret-0123456789abcdef";

async fn medallion(catalog: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_medallion"));
    cmd.arg("forget")
        .args(args)
        .env("MEDALLION_CATALOG_URL", catalog)
        .env("MEDALLION_TOKEN", token)
        .env_remove("MEDALLION_LOG");
    cmd.output().await.expect("run medallion")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_asks_the_catalog_and_waits_for_the_outcome() {
    medallion_runtime::install_crypto_provider();
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../products/payments.yaml"),
        products.path().join("payments.yaml"),
    )
    .unwrap();
    let port = free_port();
    let mut env = EnvReader::from_map(
        [
            ("NATS_URL", nats.url()),
            ("MEDALLION_LAKE", lake.path().display().to_string()),
            ("MEDALLION_PRODUCTS", products.path().display().to_string()),
            ("MEDALLION_JWT_SECRET", SECRET.to_string()),
            ("MEDALLION_CATALOG_ADDR", format!("127.0.0.1:{port}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    let config = medallion_catalog::CatalogConfig::from_env(&mut env);
    env.finish().unwrap();
    let rt = Runtime::new("medallion-catalog");
    tokio::spawn(medallion_catalog::run(config, rt.clone()));
    let catalog = format!("http://127.0.0.1:{port}");
    let admin = medallion_catalog::auth::mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    let analyst = medallion_catalog::auth::mint_hs256(SECRET.as_bytes(), "alan", &["analyst"], 600);

    // --wait 0: the id, once the catalog has the request (retried while it starts).
    let mut accepted = None;
    for _ in 0..100 {
        let out = medallion(
            &catalog,
            &admin,
            &[
                "finance.payments",
                "--subject",
                "user_id=u-1",
                "--wait",
                "0",
            ],
        )
        .await;
        if out.status.success() {
            accepted = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = accepted.expect("the catalog accepted a request");
    let first = text(&out.stdout).trim().to_string();
    assert_eq!(first.len(), 36, "an id: {first}");

    // A malformed subject is refused before anything is sent.
    let out = medallion(&catalog, &admin, &["finance.payments", "--subject", "u-1"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--subject") && err.contains("<column>=<value>"),
        "{err}"
    );

    // Not an admin: the catalog's refusal, not a wait.
    let out = medallion(
        &catalog,
        &analyst,
        &["finance.payments", "--subject", "user_id=u-1"],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    // Nobody applies it: pending after --wait, with the id and the reason.
    let out = medallion(
        &catalog,
        &admin,
        &[
            "finance.payments",
            "--subject",
            "user_id=u-2",
            "--wait",
            "1",
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("still pending") && err.contains("is medallion-transform running?"),
        "{err}"
    );

    // A stand-in transform: every request it has not seen yet gets a
    // progress note, then is done without its value.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let erasures = Erasures::open(&async_nats::jetstream::new(client), &Default::default())
        .await
        .unwrap();
    let known: BTreeSet<String> = erasures
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.id)
        .collect();
    let outcome = ErasureOutcome {
        rows_removed: [("bronze".to_string(), 2), ("silver".to_string(), 1)]
            .into_iter()
            .collect(),
        bytes_rewritten: 4096,
        files_deleted: 3,
        log_entries_deleted: 2,
        millis: 17,
    };
    let transform = {
        let erasures = erasures.clone();
        let outcome = outcome.clone();
        tokio::spawn(async move {
            loop {
                for (rev, mut e) in erasures.list(None).await.unwrap() {
                    if known.contains(&e.id) || e.status == ErasureStatus::Done {
                        continue;
                    }
                    assert_eq!(e.value.as_deref(), Some("u-3"));
                    e.progress = Some("rewriting silver".into());
                    let rev = erasures.update(&e, rev).await.unwrap().unwrap();
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    e.value = None;
                    e.status = ErasureStatus::Done;
                    e.outcome = Some(outcome.clone());
                    e.finished_at = Some("2026-12-07T00:00:00Z".into());
                    erasures.update(&e, rev).await.unwrap().unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let out = medallion(
        &catalog,
        &admin,
        &[
            "finance.payments",
            "--subject",
            "user_id=u-3",
            "--wait",
            "30",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    transform.await.unwrap();
    let printed: ErasureOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, outcome);
    assert!(
        text(&out.stderr).contains("rewriting silver"),
        "progress shown: {}",
        text(&out.stderr)
    );

    rt.shutdown.cancel();
}
