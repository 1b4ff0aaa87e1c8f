//! The DataProduct reconciler against the real product registry (a real
//! nats-server) and a fake Kubernetes API server: a valid resource is
//! registered and Ready, an invalid one is reported and registers nothing,
//! a breaking change waits for the full-refresh annotation, deleting the
//! resource unregisters the product and releases the finalizer, and the
//! HTTP API refuses to change a product a resource owns.

use std::sync::Arc;
use std::time::Duration;

use medallion_bus::registry::Registry;
use medallion_catalog::auth::mint_hs256;
use medallion_catalog::kube::DataProductResource;
use medallion_catalog::kube::reconcile::{Context, FINALIZER, reconcile};
use medallion_catalog::seed::FolderSeed;
use medallion_runtime::{EnvReader, Runtime};
use medallion_testkit::{NatsServer, eventually, free_port};
use serde_json::{Value, json};

mod common;
mod kube_fake;
use common::{Api, SECRET};
use kube_fake::FakeApi;

fn resource(name: &str, schema: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "medallion.dev/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "domain": "shop",
            "owner": "shop-team@example.com",
            "source": {"format": "ndjson"},
            "schema": schema,
            "key": ["order_id"],
            "gold": [{"name": "orders_by_qty", "sql": "SELECT qty, count(*) AS orders FROM silver GROUP BY qty"}],
            "access": [{"role": "analyst", "layers": ["gold"]}],
            "sla": {"freshness": "60s"},
        }
    })
}

fn v1_schema() -> Value {
    json!([
        {"name": "order_id", "type": "string", "required": true},
        {"name": "qty", "type": "int64"},
    ])
}

struct Harness {
    _nats: NatsServer,
    _lake: tempfile::TempDir,
    _products: tempfile::TempDir,
    fake: FakeApi,
    ctx: Arc<Context>,
    registry: Registry,
}

async fn harness(nats: NatsServer) -> Harness {
    common::init();
    let lake = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    let registry = Registry::open(&js, &Default::default()).await.unwrap();
    let fake = FakeApi::default();
    let kube = fake.start().await;
    let ctx = Arc::new(Context {
        client: kube,
        registry: registry.clone(),
        lake: medallion_lake::Lake::from_location(&lake.path().display().to_string()).unwrap(),
        audit: medallion_catalog::audit::Audit::new(js),
        folder: Arc::new(tokio::sync::Mutex::new(FolderSeed::new(
            products.path().into(),
        ))),
        nats: client,
    });
    Harness {
        _nats: nats,
        _lake: lake,
        _products: products,
        fake,
        ctx,
        registry,
    }
}

impl Harness {
    /// What the controller does on a watch event: reconcile the stored
    /// object; adding the finalizer is itself a change, which triggers the
    /// next reconcile.
    async fn reconcile(&self, name: &str) -> Result<(), String> {
        for _ in 0..3 {
            let Some(stored) = self.fake.get(name) else {
                return Ok(());
            };
            let dp: DataProductResource = serde_json::from_value(stored.clone()).unwrap();
            reconcile(Arc::new(dp), self.ctx.clone())
                .await
                .map_err(|e| e.to_string())?;
            let after = self.fake.get(name);
            let finalizers =
                |o: &Option<Value>| o.as_ref().map(|o| o["metadata"]["finalizers"].clone());
            if finalizers(&after) == finalizers(&Some(stored)) {
                return Ok(());
            }
        }
        Err("the finalizer kept changing".into())
    }

