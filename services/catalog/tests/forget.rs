//! Erasure requests (`medallion forget`) through the catalog alone: who may
//! ask, what is checked, what is stored for the transform, and that the
//! subject's value shows nowhere but in the pending request.

use std::time::Duration;

use medallion_bus::erasures::{ErasureOutcome, ErasureStatus, Erasures};
use medallion_catalog::auth::mint_hs256;
use medallion_testkit::{NatsServer, eventually};
use serde_json::{Value, json};

mod common;
use common::{Api, SECRET, start_catalog};

/// The subject's value: must never appear outside the pending request.
const VALUE: &str = "user-4711-secret";
const PATH: &str = "/v1/products/finance/payments/forget";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_requests_are_admin_only_audited_by_digest_and_stored_for_the_transform() {
    common::init();
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = common::payments_products();
    let (catalog, port) = start_catalog(&nats, lake.path(), products.path());
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    let admin = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    let analyst = mint_hs256(SECRET.as_bytes(), "alan", &["analyst"], 600);
    eventually(
        Duration::from_secs(30),
        "the product registered",
        || async {
            api.call("GET", "/v1/products/finance/payments", Some(&admin), None)
                .await
                .0
                == 200
        },
    )
    .await;

    // Accepted: 202 with the digest, never the value.
    let (s, first) = api
        .call(
            "POST",
            PATH,
            Some(&admin),
            Some(json!({"column": "user_id", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 202, "{first}");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["product"], "finance.payments");
    assert_eq!(first["column"], "user_id");
    let id = first["id"].as_str().unwrap().to_string();
    let digest = first["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 32, "{first}");
    assert!(!first.to_string().contains(VALUE), "{first}");

    // Stored for the transform: pending, with the value it needs.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let erasures = Erasures::open(&js, &Default::default()).await.unwrap();
    let (revision, stored) = erasures
        .get("finance", "payments", &id)
        .await
        .unwrap()
        .expect("the request is in the bucket");
    assert_eq!(stored.status, ErasureStatus::Pending);
    assert_eq!(stored.value.as_deref(), Some(VALUE));
    assert_eq!(stored.column, "user_id");
    assert_eq!(stored.digest, digest);
    assert_eq!(stored.requested_by, "ada");

    // The same subject has the same digest: an auditor can match requests.
    let (s, second) = api
        .call(
            "POST",
            PATH,
            Some(&admin),
            Some(json!({"column": "user_id", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 202, "{second}");
    assert_eq!(second["digest"], digest.as_str());
    assert_ne!(second["id"], id.as_str());

    // Not an admin: 403, audited as a denial.
    let (s, v) = api
        .call(
            "POST",
            PATH,
            Some(&analyst),
            Some(json!({"column": "user_id", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    for path in [format!("{PATH}/{id}"), "/v1/erasures".to_string()] {
        let (s, v) = api.call("GET", &path, Some(&analyst), None).await;
        assert_eq!(s, 403, "{path}: {v}");
    }
    let (s, v) = api
        .call(
            "POST",
            PATH,
            None,
            Some(json!({"column": "user_id", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 401, "{v}");

    // Refused as it stands: 400 naming the field.
    let (s, v) = api
        .call(
            "POST",
            PATH,
            Some(&admin),
            Some(json!({"column": "email", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.starts_with("column"), "{msg}");
    assert!(
        msg.contains("user_id") && msg.contains("event_id"),
        "lists the columns: {msg}"
    );
    for body in [
        json!({"column": "user_id", "value": ""}),
        json!({"column": "user_id"}),
        json!({"column": "user_id", "value": 4711}),
    ] {
        let (s, v) = api
            .call("POST", PATH, Some(&admin), Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap().starts_with("value"),
            "{body}: {v}"
        );
        assert!(!v.to_string().contains("4711"), "{v}");
    }
    let (s, v) = api
        .call(
            "POST",
            "/v1/products/finance/nothing/forget",
            Some(&admin),
            Some(json!({"column": "user_id", "value": VALUE})),
        )
        .await;
    assert_eq!(s, 404, "{v}");

    // Followed by id: the stored request without the value.
    let (s, v) = api
        .call("GET", &format!("{PATH}/{id}"), Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["digest"], digest.as_str());
    assert!(
        v.get("value").is_none() && !v.to_string().contains(VALUE),
        "{v}"
    );
    for unknown in [uuid_like(), "not-an-id".to_string(), "a.>".to_string()] {
        let (s, v) = api
            .call("GET", &format!("{PATH}/{unknown}"), Some(&admin), None)
            .await;
        assert_eq!(s, 404, "{unknown}: {v}");
    }

    // All requests, newest first, without values.
    let (s, v) = api.call("GET", "/v1/erasures", Some(&admin), None).await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["erasures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second["id"].as_str().unwrap(), id.as_str()], "{v}");
    assert!(!v.to_string().contains(VALUE), "{v}");

    // What the transform writes when done is what the requester reads.
    let mut done = stored.clone();
    done.value = None;
    done.status = ErasureStatus::Done;
    done.outcome = Some(ErasureOutcome {
        rows_removed: [("silver".to_string(), 3)].into_iter().collect(),
        bytes_rewritten: 1234,
        files_deleted: 2,
        log_entries_deleted: 1,
        millis: 42,
    });
    done.finished_at = Some("2026-12-07T00:00:00Z".into());
    assert!(erasures.update(&done, revision).await.unwrap().is_some());
    let (s, v) = api
        .call("GET", &format!("{PATH}/{id}"), Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "done");
    assert_eq!(v["outcome"]["rows_removed"]["silver"], 3);
    assert_eq!(v["outcome"]["millis"], 42);

    // The audit log: the accepted request with its digest, the denial, and
    // nowhere the value.
    let (s, log) = api
        .call(
            "GET",
            "/v1/audit?product=finance.payments",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 200, "{log}");
    assert!(!log.to_string().contains(VALUE), "{log}");
    let records = log["records"].as_array().unwrap();
    let find = |user: &str, action: &str, allowed: bool| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["user"] == user && r["action"] == action && r["allowed"] == allowed)
            .collect()
    };
    let accepted = find("ada", "forget", true);
    assert_eq!(accepted.len(), 2, "{log}");
    assert_eq!(accepted[0]["target"], "finance.payments");
    assert_eq!(accepted[0]["erasure"]["id"], id.as_str());
    assert_eq!(accepted[0]["erasure"]["digest"], digest.as_str());
    assert_eq!(accepted[0]["erasure"]["column"], "user_id");
    let denied = find("alan", "forget", false);
    assert_eq!(denied.len(), 1, "{log}");
    assert!(
        denied[0]["reason"].as_str().unwrap().contains("admin"),
        "{log}"
    );
    assert_eq!(find("alan", "get_erasure", false).len(), 1, "{log}");
    assert_eq!(
        find("ada", "forget", false).len(),
        4,
        "the refused bodies: {log}"
    );
    assert!(!find("ada", "get_erasure", true).is_empty(), "{log}");

    // The routes are in the OpenAPI document.
    let (_, doc) = api.call("GET", "/v1/openapi.json", None, None).await;
    for path in [
        "/v1/products/{domain}/{product}/forget",
        "/v1/products/{domain}/{product}/forget/{id}",
        "/v1/erasures",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }

    catalog.shutdown.cancel();
}

/// An id of the right shape that names no request.
fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".to_string()
}
