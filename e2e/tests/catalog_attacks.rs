//! The catalog's auth and isolation attacks against the real
//! `medallion-catalog` binary (the in-process catalog has its own tests in
//! `services/catalog/tests`): nats-server, ingest, transform and aggregate
//! fill two products (`finance.payments`, which analysts read in Gold and
//! auditors in Silver with `user_id` masked, and `hr.salaries`, which only
//! the `hr` role sees), then every attack is sent over plain HTTP (paths as
//! written, no client-side normalisation) and must get exactly the status
//! listed, leak no row, write nothing outside the lake's table directories,
//! and be in the audit log as a denial. The catalog keeps serving throughout.
//!
//! A second test runs the catalog with an RS256 public key file and sends
//! the algorithm-confusion attacks (HS256 signed with the public key, `alg:
//! none`, RS512/PS256 with the right key, another key, a `jku` header).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use medallion_e2e::{Service, gold_payments, http_request, pipeline_vars, read_table, row_count};
use medallion_testkit::{NatsServer, eventually};
use serde_json::{Value, json};

const SECRET: &str = "e2e-catalog-attacks-secret-0123456789abcdef";
const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "medallion-catalog";
const GOLD: &str = "gold.finance.revenue_by_country_hourly";
/// A string no legitimate file or directory of the test contains.
const MARKER: &str = "pwned";

const SALARIES: &str = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata:
  name: salaries
spec:
  domain: hr
  owner: hr-team@example.com
  description: Salaries, for HR only
  source:
    format: ndjson
  schema:
    - {name: employee_id, type: string, required: true}
    - {name: department, type: string}
    - {name: salary, type: float64}
  key: [employee_id]
  gold:
    - name: payroll_by_department
      sql: SELECT department, count(*) AS employees, sum(salary) AS total FROM silver GROUP BY department
  access:
    - {role: hr, layers: [silver, gold]}
"#;

const ORDERS: &str = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata:
  name: orders
spec:
  domain: shop
  owner: shop@example.com
  description: Orders
  source:
    format: ndjson
  schema:
    - {name: order_id, type: string, required: true}
  key: [order_id]
  access:
    - {role: analyst, layers: [bronze, silver, gold]}
"#;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Valid claims for `sub` with `roles` (issuer and audience as configured).
fn claims(sub: &str, roles: &[&str]) -> Value {
    json!({"sub": sub, "roles": roles, "exp": now() + 900, "iss": ISSUER, "aud": AUDIENCE})
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, claims, &secret_key(SECRET.as_bytes()))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A token with `alg: none` and no signature.
fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(&serde_json::to_vec(claims).unwrap())
    )
}

/// Every answer of an attack run, for the report and the audit check.
#[derive(Default)]
struct Tally {
    /// (attack, status)
    answers: Vec<(String, u16)>,
    /// Requests answered 401 (audited as `<unauthenticated>`).
    unauthenticated: usize,
    /// (user, action, target) of every 400/403 answered to an authenticated caller.
    denied: Vec<(String, String, String)>,
}

struct Catalog {
    addr: String,
}

impl Catalog {
    /// Sends one request; the status and the body as JSON (a string when it is not JSON).
    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        content_type: &str,
        body: &str,
    ) -> (u16, Value) {
        let (status, body) = http_request(
            &self.addr,
            method,
            path,
            auth,
            content_type,
            body.as_bytes(),
        )
        .await
        .unwrap_or_else(|| panic!("the catalog does not answer {method} {path}"));
        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, v)
    }

    async fn get(&self, path: &str, auth: Option<&str>) -> (u16, Value) {
        self.call("GET", path, auth, "application/json", "").await
    }

    async fn query(&self, auth: Option<&str>, body: &Value) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/query",
            auth,
            "application/json",
            &body.to_string(),
        )
        .await
    }

    async fn sql(&self, auth: &str, sql: &str) -> (u16, Value) {
        self.query(Some(auth), &json!({ "sql": sql })).await
    }
}

/// Files and directories under `dir` (relative), not following links.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

/// A 401 answer carries the reason and nothing else.
fn assert_refused_401(what: &str, status: u16, v: &Value) {
    assert_eq!(status, 401, "{what}: {v}");
    let keys: Vec<&String> = v
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        ["error"],
        "{what}: a 401 leaks nothing but its reason: {v}"
    );
}

/// A 403/400 answer carries no rows.
fn assert_no_rows(what: &str, v: &Value) {
    assert!(
        v.get("rows").is_none() && v.get("products").is_none() && v.get("records").is_none(),
        "{what} leaked: {v}"
    );
}

