//! The catalog with `MEDALLION_KUBE_CONTROLLER=true`: its controller finds
//! the cluster through the kubeconfig, watches DataProduct resources (kube's
//! watcher: LIST then WATCH) and reconciles them — registered and Ready on
//! apply, unregistered on delete — with the real registry on a real
//! nats-server. The Kubernetes API server is the in-process fake.

use std::time::Duration;

use medallion_runtime::{EnvReader, Runtime};
use medallion_testkit::{NatsServer, eventually, free_port};
use serde_json::json;

mod common;
mod kube_fake;
use kube_fake::FakeApi;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_runs_the_controller_when_asked() {
    common::init();
    let fake = FakeApi::default();
    let addr = fake.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n"
        ),
    )
    .unwrap();
    // SAFETY: this test binary has this one test, and nothing else reads the
    // environment concurrently at this point.
    unsafe { std::env::set_var("KUBECONFIG", &kubeconfig) };

    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = tempfile::tempdir().unwrap();
    let mut vars = common::vars(
        &nats,
        lake.path(),
        products.path(),
        "MEDALLION_CATALOG_ADDR",
        free_port(),
    );
    vars.insert("MEDALLION_KUBE_CONTROLLER".into(), "true".into());
    let mut env = EnvReader::from_map(vars);
    let config = medallion_catalog::CatalogConfig::from_env(&mut env);
    env.finish().unwrap();
    let rt = Runtime::new("medallion-catalog");
    let catalog = tokio::spawn(medallion_catalog::run(config, rt.clone()));

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let registry = medallion_bus::registry::Registry::open(&js, &Default::default())
        .await
        .unwrap();

    fake.apply(json!({
        "apiVersion": "medallion.dev/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": "web-orders", "namespace": "default"},
        "spec": {
            "domain": "shop",
            "schema": [{"name": "order_id", "type": "string", "required": true}],
            "key": ["order_id"],
        }
    }));
    eventually(Duration::from_secs(30), "the resource is Ready", || async {
        fake.get("web-orders").is_some_and(|o| {
            o["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
    })
    .await;
    assert!(registry.current("shop.web_orders").await.unwrap().is_some());
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("LIST default")),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("WATCH default")),
        "{requests:?}"
    );

    fake.delete("web-orders");
    eventually(Duration::from_secs(30), "the resource is gone", || async {
        fake.get("web-orders").is_none()
    })
    .await;
    assert!(
        registry.current("shop.web_orders").await.unwrap().is_none(),
        "unregistered"
    );

    rt.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), catalog)
        .await
        .expect("the catalog stops on shutdown")
        .unwrap()
        .unwrap();
}
