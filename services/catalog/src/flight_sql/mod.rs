//! Arrow Flight SQL, for BI tools and DataFrame libraries (ADBC, JDBC,
//! pyarrow, polars): answers come as Arrow end to end, without the JSON
//! detour of the HTTP API. There is no second access model: every
//! statement is planned and run by [`crate::sql_gate`], so grants, masks,
//! limits and audit records are those of the HTTP API and the Postgres
//! wire, and the metadata calls list only granted tables.
//!
//! Stateless on purpose: the catalog JWT is the session. Clients send it as
//! `authorization: Bearer <jwt>` on every call; the handshake (HTTP Basic
//! with the JWT as password, or the bearer header) only checks it and hands
//! it back in the `authorization` header, which ADBC and pyarrow reuse.
//! Statement and prepared-statement handles carry the SQL itself (see
//! [`handle::Handle`]) and are planned again under the grants of whoever
//! presents them, so any replica answers any call and a replayed handle
//! reaches nothing its bearer could not query directly. Only parameter
//! values bound to a prepared statement are held, in memory, until it is
//! closed or an hour passes.
//!
//! Time travel: `medallion-version: <n>` or `medallion-as-of: <RFC 3339>`
//! call metadata (with ADBC, the `adbc.flight.sql.rpc.call_header.<name>`
//! option). It is read when a statement is planned (GetFlightInfo,
//! CreatePreparedStatement) and kept in the handle, so DoGet streams the
//! state its FlightInfo described; a handle planned at the latest state
//! takes the DoGet call's metadata.
//!
//! Read-only: updates, ingestion, Substrait and transactions are refused
//! with a message saying so (data enters through ingest, never SQL).

mod handle;
mod metadata;
mod statement;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::SqlInfoData;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginSavepointRequest, ActionBeginSavepointResult, ActionBeginTransactionRequest,
    ActionBeginTransactionResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    ActionCreatePreparedSubstraitPlanRequest, ActionEndSavepointRequest,
    ActionEndTransactionRequest, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo,
    CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementSubstraitPlan, CommandStatementUpdate, DoPutPreparedStatementResult,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket,
};
use bytes::Bytes;
use datafusion::common::ParamValues;
use futures::{Stream, TryStreamExt};
use medallion_lake::query::TimeTravel;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::api::AppState;
use crate::auth::Caller;
use crate::sql_gate::{self as gate, GateError, GateErrorKind, Planned, Protocol, Scope};

use handle::{Handle, NO_TOKEN, credentials, time_travel};
use statement::{
    DoGetStream, batch_stream, flight_info, param_values, parameter_types, parse_one, schema_bytes,
};

/// Bound parameters not used for this long are forgotten (a client that
/// never closes its statements must not grow the catalog forever).
const BOUND_TTL: Duration = Duration::from_secs(3600);

/// Serves Flight SQL on `listener` until `shutdown`.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    tls: Option<crate::sql_tls::SqlTls>,
    shutdown: CancellationToken,
) {
    let service = match FlightSql::new(state) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "flight sql endpoint not started");
            return;
        }
    };
    let mut server = Server::builder();
    if let Some(tls) = tls {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        server = match server.tls_config(config) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "flight sql endpoint not started: TLS refused");
                return;
            }
        };
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(e) = server
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
    {
        tracing::error!(error = %e, "flight sql endpoint stopped");
    }
}

/// The gate's refusal as the gRPC status a client library understands.
pub fn status(e: GateError) -> Status {
    match e.kind {
        GateErrorKind::Unauthenticated => Status::unauthenticated(e.message),
        GateErrorKind::Denied => Status::permission_denied(e.message),
        GateErrorKind::Invalid => Status::invalid_argument(e.message),
        GateErrorKind::Busy | GateErrorKind::TooLarge => Status::resource_exhausted(e.message),
        GateErrorKind::Timeout => Status::deadline_exceeded(e.message),
    }
}

fn read_only(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what}: the catalog is read-only (data enters through ingest); send queries only"
    ))
}

pub struct FlightSql {
    state: Arc<AppState>,
    info: SqlInfoData,
    /// Parameter values by (user, prepared statement id).
    bound: Mutex<HashMap<(String, String), (Instant, RecordBatch)>>,
    /// Plans made by GetFlightInfo, for the DoGet that follows.
    recent: gate::RecentPlans,
}

