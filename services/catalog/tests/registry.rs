//! The product registry against the real pipeline: specs registered over the
//! API reach transform and aggregate without a restart, compatible changes
//! evolve the tables in place, breaking ones are refused with each change
//! named unless a full refresh is asked for, and folder-defined products
//! belong to their files.

use std::time::Duration;

use bytes::Bytes;
use medallion_catalog::auth::mint_hs256;
use medallion_testkit::{NatsServer, eventually};
use serde_json::json;

mod common;
use common::{Api, SECRET, start_platform};

const ORDERS_V1: &str = r#"
apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {name: orders}
spec:
  domain: shop
  owner: shop-team@example.com
  description: Web shop orders
  source: {format: ndjson}
  schema:
    - {name: order_id, type: string, required: true}
    - {name: qty, type: int64}
  key: [order_id]
  gold:
    - name: orders_by_qty
      sql: SELECT qty, count(*) AS orders FROM silver GROUP BY qty
  access:
    - {role: analyst, layers: [silver, gold]}
"#;

fn orders(range: std::ops::Range<usize>, channel: bool) -> Bytes {
    let lines: Vec<String> = range
        .map(|i| {
            if channel {
                format!(r#"{{"order_id":"o{i}","qty":{},"channel":"web"}}"#, i % 4)
            } else {
                format!(r#"{{"order_id":"o{i}","qty":{}}}"#, i % 4)
            }
        })
        .collect();
    Bytes::from(lines.join("\n"))
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

async fn count(api: &Api, token: &str, sql: &str) -> Option<i64> {
    let (s, v) = api.query(token, sql).await;
    if s != 200 {
        return None;
    }
    v["rows"][0]["n"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_round_trip_compatibility_and_hot_reload() {
    common::init();
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    let payments_file = products.path().join("payments.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../products/payments.yaml"),
        &payments_file,
    )
    .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    let (runtimes, catalog, port) = start_platform(&nats, lake.path(), products.path()).await;
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    let admin = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    let analyst = mint_hs256(SECRET.as_bytes(), "alan", &["analyst"], 600);

    // The folder's product is registered and belongs to its file.
    eventually(Duration::from_secs(30), "catalog serving", || async {
        api.call("GET", "/v1/products/finance/payments", Some(&admin), None)
            .await
            .0
            == 200
    })
    .await;
    let (_, v) = api
        .call("GET", "/v1/products/finance/payments", Some(&admin), None)
        .await;
    assert_eq!(v["revision"], json!(1), "{v}");
    assert!(
        v["managed_by"].as_str().unwrap().ends_with("payments.yaml"),
        "{v}"
    );
    let (s, v) = api
        .put_spec(
            "/v1/products/finance/payments",
            &admin,
            &std::fs::read_to_string(&payments_file).unwrap(),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("change or remove that file"),
        "{v}"
    );
    let (s, _) = api
        .call(
            "DELETE",
            "/v1/products/finance/payments",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 409);

    // Registering needs admin, a valid spec, and a path that names it.
    let path = "/v1/products/shop/orders";
    let (s, _) = api.put_spec(path, &analyst, ORDERS_V1).await;
    assert_eq!(s, 403);
    let (s, v) = api
        .put_spec(
            path,
            &admin,
            &ORDERS_V1.replace("type: int64", "type: integer"),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("spec.schema[1].type"),
        "{v}"
    );
    let (s, v) = api
        .put_spec("/v1/products/shop/other", &admin, ORDERS_V1)
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api.put_spec(path, &admin, ORDERS_V1).await;
    assert_eq!((s, v["created"].clone()), (200, json!(true)), "{v}");
    let first_revision = v["revision"].as_u64().unwrap();

    // Transform and aggregate pick it up without a restart.
    js.publish("medallion.ingest.shop.orders", orders(0..100, false))
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "v1 rows in gold", || async {
        count(
            &api,
            &analyst,
            "SELECT sum(orders) AS n FROM gold.shop.orders_by_qty",
        )
        .await
            == Some(100)
    })
    .await;

    // A compatible change (a new optional column) evolves Silver in place.
    let v2 = ORDERS_V1.replace(
        "    - {name: qty, type: int64}\n",
        "    - {name: qty, type: int64}\n    - {name: channel, type: string}\n",
    );
    let (s, v) = api.put_spec(path, &admin, &v2).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["full_refresh"], "not needed");
    // The transform reloads on the registry's change notification.
    tokio::time::sleep(Duration::from_secs(1)).await;
    js.publish("medallion.ingest.shop.orders", orders(100..150, true))
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "v2 rows in silver", || async {
        count(
            &api,
            &analyst,
            "SELECT count(*) AS n FROM silver.shop.orders WHERE channel = 'web'",
        )
        .await
            == Some(50)
    })
    .await;
    assert_eq!(
        count(
            &api,
            &analyst,
            "SELECT count(*) AS n FROM silver.shop.orders WHERE channel IS NULL"
        )
        .await,
        Some(100),
        "rows written before the change read the new column as NULL"
    );

    // Breaking changes are refused, each one named…
    let v3 = v2
        .replace("{name: qty, type: int64}", "{name: qty, type: float64}")
        .replace(
            "{name: channel, type: string}",
            "{name: sales_channel, type: string}",
        );
    let (s, v) = api.put_spec(path, &admin, &v3).await;
    assert_eq!(s, 409, "{v}");
    let e = v["error"].as_str().unwrap();
    for part in [
        "silver: column qty changes type from Int64 to Float64",
        "silver: column channel is removed (renamed to sales_channel?",
        "gold table orders_by_qty: column qty changes type",
        "?full_refresh=true",
    ] {
        assert!(e.contains(part), "missing {part:?} in {e}");
    }

    // …and taken with a full refresh: Silver and Gold rebuilt from Bronze.
    let (s, v) = api
        .put_spec(&format!("{path}?full_refresh=true"), &admin, &v3)
        .await;
    assert_eq!(
        (s, v["full_refresh"].clone()),
        (200, json!("started")),
        "{v}"
    );
    eventually(
        Duration::from_secs(90),
        "silver rebuilt under v3",
        || async {
            let (s, v) = api
                .call("GET", "/v1/tables/silver/shop/orders", Some(&admin), None)
                .await;
            s == 200
                && v["schema"].as_array().is_some_and(|cols| {
                    cols.iter()
                        .any(|c| c["name"] == "qty" && c["type"] == "Float64")
                })
                && count(&api, &admin, "SELECT count(*) AS n FROM silver.shop.orders").await
                    == Some(150)
        },
    )
    .await;
    eventually(Duration::from_secs(60), "gold rebuilt under v3", || async {
        count(
            &api,
            &analyst,
            "SELECT sum(orders) AS n FROM gold.shop.orders_by_qty",
        )
        .await
            == Some(150)
    })
    .await;
    // The old Silver stays readable by version.
    let (s, v) = api
        .call(
            "POST",
            "/v1/query",
            Some(&admin),
            Some(json!({"sql": "SELECT count(*) AS n FROM silver.shop.orders WHERE channel = 'web'", "version": 2})),
        )
        .await;
    assert_eq!((s, v["rows"][0]["n"].clone()), (200, json!(50)), "{v}");

    // Every version is kept.
    let (s, v) = api
        .call("GET", &format!("{path}/versions"), Some(&admin), None)
        .await;
    assert_eq!(s, 200);
    let revisions: Vec<u64> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions.len(), 3, "{v}");
    assert_eq!(revisions[0], first_revision);
    assert!(
        v["versions"][2]["document"]
            .as_str()
            .unwrap()
            .contains("sales_channel")
    );

    // A breaking edit of a product file is refused and shows on readiness.
    let edited = std::fs::read_to_string(&payments_file)
        .unwrap()
        .replace("key: [event_id]", "key: [event_id, ts]");
    std::fs::write(&payments_file, edited).unwrap();
    eventually(Duration::from_secs(30), "refusal on /readyz", || async {
        let r = reqwest::get(format!("{}/readyz", api.base)).await.unwrap();
        r.status().as_u16() == 503
            && r.text()
                .await
                .unwrap()
                .contains("key changes from [event_id]")
    })
    .await;

    // Deleting unregisters; the tables stay readable by admin.
    let (s, v) = api.call("DELETE", path, Some(&admin), None).await;
    assert_eq!((s, v["tables_kept"].clone()), (200, json!(true)), "{v}");
    let (s, _) = api.call("GET", path, Some(&admin), None).await;
    assert_eq!(s, 404);

    // Every change is in the audit log with its revision.
    let (_, v) = api
        .call(
            "GET",
            "/v1/audit?user=ada&product=shop.orders",
            Some(&admin),
            None,
        )
        .await;
    let actions: Vec<(String, bool)> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] != "query" && r["action"] != "table")
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    for want in [
        ("put_product", true),
        ("put_product", false),
        ("delete_product", true),
    ] {
        assert!(
            actions.contains(&(want.0.to_string(), want.1)),
            "{want:?} not in {actions:?}"
        );
    }
    // Names cannot escape their table path: `..`, slashes, quotes and NUL in
    // product names or SQL identifiers are refused, and nothing is created.
    for (d, p) in [
        ("..", "orders"),
        ("shop", ".."),
        ("shop", "a%22b"),
        ("shop", "a%00b"),
        ("Shop", "orders"),
    ] {
        let doc = ORDERS_V1
            .replace(
                "name: orders}",
                &format!(
                    "name: \"{}\"}}",
                    p.replace("%22", "\\\"").replace("%00", "\\0")
                ),
            )
            .replace("domain: shop", &format!("domain: \"{d}\""));
        let (s, v) = api
            .put_spec(&format!("/v1/products/{d}/{p}"), &admin, &doc)
            .await;
        assert!(s == 400 || s == 404, "{d}/{p}: {s} {v}");
    }
    for sql in [
        r#"SELECT * FROM "bronze"."../finance"."payments""#,
        r#"SELECT * FROM bronze.finance."payments/../../silver""#,
        "SELECT * FROM bronze.finance.\"pay\0ments\"",
    ] {
        let (s, v) = api.query(&admin, sql).await;
        assert!(s == 400 || s == 403, "{sql}: {s} {v}");
    }
    for path in [
        "/v1/tables/bronze/..%2F..%2Fetc/passwd",
        "/v1/tables/gold/finance/..",
        "/v1/tables/..%2F/finance/x",
    ] {
        let (s, _) = api.call("GET", path, Some(&admin), None).await;
        assert!(s == 400 || s == 403 || s == 404, "{path}: {s}");
    }
    let escaped: Vec<_> = walk(lake.path())
        .into_iter()
        .filter(|p| !p.starts_with(lake.path()) || p.to_string_lossy().contains(".."))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");
    assert!(!lake.path().join("../finance").exists());

    // The OpenAPI document lists exactly the served routes, each behind auth.
    let doc: serde_json::Value = reqwest::get(format!("{}/v1/openapi.json", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    let want: Vec<(String, String)> = [
        ("DELETE", "/v1/products/{domain}/{product}"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/erasures"),
        ("GET", "/v1/pipeline"),
        ("GET", "/v1/products"),
        ("GET", "/v1/products/{domain}/{product}"),
        ("GET", "/v1/products/{domain}/{product}/forget/{id}"),
        ("GET", "/v1/products/{domain}/{product}/lineage"),
        ("GET", "/v1/products/{domain}/{product}/versions"),
        ("GET", "/v1/tables/{layer}/{domain}/{table}"),
        ("POST", "/v1/products/{domain}/{product}/forget"),
        ("POST", "/v1/query"),
        ("PUT", "/v1/products/{domain}/{product}"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(documented, want);
    for (method, path) in &documented {
        let concrete = path
            .replace("{domain}", "finance")
            .replace("{product}", "payments")
            .replace("{layer}", "gold")
            .replace("{table}", "t")
            .replace("{id}", "x");
        let url = format!("{}{concrete}", api.base);
        let req = match method.as_str() {
            "GET" => api.http.get(url),
            "PUT" => api.http.put(url).body("x"),
            "DELETE" => api.http.delete(url),
            _ => api.http.post(url).json(&json!({"sql": "SELECT 1"})),
        };
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(
            status, 401,
            "{method} {path} is documented and served behind auth"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    catalog.shutdown.cancel();
    for rt in runtimes {
        rt.shutdown.cancel();
    }
}
