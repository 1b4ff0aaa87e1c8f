//! Registering, changing and deleting products (`admin` only). The registry
//! keeps a revision per change; a change that rows already written cannot
//! take is refused with each breaking change named, unless the request asks
//! for a full refresh, which rebuilds Silver and Gold from Bronze.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use medallion_bus::registry::{self, WriteError};
use medallion_spec::{Contract, breaking_changes};
use serde::Deserialize;
use serde_json::json;
use tracing::{error, info};

use crate::api::{ApiError, ApiResult, AppState, caller, require_admin, visible_product};
use crate::audit::AuditRecord;
use crate::auth::Caller;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PutParams {
    #[serde(default)]
    full_refresh: bool,
}

fn write_error(target: &str, e: WriteError) -> ApiError {
    match e {
        WriteError::Conflict => ApiError(
            StatusCode::CONFLICT,
            format!("{target} changed while this request was checked; read it again and retry"),
        ),
        WriteError::Bus(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Names that cannot be a product (`..`, `>`, `*`, dots, upper case) name
/// none: 404 here, instead of reaching the registry, whose keys they are
/// not (`>` and `*` are wildcards there).
pub(crate) fn named_like_a_product(d: &str, p: &str) -> Result<(), ApiError> {
    if medallion_spec::contract::is_valid_name(d) && medallion_spec::contract::is_valid_name(p) {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        format!("no product {d}.{p}: product and domain names are [a-z][a-z0-9_]*"),
    ))
}

/// A document refused as it stands (400): audited as a denial with the reason.
async fn refuse(s: &AppState, c: &Caller, action: &str, target: &str, reason: String) -> ApiError {
    s.audit
        .record(AuditRecord::denied(&c.user, action, target, &reason))
        .await;
    ApiError(StatusCode::BAD_REQUEST, reason)
}

/// A product a file defines is changed by editing the file.
async fn refuse_if_managed(
    s: &AppState,
    c: &Caller,
    action: &str,
    d: &str,
    p: &str,
) -> Result<(), ApiError> {
    let managed = s
        .seed
        .lock()
        .await
        .managed
        .get(&(d.to_string(), p.to_string()))
        .cloned();
    let reason = match managed {
        Some(file) => Some(format!(
            "{d}.{p} is defined by the file {file} in MEDALLION_PRODUCTS; change or remove that file instead (the folder would otherwise undo this request)"
        )),
        // A product a custom resource owns says so in its registered document.
        None => s
            .registry
            .current(&registry::key(d, p))
            .await
            .ok()
            .flatten()
            .and_then(|(_, text)| crate::seed::managed_by(&text))
            .map(|owner| format!(
                "{d}.{p} is defined by the Kubernetes resource {owner}; change or delete that resource instead (the controller would otherwise undo this request)"
            )),
    };
    match reason {
        None => Ok(()),
        Some(reason) => {
            s.audit
                .record(AuditRecord::denied(
                    &c.user,
                    action,
                    &format!("{d}.{p}"),
                    &reason,
                ))
                .await;
            Err(ApiError(StatusCode::CONFLICT, reason))
        }
    }
}

#[utoipa::path(put, path = "/v1/products/{domain}/{product}", tag = "products",
    params(("domain" = String, Path), ("product" = String, Path),
           ("full_refresh" = Option<bool>, Query, description = "Take breaking changes by rebuilding Silver and Gold from Bronze")),
    request_body(content = String, description = "A DataProduct document (YAML or JSON)", content_type = "application/yaml"),
    responses((status = 200, description = "Registered: revision, breaking changes, full refresh"),
              (status = 400, description = "The spec does not compile (the field and the fix)"),
              (status = 403, description = "Needs admin"),
              (status = 409, description = "Breaking changes without full_refresh, a file owns the product, or a concurrent change")),
    security(("bearer" = [])))]
pub async fn put_product(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
    Query(params): Query<PutParams>,
    body: String,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "put_product", &target).await?;
    require_admin(&s, &c, "put_product", &target, "changing product specs").await?;
    refuse_if_managed(&s, &c, "put_product", &d, &p).await?;
    // YAML is a superset of JSON: either body is accepted.
    let new = match Contract::from_yaml(&body).await {
        Ok(new) => new,
        Err(e) => return Err(refuse(&s, &c, "put_product", &target, e.to_string()).await),
    };
    if new
        .product
        .metadata
        .annotations
        .contains_key(crate::seed::MANAGED_BY_ANNOTATION)
    {
        let reason = format!(
            "metadata.annotations.{}: set only by the Kubernetes controller; remove it",
            crate::seed::MANAGED_BY_ANNOTATION
        );
        return Err(refuse(&s, &c, "put_product", &target, reason).await);
    }
    if new.domain() != d || new.name() != p {
        let reason = format!(
            "the document is {}.{} (spec.domain, metadata.name) but the path names {target}; make them agree",
            new.domain(),
            new.name()
        );
        return Err(refuse(&s, &c, "put_product", &target, reason).await);
    }
    let key = registry::key(&d, &p);
    let current = s
        .registry
        .current(&key)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut breaking = Vec::new();
    if let Some((_, old_text)) = &current {
        if *old_text == body {
            let revision = current.as_ref().map(|(r, _)| *r);
            return Ok(Json(
                json!({"product": target, "revision": revision, "changed": false}),
            ));
        }
        if let Ok(old) = Contract::from_yaml(old_text).await {
            breaking = breaking_changes(&old, &new);
        }
    }
    if !breaking.is_empty() && !params.full_refresh {
        let reason = format!(
            "breaking changes: {}. Rows already in Silver and Gold were written under the registered version; to rebuild them from Bronze under the new spec, repeat the request with ?full_refresh=true",
            breaking.join("; ")
        );
        s.audit
            .record(AuditRecord::denied(
                &c.user,
                "put_product",
                &target,
                &reason,
            ))
            .await;
        return Err(ApiError(StatusCode::CONFLICT, reason));
    }
    let revision = s
        .registry
        .write(&key, &body, current.as_ref().map(|(r, _)| *r))
        .await
        .map_err(|e| write_error(&target, e))?;
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "put_product",
            &target,
            Some(revision as i64),
            None,
        ))
        .await;
    s.sync().await;
    let rebuild = !breaking.is_empty() || (params.full_refresh && current.is_some());
    if rebuild {
        s.start_full_refresh(&d, &p);
    }
    Ok(Json(json!({
        "product": target,
        "revision": revision,
        "changed": true,
        "created": current.is_none(),
        "breaking_changes": breaking,
        "full_refresh": if rebuild { "started" } else { "not needed" },
    })))
}

