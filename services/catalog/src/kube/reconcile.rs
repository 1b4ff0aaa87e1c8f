//! One reconcile of a DataProduct resource: validate with the catalog's
//! validation, register through the same path as the folder (GitOps) mode,
//! write `.status`, and unregister on delete (behind a finalizer, so a
//! deleted resource cannot leave its product registered).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Client, ResourceExt};
use medallion_bus::registry::{self, Registry, WriteError};
use medallion_lake::Lake;
use medallion_spec::{Contract, TableRef};
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::crd::{Condition, DataProductResource, DataProductStatus, TableStatus};
use crate::audit::{Audit, AuditRecord};
use crate::seed::{
    FULL_REFRESH_ANNOTATION, FolderSeed, MANAGED_BY_ANNOTATION, SeedError, managed_by,
    register_document,
};

/// Held on every resource whose product is registered: deleting the resource
/// waits until the product is unregistered.
pub const FINALIZER: &str = "medallion.dev/registry";

/// How often a Ready resource is looked at again, to refresh table versions
/// and freshness in its status.
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the product registry is unavailable: {0}")]
    Registry(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(String),
}

/// What a reconcile needs: the catalog's registry, lake, audit and folder
/// (to know which products files own), and a Kubernetes client.
pub struct Context {
    pub client: Client,
    pub registry: Registry,
    pub lake: Lake,
    pub audit: Audit,
    pub folder: Arc<Mutex<FolderSeed>>,
    /// Used to ask the transform for a full refresh after an accepted breaking change.
    pub nats: async_nats::Client,
}

/// The owner string stored in `medallion.dev/managed-by`.
pub fn owner_of(dp: &DataProductResource) -> String {
    format!(
        "DataProduct {}/{}",
        dp.namespace().unwrap_or_default(),
        dp.name_any()
    )
}

/// Kubernetes names cannot hold `_`, product names cannot hold `-`: a
/// resource `card-payments` is the product `card_payments`.
pub fn product_name(resource_name: &str) -> String {
    resource_name.replace('-', "_")
}

/// The registry document of a resource: the spec as written, the product
/// name, and the owner annotation. Other annotations and labels stay out, so
/// relabelling a resource does not create a new revision.
pub fn document(dp: &DataProductResource) -> String {
    let doc = json!({
        "apiVersion": medallion_spec::API_VERSION,
        "kind": medallion_spec::KIND,
        "metadata": {
            "name": product_name(&dp.name_any()),
            "annotations": {MANAGED_BY_ANNOTATION: owner_of(dp)},
        },
        "spec": dp.spec.0,
    });
    serde_yaml::to_string(&doc).expect("JSON always serializes as YAML")
}

