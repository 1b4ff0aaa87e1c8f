//! What a BI tool's object browser shows: the layers (catalogs), domains
//! (schemas) and tables of the caller's grants and nothing else, so a
//! table one may not read is not even listed. Filtering and ordering are
//! arrow-flight's builders', so they follow the Flight SQL spec exactly.

use std::collections::BTreeSet;

use arrow::array::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetTableTypes, CommandGetTables, SqlInfo,
    SqlSupportedTransaction,
};
use datafusion::common::TableReference;
use medallion_lake::Lake;
use medallion_lake::query::{Grant, TimeTravel, session};
use tonic::Status;

pub const TABLE_TYPE: &str = "TABLE";

pub fn sql_info() -> Result<SqlInfoData, FlightError> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Medallion");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow format version (Schema.fbs), not the library's.
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(SqlInfo::SqlSearchStringEscape, "\\");
    b.build()
}

pub fn catalogs(grants: &[Grant], q: CommandGetCatalogs) -> Result<RecordBatch, FlightError> {
    let mut b = q.into_builder();
    let layers: BTreeSet<&str> = grants.iter().map(|g| g.table.layer.as_str()).collect();
    for layer in layers {
        b.append(layer);
    }
    b.build()
}

pub fn db_schemas(grants: &[Grant], q: CommandGetDbSchemas) -> Result<RecordBatch, FlightError> {
    let mut b = q.into_builder();
    let schemas: BTreeSet<(&str, &str)> = grants
        .iter()
        .map(|g| (g.table.layer.as_str(), g.table.domain.as_str()))
        .collect();
    for (layer, domain) in schemas {
        b.append(layer, domain);
    }
    b.build()
}

pub fn table_types(q: CommandGetTableTypes) -> Result<RecordBatch, FlightError> {
    let mut b = q.into_builder();
    b.append(TABLE_TYPE);
    b.build()
}

/// The granted tables that exist in the lake, with their schema as the
/// caller sees it (masked columns included, as they are queryable as
/// NULL). A table not written yet is left out, like in the Postgres
/// catalog: listing it would only lead to a "table not found".
pub async fn tables(
    lake: &Lake,
    grants: Vec<Grant>,
    q: CommandGetTables,
) -> Result<RecordBatch, Status> {
    // Only the tables the filters keep are opened.
    let wanted: Vec<Grant> = grants.into_iter().filter(|g| keeps(&q, g)).collect();
    let ctx = session(lake, &wanted, TimeTravel::Latest)
        .await
        .map_err(|e| Status::unavailable(format!("opening the granted tables: {e}")))?;
    let mut b = q.into_builder();
    for g in &wanted {
        let t = &g.table;
        let reference = TableReference::full(t.layer.as_str(), t.domain.as_str(), t.name.as_str());
        let Ok(provider) = ctx.table_provider(reference).await else {
            continue;
        };
        b.append(
            t.layer.as_str(),
            &t.domain,
            &t.name,
            TABLE_TYPE,
            provider.schema().as_ref(),
        )
        .map_err(|e| Status::internal(format!("listing {}: {e}", t.sql_name())))?;
    }
    b.build()
        .map_err(|e| Status::internal(format!("listing tables: {e}")))
}

fn keeps(q: &CommandGetTables, g: &Grant) -> bool {
    let t = &g.table;
    q.catalog.as_ref().is_none_or(|c| c == t.layer.as_str())
        && q.db_schema_filter_pattern
            .as_ref()
            .is_none_or(|p| like(p, &t.domain))
        && q.table_name_filter_pattern
            .as_ref()
            .is_none_or(|p| like(p, &t.name))
        && (q.table_types.is_empty() || q.table_types.iter().any(|tt| tt == TABLE_TYPE))
}

/// SQL LIKE: `%` any run, `_` one character, `\` escapes the next one.
pub fn like(pattern: &str, s: &str) -> bool {
    enum Tok {
        Any,
        One,
        Lit(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '%' => Tok::Any,
            '_' => Tok::One,
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            c => Tok::Lit(c),
        });
    }
    let s: Vec<char> = s.chars().collect();
    // matched[i]: the pattern so far matches the first i characters.
    let mut matched = vec![false; s.len() + 1];
    matched[0] = true;
    for tok in toks {
        let mut next = vec![false; s.len() + 1];
        match tok {
            Tok::Any => {
                let mut reached = false;
                for (i, m) in matched.iter().enumerate() {
                    reached |= *m;
                    next[i] = reached;
                }
            }
            Tok::One => next[1..].copy_from_slice(&matched[..s.len()]),
            Tok::Lit(c) => {
                for i in 0..s.len() {
                    next[i + 1] = matched[i] && s[i] == c;
                }
            }
        }
        matched = next;
    }
    matched[s.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_follows_sql() {
        assert!(like("fin%", "finance"));
        assert!(like("%", ""));
        assert!(like("f_nance", "finance"));
        assert!(!like("f_nance", "fnance"));
        assert!(like("%_hourly", "revenue_by_country_hourly"));
        assert!(!like("finance", "finance2"));
        assert!(like("payments\\_\\_%", "payments__quarantine"));
        assert!(!like("payments\\_\\_%", "paymentsxxquarantine"));
        assert!(like("%a%a%", "banana"));
        assert!(!like("%x%", "banana"));
    }
}
