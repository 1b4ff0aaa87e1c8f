//! The one way SQL reaches the lake from the Postgres wire and Flight SQL
//! endpoints: authenticate, check every table the statement names against
//! the caller's grants, plan in a session that holds only granted tables
//! (masked columns already NULL), and stream the answer under the limits
//! that protect the service. Every query and every denial is audited with
//! the protocol it came by.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::{ParamValues, TableReference};
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;
use futures::{Stream, StreamExt};
use medallion_lake::query::{Grant, TimeTravel, session_with};
use medallion_spec::model::Layer;

use crate::access::grants_for;
use crate::api::AppState;
use crate::audit::AuditRecord;
use crate::auth::Caller;

/// How a query arrived; named in its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    FlightSql,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::FlightSql => "flight-sql",
        }
    }
}

/// Why a statement was not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateErrorKind {
    /// No valid token.
    Unauthenticated,
    /// A table outside the caller's grants.
    Denied,
    /// Not a query, or one the engine refuses.
    Invalid,
    /// The caller's role already runs its share of queries.
    Busy,
    /// The answer passed the row or byte limit.
    TooLarge,
    /// The query ran past the timeout.
    Timeout,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GateError {
    pub kind: GateErrorKind,
    pub message: String,
}

impl GateError {
    fn new(kind: GateErrorKind, message: impl Into<String>) -> Self {
        GateError {
            kind,
            message: message.into(),
        }
    }
}

/// The limits a streamed answer runs under.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub rows: usize,
    pub bytes: usize,
    pub timeout: Duration,
    /// Queries one role may run at once.
    pub per_role: usize,
}

/// Where bare names resolve and what a statement may see besides tables.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    pub protocol: Protocol,
    pub at: TimeTravel,
    /// The Postgres database: the layer `schema.table` and `table` resolve
    /// in. With it, `pg_catalog` and `information_schema` are served, built
    /// from the granted tables only.
    pub database: Option<Layer>,
}

/// A planned statement, ready to run (once, or again with other parameters).
#[derive(Clone)]
pub struct Planned {
    pub ctx: SessionContext,
    pub plan: LogicalPlan,
    pub sql: String,
    pub at: TimeTravel,
}

impl Planned {
    pub fn schema(&self) -> SchemaRef {
        Arc::new(self.plan.schema().as_arrow().clone())
    }
}

/// Statements planned moments ago, for the call that runs them: clients
/// describe a statement (Postgres Parse, Flight SQL GetFlightInfo) and run
/// it right after (Execute, DoGet), and planning opens every table the
/// statement reads, so planning twice doubled a small query's latency. A
/// plan older than [`RecentPlans::FRESH_FOR`] is never reused, so a
/// statement sees tables as fresh as if it were planned when run.
#[derive(Default)]
pub struct RecentPlans {
    plans: Mutex<Vec<(std::time::Instant, String, Planned)>>,
}

impl RecentPlans {
    pub const FRESH_FOR: Duration = Duration::from_secs(1);
    const KEEP: usize = 64;

    pub fn put(&self, user: &str, planned: &Planned) {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.retain(|(when, _, _)| when.elapsed() < Self::FRESH_FOR);
        if plans.len() >= Self::KEEP {
            plans.remove(0);
        }
        plans.push((std::time::Instant::now(), user.to_string(), planned.clone()));
    }

    /// The plan of `sql` at `at` made for `user` within FRESH_FOR, taken
    /// (each plan serves one run).
    pub fn take(&self, user: &str, sql: &str, at: TimeTravel) -> Option<Planned> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let i = plans.iter().position(|(when, u, p)| {
            when.elapsed() < Self::FRESH_FOR && u == user && p.sql == sql && p.at == at
        })?;
        Some(plans.swap_remove(i).2)
    }
}

pub type BatchStream = Pin<Box<dyn Stream<Item = Result<RecordBatch, GateError>> + Send>>;

const CATALOG_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];

