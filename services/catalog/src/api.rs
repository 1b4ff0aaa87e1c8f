//! The catalog HTTP API. Every request is authenticated, and every request —
//! allowed or denied — is appended to the audit stream.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use medallion_bus::registry::{Registry, SpecSource};
use medallion_lake::query::{Grant, TimeTravel, run_query, session};
use medallion_lake::{Lake, maintenance};
use medallion_spec::products::Products;
use medallion_spec::{Contract, TableRef};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::RwLock;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::access::{can_see_product, grants_for};
use crate::audit::{Audit, AuditRecord};
use crate::auth::{Caller, Verifier};

pub struct AppState {
    pub lake: Lake,
    /// The catalog's compiled view of the registry.
    pub products: RwLock<Products>,
    pub registry: Registry,
    pub source: SpecSource,
    /// Shared with the Kubernetes controller, which must not take a product a file owns.
    pub seed: Arc<tokio::sync::Mutex<crate::seed::FolderSeed>>,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub health: medallion_runtime::Health,
    pub quality: crate::quality::Quality,
    pub dead_letters: crate::dead_letters::DeadLetterMap,
    pub verifier: Verifier,
    pub audit: Audit,
    pub row_limit: usize,
    pub query_timeout: Duration,
    /// Files below half of this count as small in a table's health.
    pub compact_target_bytes: u64,
    /// Erasure requests (`medallion forget`), applied by the transform.
    pub erasures: medallion_bus::erasures::Erasures,
    /// Keys the digest naming a subject; `None`: erasure requests are refused.
    pub erasure_key: Option<crate::forget_api::DigestKey>,
    /// Queries running per role, over every protocol.
    pub sql_slots: crate::sql_gate::SqlSlots,
    pub stream_limits: crate::sql_gate::StreamLimits,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Medallion catalog", description = "Data products, lineage, SQL with time travel, RBAC and audit"),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The routes and the OpenAPI document, built from the same handler
/// annotations, so the document cannot drift from what is served.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_products))
        .routes(routes!(
            get_product,
            crate::specs_api::put_product,
            crate::specs_api::delete_product
        ))
        .routes(routes!(crate::specs_api::versions))
        .routes(routes!(lineage))
        .routes(routes!(table_info))
        .routes(routes!(query))
        .routes(routes!(audit_log))
        .routes(routes!(crate::pipeline_api::pipeline))
        .routes(routes!(crate::forget_api::forget))
        .routes(routes!(crate::forget_api::get_erasure))
        .routes(routes!(crate::forget_api::list_erasures))
        .with_state(state)
        .split_for_parts();
    let doc = Arc::new(doc);
    router
        .route(
            "/v1/openapi.json",
            get(move || async move { Json(doc.as_ref().clone()) }),
        )
        .merge(crate::web::router())
}

pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

/// Authenticates; a failure is audited and answered 401.
pub(crate) async fn caller(
    s: &AppState,
    headers: &HeaderMap,
    action: &str,
    target: &str,
) -> Result<Caller, ApiError> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    match s.verifier.verify(auth) {
        Ok(c) => Ok(c),
        Err(reason) => {
            s.audit
                .record(AuditRecord::denied(
                    "<unauthenticated>",
                    action,
                    target,
                    &reason,
                ))
                .await;
            Err(ApiError(StatusCode::UNAUTHORIZED, reason))
        }
    }
}

pub(crate) async fn deny(
    s: &AppState,
    c: &Caller,
    action: &str,
    target: &str,
    reason: String,
) -> ApiError {
    s.audit
        .record(AuditRecord::denied(&c.user, action, target, &reason))
        .await;
    ApiError(StatusCode::FORBIDDEN, reason)
}

/// Refuses (403, audited) a caller without the admin role; `what` names
/// the thing that needs it ("changing product specs").
pub(crate) async fn require_admin(
    s: &AppState,
    c: &Caller,
    action: &str,
    target: &str,
    what: &str,
) -> Result<(), ApiError> {
    if c.is_admin() {
        return Ok(());
    }
    Err(deny(s, c, action, target, format!("{what} needs the admin role")).await)
}

#[utoipa::path(get, path = "/v1/products", tag = "products",
    params(("q" = Option<String>, Query, description = "Text in name or description"),
           ("domain" = Option<String>, Query), ("tag" = Option<String>, Query), ("owner" = Option<String>, Query)),
    responses((status = 200, description = "Products the caller may see, with tables, freshness and quality"),
              (status = 401, description = "No valid bearer token")),
    security(("bearer" = [])))]