    fn condition(&self, name: &str, type_: &str) -> Value {
        let o = self.fake.get(name).expect("resource exists");
        o["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null)
    }

    async fn registered(&self, key: &str) -> Option<(u64, String)> {
        self.registry.current(key).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_resource_is_registered_and_ready() {
    let h = harness(NatsServer::start()).await;
    h.fake.apply(resource("web-orders", v1_schema(), json!({})));
    h.reconcile("web-orders").await.unwrap();

    let stored = h.fake.get("web-orders").unwrap();
    assert_eq!(
        stored["metadata"]["finalizers"],
        json!([FINALIZER]),
        "{stored}"
    );
    let ready = h.condition("web-orders", "Ready");
    assert_eq!(ready["status"], "True", "{stored}");
    assert_eq!(ready["reason"], "Registered", "{ready}");
    assert_eq!(h.condition("web-orders", "Invalid")["status"], "False");
    assert_eq!(stored["status"]["observedGeneration"], json!(1));
    assert_eq!(stored["status"]["product"], "shop.web_orders");
    // Tables are listed (none committed yet, so no versions).
    let tables: Vec<&str> = stored["status"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        tables.contains(&"silver.shop.web_orders") && tables.contains(&"gold.shop.orders_by_qty"),
        "{tables:?}"
    );

    // The registry holds the spec under the product name, owned by the resource.
    let (revision, doc) = h.registered("shop.web_orders").await.expect("registered");
    assert_eq!(stored["status"]["revision"], json!(revision));
    assert!(
        doc.contains("medallion.dev/managed-by: DataProduct default/web-orders"),
        "{doc}"
    );
    let contract = medallion_spec::Contract::from_yaml(&doc).await.unwrap();
    assert_eq!(contract.name(), "web_orders");

    // Reconciling again changes nothing: same revision, no new status patch.
    let patches = h
        .fake
        .requests()
        .iter()
        .filter(|r| r.contains("/status"))
        .count();
    h.reconcile("web-orders").await.unwrap();
    assert_eq!(h.registered("shop.web_orders").await.unwrap().0, revision);
    let patches_after = h
        .fake
        .requests()
        .iter()
        .filter(|r| r.contains("/status"))
        .count();
    assert_eq!(patches, patches_after, "{:?}", h.fake.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resource_is_reported_and_nothing_registered() {
    let h = harness(NatsServer::start()).await;
    let schema = json!([
        {"name": "order_id", "type": "string", "required": true},
        {"name": "qty", "type": "integer"},
    ]);
    h.fake.apply(resource("bad-orders", schema, json!({})));
    h.reconcile("bad-orders").await.unwrap();

    let invalid = h.condition("bad-orders", "Invalid");
    assert_eq!(invalid["status"], "True", "{invalid}");
    let message = invalid["message"].as_str().unwrap();
    assert!(
        message.contains("spec.schema[1].type") && message.contains("integer"),
        "{message}"
    );
    assert_eq!(h.condition("bad-orders", "Ready")["status"], "False");
    assert!(h.registered("shop.bad_orders").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_change_waits_for_the_full_refresh_annotation() {
    let h = harness(NatsServer::start()).await;
    h.fake.apply(resource("orders", v1_schema(), json!({})));
    h.reconcile("orders").await.unwrap();
    let (rev1, doc1) = h.registered("shop.orders").await.unwrap();

    // qty becomes a string: a retyped column is breaking.
    let retyped = json!([
        {"name": "order_id", "type": "string", "required": true},
        {"name": "qty", "type": "string"},
    ]);
    h.fake.apply(resource("orders", retyped.clone(), json!({})));
    h.reconcile("orders").await.unwrap();
    let ready = h.condition("orders", "Ready");
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(ready["reason"], "BreakingChange", "{ready}");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("qty") && message.contains("medallion.dev/full-refresh"),
        "{message}"
    );
    assert_eq!(
        h.registered("shop.orders").await.unwrap(),
        (rev1, doc1),
        "the registered version stays"
    );
    assert_eq!(
        h.fake.get("orders").unwrap()["status"]["observedGeneration"],
        json!(2)
    );

    // With the annotation the change is taken (and a full refresh requested).
    h.fake.apply(resource(
        "orders",
        retyped,
        json!({"medallion.dev/full-refresh": "true"}),
    ));
    h.reconcile("orders").await.unwrap();
    assert_eq!(h.condition("orders", "Ready")["status"], "True");
    let (rev2, doc2) = h.registered("shop.orders").await.unwrap();
    assert!(rev2 > rev1);
    assert!(
        doc2.contains("type: string") && !doc2.contains("int64"),
        "{doc2}"
    );
    // The annotation is a request, not part of the registered spec.
    assert!(!doc2.contains("full-refresh"), "{doc2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_unregisters_and_releases_the_finalizer() {
    let h = harness(NatsServer::start()).await;
    h.fake.apply(resource("orders", v1_schema(), json!({})));
    h.reconcile("orders").await.unwrap();
    assert!(h.registered("shop.orders").await.is_some());

    h.fake.delete("orders");
    assert!(
        h.fake.get("orders").is_some(),
        "the finalizer holds the object"
    );
    h.reconcile("orders").await.unwrap();
    assert!(h.registered("shop.orders").await.is_none(), "unregistered");
    assert!(
        h.fake.get("orders").is_none(),
        "finalizer removed, object gone"
    );
    let removal = h
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH default/orders application/json-patch+json"))
        .count();
    assert_eq!(
        removal,
        2,
        "one patch adds the finalizer, one removes it: {:?}",
        h.fake.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_cannot_take_a_product_another_resource_owns() {
    let h = harness(NatsServer::start()).await;
    h.fake.apply(resource("orders", v1_schema(), json!({})));
    h.reconcile("orders").await.unwrap();
    let before = h.registered("shop.orders").await.unwrap();
    // Meanwhile another resource (team-b/orders) has taken the product.
    let foreign = before
        .1
        .replace("DataProduct default/orders", "DataProduct team-b/orders");
    h.registry
        .write("shop.orders", &foreign, Some(before.0))
        .await
        .map_err(|_| "write")
        .unwrap();
    let mut changed = resource("orders", v1_schema(), json!({}));
    changed["spec"]["description"] = json!("changed here");
    h.fake.apply(changed);
    h.reconcile("orders").await.unwrap();
    let ready = h.condition("orders", "Ready");
    assert_eq!(ready["reason"], "Conflict", "{ready}");
    assert!(
        ready["message"].as_str().unwrap().contains("team-b/orders"),
        "{ready}"
    );
    // And its deletion does not unregister what it does not own.
    h.fake.delete("orders");
    h.reconcile("orders").await.unwrap();
    assert!(h.registered("shop.orders").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_writes_to_a_product_a_resource_owns() {
    let nats = NatsServer::start();
    let products = tempfile::tempdir().unwrap();
    let catalog_lake = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut env = EnvReader::from_map(common::vars(
        &nats,
        catalog_lake.path(),
        products.path(),
        "MEDALLION_CATALOG_ADDR",
        port,
    ));
    let config = medallion_catalog::CatalogConfig::from_env(&mut env);
    env.finish().unwrap();
    let h = harness(nats).await;
    let rt = Runtime::new("medallion-catalog");
    tokio::spawn(medallion_catalog::run(config, rt.clone()));
    h.fake.apply(resource("orders", v1_schema(), json!({})));
    h.reconcile("orders").await.unwrap();

    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    let admin = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    eventually(
        Duration::from_secs(30),
        "catalog lists the product",
        || async {
            api.call("GET", "/v1/products/shop/orders", Some(&admin), None)
                .await
                .0
                == 200
        },
    )
    .await;
    let (_, v) = api
        .call("GET", "/v1/products/shop/orders", Some(&admin), None)
        .await;
    assert_eq!(v["managed_by"], "DataProduct default/orders", "{v}");
    let doc = h.registered("shop.orders").await.unwrap().1;
    let (status, v) = api
        .put_spec(
            "/v1/products/shop/orders",
            &admin,
            &doc.replace("shop-team@", "other@"),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("DataProduct default/orders"),
        "{v}"
    );
    // Nor can a PUT claim a resource's ownership for another product.
    let claimed = doc.replace("name: orders", "name: claimed");
    let (status, v) = api
        .put_spec("/v1/products/shop/claimed", &admin, &claimed)
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("medallion.dev/managed-by"),
        "{v}"
    );
    let (status, v) = api
        .call("DELETE", "/v1/products/shop/orders", Some(&admin), None)
        .await;
    assert_eq!(status, 409, "{v}");
    assert!(h.registered("shop.orders").await.is_some());
    rt.shutdown.cancel();
}