/// Verifies `token` (a bare JWT or `Bearer <jwt>`); a refusal is audited.
pub async fn authenticate(
    s: &AppState,
    token: &str,
    user_hint: Option<&str>,
    protocol: Protocol,
) -> Result<Caller, GateError> {
    let bearer = if token.starts_with("Bearer ") {
        token.to_string()
    } else {
        format!("Bearer {token}")
    };
    let result = s.verifier.verify(Some(&bearer)).and_then(|c| match user_hint {
        // A user name, when given, must be the token's subject: a log in as
        // "alice" with bob's token is a mistake worth refusing.
        Some(u) if !u.is_empty() && u != c.user => Err(format!(
            "the user name `{u}` is not the token's subject; connect as `{}` (or any name the client lets you leave empty)",
            c.user
        )),
        _ => Ok(c),
    });
    match result {
        Ok(c) => Ok(c),
        Err(reason) => {
            s.audit
                .record(
                    AuditRecord::denied("<unauthenticated>", "connect", protocol.as_str(), &reason)
                        .via(protocol.as_str()),
                )
                .await;
            Err(GateError::new(GateErrorKind::Unauthenticated, reason))
        }
    }
}

/// Every table the caller may read, with its masks.
pub async fn grants(s: &AppState, c: &Caller) -> Vec<Grant> {
    let products = s.products.read().await;
    products
        .contracts
        .values()
        .flat_map(|contract| grants_for(c, contract))
        .collect()
}

/// Records a refusal of `sql` and returns it as the error to send.
pub async fn deny(
    s: &AppState,
    c: &Caller,
    sql: &str,
    protocol: Protocol,
    e: GateError,
) -> GateError {
    let reason = match e.kind {
        GateErrorKind::Invalid => format!("refused: {}", e.message),
        _ => e.message.clone(),
    };
    s.audit
        .record(AuditRecord::denied(&c.user, "query", sql, &reason).via(protocol.as_str()))
        .await;
    e
}

/// Plans one statement for `c`; a refusal is audited.
pub async fn plan(
    s: &AppState,
    c: &Caller,
    sql: &str,
    statement: Statement,
    scope: &Scope,
) -> Result<Planned, GateError> {
    match plan_unaudited(s, c, sql, statement, scope).await {
        Ok(p) => Ok(p),
        Err(e) => Err(deny(s, c, sql, scope.protocol, e).await),
    }
}

async fn plan_unaudited(
    s: &AppState,
    c: &Caller,
    sql: &str,
    statement: Statement,
    scope: &Scope,
) -> Result<Planned, GateError> {
    let grants = grants(s, c).await;
    let (wanted, reads_catalog) = tables_read(&statement, scope.database)?;
    if let Some(name) = wanted
        .iter()
        .find(|name| !grants.iter().any(|g| g.table.sql_name() == **name))
    {
        return Err(GateError::new(
            GateErrorKind::Denied,
            format!("{name} is not granted to your roles (or does not exist)"),
        ));
    }
    // A catalog query sees every granted table (and nothing else); any
    // other query opens only the tables it names.
    let open: Vec<Grant> = grants
        .into_iter()
        .filter(|g| reads_catalog || wanted.contains(&g.table.sql_name()))
        .collect();
    let mut config = SessionConfig::new().with_create_default_catalog_and_schema(false);
    if let Some(db) = scope.database {
        config = config
            .with_information_schema(true)
            .with_default_catalog_and_schema(db.as_str(), "public");
    }
    let ctx = session_with(&s.lake, &open, scope.at, config)
        .await
        .map_err(invalid)?;
    if let Some(db) = scope.database {
        crate::pg_wire::catalog::install(&ctx, db).map_err(invalid)?;
    }
    let plan = ctx
        .state()
        .statement_to_plan(statement)
        .await
        .map_err(invalid)?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(invalid)?;
    Ok(Planned {
        ctx,
        plan,
        sql: sql.to_string(),
        at: scope.at,
    })
}

