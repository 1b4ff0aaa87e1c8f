//! Statements over the simple and the extended query protocols. Session
//! statements clients send on their own (`SET`, `SHOW`, `BEGIN`/`COMMIT`)
//! are answered by datafusion-postgres's hooks on a scratch session, so
//! they can change nothing but this connection's settings; every other
//! statement is planned and run by the gate, which opens the granted
//! tables afresh for each one (a long-lived BI connection sees new data).
//!
//! Time travel: `SET medallion.version = <n>` or `SET medallion.as_of =
//! '<RFC 3339>'` applies to the connection's following statements;
//! `SET medallion.version = DEFAULT` goes back to the latest version.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Expr, Set, Statement};
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters;
use datafusion_postgres::arrow_pg::datatypes::{
    arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type,
};
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::QueryHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use futures::{Sink, StreamExt};
use medallion_lake::query::TimeTravel;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use pgwire::types::format::FormatOptions;

use super::Connection;
use crate::auth::Caller;
use crate::sql_gate::{self, GateError, GateErrorKind, Protocol, Scope};

/// Decodes a portal's parameters given the types the plan infers for them.
type ParamDecoder<'a> =
    dyn Fn(&[Option<&DataType>]) -> PgWireResult<ParamValues> + Send + Sync + 'a;

/// The statement type datafusion-postgres's hooks expect in the portal store.
type Prepared = (String, Option<(Statement, LogicalPlan)>);

const VERSION_KEY: &str = "medallion.version";
const AS_OF_KEY: &str = "medallion.as_of";
/// Where datafusion-postgres's `SET statement_timeout` keeps its value.
const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

pub(crate) struct Queries {
    parser: Arc<Parser>,
}

impl Queries {
    pub(crate) fn new(conn: Arc<Connection>) -> Self {
        Queries {
            parser: Arc::new(Parser {
                conn,
                sql: PostgresCompatibilityParser::new(),
                recent: Default::default(),
            }),
        }
    }
}

pub(crate) struct Parser {
    conn: Arc<Connection>,
    sql: PostgresCompatibilityParser,
    /// Plans made at Parse, for the Execute drivers send right behind it.
    recent: sql_gate::RecentPlans,
}

fn session_hooks() -> [Arc<dyn QueryHook>; 2] {
    [Arc::new(SetShowHook), Arc::new(TransactionStatementHook)]
}

/// Statements about the session, not the data.
fn is_session_statement(st: &Statement) -> bool {
    matches!(
        st,
        Statement::Set(_)
            | Statement::ShowVariable { .. }
            | Statement::ShowStatus { .. }
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
    )
}

pub(crate) fn error(kind: &GateErrorKind, message: String) -> PgWireError {
    let code = match kind {
        GateErrorKind::Unauthenticated => "28000",
        GateErrorKind::Denied => "42501",
        GateErrorKind::Invalid => "42000",
        GateErrorKind::Busy => "53000",
        GateErrorKind::TooLarge => "54000",
        GateErrorKind::Timeout => "57014",
    };
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message,
    )))
}

fn gate_error(e: GateError) -> PgWireError {
    error(&e.kind, e.message)
}

fn invalid(message: String) -> PgWireError {
    error(&GateErrorKind::Invalid, message)
}

