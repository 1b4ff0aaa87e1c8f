//! Statements as Flight SQL carries them: SQL text in, a FlightInfo or
//! an Arrow stream out, and parameter values in between.

use std::ops::ControlFlow;
use std::pin::Pin;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema};
use arrow::error::ArrowError;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Value as SqlValue, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::{Stream, TryStreamExt};
use tonic::{Response, Status};

use crate::sql_gate::{GateError, GateErrorKind, Planned};

/// What DoGet answers with.
pub type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// Exactly one statement, its `?` placeholders numbered `$1, $2, ...` in
/// the order they appear: JDBC and ADBC clients write `?`, DataFusion binds
/// by number.
pub fn parse_one(sql: &str) -> Result<Statement, GateError> {
    let invalid = |message: String| GateError {
        kind: GateErrorKind::Invalid,
        message,
    };
    let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
        .map_err(|e| invalid(e.to_string()))?;
    if statements.len() != 1 {
        return Err(invalid(format!(
            "send exactly one statement per call (got {})",
            statements.len()
        )));
    }
    let Some(mut statement) = statements.pop_front() else {
        return Err(invalid(
            "send exactly one statement per call (got 0)".into(),
        ));
    };
    if let Statement::Statement(s) = &mut statement {
        let mut n = 0;
        let _ = visit_expressions_mut(&mut **s, |e| {
            if let SqlExpr::Value(v) = e
                && let SqlValue::Placeholder(p) = &mut v.value
                && p == "?"
            {
                n += 1;
                *p = format!("${n}");
            }
            ControlFlow::<()>::Continue(())
        });
    }
    Ok(statement)
}

/// The types of `$1..$n` (`None`: not inferred from the statement).
pub fn parameter_types(planned: &Planned) -> Result<Vec<Option<DataType>>, Status> {
    let mut types = planned
        .plan
        .get_parameter_types()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut out = Vec::with_capacity(types.len());
    for i in 1..=types.len() {
        let t = types.remove(&format!("${i}")).ok_or_else(|| {
            Status::invalid_argument("use positional parameters: `?`, or `$1, $2, ...`")
        })?;
        out.push(t);
    }
    Ok(out)
}

pub fn schema_bytes(schema: &Schema) -> Result<Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &Default::default())
        .try_into()
        .map_err(|e: ArrowError| Status::internal(format!("encoding a schema: {e}")))?;
    Ok(bytes)
}

pub fn flight_info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

pub fn batch_stream(
    batch: Result<RecordBatch, FlightError>,
) -> Result<Response<DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("building the answer: {e}")))?;
    let flight = FlightDataEncoderBuilder::new()
        .with_schema(batch.schema())
        .build(futures::stream::once(async { Ok(batch) }))
        .map_err(Status::from);
    Ok(Response::new(Box::pin(flight)))
}

/// One row of bound values as the plan's parameters, cast to the types
/// the plan inferred (a client binds what its language has: a Python int
/// is Int64 whatever the column).
pub fn param_values(
    batch: &RecordBatch,
    expected: &[Option<DataType>],
) -> Result<ParamValues, Status> {
    if batch.num_columns() != expected.len() {
        return Err(Status::invalid_argument(format!(
            "the statement has {} parameter(s) but {} value(s) are bound",
            expected.len(),
            batch.num_columns()
        )));
    }
    let mut values = Vec::with_capacity(expected.len());
    for (i, (column, want)) in batch.columns().iter().zip(expected).enumerate() {
        let column = match want {
            Some(t) if t != column.data_type() => arrow::compute::cast(column, t)
                .map_err(|e| Status::invalid_argument(format!("parameter ${}: {e}", i + 1)))?,
            _ => column.clone(),
        };
        values.push(
            ScalarValue::try_from_array(&column, 0)
                .map_err(|e| Status::invalid_argument(format!("parameter ${}: {e}", i + 1)))?,
        );
    }
    Ok(ParamValues::from(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_are_numbered_in_order() {
        let st = parse_one("SELECT a FROM t WHERE a > ? AND b = ? LIMIT ?").unwrap();
        assert_eq!(
            st.to_string(),
            "SELECT a FROM t WHERE a > $1 AND b = $2 LIMIT $3"
        );
        let e = parse_one("SELECT 1; SELECT 2").unwrap_err();
        assert_eq!(e.kind, GateErrorKind::Invalid);
        assert!(e.message.contains("exactly one statement"), "{e}");
        assert!(parse_one("").is_err());
    }
}