#[utoipa::path(delete, path = "/v1/products/{domain}/{product}", tag = "products",
    params(("domain" = String, Path), ("product" = String, Path)),
    responses((status = 200, description = "Unregistered; the tables stay"), (status = 403, description = "Needs admin"),
              (status = 404, description = "No such product"), (status = 409, description = "A file owns the product")),
    security(("bearer" = [])))]
pub async fn delete_product(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "delete_product", &target).await?;
    require_admin(&s, &c, "delete_product", &target, "changing product specs").await?;
    named_like_a_product(&d, &p)?;
    refuse_if_managed(&s, &c, "delete_product", &d, &p).await?;
    let key = registry::key(&d, &p);
    let Some((revision, _)) = s
        .registry
        .current(&key)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no product {target}"),
        ));
    };
    s.registry
        .delete(&key, revision)
        .await
        .map_err(|e| write_error(&target, e))?;
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "delete_product",
            &target,
            Some(revision as i64),
            None,
        ))
        .await;
    s.sync().await;
    // The tables stay: unregistering stops processing, it does not destroy data.
    Ok(Json(
        json!({"product": target, "deleted": true, "tables_kept": true}),
    ))
}

#[utoipa::path(get, path = "/v1/products/{domain}/{product}/versions", tag = "products",
    params(("domain" = String, Path), ("product" = String, Path)),
    responses((status = 200, description = "Every stored revision with its document"), (status = 404, description = "No such product")),
    security(("bearer" = [])))]
pub async fn versions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "versions", &target).await?;
    named_like_a_product(&d, &p)?;
    if !c.is_admin() {
        visible_product(&s, &c, "versions", &d, &p).await?;
    }
    let history = s
        .registry
        .history(&registry::key(&d, &p))
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if history.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no product {target}"),
        ));
    }
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "versions",
            &target,
            None,
            Some(history.len()),
        ))
        .await;
    let versions: Vec<_> = history
        .into_iter()
        .map(|v| {
            json!({
                "revision": v.revision,
                "at": v.at.to_rfc3339(),
                "deleted": v.document.is_none(),
                "document": v.document,
            })
        })
        .collect();
    Ok(Json(json!({"product": target, "versions": versions})))
}

impl AppState {
    /// Asks the transform to rebuild Silver from Bronze under the registered
    /// spec (Gold follows: the aggregate rebuilds when Silver is rewritten).
    /// Runs in the background: a rebuild takes as long as Bronze is large.
    pub fn start_full_refresh(&self, d: &str, p: &str) {
        start_full_refresh(self.client.clone(), d, p);
    }
}

/// Asks the transform for a full refresh of `d.p` in the background.
pub fn start_full_refresh(client: async_nats::Client, d: &str, p: &str) {
    let product = format!("{d}.{p}");
    tokio::spawn(async move {
        info!(product = %product, "full refresh requested");
        let request = async_nats::Request::new()
            .payload(product.clone().into())
            .timeout(Some(Duration::from_secs(3600)));
        match client
            .send_request(medallion_bus::streams::REPLAY_SUBJECT, request)
            .await
        {
            Ok(answer) => {
                info!(product = %product, answer = %String::from_utf8_lossy(&answer.payload), "full refresh answered")
            }
            Err(e) => {
                error!(product = %product, error = %e, "full refresh not done: is medallion-transform running? run `medallion replay` once it is")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_a_product_are_not_found() {
        assert!(named_like_a_product("finance", "payments").is_ok());
        for (d, p) in [
            ("..", "payments"),
            ("../finance", "payments"),
            ("finance", ">"),
            ("finance", "*"),
            ("finance", "pay.ments"),
            ("Finance", "payments"),
            ("finance", "pay\0ments"),
        ] {
            let e = named_like_a_product(d, p).unwrap_err();
            assert_eq!(e.0, StatusCode::NOT_FOUND, "{d}/{p}");
        }
    }
}