async fn list_products(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<Search>,
) -> ApiResult {
    let c = caller(&s, &headers, "list_products", "*").await?;
    let products = s.products.read().await;
    let mut out = Vec::new();
    for contract in products.contracts.values() {
        if !can_see_product(&c, contract) || !q.matches(contract) {
            continue;
        }
        let mut summary = product_summary(&s.lake, &c, contract).await;
        add_quality(&s, contract, &mut summary, false).await;
        out.push(summary);
    }
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "list_products",
            "*",
            None,
            Some(out.len()),
        ))
        .await;
    Ok(Json(json!({ "products": out })))
}

#[derive(Deserialize, Default)]
struct Search {
    q: Option<String>,
    domain: Option<String>,
    tag: Option<String>,
    owner: Option<String>,
}

impl Search {
    fn matches(&self, c: &Contract) -> bool {
        let spec = &c.product.spec;
        self.domain.as_ref().is_none_or(|d| d == c.domain())
            && self.tag.as_ref().is_none_or(|t| spec.tags.contains(t))
            && self.owner.as_ref().is_none_or(|o| &spec.owner == o)
            && self.q.as_ref().is_none_or(|q| {
                let q = q.to_lowercase();
                c.name().contains(&q) || spec.description.to_lowercase().contains(&q)
            })
    }
}

/// Quality counts per expectation, from the transform's events.
/// `per_hour`: quality over time too (one product's page; lists keep to totals).
async fn add_quality(s: &AppState, contract: &Contract, summary: &mut Value, per_hour: bool) {
    let key = format!("{}.{}", contract.domain(), contract.name());
    if let Some(q) = s.quality.read().await.get(&key) {
        let mut v = serde_json::to_value(q).unwrap_or(Value::Null);
        if !per_hour && let Some(o) = v.as_object_mut() {
            o.remove("by_hour");
        }
        summary["quality"] = v;
    }
    if let Some(d) = s.dead_letters.read().await.get(&key) {
        summary["dead_letters"] = serde_json::to_value(d).unwrap_or(Value::Null);
    }
}

async fn product_summary(lake: &Lake, c: &Caller, contract: &Contract) -> Value {
    let mut tables = Vec::new();
    for g in grants_for(c, contract) {
        tables.push(table_summary(lake, &g.table, contract, None).await);
    }
    let spec = &contract.product.spec;
    json!({
        "domain": contract.domain(),
        "name": contract.name(),
        "owner": spec.owner,
        "description": spec.description,
        "tags": spec.tags,
        "tables": tables,
    })
}

/// A table's summary; with `health` (the compaction target), also its
/// files, log and maintenance (one table's view, not product lists).
async fn table_summary(
    lake: &Lake,
    t: &TableRef,
    contract: &Contract,
    health: Option<u64>,
) -> Value {
    let Ok(Some(table)) = medallion_lake::open_at(lake, t, None).await else {
        return json!({"name": t.sql_name(), "exists": false});
    };
    let version = table.version().map(|v| v as i64).unwrap_or(-1);
    let rows: usize = medallion_lake::list_files(t, &table)
        .await
        .map(|f| f.iter().map(|f| f.num_records.unwrap_or(0)).sum())
        .unwrap_or(0);
    // Freshness counts commits that brought rows, not maintenance.
    let recent = maintenance::recent_commits(t, &table, 200)
        .await
        .unwrap_or_default();
    let last_ms = recent.last_data.and_then(|(_, ms)| ms);
    let age = last_ms.map(|ms| (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0);
    let freshness = match (contract.freshness, age) {
        (Some(sla), Some(age)) => Some(if age <= sla.as_secs_f64() {
            "fresh"
        } else {
            "stale"
        }),
        _ => None,
    };
    let schema = medallion_lake::table_schema(t, &table)
        .map(|s| s.fields().iter().map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()})).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut out = json!({
        "name": t.sql_name(),
        "layer": t.layer.as_str(),
        "exists": true,
        "version": version,
        "rows": rows,
        "last_commit": last_ms.and_then(chrono::DateTime::from_timestamp_millis).map(|d| d.to_rfc3339()),
        "age_seconds": age,
        "freshness": freshness,
        "schema": schema,
    });
    if let Some(target) = health {
        let compaction = maintenance::Compaction {
            target_file_size: target,
            fanout: 2,
        };
        let rfc = |ms: Option<i64>| {
            ms.and_then(chrono::DateTime::from_timestamp_millis)
                .map(|d| d.to_rfc3339())
        };
        // The one-table view also carries the table's recent history.
        if let Ok(h) = medallion_lake::commits::history(t, &table, 25).await {
            out["history"] = json!(
                h.iter()
                    .map(|e| json!({
                        "version": e.version,
                        "at": rfc(e.timestamp_ms),
                        "operation": e.operation,
                        "rows_added": e.rows_added,
                        "files_added": e.files_added,
                        "files_removed": e.files_removed,
                        "maintenance": e.maintenance,
                    }))
                    .collect::<Vec<_>>()
            );
        }
        if let Ok(h) = maintenance::health(t, &table, &compaction).await {
            out["health"] = json!({
                "files": h.files,
                "bytes": h.bytes,
                "average_file_bytes": h.average_file_bytes,
                "small_files": h.small_files,
                "checkpoint_version": h.checkpoint_version,
                "log_since_checkpoint": h.log_since_checkpoint,
                "unreferenced_files": h.unreferenced_files,
                "unreferenced_bytes": h.unreferenced_bytes,
                "last_compaction": rfc(recent.last_compaction_ms),
                "last_vacuum": rfc(maintenance::last_vacuum(&table).await),
            });
        }
    }
    out
}

