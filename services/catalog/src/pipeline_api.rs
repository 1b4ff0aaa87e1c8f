//! `GET /v1/pipeline`: who works on what — each stage's live replicas, the
//! unit (product partition) each holds with the work waiting for it, how
//! often units moved, and units nobody holds right now.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use medallion_bus::ownership::{Owners, OwnersView, UnitId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, ApiResult, AppState, caller, deny};
use crate::audit::AuditRecord;

const STAGES: [&str; 3] = ["ingest", "transform", "aggregate"];

#[derive(Deserialize)]
pub(crate) struct PipelineQuery {
    /// `<domain>.<product>`: only that product's units.
    product: Option<String>,
}

#[utoipa::path(get, path = "/v1/pipeline", tag = "pipeline",
    params(("product" = Option<String>, Query, description = "<domain>.<product>")),
    responses((status = 200, description = "Replicas of each stage and the units they hold"),
              (status = 403, description = "Needs admin")),
    security(("bearer" = [])))]
pub(crate) async fn pipeline(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<PipelineQuery>,
) -> ApiResult {
    let c = caller(&s, &headers, "pipeline", "*").await?;
    if !c.is_admin() {
        return Err(deny(
            &s,
            &c,
            "pipeline",
            "*",
            "the pipeline's replicas and units need the admin role".into(),
        )
        .await);
    }
    let view = match Owners::open_existing(&s.js)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    {
        Some(o) => o
            .view()
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
        None => OwnersView::default(),
    };
    let expected: Vec<UnitId> = {
        let products = s.products.read().await;
        products
            .contracts
            .iter()
            .flat_map(|((d, p), c)| (0..c.partitions()).map(move |k| UnitId::new(d, p, k)))
            .collect()
    };
    let body = describe(&view, &expected, q.product.as_deref());
    s.audit
        .record(AuditRecord::allowed(&c.user, "pipeline", "*", None, None))
        .await;
    Ok(Json(body))
}

/// The view per stage; `expected` are the registered products' units (a
/// stage may hold more: ingest lands products that have no spec).
fn describe(view: &OwnersView, expected: &[UnitId], product: Option<&str>) -> Value {
    let wanted = |u: &UnitId| product.is_none_or(|p| u.product_name() == p);
    let mut stages = BTreeMap::new();
    for stage in STAGES {
        let backlog: BTreeMap<&UnitId, i64> = view
            .members
            .iter()
            .filter(|(st, _)| st == stage)
            .flat_map(|(_, m)| m.units.iter().map(|u| (&u.unit, u.backlog)))
            .collect();
        let owners: BTreeMap<&UnitId, &str> = view
            .leases
            .iter()
            .filter(|(st, u, _)| st == stage && wanted(u))
            .map(|(_, u, l)| (u, l.replica.as_str()))
            .collect();
        let replicas: Vec<Value> = view
            .members
            .iter()
            .filter(|(st, _)| st == stage)
            .map(|(_, m)| {
                json!({
                    "replica": m.replica,
                    "started_at": m.started_at,
                    "rebalances": m.rebalances,
                    "units": m.units.iter().filter(|u| wanted(&u.unit)).map(|u| u.unit.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let units: Vec<Value> = owners
            .iter()
            .map(|(u, r)| {
                json!({
                    "product": u.product_name(),
                    "partition": u.partition,
                    "owner": r,
                    "backlog": backlog.get(u).copied().unwrap_or(-1),
                })
            })
            .collect();
        let unowned: Vec<String> = expected
            .iter()
            .filter(|u| wanted(u) && !owners.contains_key(u))
            .map(|u| u.to_string())
            .collect();
        stages.insert(
            stage,
            json!({"replicas": replicas, "units": units, "unowned": unowned}),
        );
    }
    json!({ "stages": stages })
}

#[cfg(test)]
mod tests {
    use medallion_bus::ownership::{LeaseRecord, MemberRecord, UnitStatus};

    use super::*;

    #[test]
    fn units_are_listed_with_owner_and_backlog_and_the_unowned_named() {
        let u0 = UnitId::new("finance", "payments", 0);
        let u1 = UnitId::new("finance", "payments", 1);
        let view = OwnersView {
            members: vec![(
                "transform".into(),
                MemberRecord {
                    replica: "t-1".into(),
                    instance: "x".into(),
                    started_at: "2026-12-04T00:00:00Z".into(),
                    units: vec![UnitStatus {
                        unit: u0.clone(),
                        backlog: 7,
                    }],
                    rebalances: 3,
                },
            )],
            leases: vec![(
                "transform".into(),
                u0.clone(),
                LeaseRecord {
                    replica: "t-1".into(),
                    instance: "x".into(),
                    since: "2026-12-04T00:00:00Z".into(),
                },
            )],
        };
        let v = describe(&view, &[u0, u1], None);
        let t = &v["stages"]["transform"];
        assert_eq!(t["units"][0]["owner"], "t-1");
        assert_eq!(t["units"][0]["backlog"], 7);
        assert_eq!(t["unowned"][0], "finance.payments#1");
        assert_eq!(t["replicas"][0]["rebalances"], 3);
        assert_eq!(
            v["stages"]["ingest"]["unowned"].as_array().unwrap().len(),
            2
        );
        let only = describe(&view, &[], Some("other.product"));
        assert!(
            only["stages"]["transform"]["units"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
}
