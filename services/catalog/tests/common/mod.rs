// Each test binary uses a different part of this module.
#![allow(dead_code)]

//! What the catalog tests share: the settings, the whole platform started
//! in-process against one nats-server, and a small API client.

use std::collections::BTreeMap;
use std::path::Path;

use medallion_runtime::{EnvReader, Runtime};
use medallion_testkit::{NatsServer, free_port};
use serde_json::{Value, json};

pub const SECRET: &str = "catalog-test-secret-0123456789abcdef";

pub fn vars(
    nats: &NatsServer,
    lake: &Path,
    products: &Path,
    addr_var: &str,
    port: u16,
) -> BTreeMap<String, String> {
    [
        ("NATS_URL", nats.url()),
        ("MEDALLION_LAKE", lake.display().to_string()),
        ("MEDALLION_PRODUCTS", products.display().to_string()),
        (
            "MEDALLION_PII_KEY",
            "catalog-test-pii-key-0123456789".to_string(),
        ),
        ("MEDALLION_JWT_SECRET", SECRET.to_string()),
        ("MEDALLION_BATCH_WAIT", "50ms".to_string()),
        ("MEDALLION_RELOAD_INTERVAL", "300ms".to_string()),
        (addr_var, format!("127.0.0.1:{port}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            "PUT" => self.http.put(url),
            _ => self.http.post(url),
        };
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        // Status 0 = not listening yet (the catalog is still starting).
        let Ok(resp) = req.send().await else {
            return (0, Value::Null);
        };
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn query(&self, token: &str, sql: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/query",
            Some(token),
            Some(json!({ "sql": sql })),
        )
        .await
    }
}

/// Starts ingest, transform and aggregate (specs from the catalog's
/// registry, as in production), then the catalog on a free port.
pub async fn start_platform(
    nats: &NatsServer,
    lake: &Path,
    products: &Path,
) -> (Vec<Runtime>, Runtime, u16) {
    start_platform_with(nats, lake, products, &[]).await
}

/// [`start_platform`] with more catalog settings (`MEDALLION_FLIGHT_ADDR`, …).
pub async fn start_platform_with(
    nats: &NatsServer,
    lake: &Path,
    products: &Path,
    catalog_vars: &[(&str, String)],
) -> (Vec<Runtime>, Runtime, u16) {
    let mut runtimes = Vec::new();
    macro_rules! start {
        ($krate:ident, $cfg:ident, $name:literal, $addr:literal) => {{
            let mut r = EnvReader::from_map(vars(nats, lake, products, $addr, 0));
            let c = $krate::$cfg::from_env(&mut r);
            r.finish().unwrap();
            let rt = Runtime::new($name);
            let fut = $krate::run(c, rt.clone());
            tokio::spawn(async move {
                // A service that stops on its own fails the test with its reason.
                if let Err(e) = fut.await {
                    panic!("{} stopped: {e:#}", $name);
                }
            });
            runtimes.push(rt);
        }};
    }
    start!(
        medallion_ingest,
        IngestConfig,
        "medallion-ingest",
        "MEDALLION_INGEST_ADDR"
    );
    start!(
        medallion_transform,
        TransformConfig,
        "medallion-transform",
        "MEDALLION_TRANSFORM_ADDR"
    );
    start!(
        medallion_aggregate,
        AggregateConfig,
        "medallion-aggregate",
        "MEDALLION_AGGREGATE_ADDR"
    );
    let port = free_port();
    let mut env = vars(nats, lake, products, "MEDALLION_CATALOG_ADDR", port);
    env.extend(catalog_vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut r = EnvReader::from_map(env);
    let c = medallion_catalog::CatalogConfig::from_env(&mut r);
    r.finish().unwrap();
    let catalog = Runtime::new("medallion-catalog");
    tokio::spawn(medallion_catalog::run(c, catalog.clone()));

    (runtimes, catalog, port)
}

/// Starts the catalog alone on a free port: nothing acts on what it records.
pub fn start_catalog(nats: &NatsServer, lake: &Path, products: &Path) -> (Runtime, u16) {
    let port = free_port();
    let mut r = EnvReader::from_map(vars(nats, lake, products, "MEDALLION_CATALOG_ADDR", port));
    let c = medallion_catalog::CatalogConfig::from_env(&mut r);
    r.finish().unwrap();
    let catalog = Runtime::new("medallion-catalog");
    let fut = medallion_catalog::run(c, catalog.clone());
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            panic!("medallion-catalog stopped: {e:#}");
        }
    });
    (catalog, port)
}

impl Api {
    /// Sends a spec document (YAML) with PUT.
    pub async fn put_spec(&self, path: &str, token: &str, yaml: &str) -> (u16, Value) {
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/yaml")
            .body(yaml.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// Crypto provider and test logs (`MEDALLION_LOG` to see more).
pub fn init() {
    medallion_runtime::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MEDALLION_LOG")
                .unwrap_or_else(|_| "warn,deltalake_core=error,buoyant_kernel=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A products folder holding the repository's `payments.yaml`.
pub fn payments_products() -> tempfile::TempDir {
    let products = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../products/payments.yaml"),
        products.path().join("payments.yaml"),
    )
    .unwrap();
    products
}