/// The version and the time (ms) of the last commit that brought rows (not
/// maintenance) of a table; `None` when it does not exist yet.
pub(crate) async fn last_commit(lake: &Lake, t: &TableRef) -> Option<(Option<i64>, Option<i64>)> {
    let table = medallion_lake::open_at(lake, t, None)
        .await
        .ok()
        .flatten()?;
    let version = table.version().map(|v| v as i64)?;
    let last_ms = maintenance::recent_commits(t, &table, 200)
        .await
        .ok()
        .and_then(|r| r.last_data)
        .and_then(|(_, ms)| ms);
    Some((Some(version), last_ms))
}

/// The product `d.name` if it exists and the caller may see it (a denial is audited).
pub(crate) async fn visible_product(
    s: &AppState,
    c: &Caller,
    action: &str,
    d: &str,
    name: &str,
) -> Result<Arc<Contract>, ApiError> {
    let target = format!("{d}.{name}");
    let contract = s
        .products
        .read()
        .await
        .contracts
        .get(&(d.to_string(), name.to_string()))
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no product {target}")))?;
    if !can_see_product(c, &contract) {
        return Err(deny(
            s,
            c,
            action,
            &target,
            format!("no role of yours is granted {target}"),
        )
        .await);
    }
    Ok(contract)
}

#[utoipa::path(get, path = "/v1/products/{domain}/{product}", tag = "products",
    params(("domain" = String, Path), ("product" = String, Path)),
    responses((status = 200, description = "The product with its spec, revision and tables"),
              (status = 403, description = "No role of the caller is granted the product"),
              (status = 404, description = "No such product")),
    security(("bearer" = [])))]
async fn get_product(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "get_product", &target).await?;
    let contract = visible_product(&s, &c, "get_product", &d, &p).await?;
    let mut summary = product_summary(&s.lake, &c, &contract).await;
    add_quality(&s, &contract, &mut summary, true).await;
    summary["spec"] = serde_json::to_value(&contract.product).unwrap_or(Value::Null);
    let key = medallion_bus::registry::key(&d, &p);
    let current = s.registry.current(&key).await.ok().flatten();
    if let Some((revision, _)) = &current {
        summary["revision"] = json!(revision);
    }
    if let Some(file) = s.seed.lock().await.managed.get(&(d.clone(), p.clone())) {
        summary["managed_by"] = json!(file);
    }
    if let Some(owner) = current
        .as_ref()
        .and_then(|(_, t)| crate::seed::managed_by(t))
    {
        summary["managed_by"] = json!(owner);
    }
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "get_product",
            &target,
            None,
            None,
        ))
        .await;
    Ok(Json(summary))
}

#[derive(Deserialize, Default)]
struct LineageQuery {
    format: Option<String>,
}

#[utoipa::path(get, path = "/v1/products/{domain}/{product}/lineage", tag = "lineage",
    params(("domain" = String, Path), ("product" = String, Path),
           ("format" = Option<String>, Query, description = "`openlineage`: OpenLineage run events (one per stage) instead of the native graph")),
    responses((status = 200, description = "Table and column lineage"), (status = 403, description = "Not granted")),
    security(("bearer" = [])))]
