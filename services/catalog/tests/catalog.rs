//! The catalog against a real pipeline: auth attacks, the RBAC matrix,
//! masking through every query shape, time travel, lineage and audit.

use std::time::Duration;

use bytes::Bytes;
use medallion_catalog::auth::mint_hs256;
use medallion_testkit::{NatsServer, eventually};
use serde_json::{Value, json};

mod common;
use common::{Api, SECRET, start_platform};

fn b64(v: &Value) -> String {
    // URL-safe base64 without padding, enough for a forged token.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = serde_json::to_vec(v).unwrap();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..(chunk.len() + 1) {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_end_to_end() {
    common::init();
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = common::payments_products();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();

    let (runtimes, catalog, port) = start_platform(&nats, lake.path(), products.path()).await;
    let lines: Vec<String> = (0..300)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-29T0{}:00:00Z","user_id":"user-{}","amount":{},"currency":"EUR","country":"{}"}}"#,
                i % 3,
                i % 7,
                i % 50 + 1,
                ["FR", "DE"][i % 2]
            )
        })
        .collect();
    js.publish(
        "medallion.ingest.finance.payments",
        Bytes::from(lines.join("\n")),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    let admin = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    let analyst = mint_hs256(SECRET.as_bytes(), "alan", &["analyst"], 600);
    let auditor = mint_hs256(SECRET.as_bytes(), "grace", &["auditor"], 600);
    let nobody = mint_hs256(SECRET.as_bytes(), "eve", &["intern"], 600);
    eventually(Duration::from_secs(60), "gold through the API", || async {
        let (s, v) = api
            .query(
                &admin,
                "SELECT sum(payments) AS n FROM gold.finance.revenue_by_country_hourly",
            )
            .await;
        s == 200 && v["rows"][0]["n"] == json!(300)
    })
    .await;

    // Gold via the API equals the aggregate of the input, computed here.
    let (_, v) = api.query(&analyst, "SELECT country, sum(revenue) AS r FROM gold.finance.revenue_by_country_hourly GROUP BY country ORDER BY country").await;
    let want = |parity: usize| {
        (0..300)
            .filter(|i| i % 2 == parity)
            .map(|i| (i % 50 + 1) as f64)
            .sum::<f64>()
    };
    assert_eq!(
        v["rows"],
        json!([{"country": "DE", "r": want(1)}, {"country": "FR", "r": want(0)}]),
        "{v}"
    );

    // Authentication attacks: all 401.
    let expired = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 0);
    tokio::time::sleep(Duration::from_secs(7)).await; // past the 5 s leeway
    let wrong_key = mint_hs256(
        b"another-secret-0123456789abcdef-xyz",
        "ada",
        &["admin"],
        600,
    );
    let exp = 4_102_444_800u64;
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "ada", "exp": exp, "roles": ["admin"]}))
    );
    let rs_header = format!(
        "{}.{}.AAAA",
        b64(&json!({"alg": "RS256", "typ": "JWT"})),
        b64(&json!({"sub": "ada", "exp": exp, "roles": ["admin"]}))
    );
    for (what, token) in [
        ("expired", Some(expired.as_str())),
        ("wrong key", Some(&wrong_key)),
        ("alg none", Some(&alg_none)),
        ("RS256 header", Some(&rs_header)),
        ("no token", None),
    ] {
        let (s, _) = api.call("GET", "/v1/products", token, None).await;
        assert_eq!(s, 401, "{what}");
    }
    // A role smuggled in another claim is ignored.
    let smuggled = {
        let claims = json!({"sub": "eve", "exp": exp, "roles": ["intern"], "role": "admin", "realm_access": {"roles": ["admin"]}});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let (s, _) = api
        .query(&smuggled, "SELECT count(*) FROM silver.finance.payments")
        .await;
    assert_eq!(s, 403);

    // RBAC matrix: role × layer.
    let matrix = [
        (&admin, "bronze.finance.payments", 200),
        (&admin, "silver.finance.payments", 200),
        (&admin, "gold.finance.revenue_by_country_hourly", 200),
        (&analyst, "bronze.finance.payments", 403),
        (&analyst, "silver.finance.payments", 403),
        (&analyst, "silver.finance.payments__quarantine", 403),
        (&analyst, "gold.finance.revenue_by_country_hourly", 200),
        (&auditor, "bronze.finance.payments", 403),
        (&auditor, "silver.finance.payments", 200),
        (&auditor, "gold.finance.revenue_by_country_hourly", 200),
        (&nobody, "gold.finance.revenue_by_country_hourly", 403),
    ];
    for (token, table, want) in matrix {
        let (s, v) = api
            .query(token, &format!("SELECT count(*) FROM {table}"))
            .await;
        assert_eq!(s, want, "query {table}: {v}");
        let path = format!("/v1/tables/{}", table.replace('.', "/"));
        let (s, v) = api.call("GET", &path, Some(token), None).await;
        assert_eq!(s, want, "GET {path}");
        if s == 200 && v["exists"] == true {
            // The table's health, for operators: files, log, maintenance.
            let h = &v["health"];
            assert!(h["files"].as_u64().is_some_and(|n| n >= 1), "{table}: {v}");
            assert!(h["bytes"].as_i64().is_some_and(|n| n > 0), "{table}: {v}");
            assert!(h["log_since_checkpoint"].as_i64().is_some(), "{table}: {v}");
            assert_eq!(h["unreferenced_files"], 0, "{table}: {v}");
            assert!(
                v["last_commit"].is_string(),
                "{table}: freshness counts data commits: {v}"
            );
        }
    }
    let (s, v) = api.call("GET", "/v1/products", Some(&nobody), None).await;
    assert_eq!(
        (s, v["products"].as_array().map(Vec::len)),
        (200, Some(0)),
        "nobody sees no product"
    );

    // Masked columns never leak, whatever the query shape.
    for sql in [
        "SELECT user_id FROM silver.finance.payments",
        "SELECT * FROM silver.finance.payments",
        "SELECT u FROM (SELECT user_id AS u FROM silver.finance.payments) t",
        "SELECT a.user_id FROM silver.finance.payments a JOIN silver.finance.payments b ON a.event_id = b.event_id",
        "SELECT max(user_id) AS user_id FROM silver.finance.payments",
    ] {
        let (s, v) = api.query(&auditor, sql).await;
        assert_eq!(s, 200, "{sql}: {v}");
        let rows = v["rows"].as_array().unwrap();
        assert!(!rows.is_empty());
        assert!(
            rows.iter()
                .all(|r| r.get("user_id").is_none_or(Value::is_null)
                    && r.get("u").is_none_or(Value::is_null)),
            "{sql} leaked: {v}"
        );
    }
    let (s, v) = api
        .query(
            &admin,
            "SELECT count(DISTINCT user_id) AS n FROM silver.finance.payments",
        )
        .await;
    assert_eq!(
        (s, v["rows"][0]["n"].clone()),
        (200, json!(7)),
        "admin sees the (hashed) tokens"
    );
    let (s, _) = api
        .query(&auditor, "SELECT * FROM information_schema.tables")
        .await;
    assert_eq!(s, 403);
    let (s, v) = api
        .query(&admin, "DROP TABLE silver.finance.payments")
        .await;
    assert_eq!(s, 400, "statements other than queries are refused: {v}");

    // Time travel.
    let (s, v) = api
        .call(
            "POST",
            "/v1/query",
            Some(&auditor),
            Some(json!({"sql": "SELECT count(*) AS n FROM silver.finance.payments", "version": 0})),
        )
        .await;
    assert_eq!((s, v["rows"][0]["n"].clone()), (200, json!(0)), "{v}");
    let now = chrono::Utc::now().to_rfc3339();
    let (s, v) = api
        .call(
            "POST",
            "/v1/query",
            Some(&auditor),
            Some(json!({"sql": "SELECT count(*) AS n FROM silver.finance.payments", "as_of": now})),
        )
        .await;
    assert_eq!((s, v["rows"][0]["n"].clone()), (200, json!(300)), "{v}");
    let (s, v) = api
        .call(
            "POST",
            "/v1/query",
            Some(&auditor),
            Some(json!({"sql": "SELECT count(*) AS n FROM silver.finance.payments", "as_of": "2001-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 400, "before the table existed: {v}");
    let (s, _) = api
        .call(
            "POST",
            "/v1/query",
            Some(&auditor),
            Some(json!({"sql": "SELECT 1", "as_of": "yesterday"})),
        )
        .await;
    assert_eq!(s, 400);

    // Arrow IPC when asked; masking holds there too.
    let resp = api
        .http
        .post(format!("{}/v1/query", api.base))
        .header("authorization", format!("Bearer {auditor}"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&json!({"sql": "SELECT event_id, user_id FROM silver.finance.payments"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = resp.bytes().await.unwrap();
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 300);
    assert!(
        batches
            .iter()
            .all(|b| b.column(1).null_count() == b.num_rows()),
        "user_id masked in Arrow too"
    );

    // Discovery and lineage.
    eventually(Duration::from_secs(30), "quality counts", || async {
        let (_, v) = api
            .call("GET", "/v1/products/finance/payments", Some(&auditor), None)
            .await;
        v["quality"]["rows_out"] == json!(300)
    })
    .await;
    let (s, v) = api
        .call("GET", "/v1/products/finance/payments", Some(&auditor), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        v["quality"]["expectations"]["positive_amount"],
        json!({"action": "quarantine", "passed": 300, "failed": 0}),
        "{v}"
    );
    assert_eq!(v["quality"]["rows_in"], json!(300));
    assert_eq!(v["owner"], "payments-team@example.com");
    let tables: Vec<String> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        tables.contains(&"silver.finance.payments".to_string())
            && !tables.contains(&"bronze.finance.payments".to_string()),
        "{tables:?}"
    );
    let (s, v) = api
        .call(
            "GET",
            "/v1/products/finance/payments/lineage",
            Some(&analyst),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let revenue = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["column"] == "revenue")
        .unwrap()
        .clone();
    assert_eq!(
        revenue["sources"],
        json!(["silver.finance.payments.amount"]),
        "{v}"
    );
    let (s, v) = api
        .call(
            "GET",
            "/v1/products/finance/payments/lineage?format=openlineage",
            Some(&analyst),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "ingest, transform, one gold table: {v}");
    for e in events {
        assert_eq!(e["eventType"], "COMPLETE");
        assert!(e["run"]["runId"].as_str().unwrap().len() == 36, "{e}");
    }
    let gold = &events[2]["outputs"][0];
    assert_eq!(gold["name"], "gold.finance.revenue_by_country_hourly");
    assert_eq!(
        gold["facets"]["columnLineage"]["fields"]["revenue"]["inputFields"][0]["field"],
        "amount"
    );

    // Audit: denials are recorded with who and why; only admin reads it.
    let (s, _) = api.call("GET", "/v1/audit", Some(&analyst), None).await;
    assert_eq!(s, 403);
    let (s, v) = api
        .call("GET", "/v1/audit?user=eve", Some(&admin), None)
        .await;
    assert_eq!(s, 200);
    let records = v["records"].as_array().unwrap();
    assert!(
        records.iter().any(|r| r["allowed"] == false
            && r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("gold.finance.revenue_by_country_hourly")),
        "{v}"
    );
    let (_, v) = api
        .call(
            "GET",
            "/v1/audit?user=%3Cunauthenticated%3E",
            Some(&admin),
            None,
        )
        .await;
    assert!(
        v["records"].as_array().unwrap().len() >= 5,
        "every 401 is audited: {v}"
    );

    catalog.shutdown.cancel();
    for rt in runtimes {
        rt.shutdown.cancel();
    }
}