/// The tables a statement names (`layer.domain.table` when its names
/// resolve to that; as written otherwise, which no grant matches), and
/// whether it reads `pg_catalog` or `information_schema` (only with a
/// database: over HTTP and Flight SQL those are names like any other).
pub fn tables_read(
    statement: &Statement,
    database: Option<Layer>,
) -> Result<(Vec<String>, bool), GateError> {
    let refs = SessionContext::new()
        .state()
        .resolve_table_references(statement)
        .map_err(invalid)?;
    let mut names = Vec::new();
    let mut reads_catalog = false;
    for r in &refs {
        let (catalog, schema, table) = resolve(r, database);
        if database.is_some()
            && schema
                .as_deref()
                .is_some_and(|s| CATALOG_SCHEMAS.contains(&s))
        {
            reads_catalog = true;
            continue;
        }
        names.push(match (&catalog, &schema) {
            (Some(catalog), Some(schema)) => format!("{catalog}.{schema}.{table}"),
            _ => r.to_string(),
        });
    }
    Ok((names, reads_catalog))
}

fn invalid(e: impl std::fmt::Display) -> GateError {
    GateError::new(GateErrorKind::Invalid, e.to_string())
}

/// (catalog, schema, table) of a reference, bare names completed with the
/// database and `public` the way Postgres's search path would.
fn resolve(
    r: &TableReference,
    database: Option<Layer>,
) -> (Option<String>, Option<String>, String) {
    let db = database.map(|d| d.as_str().to_string());
    match r {
        TableReference::Full {
            catalog,
            schema,
            table,
        } => (
            Some(catalog.to_string()),
            Some(schema.to_string()),
            table.to_string(),
        ),
        TableReference::Partial { schema, table } => {
            (db, Some(schema.to_string()), table.to_string())
        }
        TableReference::Bare { table } => (
            db.clone(),
            db.map(|_| "public".to_string()),
            table.to_string(),
        ),
    }
}

/// Runs a planned statement, streaming at most the limits allow. The
/// query is audited before its first row leaves.
pub async fn execute(
    s: &AppState,
    c: &Caller,
    planned: Planned,
    params: Option<ParamValues>,
    protocol: Protocol,
    limits: StreamLimits,
    statement_timeout: Option<Duration>,
) -> Result<(SchemaRef, BatchStream), GateError> {
    let Planned { ctx, plan, sql, at } = planned;
    let result = async {
        let plan = match params {
            Some(p) => plan.replace_params_with_values(&p).map_err(invalid)?,
            None => plan,
        };
        let slot = s.sql_slots.admit(c, limits.per_role)?;
        let timeout = statement_timeout.map_or(limits.timeout, |t| t.min(limits.timeout));
        let deadline = tokio::time::Instant::now() + timeout;
        let df = ctx.execute_logical_plan(plan).await.map_err(invalid)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let inner = tokio::time::timeout_at(deadline, df.execute_stream())
            .await
            .map_err(|_| timed_out(timeout))?
            .map_err(invalid)?;
        Ok((schema, limited(inner, slot, deadline, timeout, limits)))
    }
    .await;
    match result {
        Ok(r) => {
            s.audit
                .record(
                    AuditRecord::allowed(&c.user, "query", &sql, version_of(at), None)
                        .via(protocol.as_str()),
                )
                .await;
            Ok(r)
        }
        Err(e) => Err(deny(s, c, &sql, protocol, e).await),
    }
}

fn version_of(at: TimeTravel) -> Option<i64> {
    match at {
        TimeTravel::Version(v) => Some(v),
        _ => None,
    }
}

fn timed_out(timeout: Duration) -> GateError {
    GateError::new(
        GateErrorKind::Timeout,
        format!(
            "canceling statement: it ran past {timeout:?} (the catalog's MEDALLION_QUERY_TIMEOUT, or your statement_timeout)"
        ),
    )
}

struct Limited {
    inner: datafusion::physical_plan::SendableRecordBatchStream,
    _slot: Slot,
    deadline: tokio::time::Instant,
    timeout: Duration,
    limits: StreamLimits,
    rows: usize,
    bytes: usize,
    done: bool,
}