async fn lineage(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
    Query(q): Query<LineageQuery>,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "lineage", &target).await?;
    let contract = visible_product(&s, &c, "lineage", &d, &p).await?;
    let subject = medallion_spec::ingest_subject(&d, &p);
    let (bronze, silver, quarantine) = (
        TableRef::bronze(&d, &p).sql_name(),
        TableRef::silver(&d, &p).sql_name(),
        TableRef::quarantine(&d, &p).sql_name(),
    );
    let mut edges = vec![
        json!({"from": format!("nats:{subject}"), "to": bronze, "by": "medallion-ingest"}),
        json!({"from": bronze, "to": silver, "by": "medallion-transform"}),
        json!({"from": bronze, "to": quarantine, "by": "medallion-transform"}),
    ];
    let mut columns = Vec::new();
    for g in &contract.gold {
        let gold = TableRef::gold(&d, &g.name).sql_name();
        edges.push(
            json!({"from": silver, "to": gold, "by": "medallion-aggregate", "sql": g.sql.trim()}),
        );
        for l in &g.lineage {
            columns.push(json!({"table": gold, "column": l.column, "sources": l.sources.iter().map(|s| format!("{silver}.{s}")).collect::<Vec<_>>(), "transformation": l.transformation}));
        }
    }
    s.audit
        .record(AuditRecord::allowed(
            &c.user, "lineage", &target, None, None,
        ))
        .await;
    if q.format.as_deref() == Some("openlineage") {
        return Ok(Json(json!({
            "events": crate::openlineage::events(s.lake.root().as_str(), &contract)
        })));
    }
    Ok(Json(
        json!({"product": target, "edges": edges, "columns": columns}),
    ))
}

#[utoipa::path(get, path = "/v1/tables/{layer}/{domain}/{table}", tag = "tables",
    params(("layer" = String, Path, description = "bronze, silver or gold"), ("domain" = String, Path), ("table" = String, Path)),
    responses((status = 200, description = "Schema, version, rows, last commit, freshness, and health: files, sizes, log since the last checkpoint, unreferenced bytes, last compaction and vacuum"), (status = 403, description = "Not granted")),
    security(("bearer" = [])))]
async fn table_info(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((layer, d, t)): Path<(String, String, String)>,
) -> ApiResult {
    let target = format!("{layer}.{d}.{t}");
    let c = caller(&s, &headers, "table", &target).await?;
    let tref = TableRef::parse(&target).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{target} is not <layer>.<domain>.<table>"),
        )
    })?;
    let products = s.products.read().await;
    let found = products.contracts.values().find_map(|contract| {
        grants_for(&c, contract)
            .into_iter()
            .find(|g| g.table == tref)
            .map(|_| contract.clone())
    });
    let Some(contract) = found else {
        return Err(deny(
            &s,
            &c,
            "table",
            &target,
            format!("{target} is not granted to your roles (or does not exist)"),
        )
        .await);
    };
    s.audit
        .record(AuditRecord::allowed(&c.user, "table", &target, None, None))
        .await;
    Ok(Json(
        table_summary(&s.lake, &tref, &contract, Some(s.compact_target_bytes)).await,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
    #[serde(default)]
    version: Option<i64>,
    /// RFC 3339: each table as of its last commit at or before this instant.
    #[serde(default)]
    as_of: Option<String>,
}

const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

#[utoipa::path(post, path = "/v1/query", tag = "query",
    request_body(content = String, description = "{\"sql\": \"SELECT ...\", \"version\": n | \"as_of\": \"RFC 3339\"}", content_type = "application/json"),
    responses((status = 200, description = "JSON {columns, rows, row_count, truncated}, or an Arrow IPC stream with `Accept: application/vnd.apache.arrow.stream`"),
              (status = 400, description = "The engine's message"),
              (status = 403, description = "A referenced table is not granted"),
              (status = 429, description = "The caller's role already runs MEDALLION_QUERY_CONCURRENCY queries")),
    security(("bearer" = [])))]
async fn query(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(req): Json<QueryRequest>,
) -> Result<Response, ApiError> {
    let c = caller(&s, &headers, "query", &req.sql).await?;
    match answer_query(&s, &c, &headers, &req).await {
        Ok(r) => Ok(r),
        Err(e) => {
            // A refused statement (DDL, DML, COPY, an unknown table function,
            // several statements, a timeout) is a denial too: audited with
            // the engine's reason. 403s are audited where they are decided.
            if e.0 == StatusCode::BAD_REQUEST {
                s.audit
                    .record(AuditRecord::denied(
                        &c.user,
                        "query",
                        &req.sql,
                        &format!("refused: {}", e.1),
                    ))
                    .await;
            }
            Err(e)
        }
    }
}