/// `SET medallion.version|as_of = …`: kept in the connection's metadata.
fn medallion_setting<C: ClientInfo + ?Sized>(
    st: &Statement,
    client: &mut C,
) -> PgWireResult<Option<Response>> {
    let Statement::Set(Set::SingleAssignment {
        variable, values, ..
    }) = st
    else {
        return Ok(None);
    };
    let name = variable.to_string().to_ascii_lowercase();
    if !name.starts_with("medallion.") {
        return Ok(None);
    }
    let raw = match values.first() {
        Some(Expr::Value(v)) => v.to_string(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let value = raw.trim_matches('\'').trim_matches('"').to_string();
    let reset = value.is_empty() || value.eq_ignore_ascii_case("default");
    let metadata = client.metadata_mut();
    match name.as_str() {
        VERSION_KEY | AS_OF_KEY if reset => {
            metadata.remove(&name);
        }
        VERSION_KEY => {
            value.parse::<i64>().map_err(|_| {
                invalid(format!(
                    "medallion.version: `{value}` is not a table version; give a whole number, or DEFAULT for the latest"
                ))
            })?;
            metadata.remove(AS_OF_KEY);
            metadata.insert(name, value);
        }
        AS_OF_KEY => {
            chrono::DateTime::parse_from_rfc3339(&value).map_err(|e| {
                invalid(format!(
                    "medallion.as_of: {e}; use RFC 3339, e.g. '2026-11-29T10:00:00Z', or DEFAULT for the latest"
                ))
            })?;
            metadata.remove(VERSION_KEY);
            metadata.insert(name, value);
        }
        _ => {
            return Err(invalid(format!(
                "unknown setting `{name}`; Medallion has medallion.version and medallion.as_of"
            )));
        }
    }
    Ok(Some(Response::Execution(Tag::new("SET"))))
}

impl Parser {
    fn caller(&self) -> PgWireResult<&Caller> {
        self.conn.caller.get().ok_or_else(|| {
            error(
                &GateErrorKind::Unauthenticated,
                "log in with a catalog token first".into(),
            )
        })
    }

    fn scope<C: ClientInfo + ?Sized>(&self, client: &C) -> Scope {
        let metadata = client.metadata();
        let at = if let Some(v) = metadata.get(VERSION_KEY).and_then(|v| v.parse().ok()) {
            TimeTravel::Version(v)
        } else if let Some(t) = metadata
            .get(AS_OF_KEY)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            TimeTravel::AsOf(t.with_timezone(&chrono::Utc))
        } else {
            TimeTravel::Latest
        };
        Scope {
            protocol: Protocol::Postgres,
            at,
            database: self.conn.database.get().copied(),
        }
    }

    async fn plan<C: ClientInfo + ?Sized>(
        &self,
        client: &C,
        st: Statement,
    ) -> PgWireResult<sql_gate::Planned> {
        let caller = self.caller()?;
        let sql = st.to_string();
        sql_gate::plan(
            &self.conn.state,
            caller,
            &sql,
            datafusion::sql::parser::Statement::Statement(Box::new(st)),
            &self.scope(client),
        )
        .await
        .map_err(gate_error)
    }

    /// Plans and runs one query, streaming its rows as they come.
    async fn run<C: ClientInfo + ?Sized>(
        &self,
        client: &C,
        st: Statement,
        decode_params: Option<&ParamDecoder<'_>>,
        format: &Format,
    ) -> PgWireResult<QueryResponse> {
        let reused = self
            .recent
            .take(&self.caller()?.user, &st.to_string(), self.scope(client).at);
        let planned = match reused {
            Some(p) => p,
            None => self.plan(client, st).await?,
        };
        let params = match decode_params {
            Some(decode) => {
                let types = parameter_types(&planned.plan)?;
                let refs: Vec<Option<&DataType>> = types.iter().map(|t| t.as_ref()).collect();
                Some(decode(&refs)?)
            }
            None => None,
        };
        let timeout = client
            .metadata()
            .get(STATEMENT_TIMEOUT_KEY)
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(std::time::Duration::from_millis);
        let s = &self.conn.state;
        let (schema, batches) = sql_gate::execute(
            s,
            self.caller()?,
            planned,
            params,
            Protocol::Postgres,
            s.stream_limits,
            timeout,
        )
        .await
        .map_err(gate_error)?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, Some(options))?);
        let row_fields = fields.clone();
        // Formatting values as text is most of a large answer's cost (a
        // connection is one task): batches are encoded on the blocking pool,
        // several at once, in order, while earlier rows are being sent.
        let ahead = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rows = batches
            .map(move |batch| {
                let fields = row_fields.clone();
                async move {
                    let rows: Vec<PgWireResult<DataRow>> = match batch {
                        Ok(b) => tokio::task::spawn_blocking(move || {
                            encode_recordbatch(fields, b).collect()
                        })
                        .await
                        .unwrap_or_else(|e| vec![Err(invalid(format!("encoding rows: {e}")))]),
                        Err(e) => vec![Err(gate_error(e))],
                    };
                    futures::stream::iter(rows)
                }
            })
            .buffered(ahead)
            .flatten();
        Ok(QueryResponse::new(fields, rows))
    }
}