fn pipeline(
    nats: &NatsServer,
    lake: &Path,
    products: &Path,
    addr: &str,
) -> BTreeMap<String, String> {
    let mut v = pipeline_vars(&nats.url(), lake, addr);
    v.insert("MEDALLION_PRODUCTS".into(), products.display().to_string());
    v.insert("OTEL_SDK_DISABLED".into(), "true".into());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_refuses_every_attack_and_keeps_serving() {
    let nats = NatsServer::start();
    // Everything the services may write lives under `root`; logs elsewhere.
    let root = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let lake = root.path().join("lake");
    let products = root.path().join("products");
    std::fs::create_dir_all(&lake).unwrap();
    std::fs::create_dir_all(&products).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../products/payments.yaml"),
        products.join("payments.yaml"),
    )
    .unwrap();
    std::fs::write(products.join("salaries.yaml"), SALARIES).unwrap();

    let names = [
        "medallion-ingest",
        "medallion-transform",
        "medallion-aggregate",
        "medallion-catalog",
    ];
    let mut vars: Vec<BTreeMap<String, String>> = [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
        "MEDALLION_CATALOG_ADDR",
    ]
    .iter()
    .map(|a| pipeline(&nats, &lake, &products, a))
    .collect();
    for (k, v) in [
        ("MEDALLION_JWT_SECRET", SECRET),
        ("MEDALLION_JWT_ISSUER", ISSUER),
        ("MEDALLION_JWT_AUDIENCE", AUDIENCE),
        ("MEDALLION_QUERY_TIMEOUT", "3s"),
    ] {
        vars[3].insert(k.into(), v.into());
    }
    let catalog = Catalog {
        addr: vars[3]["MEDALLION_CATALOG_ADDR"].clone(),
    };
    let (mut services, js) =
        medallion_e2e::start_services(&names, &vars, logs.path(), nats.url()).await;

    // 200 payments (8 with amount 0 go to quarantine), 12 salaries.
    let payments: Vec<String> = (0..200)
        .map(|i| {
            let amount = if i % 25 == 0 { 0 } else { i % 50 + 1 };
            format!(
                r#"{{"event_id":"a{i}","ts":"2026-11-29T0{}:00:00Z","user_id":"user-{}","amount":{amount},"currency":"EUR","country":"{}"}}"#,
                i % 3,
                i % 7,
                ["FR", "DE"][i % 2]
            )
        })
        .collect();
    for chunk in payments.chunks(10) {
        js.publish("medallion.ingest.finance.payments", chunk.join("\n").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let salaries: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"employee_id":"e{i}","department":"{}","salary":{}}}"#,
                ["eng", "ops"][i % 2],
                50_000 + i * 1000
            )
        })
        .collect();
    js.publish("medallion.ingest.hr.salaries", salaries.join("\n").into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (silver_rows, quarantined) = (192usize, 8usize);
    eventually(
        Duration::from_secs(120),
        "both products reach gold",
        || async {
            gold_payments(&lake).await == silver_rows as i64
                && row_count(&read_table(&lake, "gold.hr.payroll_by_department").await) == 2
                && row_count(&read_table(&lake, "silver.finance.payments__quarantine").await)
                    == quarantined
        },
    )
    .await;

    let admin = bearer(&hs256(&claims("ada", &["admin"])));
    let analyst = bearer(&hs256(&claims("alan", &["analyst"])));
    let auditor = bearer(&hs256(&claims("grace", &["auditor"])));
    let hr = bearer(&hs256(&claims("helen", &["hr"])));
    eventually(Duration::from_secs(60), "the catalog answers", || async {
        let (s, v) = catalog
            .sql(&admin, &format!("SELECT sum(payments) AS n FROM {GOLD}"))
            .await;
        s == 200 && v["rows"][0]["n"] == json!(silver_rows)
    })
    .await;

    // What the lake and the temp dir hold before the attacks.
    let before = tree(root.path());
    let tables_before: BTreeSet<PathBuf> = before
        .iter()
        .filter(|p| p.components().count() == 4 && p.starts_with("lake"))
        .cloned()
        .collect();
    assert_eq!(tables_before.len(), 8, "{tables_before:?}");
    let outside = std::env::temp_dir().join(format!("medallion-{MARKER}-{}", std::process::id()));
    let since = rfc3339_now();
    let mut t = Tally::default();

    // Positive controls: the right tokens work.
    for (who, token) in [("admin", &admin), ("hr", &hr)] {
        let (s, v) = catalog.get("/v1/products", Some(token)).await;
        assert_eq!(s, 200, "{who}: {v}");
    }

    // 1. Authentication: each refused with 401 on a list and a query, and audited.
    let other_secret = secret_key(b"another-secret-0123456789abcdef-xyz");
    let valid = hs256(&claims("ada", &["admin"]));
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let mut c = claims("ada", &["admin"]);
        c["roles"] = json!(["admin", "hr"]);
        c["sub"] = json!("mallory");
        format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_vec(&c).unwrap()),
            parts[2]
        )
    };
    let with = |patch: &dyn Fn(&mut Value)| {
        let mut c = claims("ada", &["admin"]);
        patch(&mut c);
        c
    };
    let kid_injection = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("../../../../../../dev/null".into());
        jsonwebtoken::encode(&h, &claims("ada", &["admin"]), &secret_key(b"\n")).unwrap()
    };
    let auth_attacks: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("Basic scheme", Some("Basic YWRhOmFkbWlu".into())),
        ("garbage token", Some(bearer("not.a.jwt"))),
        ("bare token without Bearer", Some(valid.clone())),
        (
            "expired",
            Some(bearer(&hs256(&with(&|c| c["exp"] = json!(now() - 120))))),
        ),
        (
            "not yet valid (nbf in an hour)",
            Some(bearer(&hs256(&with(&|c| c["nbf"] = json!(now() + 3600))))),
        ),
        (
            "wrong signature",
            Some(bearer(&sign(
                Algorithm::HS256,
                &claims("ada", &["admin"]),
                &other_secret,
            ))),
        ),
        ("payload tampered, signature kept", Some(bearer(&tampered))),
        (
            "alg none",
            Some(bearer(&alg_none(&claims("ada", &["admin"])))),
        ),
        (
            "alg none with the valid signature",
            Some(bearer(&format!(
                "{}{}",
                alg_none(&claims("ada", &["admin"])),
                valid.rsplit('.').next().unwrap()
            ))),
        ),
        (
            "HS512 with the right secret",
            Some(bearer(&sign(
                Algorithm::HS512,
                &claims("ada", &["admin"]),
                &secret_key(SECRET.as_bytes()),
            ))),
        ),
        (
            "kid path injection, empty key",
            Some(bearer(&kid_injection)),
        ),
        (
            "wrong issuer",
            Some(bearer(&hs256(&with(&|c| {
                c["iss"] = json!("https://evil.example/")
            })))),
        ),
        (
            "no issuer",
            Some(bearer(&hs256(&with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            })))),
        ),
        (
            "wrong audience",
            Some(bearer(&hs256(&with(&|c| c["aud"] = json!("another-api"))))),
        ),
        (
            "no audience",
            Some(bearer(&hs256(&with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            })))),
        ),
        (
            "no exp",
            Some(bearer(&hs256(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })))),
        ),
        (
            "no sub",
            Some(bearer(&hs256(&with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            })))),
        ),
        (
            "roles as a string",
            Some(bearer(&hs256(&with(&|c| c["roles"] = json!("admin"))))),
        ),
    ];
    for (what, auth) in &auth_attacks {
        let (s, v) = catalog.get("/v1/products", auth.as_deref()).await;
        assert_refused_401(&format!("GET /v1/products, {what}"), s, &v);
        let (s, v) = catalog
            .query(
                auth.as_deref(),
                &json!({"sql": "SELECT * FROM bronze.finance.payments"}),
            )
            .await;
        assert_refused_401(&format!("query bronze, {what}"), s, &v);
        let (s, v) = catalog
            .call(
                "DELETE",
                "/v1/products/finance/payments",
                auth.as_deref(),
                "text/plain",
                "",
            )
            .await;
        assert_refused_401(&format!("DELETE payments, {what}"), s, &v);
        t.unauthenticated += 3;
        t.answers.push((format!("auth: {what}"), 401));
    }

    // 2. Role escalation.
    let smuggled = bearer(&hs256(&with(&|c| {
        c["sub"] = json!("eve");
        c["roles"] = json!(["intern"]);
        c["role"] = json!("admin");
        c["realm_access"] = json!({"roles": ["admin"]});
        c["groups"] = json!(["admin"]);
    })));
    let look_alike = bearer(&hs256(&with(&|c| {
        c["sub"] = json!("eve");
        c["roles"] = json!(["Admin", "admin ", "analyst\u{0}admin"]);
    })));
    let deny = |t: &mut Tally, user: &str, action: &str, target: &str, what: String, s: u16| {
        t.denied.push((user.into(), action.into(), target.into()));
        t.answers.push((what, s));
    };
    for (what, token) in [
        ("roles smuggled in other claims", &smuggled),
        ("look-alike role names", &look_alike),
    ] {
        let sql = "SELECT * FROM bronze.finance.payments";
        let (s, v) = catalog.sql(token, sql).await;
        assert_eq!(s, 403, "{what}: {v}");
        assert_no_rows(what, &v);
        deny(
            &mut t,
            "eve",
            "query",
            sql,
            format!("escalation: {what}"),
            s,
        );
    }
    let (s, v) = catalog.get("/v1/products", Some(&smuggled)).await;
    assert_eq!(
        (s, v["products"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );

    // Layers and products a role is not granted: 403 on every route.
    let ungranted: &[(&str, &str, &str)] = &[
        ("alan", "analyst", "bronze.finance.payments"),
        ("alan", "analyst", "silver.finance.payments"),
        ("alan", "analyst", "silver.finance.payments__quarantine"),
        ("alan", "analyst", "silver.hr.salaries"),
        ("alan", "analyst", "gold.hr.payroll_by_department"),
        ("grace", "auditor", "bronze.finance.payments"),
        ("grace", "auditor", "gold.hr.payroll_by_department"),
        ("helen", "hr", "bronze.hr.salaries"),
        ("helen", "hr", GOLD),
    ];
    let token_of = |role: &str| match role {
        "analyst" => analyst.clone(),
        "auditor" => auditor.clone(),
        _ => hr.clone(),
    };
    for (user, role, table) in ungranted {
        let token = token_of(role);
        let sql = format!("SELECT * FROM {table}");
        let (s, v) = catalog.sql(&token, &sql).await;
        assert_eq!(s, 403, "{role} reads {table}: {v}");
        assert_no_rows(&sql, &v);
        deny(
            &mut t,
            user,
            "query",
            &sql,
            format!("{role}: query {table}"),
            s,
        );
        let path = format!("/v1/tables/{}", table.replace('.', "/"));
        let (s, v) = catalog.get(&path, Some(&token)).await;
        assert_eq!(s, 403, "{role} GET {path}: {v}");
        deny(
            &mut t,
            user,
            "table",
            table,
            format!("{role}: GET {path}"),
            s,
        );
        // Time travel does not open another door.
        let (s, v) = catalog
            .query(Some(&token), &json!({"sql": sql, "version": 0}))
            .await;
        assert_eq!(s, 403, "{role} reads {table} at version 0: {v}");
        deny(
            &mut t,
            user,
            "query",
            &sql,
            format!("{role}: {table} at version 0"),
            s,
        );
    }
    for (path, action) in [
        ("/v1/products/hr/salaries", "get_product"),
        ("/v1/products/hr/salaries/lineage", "lineage"),
        ("/v1/products/hr/salaries/versions", "versions"),
    ] {
        let (s, v) = catalog.get(path, Some(&analyst)).await;
        assert_eq!(s, 403, "analyst GET {path}: {v}");
        assert!(!v.to_string().contains("salary"), "{path} leaked: {v}");
        deny(
            &mut t,
            "alan",
            action,
            "hr.salaries",
            format!("analyst: GET {path}"),
            s,
        );
    }
    let (s, v) = catalog.get("/v1/products", Some(&analyst)).await;
    let listed: Vec<&str> = v["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!((s, listed), (200, vec!["payments"]), "{v}");
    let (s, v) = catalog.get("/v1/audit", Some(&analyst)).await;
    assert_eq!(s, 403, "{v}");
    assert_no_rows("analyst reads the audit log", &v);
    deny(
        &mut t,
        "alan",
        "audit",
        "*",
        "analyst: GET /v1/audit".into(),
        s,
    );
    // Changing specs needs admin.
    let payments_yaml = std::fs::read_to_string(products.join("payments.yaml"))
        .unwrap()
        .replace(
            "{role: analyst, layers: [gold]}",
            "{role: analyst, layers: [bronze, silver, gold]}",
        );
    for (method, path, body, target) in [
        (
            "PUT",
            "/v1/products/finance/payments",
            payments_yaml.as_str(),
            "finance.payments",
        ),
        (
            "DELETE",
            "/v1/products/finance/payments",
            "",
            "finance.payments",
        ),
        ("PUT", "/v1/products/shop/orders", ORDERS, "shop.orders"),
        ("DELETE", "/v1/products/hr/salaries", "", "hr.salaries"),
    ] {
        let (s, v) = catalog
            .call(method, path, Some(&analyst), "application/yaml", body)
            .await;
        assert_eq!(s, 403, "analyst {method} {path}: {v}");
        let action = if method == "PUT" {
            "put_product"
        } else {
            "delete_product"
        };
        deny(
            &mut t,
            "alan",
            action,
            target,
            format!("analyst: {method} {path}"),
            s,
        );
    }
    // A request body cannot carry grants.
    let (s, v) = catalog
        .query(
            Some(&analyst),
            &json!({"sql": "SELECT * FROM bronze.finance.payments", "grants": [{"table": "bronze.finance.payments"}], "roles": ["admin"]}),
        )
        .await;
    assert_eq!(s, 422, "unknown request fields are refused: {v}");
    assert_no_rows("grants in the body", &v);
    t.answers
        .push(("analyst: grants and roles in the query body".into(), s));

    // PII and masked columns never leak to the auditor, whatever the shape.
    let masked_shapes = [
        "SELECT user_id FROM silver.finance.payments",
        "SELECT * FROM silver.finance.payments",
        "SELECT u FROM (SELECT user_id AS u FROM silver.finance.payments) t",
        "WITH x AS (SELECT user_id FROM silver.finance.payments) SELECT user_id FROM x",
        "SELECT a.user_id FROM silver.finance.payments a JOIN silver.finance.payments b ON a.event_id = b.event_id",
        "SELECT max(user_id) AS user_id FROM silver.finance.payments",
        "SELECT CAST(user_id AS VARCHAR) AS u, length(user_id) AS l FROM silver.finance.payments",
        "SELECT user_id FROM silver.finance.payments UNION ALL SELECT user_id FROM silver.finance.payments",
        "SELECT payload FROM silver.finance.payments__quarantine",
    ];
    for sql in masked_shapes {
        let (s, v) = catalog.sql(&auditor, sql).await;
        assert_eq!(s, 200, "{sql}: {v}");
        let rows = v["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{sql}: {v}");
        for r in rows {
            for (k, val) in r.as_object().unwrap() {
                assert!(
                    val.is_null() || !["user_id", "u", "l", "payload"].contains(&k.as_str()),
                    "{sql} leaked {k}: {v}"
                );
            }
        }
        t.answers.push((format!("auditor, masked: {sql}"), s));
    }
    for (sql, want) in [
        (
            "SELECT count(DISTINCT user_id) AS n FROM silver.finance.payments",
            0,
        ),
        (
            "SELECT count(*) AS n FROM silver.finance.payments WHERE user_id IS NOT NULL",
            0,
        ),
        (
            "SELECT count(*) AS n FROM silver.finance.payments WHERE user_id LIKE 'user-%'",
            0,
        ),
    ] {
        let (s, v) = catalog.sql(&auditor, sql).await;
        assert_eq!(
            (s, v["rows"][0]["n"].clone()),
            (200, json!(want)),
            "{sql}: {v}"
        );
        t.answers.push((format!("auditor, masked: {sql}"), s));
    }
    let (s, v) = catalog
        .query(
            Some(&auditor),
            &json!({"sql": "SELECT count(*) AS n FROM silver.finance.payments WHERE user_id IS NOT NULL", "version": 1}),
        )
        .await;
    assert_eq!(
        (s, v["rows"][0]["n"].clone()),
        (200, json!(0)),
        "time travel is masked: {v}"
    );
    // Control: admin sees the (hashed) values, never the raw ones.
    let (s, v) = catalog
        .sql(&admin, "SELECT count(DISTINCT user_id) AS n, count(*) FILTER (WHERE user_id LIKE 'user-%') AS raw FROM silver.finance.payments")
        .await;
    assert_eq!(
        (s, v["rows"][0]["n"].clone(), v["rows"][0]["raw"].clone()),
        (200, json!(7), json!(0)),
        "{v}"
    );

    // 3. SQL that tries to leave the read-only, granted session.
    let copy_target = root.path().join(format!("{MARKER}-copy.parquet"));
    let bronze_dir = lake.join("bronze/finance/payments");
    let sql_attacks: Vec<(&str, &str, String, u16)> = vec![
        (
            "ada",
            "admin",
            "DROP TABLE silver.finance.payments".into(),
            400,
        ),
        (
            "ada",
            "admin",
            "DELETE FROM silver.finance.payments".into(),
            400,
        ),
        (
            "ada",
            "admin",
            format!("INSERT INTO {GOLD} SELECT * FROM {GOLD}"),
            400,
        ),
        (
            "ada",
            "admin",
            "UPDATE silver.finance.payments SET amount = 0".into(),
            400,
        ),
        (
            "ada",
            "admin",
            format!("CREATE TABLE {MARKER} AS SELECT * FROM bronze.finance.payments"),
            403,
        ),
        (
            "ada",
            "admin",
            format!("CREATE EXTERNAL TABLE {MARKER} STORED AS CSV LOCATION '/etc/passwd'"),
            403,
        ),
        (
            "ada",
            "admin",
            "CREATE VIEW v AS SELECT * FROM bronze.finance.payments".into(),
            400,
        ),
        (
            "ada",
            "admin",
            format!(
                "COPY (SELECT * FROM bronze.finance.payments) TO '{}'",
                copy_target.display()
            ),
            400,
        ),
        (
            "ada",
            "admin",
            format!(
                "COPY silver.finance.payments TO '{}' STORED AS CSV",
                outside.display()
            ),
            400,
        ),
        (
            "ada",
            "admin",
            format!("SELECT * FROM read_parquet('{}')", bronze_dir.display()),
            403,
        ),
        (
            "ada",
            "admin",
            "SELECT * FROM read_csv('/etc/passwd')".into(),
            403,
        ),
        (
            "ada",
            "admin",
            "SELECT * FROM generate_series(1, 100000000000)".into(),
            403,
        ),
        ("ada", "admin", "SELECT * FROM '/etc/passwd'".into(), 403),
        (
            "ada",
            "admin",
            format!("SELECT * FROM '{}'", bronze_dir.display()),
            403,
        ),
        (
            "ada",
            "admin",
            "SELECT * FROM 'file:///etc/passwd'".into(),
            403,
        ),
        (
            "ada",
            "admin",
            "SET datafusion.catalog.information_schema = true".into(),
            400,
        ),
        (
            "ada",
            "admin",
            "SELECT * FROM information_schema.tables".into(),
            403,
        ),
        ("ada", "admin", "SHOW TABLES".into(), 403),
        (
            "ada",
            "admin",
            "SELECT 1; DROP TABLE silver.finance.payments".into(),
            400,
        ),
        (
            "ada",
            "admin",
            // Runs past MEDALLION_QUERY_TIMEOUT (3 s): cut off, 400.
            "SELECT count(*) FROM silver.finance.payments a, silver.finance.payments b, \
             silver.finance.payments c, silver.finance.payments d \
             WHERE concat(a.event_id, b.event_id, c.event_id, d.event_id) = 'x'"
                .into(),
            400,
        ),
        (
            "alan",
            "analyst",
            format!("SELECT * FROM {GOLD}; SELECT * FROM bronze.finance.payments"),
            403,
        ),
        (
            "alan",
            "analyst",
            "SELECT * FROM /* gold.finance.revenue_by_country_hourly */ bronze.finance.payments"
                .into(),
            403,
        ),
        (
            "alan",
            "analyst",
            format!("SELECT g.* FROM {GOLD} g JOIN bronze.finance.payments b ON true"),
            403,
        ),
        (
            "alan",
            "analyst",
            format!(
                "SELECT country FROM {GOLD} UNION ALL SELECT subject FROM bronze.finance.payments"
            ),
            403,
        ),
        (
            "alan",
            "analyst",
            format!(
                "SELECT * FROM {GOLD} WHERE country IN (SELECT subject FROM bronze.finance.payments)"
            ),
            403,
        ),
        (
            "alan",
            "analyst",
            "WITH x AS (SELECT * FROM bronze.finance.payments) SELECT * FROM x".into(),
            403,
        ),
        (
            "alan",
            "analyst",
            format!(
                "WITH \"{GOLD}\" AS (SELECT * FROM silver.finance.payments) SELECT * FROM \"{GOLD}\""
            ),
            403,
        ),
        (
            "alan",
            "analyst",
            "EXPLAIN SELECT * FROM bronze.finance.payments".into(),
            403,
        ),
        (
            "alan",
            "analyst",
            "DESCRIBE bronze.finance.payments".into(),
            403,
        ),
        (
            "alan",
            "analyst",
            "SELECT * FROM BRONZE.FINANCE.PAYMENTS".into(),
            403,
        ),
        (
            "alan",
            "analyst",
            "SELECT * FROM \"silver\".finance.payments".into(),
            403,
        ),
        (
            "ada",
            "admin",
            r#"SELECT * FROM "bronze"."../finance"."payments""#.into(),
            403,
        ),
        (
            "ada",
            "admin",
            r#"SELECT * FROM bronze.finance."payments/../../silver""#.into(),
            403,
        ),
        (
            "ada",
            "admin",
            "SELECT * FROM bronze.finance.\"pay\u{0}ments\"".into(),
            403,
        ),
        (
            "ada",
            "admin",
            // One quoted identifier is a bare name: not the table, not found.
            r#"SELECT * FROM "bronze.finance.payments""#.into(),
            400,
        ),
        (
            "ada",
            "admin",
            r#"SELECT * FROM bronze."finance/../hr".salaries"#.into(),
            403,
        ),
    ];
    let mut wrong = Vec::new();
    for (user, role, sql, want) in &sql_attacks {
        let token = if *role == "admin" {
            admin.clone()
        } else {
            token_of(role)
        };
        let (s, v) = catalog.sql(&token, sql).await;
        if s != *want {
            wrong.push(format!("{role}: {sql}: {s} (want {want}) {v}"));
        }
        assert_no_rows(sql, &v);
        deny(&mut t, user, "query", sql, format!("{role}: {sql}"), s);
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // A comment is a comment: this is a plain, granted Gold read.
    let sql =
        format!("SELECT sum(payments) AS n FROM {GOLD} -- ; DROP TABLE bronze.finance.payments");
    let (s, v) = catalog.sql(&analyst, &sql).await;
    assert_eq!(
        (s, v["rows"][0]["n"].clone()),
        (200, json!(silver_rows)),
        "{v}"
    );
    t.answers.push((format!("analyst: {sql}"), s));
    let (s, v) = catalog.get("/healthz", None).await;
    assert_eq!(s, 200, "the catalog survives the runaway query: {v}");

    // 4. Names that try to leave their table path.
    let doc = |domain: &str, name: &str| {
        ORDERS
            .replace("name: orders", &format!("name: {}", json!(name)))
            .replace("domain: shop", &format!("domain: {}", json!(domain)))
    };
    let puts: Vec<(String, String, String)> = vec![
        (
            "/v1/products/..%2F..%2Fpwned/orders".into(),
            doc("../../pwned", "orders"),
            "../../pwned.orders".into(),
        ),
        (
            "/v1/products/shop/..%2F..%2F..%2Fpwned".into(),
            doc("shop", "../../../pwned"),
            "shop.../../../pwned".into(),
        ),
        (
            "/v1/products/shop/%2e%2e".into(),
            doc("shop", ".."),
            "shop...".into(),
        ),
        (
            "/v1/products/shop/pwned%00x".into(),
            doc("shop", "pwned\u{0}x"),
            "shop.pwned\u{0}x".into(),
        ),
        (
            "/v1/products/shop/pwned%22x".into(),
            doc("shop", "pwned\"x"),
            "shop.pwned\"x".into(),
        ),
        (
            "/v1/products/shop/pwned%27x".into(),
            doc("shop", "pwned'x"),
            "shop.pwned'x".into(),
        ),
        (
            "/v1/products/Shop/Pwned".into(),
            doc("Shop", "Pwned"),
            "Shop.Pwned".into(),
        ),
        (
            "/v1/products/shop/pwned%2Fx".into(),
            doc("shop", "pwned/x"),
            "shop.pwned/x".into(),
        ),
        (
            "/v1/products/shop/pwned.x".into(),
            doc("shop", "pwned.x"),
            "shop.pwned.x".into(),
        ),
        (
            "/v1/products/shop/orders%2F..%2F..%2Fpwned".into(),
            doc("shop", "orders"),
            "shop.orders/../../pwned".into(),
        ),
        (
            "/v1/products/shop/%3E".into(),
            doc("shop", ">"),
            "shop.>".into(),
        ),
    ];
    for (path, body, target) in &puts {
        let (s, v) = catalog
            .call("PUT", path, Some(&admin), "application/yaml", body)
            .await;
        if s != 400 {
            wrong.push(format!("PUT {path}: {s} {v}"));
        }
        deny(
            &mut t,
            "ada",
            "put_product",
            target,
            format!("admin: PUT {path}"),
            s,
        );
    }
    let gets: Vec<(&str, &str, u16)> = vec![
        ("GET", "/v1/tables/bronze/..%2F..%2Fetc/passwd", 400),
        ("GET", "/v1/tables/gold/finance/..", 400),
        ("GET", "/v1/tables/gold/finance/%2e%2e", 400),
        ("GET", "/v1/tables/..%2F/finance/x", 400),
        ("GET", "/v1/tables/../../../../etc/passwd", 404),
        (
            "GET",
            "/v1/tables/silver/finance/payments__quarantine%2F..%2F..%2F..%2Fbronze%2Ffinance%2Fpayments",
            400,
        ),
        (
            "GET",
            "/v1/products/finance/payments%2F..%2F..%2Fhr%2Fsalaries",
            404,
        ),
        ("GET", "/v1/products/hr/salaries%00", 404),
        ("GET", "/v1/products/..%2Fhr/salaries", 404),
        ("DELETE", "/v1/products/..%2Ffinance/payments", 404),
        ("DELETE", "/v1/products/finance/%2A", 404),
        ("DELETE", "/v1/products/finance/%3E", 404),
        ("GET", "/v1/products/finance/%3E/versions", 404),
    ];
    for (method, path, want) in &gets {
        let (s, v) = catalog
            .call(method, path, Some(&admin), "application/json", "")
            .await;
        if s != *want {
            wrong.push(format!("{method} {path}: {s} (want {want}) {v}"));
        }
        assert_no_rows(path, &v);
        t.answers.push((format!("admin: {method} {path}"), s));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Nothing above unregistered or changed a product.
    for (d, p) in [("finance", "payments"), ("hr", "salaries")] {
        let (s, v) = catalog
            .get(&format!("/v1/products/{d}/{p}/versions"), Some(&admin))
            .await;
        assert_eq!(s, 200, "{v}");
        let versions = v["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1, "{d}.{p} changed: {v}");
    }
    let (s, v) = catalog.get("/v1/products/shop/orders", Some(&admin)).await;
    assert_eq!(s, 404, "no attack registered shop.orders: {v}");

    // Nothing written outside the lake's table directories, no table added,
    // no file by any attack anywhere.
    let after = tree(root.path());
    let new: Vec<&PathBuf> = after
        .difference(&before)
        .filter(|p| !tables_before.iter().any(|t| p.starts_with(t)))
        .collect();
    assert!(
        new.is_empty(),
        "written outside the table directories: {new:?}"
    );
    let marked: Vec<&PathBuf> = after
        .iter()
        .filter(|p| p.to_string_lossy().contains(MARKER) || p.to_string_lossy().contains(".."))
        .collect();
    assert!(marked.is_empty(), "{marked:?}");
    assert!(!copy_target.exists() && !outside.exists());
    assert!(!lake.join("../pwned").exists() && !root.path().join("../pwned").exists());
    let tmp_marked: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(MARKER))
        .map(|e| e.path())
        .collect();
    assert!(tmp_marked.is_empty(), "{tmp_marked:?}");

    // The audit log holds every refusal: each 401 as `<unauthenticated>`,
    // each 400/403 with the caller, the action and the target.
    let (s, v) = catalog
        .get(
            &format!("/v1/audit?since={since}&limit=10000"),
            Some(&admin),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let records = v["records"].as_array().unwrap();
    let unauthenticated = records
        .iter()
        .filter(|r| r["user"] == "<unauthenticated>" && r["allowed"] == false)
        .count();
    assert_eq!(
        unauthenticated, t.unauthenticated,
        "every 401 is audited once"
    );
    let denied: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| r["allowed"] == false && r["user"] != "<unauthenticated>")
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["target"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut missing = Vec::new();
    let mut pool = denied.clone();
    for d in &t.denied {
        match pool.iter().position(|x| x == d) {
            Some(i) => {
                pool.swap_remove(i);
            }
            None => missing.push(d.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "denials not in the audit log: {missing:#?}"
    );
    assert!(
        pool.is_empty(),
        "denials audited that were not sent: {pool:#?}"
    );
    for r in records.iter().filter(|r| r["allowed"] == false) {
        assert!(
            r["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "every denial says why: {r}"
        );
    }

    // Still serving, and still right.
    let (s, _) = catalog.get("/healthz", None).await;
    assert_eq!(s, 200);
    let (s, v) = catalog
        .sql(&analyst, &format!("SELECT sum(payments) AS n FROM {GOLD}"))
        .await;
    assert_eq!(
        (s, v["rows"][0]["n"].clone()),
        (200, json!(silver_rows)),
        "{v}"
    );
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, s) in &t.answers {
        *by_status.entry(*s).or_default() += 1;
    }
    println!(
        "catalog attacks: {} attacks ({} auth attacks x 3 routes), statuses {by_status:?}; audit holds {} unauthenticated and {} authenticated denials",
        t.answers.len(),
        auth_attacks.len(),
        unauthenticated,
        denied.len()
    );
    for (what, s) in &t.answers {
        println!("  {s}  {}", what.escape_debug());
    }
    for s in services.iter_mut() {
        assert!(
            s.wait_exit(Duration::from_millis(1)).is_none(),
            "{} exited:\n{}",
            s.name,
            s.logs()
        );
    }
    medallion_e2e::stop_all(&mut services);
}

/// RFC 3339 now, for `/v1/audit?since=` (percent-encoded `+` not needed: UTC `Z`).
fn rfc3339_now() -> String {
    let secs = now() - 1;
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_catalog_refuses_algorithm_confusion() {
    let nats = NatsServer::start();
    let root = tempfile::tempdir().unwrap();
    let lake = root.path().join("lake");
    std::fs::create_dir_all(&lake).unwrap();
    let fixtures = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/catalog/tests/fixtures"
    ));
    let public_pem = std::fs::read(fixtures.join("test_rsa_public.pem")).unwrap();
    let private_pem = std::fs::read(fixtures.join("test_rsa_private.pem")).unwrap();
    let right = EncodingKey::from_rsa_pem(&private_pem).unwrap();
    // Another RSA key, made here.
    let other_key = root.path().join("other.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&other_key)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genrsa");
    let other = EncodingKey::from_rsa_pem(&std::fs::read(&other_key).unwrap()).unwrap();

    let mut vars = pipeline_vars(&nats.url(), &lake, "MEDALLION_CATALOG_ADDR");
    vars.insert("OTEL_SDK_DISABLED".into(), "true".into());
    vars.insert(
        "MEDALLION_JWT_PUBLIC_KEY".into(),
        fixtures.join("test_rsa_public.pem").display().to_string(),
    );
    let logs = tempfile::tempdir().unwrap();
    let mut services = vec![Service::start("medallion-catalog", &vars, logs.path())];
    let catalog = Catalog {
        addr: vars["MEDALLION_CATALOG_ADDR"].clone(),
    };
    let c = json!({"sub": "ada", "roles": ["admin"], "exp": now() + 900});
    let valid = bearer(&sign(Algorithm::RS256, &c, &right));
    eventually(Duration::from_secs(60), "the catalog answers", || async {
        http_request(
            &catalog.addr,
            "GET",
            "/v1/products",
            Some(&valid),
            "text/plain",
            b"",
        )
        .await
        .is_some_and(|(s, _)| s == 200)
    })
    .await;

    let jku = {
        let mut h = Header::new(Algorithm::RS256);
        h.jku = Some("http://127.0.0.1:1/evil-jwks.json".into());
        h.kid = Some("evil".into());
        jsonwebtoken::encode(&h, &c, &other).unwrap()
    };
    let mut expired = c.clone();
    expired["exp"] = json!(now() - 120);
    let mut immature = c.clone();
    immature["nbf"] = json!(now() + 3600);
    let attacks: Vec<(&str, String)> = vec![
        (
            "HS256 signed with the RS256 public key (key confusion)",
            sign(Algorithm::HS256, &c, &secret_key(&public_pem)),
        ),
        (
            "HS256 signed with the public key, trailing newline trimmed",
            sign(
                Algorithm::HS256,
                &c,
                &secret_key(public_pem.trim_ascii_end()),
            ),
        ),
        ("alg none", alg_none(&c)),
        (
            "RS256 signed with another key",
            sign(Algorithm::RS256, &c, &other),
        ),
        (
            "RS512 with the right key",
            sign(Algorithm::RS512, &c, &right),
        ),
        (
            "PS256 with the right key",
            sign(Algorithm::PS256, &c, &right),
        ),
        ("jku and kid of an attacker's key set", jku),
        ("expired", sign(Algorithm::RS256, &expired, &right)),
        ("not yet valid", sign(Algorithm::RS256, &immature, &right)),
    ];
    for (what, token) in &attacks {
        let (s, v) = catalog.get("/v1/products", Some(&bearer(token))).await;
        assert_refused_401(what, s, &v);
        let (s, v) = catalog
            .query(
                Some(&bearer(token)),
                &json!({"sql": "SELECT * FROM bronze.finance.payments"}),
            )
            .await;
        assert_refused_401(what, s, &v);
    }
    let (s, v) = catalog.get("/v1/audit?limit=10000", Some(&valid)).await;
    assert_eq!(s, 200, "{v}");
    let unauthenticated = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["user"] == "<unauthenticated>" && r["allowed"] == false)
        .count();
    assert_eq!(unauthenticated, 2 * attacks.len(), "{v}");
    let (s, _) = catalog.get("/healthz", None).await;
    assert_eq!(s, 200);
    println!(
        "rs256 catalog: {} algorithm-confusion attacks x 2 routes, all 401 and audited",
        attacks.len()
    );
    medallion_e2e::stop_all(&mut services);
}

fn secret_key(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).expect("any byte string is an HMAC key")
}