impl FlightSql {
    pub fn new(state: Arc<AppState>) -> Result<Self, FlightError> {
        Ok(FlightSql {
            state,
            info: metadata::sql_info()?,
            bound: Mutex::default(),
            recent: Default::default(),
        })
    }

    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        match credentials(metadata)? {
            Some((token, user)) => {
                gate::authenticate(&self.state, &token, user.as_deref(), Protocol::FlightSql)
                    .await
                    .map_err(status)
            }
            None => {
                // Audited like any failed log in, answered with what to send.
                let _ = gate::authenticate(&self.state, "", None, Protocol::FlightSql).await;
                Err(Status::unauthenticated(NO_TOKEN))
            }
        }
    }

    /// Parses and plans one statement through the gate; refusals are audited.
    async fn plan(&self, c: &Caller, sql: &str, at: TimeTravel) -> Result<Planned, Status> {
        let statement = match parse_one(sql) {
            Ok(s) => s,
            Err(e) => {
                return Err(status(
                    gate::deny(&self.state, c, sql, Protocol::FlightSql, e).await,
                ));
            }
        };
        let scope = Scope {
            protocol: Protocol::FlightSql,
            at,
            database: None,
        };
        gate::plan(&self.state, c, sql, statement, &scope)
            .await
            .map_err(status)
    }

    async fn stream(
        &self,
        c: &Caller,
        planned: Planned,
        params: Option<ParamValues>,
    ) -> Result<Response<DoGetStream>, Status> {
        let (schema, batches) = gate::execute(
            &self.state,
            c,
            planned,
            params,
            Protocol::FlightSql,
            self.state.stream_limits,
            None,
        )
        .await
        .map_err(status)?;
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches.map_err(|e| FlightError::Tonic(Box::new(status(e)))))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(flight)))
    }

    fn bound_params(
        &self,
        c: &Caller,
        handle: &Handle,
        planned: &Planned,
    ) -> Result<Option<ParamValues>, Status> {
        let expected = parameter_types(planned)?;
        if expected.is_empty() {
            return Ok(None);
        }
        let key = (c.user.clone(), handle.id.clone().unwrap_or_default());
        let batch = {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            bound.get_mut(&key).map(|(used, b)| {
                *used = Instant::now();
                b.clone()
            })
        };
        let Some(batch) = batch else {
            return Err(Status::invalid_argument(format!(
                "the statement has {} parameter(s) and none are bound: bind one row of values (DoPut) before executing",
                expected.len()
            )));
        };
        param_values(&batch, &expected).map(Some)
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let Some((token, user)) = credentials(request.metadata())? else {
            let _ = gate::authenticate(&self.state, "", None, Protocol::FlightSql).await;
            return Err(Status::unauthenticated(NO_TOKEN));
        };
        gate::authenticate(&self.state, &token, user.as_deref(), Protocol::FlightSql)
            .await
            .map_err(status)?;
        let header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Status::unauthenticated("the token holds characters a header cannot carry")
        })?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Bytes::from(token),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        response.metadata_mut().insert("authorization", header);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let c = self.caller(request.metadata()).await?;
        if query.transaction_id.is_some() {
            return Err(read_only("transactions"));
        }
        let at = time_travel(request.metadata())?;
        let planned = self.plan(&c, &query.query, at).await?;
        self.recent.put(&c.user, &planned);
        let handle = Handle::new(query.query, at, None);
        let ticket = TicketStatementQuery {
            statement_handle: handle.encode()?,
        };
        flight_info(
            &planned.schema(),
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "Substrait plans are not accepted; send SQL",
        ))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let c = self.caller(request.metadata()).await?;
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let at = handle.at(request.metadata())?;
        let planned = self.plan(&c, &handle.sql, at).await?;
        flight_info(
            &planned.schema(),
            cmd.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata()).await?;
        let schema = query.into_builder().schema();
        flight_info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata()).await?;
        let schema = query.clone().into_builder().schema();
        flight_info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata()).await?;
        let schema = query.clone().into_builder().schema();
        flight_info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata()).await?;
        let schema = query.into_builder().schema();
        flight_info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata()).await?;
        let schema = query.clone().into_builder(&self.info).schema();
        flight_info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.caller(request.metadata()).await?;
        let handle = Handle::decode(&ticket.statement_handle)?;
        let at = handle.at(request.metadata())?;
        let planned = match self.recent.take(&c.user, &handle.sql, at) {
            Some(p) => p,
            None => self.plan(&c, &handle.sql, at).await?,
        };
        self.stream(&c, planned, None).await
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.caller(request.metadata()).await?;
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let at = handle.at(request.metadata())?;
        let planned = self.plan(&c, &handle.sql, at).await?;
        let params = self.bound_params(&c, &handle, &planned)?;
        self.stream(&c, planned, params).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.caller(request.metadata()).await?;
        let grants = gate::grants(&self.state, &c).await;
        batch_stream(metadata::catalogs(&grants, query))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.caller(request.metadata()).await?;
        let grants = gate::grants(&self.state, &c).await;
        batch_stream(metadata::db_schemas(&grants, query))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let c = self.caller(request.metadata()).await?;
        let grants = gate::grants(&self.state, &c).await;
        let batch = metadata::tables(&self.state.lake, grants, query).await?;
        batch_stream(Ok(batch))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(request.metadata()).await?;
        batch_stream(metadata::table_types(query))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(request.metadata()).await?;
        batch_stream(query.into_builder(&self.info).build())
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("updates"))
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("bulk ingestion"))
    }

    async fn do_put_prepared_statement_query(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let c = self.caller(request.metadata()).await?;
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let Some(id) = handle.id else {
            return Err(Status::invalid_argument(
                "not a prepared statement handle; create the prepared statement first",
            ));
        };
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        )
        .try_collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the parameter values: {e}")))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > 1 {
            return Err(Status::invalid_argument(format!(
                "bind one row of parameter values per execution (got {rows}); run the statement once per row"
            )));
        }
        let key = (c.user, id);
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        bound.retain(|_, (used, _)| used.elapsed() < BOUND_TTL);
        match batches.into_iter().find(|b| b.num_rows() == 1) {
            Some(batch) => {
                bound.insert(key, (Instant::now(), batch));
            }
            None => {
                bound.remove(&key);
            }
        }
        // The same handle: the values live here, keyed by it.
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(cmd.prepared_statement_handle),
        })
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("updates"))
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "Substrait plans are not accepted; send SQL",
        ))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let c = self.caller(request.metadata()).await?;
        if query.transaction_id.is_some() {
            return Err(read_only("transactions"));
        }
        let at = time_travel(request.metadata())?;
        let planned = self.plan(&c, &query.query, at).await?;
        let parameters: Vec<Field> = parameter_types(&planned)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| Field::new(format!("${}", i + 1), t.unwrap_or(DataType::Null), true))
            .collect();
        let parameter_schema = if parameters.is_empty() {
            Bytes::new()
        } else {
            schema_bytes(&Schema::new(parameters))?
        };
        let handle = Handle::new(query.query, at, Some(uuid::Uuid::new_v4().to_string()));
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode()?,
            dataset_schema: schema_bytes(&planned.schema())?,
            parameter_schema,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let c = self.caller(request.metadata()).await?;
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        if let Some(id) = handle.id {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            bound.remove(&(c.user, id));
        }
        Ok(())
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        _query: ActionCreatePreparedSubstraitPlanRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        Err(Status::unimplemented(
            "Substrait plans are not accepted; send SQL",
        ))
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        Err(read_only("transactions"))
    }

    async fn do_action_end_transaction(
        &self,
        _query: ActionEndTransactionRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(read_only("transactions"))
    }

    async fn do_action_begin_savepoint(
        &self,
        _query: ActionBeginSavepointRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginSavepointResult, Status> {
        Err(read_only("savepoints"))
    }

    async fn do_action_end_savepoint(
        &self,
        _query: ActionEndSavepointRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(read_only("savepoints"))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_refusals_keep_their_message_and_get_the_matching_code() {
        let e = |kind| GateError {
            kind,
            message: "gold.x.y is not granted".into(),
        };
        let s = status(e(GateErrorKind::Denied));
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(s.message(), "gold.x.y is not granted");
        assert_eq!(
            status(e(GateErrorKind::Unauthenticated)).code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            status(e(GateErrorKind::Invalid)).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            status(e(GateErrorKind::Busy)).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(e(GateErrorKind::TooLarge)).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(e(GateErrorKind::Timeout)).code(),
            tonic::Code::DeadlineExceeded
        );
    }
}