async fn answer_query(
    s: &AppState,
    c: &Caller,
    headers: &HeaderMap,
    req: &QueryRequest,
) -> Result<Response, ApiError> {
    let at = match (req.version, req.as_of.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give either `version` or `as_of`, not both".into(),
            ));
        }
        (Some(v), None) => TimeTravel::Version(v),
        (None, Some(t)) => TimeTravel::AsOf(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("as_of: {e}; use RFC 3339, e.g. 2026-11-29T10:00:00Z"),
                    )
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, None) => TimeTravel::Latest,
    };
    let grants = crate::sql_gate::grants(s, c).await;
    // Name the table the caller may not read instead of "not found".
    let referenced =
        referenced_tables(&req.sql).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    for r in &referenced {
        if !grants.iter().any(|g| g.table.sql_name() == *r) {
            return Err(deny(
                s,
                c,
                "query",
                &req.sql,
                format!("{r} is not granted to your roles (or does not exist)"),
            )
            .await);
        }
    }
    // Only the tables the query names: `version` applies to them, and the
    // session does not open tables it will not read.
    let grants: Vec<Grant> = grants
        .into_iter()
        .filter(|g| referenced.contains(&g.table.sql_name()))
        .collect();
    // The same per-role share as the Postgres wire and Flight SQL ports.
    let _slot = s
        .sql_slots
        .admit(c, s.stream_limits.per_role)
        .map_err(|e| ApiError(StatusCode::TOO_MANY_REQUESTS, e.message))?;
    let ctx = session(&s.lake, &grants, at)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let batches = tokio::time::timeout(s.query_timeout, run_query(&ctx, &req.sql, s.row_limit))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("query exceeded {:?}", s.query_timeout),
            )
        })?
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    // Recorded before the answer leaves, whatever its format.
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "query",
            &req.sql,
            req.version,
            Some(rows),
        ))
        .await;
    let wants_arrow = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(ARROW_STREAM));
    if wants_arrow {
        let mut out = Vec::new();
        if let Some(first) = batches.first() {
            let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &first.schema())
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            for b in &batches {
                w.write(b)
                    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            }
            w.finish()
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
        return Ok(([("content-type", ARROW_STREAM)], out).into_response());
    }
    let mut w = arrow_json::ArrayWriter::new(Vec::new());
    for b in &batches {
        w.write(b)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    w.finish()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let body = w.into_inner();
    let data: Value = if body.is_empty() {
        json!([])
    } else {
        serde_json::from_slice(&body).unwrap_or(json!([]))
    };
    let columns: Vec<String> = batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(
        json!({"columns": columns, "rows": data, "row_count": rows, "truncated": rows >= s.row_limit}),
    )
    .into_response())
}

/// `layer.domain.table` names the SQL reads.
fn referenced_tables(sql: &str) -> Result<Vec<String>, String> {
    let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
    let statements = datafusion::sql::parser::DFParser::parse_sql_with_dialect(sql, &dialect)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for st in statements {
        let (names, _) = crate::sql_gate::tables_read(&st, None).map_err(|e| e.message)?;
        out.extend(names);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct AuditQuery {
    user: Option<String>,
    product: Option<String>,
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(("user" = Option<String>, Query), ("product" = Option<String>, Query),
           ("since" = Option<String>, Query, description = "RFC 3339"), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "Audit records, oldest first"), (status = 403, description = "Needs admin")),
    security(("bearer" = [])))]
async fn audit_log(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    let c = caller(&s, &headers, "audit", "*").await?;
    if !c.is_admin() {
        return Err(deny(
            &s,
            &c,
            "audit",
            "*",
            "reading the audit log needs the admin role".into(),
        )
        .await);
    }
    let since = q
        .since
        .as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("since: {e}; use RFC 3339")))
        })
        .transpose()?;
    let records = s
        .audit
        .read(q.limit.unwrap_or(1000).min(10_000), |r| {
            q.user.as_ref().is_none_or(|u| &r.user == u)
                && q.product
                    .as_ref()
                    .is_none_or(|p| r.target.contains(p.as_str()))
                && since.is_none_or(|t| r.at >= t.with_timezone(&chrono::Utc))
        })
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "audit",
            "*",
            None,
            Some(records.len()),
        ))
        .await;
    Ok(Json(json!({ "records": records })))
}