/// A plan's parameters (`$1`, `$2`, …) in order, with the types inferred.
fn parameter_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let found = plan
        .get_parameter_types()
        .map_err(|e| invalid(e.to_string()))?;
    let mut ordered: Vec<(usize, Option<DataType>)> = found
        .into_iter()
        .filter_map(|(id, t)| Some((id.trim_start_matches('$').parse::<usize>().ok()?, t)))
        .collect();
    ordered.sort_by_key(|(i, _)| *i);
    Ok(ordered.into_iter().map(|(_, t)| t).collect())
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self
            .parser
            .sql
            .parse(query)
            .map_err(|e| invalid(e.to_string()))?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut out = Vec::with_capacity(statements.len());
        'statements: for st in statements {
            if let Some(r) = medallion_setting(&st, client)? {
                out.push(r);
                continue;
            }
            if is_session_statement(&st) {
                let scratch = SessionContext::new();
                for hook in session_hooks() {
                    if let Some(r) = hook.handle_simple_query(&st, &scratch, client).await {
                        out.push(r?);
                        continue 'statements;
                    }
                }
            }
            let r = self
                .parser
                .run(&*client, st, None, &Format::UnifiedText)
                .await?;
            out.push(Response::Query(r));
        }
        Ok(out)
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.sql.parse(sql).map_err(|e| invalid(e.to_string()))?;
        if statements.is_empty() {
            return Ok(None);
        }
        if statements.len() > 1 {
            return Err(invalid(
                "a prepared statement holds one statement; send the others separately".into(),
            ));
        }
        let st = statements.remove(0);
        let text = st.to_string();
        if is_session_statement(&st) {
            let scratch = SessionContext::new();
            for hook in session_hooks() {
                if let Some(plan) = hook
                    .handle_extended_parse_query(&st, &scratch, client)
                    .await
                {
                    return Ok(Some((text, Some((st, plan?)))));
                }
            }
        }
        // Planned now for the statement's description (parameter and result
        // types); an Execute more than RecentPlans::FRESH_FOR later plans again.
        let planned = self.plan(client, st.clone()).await?;
        self.recent.put(&self.caller()?.user, &planned);
        Ok(Some((text, Some((st, planned.plan)))))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        let (_, Some((_, plan))) = stmt else {
            return Ok(vec![]);
        };
        parameter_types(plan)?
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let (_, Some((_, plan))) = stmt else {
            return Ok(vec![]);
        };
        arrow_schema_to_pg_fields(
            plan.schema().as_arrow(),
            column_format.unwrap_or(&Format::UnifiedText),
            None,
        )
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (_, Some((st, plan))) = &portal.statement.statement else {
            return Ok(Response::EmptyQuery);
        };
        if let Some(r) = medallion_setting(st, client)? {
            return Ok(r);
        }
        if is_session_statement(st) {
            let scratch = SessionContext::new();
            let no_params = ParamValues::List(vec![]);
            for hook in session_hooks() {
                if let Some(r) = hook
                    .handle_extended_query(st, plan, &no_params, &scratch, client)
                    .await
                {
                    return r;
                }
            }
        }
        let decode = |types: &[Option<&DataType>]| deserialize_parameters(portal, types);
        let decode: Option<&ParamDecoder<'_>> = if portal.parameters.is_empty() {
            None
        } else {
            Some(&decode)
        };
        let r = self
            .parser
            .run(&*client, st.clone(), decode, &portal.result_column_format)
            .await?;
        Ok(Response::Query(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_come_in_order_with_their_types() {
        let ctx = SessionContext::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let plan = rt
            .block_on(ctx.state().create_logical_plan(
                "SELECT * FROM (VALUES (1, 'a')) AS t(n, s) WHERE s = $2 AND n > $1",
            ))
            .unwrap();
        assert_eq!(
            parameter_types(&plan).unwrap(),
            vec![Some(DataType::Int64), Some(DataType::Utf8)]
        );
    }
}