/// The reconciler the controller runs.
pub async fn reconcile(dp: Arc<DataProductResource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = dp
        .namespace()
        .unwrap_or_else(|| ctx.client.default_namespace().to_string());
    let api: Api<DataProductResource> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, dp, |event| async {
        match event {
            Event::Apply(dp) => apply(&api, &dp, &ctx).await,
            Event::Cleanup(dp) => cleanup(&dp, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Failed reconciles are retried with a short delay; the cause is in the
/// resource's status and the logs.
pub fn error_policy(dp: Arc<DataProductResource>, error: &Error, _: Arc<Context>) -> Action {
    warn!(resource = %owner_of(&dp), error = %error, "DataProduct reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}

/// The outcome written to the status.
enum Outcome {
    Registered {
        revision: u64,
    },
    Invalid(String),
    Refused {
        reason: &'static str,
        message: String,
    },
}

async fn apply(
    api: &Api<DataProductResource>,
    dp: &DataProductResource,
    ctx: &Context,
) -> Result<Action, Error> {
    let owner = owner_of(dp);
    let text = document(dp);
    let contract = match Contract::from_yaml(&text).await {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            info!(resource = %owner, error = %message, "DataProduct is invalid; nothing registered");
            write_status(api, dp, Outcome::Invalid(message), None, &ctx.lake).await?;
            // Nothing changes until the resource does.
            return Ok(Action::await_change());
        }
    };
    let id = (contract.domain().to_string(), contract.name().to_string());
    let qualified = format!("{}.{}", id.0, id.1);
    if let Some(file) = ctx.folder.lock().await.managed.get(&id).cloned() {
        let message = format!(
            "{qualified} is defined by the file {file} in MEDALLION_PRODUCTS; remove the file or rename this product"
        );
        write_status(
            api,
            dp,
            Outcome::Refused {
                reason: "OwnedByFile",
                message,
            },
            Some(&contract),
            &ctx.lake,
        )
        .await?;
        return Ok(Action::requeue(RESYNC));
    }
    let refresh_requested = dp
        .annotations()
        .get(FULL_REFRESH_ANNOTATION)
        .is_some_and(|v| v == "true");
    let outcome = match register_document(&ctx.registry, &text, &contract, refresh_requested).await
    {
        Ok((_, Some((revision, full_refresh)))) => {
            info!(resource = %owner, product = %qualified, revision, full_refresh, "DataProduct registered");
            ctx.audit
                .record(AuditRecord::allowed(
                    &format!("kubernetes:{owner}"),
                    "put_product",
                    &qualified,
                    Some(revision as i64),
                    None,
                ))
                .await;
            if full_refresh {
                crate::specs_api::start_full_refresh(ctx.nats.clone(), &id.0, &id.1);
            }
            Outcome::Registered { revision }
        }
        Ok((_, None)) => {
            let revision = current_revision(&ctx.registry, &id).await?;
            Outcome::Registered { revision }
        }
        Err(SeedError::Breaking(message)) => {
            info!(resource = %owner, product = %qualified, error = %message, "DataProduct change refused; the registered version stays");
            Outcome::Refused {
                reason: "BreakingChange",
                message,
            }
        }
        Err(SeedError::Refused(message)) => {
            info!(resource = %owner, product = %qualified, error = %message, "DataProduct refused; the registered version stays");
            Outcome::Refused {
                reason: "Conflict",
                message,
            }
        }
        Err(SeedError::Retry(message)) => return Err(Error::Registry(message)),
    };
    write_status(api, dp, outcome, Some(&contract), &ctx.lake).await?;
    Ok(Action::requeue(RESYNC))
}

async fn current_revision(registry: &Registry, id: &(String, String)) -> Result<u64, Error> {
    registry
        .current(&registry::key(&id.0, &id.1))
        .await
        .map_err(|e| Error::Registry(e.to_string()))?
        .map(|(r, _)| r)
        .ok_or_else(|| Error::Registry("the product vanished while it was checked".into()))
}

/// Unregisters the product if this resource owns it; the tables stay, as
/// with `DELETE` on the API.
async fn cleanup(dp: &DataProductResource, ctx: &Context) -> Result<Action, Error> {
    let owner = owner_of(dp);
    let Some(domain) = dp.spec.0.get("domain").and_then(|d| d.as_str()) else {
        // No domain: the spec never compiled, so nothing was registered.
        return Ok(Action::await_change());
    };
    let key = registry::key(domain, &product_name(&dp.name_any()));
    let current = ctx
        .registry
        .current(&key)
        .await
        .map_err(|e| Error::Registry(e.to_string()))?;
    match current {
        Some((revision, text)) if managed_by(&text).as_deref() == Some(owner.as_str()) => {
            match ctx.registry.delete(&key, revision).await {
                Ok(()) => {}
                Err(WriteError::Conflict) => {
                    return Err(Error::Registry("changed concurrently".into()));
                }
                Err(WriteError::Bus(e)) => return Err(Error::Registry(e.to_string())),
            }
            info!(resource = %owner, product = %key, revision, "DataProduct deleted; product unregistered (tables kept)");
            ctx.audit
                .record(AuditRecord::allowed(
                    &format!("kubernetes:{owner}"),
                    "delete_product",
                    &key,
                    Some(revision as i64),
                    None,
                ))
                .await;
        }
        // Never registered (invalid, refused) or owned by someone else: nothing to undo.
        _ => {
            info!(resource = %owner, product = %key, "DataProduct deleted; it owned no registered product")
        }
    }
    Ok(Action::await_change())
}

async fn write_status(
    api: &Api<DataProductResource>,
    dp: &DataProductResource,
    outcome: Outcome,
    contract: Option<&Contract>,
    lake: &Lake,
) -> Result<(), Error> {
    let generation = dp.metadata.generation;
    let previous = dp.status.clone().unwrap_or_default();
    let (ready, invalid, revision) = match outcome {
        Outcome::Registered { revision } => (
            (
                "True",
                "Registered",
                format!("registered as revision {revision}"),
            ),
            ("False", "Valid", "the spec compiles".to_string()),
            Some(revision as i64),
        ),
        Outcome::Invalid(message) => (
            (
                "False",
                "Invalid",
                "the spec does not compile; see the Invalid condition".into(),
            ),
            ("True", "Invalid", message),
            None,
        ),
        Outcome::Refused { reason, message } => (
            ("False", reason, message),
            ("False", "Valid", "the spec compiles".to_string()),
            previous.revision,
        ),
    };
    let conditions = vec![
        condition(&previous, "Ready", ready, generation),
        condition(&previous, "Invalid", invalid, generation),
    ];
    let tables = match contract {
        Some(c) => table_statuses(lake, c).await,
        None => Vec::new(),
    };
    let status = DataProductStatus {
        observed_generation: generation,
        conditions,
        product: contract.map(|c| format!("{}.{}", c.domain(), c.name())),
        revision,
        tables,
    };
    if dp.status.as_ref() == Some(&status) {
        return Ok(());
    }
    api.patch_status(
        &dp.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

fn condition(
    previous: &DataProductStatus,
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: Option<i64>,
) -> Condition {
    // The transition time moves only when the status does (Kubernetes convention).
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Versions and freshness of the product's tables, read from the Delta logs
/// (the last commit only: cheap enough for every resync).
async fn table_statuses(lake: &Lake, c: &Contract) -> Vec<TableStatus> {
    let (d, p) = (c.domain(), c.name());
    let mut refs = vec![
        TableRef::bronze(d, p),
        TableRef::silver(d, p),
        TableRef::quarantine(d, p),
    ];
    refs.extend(c.gold.iter().map(|g| TableRef::gold(d, &g.name)));
    let mut out = Vec::new();
    for t in refs {
        let (version, last_ms) = crate::api::last_commit(lake, &t)
            .await
            .unwrap_or((None, None));
        let freshness = match (c.freshness, last_ms) {
            (Some(sla), Some(ms)) if !t.is_quarantine() => {
                let age = (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
                Some(
                    if age <= sla.as_secs_f64() {
                        "fresh"
                    } else {
                        "stale"
                    }
                    .to_string(),
                )
            }
            _ => None,
        };
        out.push(TableStatus {
            name: t.sql_name(),
            version,
            last_commit: last_ms
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|d| d.to_rfc3339()),
            freshness,
        });
    }
    out
}
