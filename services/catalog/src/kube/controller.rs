//! The DataProduct controller, run inside the catalog (the registry's only
//! writer) when `MEDALLION_KUBE_CONTROLLER=true`.

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{info, warn};

use super::crd::DataProductResource;
use super::reconcile::{Context, error_policy, reconcile};

const HEALTH_KEY: &str = "kube controller";

/// Watches DataProduct resources in the pod's namespace until `shutdown`.
/// Watch failures (CRD not installed, RBAC missing) show on `/readyz`.
pub async fn run(
    ctx: Arc<Context>,
    health: medallion_runtime::Health,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let client: Client = ctx.client.clone();
    let namespace = client.default_namespace().to_string();
    let api: Api<DataProductResource> = Api::namespaced(client, &namespace);
    info!(%namespace, "watching DataProduct resources");
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((object, _)) => {
                    health.clear_problem(HEALTH_KEY);
                    tracing::debug!(resource = %object.name, "DataProduct reconciled");
                }
                Err(kube::runtime::controller::Error::QueueError(e)) => {
                    warn!(error = %e, "watching DataProduct resources failed; is the CRD installed and the Role bound?");
                    health.set_problem(
                        HEALTH_KEY,
                        format!("watching DataProduct resources in {namespace}: {e}"),
                    );
                }
                // Reconcile errors are logged by the error policy and retried.
                Err(_) => {}
            }
            futures::future::ready(())
        })
        .await;
    info!("DataProduct controller stopped");
}