fn limited(
    inner: datafusion::physical_plan::SendableRecordBatchStream,
    slot: Slot,
    deadline: tokio::time::Instant,
    timeout: Duration,
    limits: StreamLimits,
) -> BatchStream {
    let state = Limited {
        inner,
        _slot: slot,
        deadline,
        timeout,
        limits,
        rows: 0,
        bytes: 0,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let next = match tokio::time::timeout_at(st.deadline, st.inner.next()).await {
            Err(_) => Some(Err(timed_out(st.timeout))),
            Ok(None) => None,
            Ok(Some(Err(e))) => Some(Err(GateError::new(GateErrorKind::Invalid, e.to_string()))),
            Ok(Some(Ok(batch))) => {
                st.rows += batch.num_rows();
                st.bytes += batch.get_array_memory_size();
                if st.rows > st.limits.rows {
                    Some(Err(GateError::new(
                        GateErrorKind::TooLarge,
                        format!(
                            "the answer passed {} rows (MEDALLION_STREAM_ROW_LIMIT); add a filter, an aggregate or a LIMIT",
                            st.limits.rows
                        ),
                    )))
                } else if st.bytes > st.limits.bytes {
                    Some(Err(GateError::new(
                        GateErrorKind::TooLarge,
                        format!(
                            "the answer passed {} bytes (MEDALLION_STREAM_BYTE_LIMIT); select fewer columns or rows",
                            st.limits.bytes
                        ),
                    )))
                } else {
                    Some(Ok(batch))
                }
            }
        };
        let item = next?;
        st.done = item.is_err();
        Some((item, st))
    }))
}

/// Queries running per role, so one role's dashboards cannot take every
/// core from the others.
#[derive(Debug, Default)]
pub struct SqlSlots {
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// A running query's place; given back when the answer is dropped.
pub struct Slot {
    running: Arc<Mutex<HashMap<String, usize>>>,
    roles: Vec<String>,
}

impl SqlSlots {
    /// Takes a place for each of the caller's roles, or none if any of
    /// them is full.
    pub fn admit(&self, c: &Caller, per_role: usize) -> Result<Slot, GateError> {
        let roles: Vec<String> = if c.roles.is_empty() {
            vec![format!("user:{}", c.user)]
        } else {
            c.roles.clone()
        };
        let mut running = self.running.lock().expect("slot counts are never poisoned");
        if let Some(full) = roles
            .iter()
            .find(|r| running.get(*r).copied().unwrap_or(0) >= per_role)
        {
            return Err(GateError::new(
                GateErrorKind::Busy,
                format!(
                    "role {full} already runs {per_role} queries (MEDALLION_QUERY_CONCURRENCY); retry when one finishes"
                ),
            ));
        }
        for r in &roles {
            *running.entry(r.clone()).or_default() += 1;
        }
        Ok(Slot {
            running: self.running.clone(),
            roles,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("slot counts are never poisoned");
        for r in &self.roles {
            if let Some(n) = running.get_mut(r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    running.remove(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(roles: &[&str]) -> Caller {
        Caller {
            user: "u".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_role_runs_at_most_its_share_and_gets_places_back() {
        let slots = SqlSlots::default();
        let a = slots.admit(&caller(&["analyst"]), 2).unwrap();
        let _b = slots.admit(&caller(&["analyst", "finance"]), 2).unwrap();
        let refused = slots.admit(&caller(&["analyst"]), 2).err().unwrap();
        assert_eq!(refused.kind, GateErrorKind::Busy);
        assert!(refused.message.contains("role analyst"), "{refused}");
        // finance holds one place, so it can still take another.
        let _c = slots.admit(&caller(&["finance"]), 2).unwrap();
        drop(a);
        slots.admit(&caller(&["analyst"]), 2).unwrap();
    }

    #[test]
    fn bare_names_resolve_in_the_database() {
        let bare = TableReference::bare("orders");
        let partial = TableReference::partial("shop", "orders");
        assert_eq!(
            resolve(&partial, Some(Layer::Gold)),
            (Some("gold".into()), Some("shop".into()), "orders".into())
        );
        assert_eq!(
            resolve(&bare, Some(Layer::Silver)),
            (
                Some("silver".into()),
                Some("public".into()),
                "orders".into()
            )
        );
        assert_eq!(
            resolve(&partial, None),
            (None, Some("shop".into()), "orders".into())
        );
    }
}
