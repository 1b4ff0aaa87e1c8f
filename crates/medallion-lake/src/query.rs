//! SQL over the lake: every table registered under its SQL name
//! (`<layer>.<domain>.<table>`) in a DataFusion session, optionally at an
//! older version (time travel), with masked columns replaced by NULL.
//!
//! Masking is done by registering a projection in place of the table, so no
//! query shape (`SELECT *`, joins, subqueries) can reach the raw column: the
//! session never sees it. The session has no `information_schema`, and
//! statements other than queries are refused.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::{MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider};
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use medallion_spec::TableRef;
use medallion_spec::model::Layer;

use crate::{Lake, LakeError, open_at};

/// One table a session may read, and the columns it must not see.
#[derive(Debug, Clone)]
pub struct Grant {
    pub table: TableRef,
    pub masked: Vec<String>,
}

/// Tables present under a local lake root (`<layer>/<domain>/<name>/_delta_log`).
pub fn list_local_tables(lake: &Lake) -> Vec<TableRef> {
    let Some(root) = lake.local_path() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for layer in [Layer::Bronze, Layer::Silver, Layer::Gold] {
        let Ok(domains) = std::fs::read_dir(root.join(layer.as_str())) else {
            continue;
        };
        for d in domains.flatten() {
            let Ok(tables) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for t in tables.flatten() {
                if t.path().join("_delta_log").is_dir() {
                    out.push(TableRef::new(
                        layer,
                        d.file_name().to_string_lossy().to_string(),
                        t.file_name().to_string_lossy().to_string(),
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

/// Which state of the tables a query reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum TimeTravel {
    #[default]
    Latest,
    /// This table version.
    Version(i64),
    /// The last version committed at or before this instant.
    AsOf(chrono::DateTime<chrono::Utc>),
}

impl From<Option<i64>> for TimeTravel {
    fn from(v: Option<i64>) -> Self {
        v.map_or(TimeTravel::Latest, TimeTravel::Version)
    }
}

/// A session exposing exactly `grants`, each at the state `at` names.
pub async fn session(
    lake: &Lake,
    grants: &[Grant],
    at: impl Into<TimeTravel>,
) -> Result<SessionContext, LakeError> {
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(false);
    session_with(lake, grants, at, config).await
}

/// [`session`] with the caller's own configuration (a default catalog for
/// bare names, `information_schema` over exactly the granted tables).
pub async fn session_with(
    lake: &Lake,
    grants: &[Grant],
    at: impl Into<TimeTravel>,
    config: SessionConfig,
) -> Result<SessionContext, LakeError> {
    let at = at.into();
    let ctx = SessionContext::new_with_config(config);
    for g in grants {
        let table = match at {
            TimeTravel::Latest => open_at(lake, &g.table, None).await?,
            TimeTravel::Version(v) => open_at(lake, &g.table, Some(v)).await?,
            TimeTravel::AsOf(t) => crate::commits::open_as_of(lake, &g.table, t).await?,
        };
        let Some(table) = table else {
            continue;
        };
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| LakeError::delta(&g.table, e))?;
        let provider = table.table_provider().await?;
        let provider = if g.masked.is_empty() {
            provider
        } else {
            let df = ctx.read_table(provider.clone())?;
            let exprs: Vec<_> = provider
                .schema()
                .fields()
                .iter()
                .map(|f| {
                    if g.masked.iter().any(|m| m == f.name()) {
                        let null =
                            ScalarValue::try_from(f.data_type()).unwrap_or(ScalarValue::Null);
                        lit(null).alias(f.name())
                    } else {
                        col(format!("\"{}\"", f.name())).alias(f.name())
                    }
                })
                .collect();
            // A table to its readers: catalogs that list tables (psql `\dt`,
            // BI tools) must not show a masked table as a view.
            Arc::new(crate::masked_table::MaskedTable(
                df.select(exprs)?.into_view(),
            ))
        };
        let catalog = match ctx.catalog(g.table.layer.as_str()) {
            Some(c) => c,
            None => {
                let c = Arc::new(MemoryCatalogProvider::new());
                ctx.register_catalog(g.table.layer.as_str(), c.clone());
                c
            }
        };
        let schema = match catalog.schema(&g.table.domain) {
            Some(s) => s,
            None => {
                let s: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
                catalog.register_schema(&g.table.domain, s.clone())?;
                s
            }
        };
        schema.register_table(g.table.name.clone(), provider)?;
    }
    Ok(ctx)
}

/// Runs one read-only query, at most `limit` rows.
pub async fn run_query(
    ctx: &SessionContext,
    sql: &str,
    limit: usize,
) -> Result<Vec<RecordBatch>, LakeError> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, options).await?;
    Ok(df.limit(0, Some(limit))?.collect().await?)
}
