//! Flight SQL against a real pipeline, with arrow-flight's own client: who
//! sees which tables, that answers match the HTTP API, masks, prepared
//! statements with bound parameters, refusals and their audit records.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, BinaryArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use arrow_flight::FlightInfo;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables};
use bytes::Bytes;
use futures::TryStreamExt;
use medallion_catalog::auth::mint_hs256;
use medallion_testkit::{NatsServer, eventually, free_port};
use serde_json::Value;
use tonic::transport::Channel;

mod common;
use common::{Api, SECRET};

const GOLD: &str = "gold.finance.revenue_by_country_hourly";
const SILVER: &str = "silver.finance.payments";
const QUARANTINE: &str = "silver.finance.payments__quarantine";
const BRONZE: &str = "bronze.finance.payments";
const GOOD_ROWS: usize = 120;

async fn client(port: u16, token: Option<&str>) -> FlightSqlServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = FlightSqlServiceClient::new(channel);
    if let Some(t) = token {
        c.set_token(t.to_string());
    }
    c
}

async fn fetch(c: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> RecordBatch {
    let schema = info.clone().try_decode_schema().unwrap();
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("an endpoint with a ticket");
        let stream = c.do_get(ticket).await.unwrap();
        batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    let schema = batches.first().map_or(Arc::new(schema), |b| b.schema());
    concat_batches(&schema, &batches).unwrap()
}

async fn query(c: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<RecordBatch, String> {
    let info = c
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(fetch(c, info).await)
}

async fn tables(c: &mut FlightSqlServiceClient<Channel>, include_schema: bool) -> RecordBatch {
    let info = c
        .get_tables(CommandGetTables {
            include_schema,
            ..Default::default()
        })
        .await
        .unwrap();
    fetch(c, info).await
}

fn strings(b: &RecordBatch, column: &str) -> Vec<String> {
    let a = arrow::compute::cast(b.column_by_name(column).unwrap(), &DataType::Utf8).unwrap();
    let a: &StringArray = a.as_string();
    a.iter()
        .map(|v| v.unwrap_or("<null>").to_string())
        .collect()
}

fn table_names(b: &RecordBatch) -> BTreeSet<String> {
    let (c, s, t) = (
        strings(b, "catalog_name"),
        strings(b, "db_schema_name"),
        strings(b, "table_name"),
    );
    (0..b.num_rows())
        .map(|i| format!("{}.{}.{}", c[i], s[i], t[i]))
        .collect()
}

fn int(b: &RecordBatch, column: &str, row: usize) -> i64 {
    let a = arrow::compute::cast(b.column_by_name(column).unwrap(), &DataType::Int64).unwrap();
    a.as_primitive::<Int64Type>().value(row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flight_sql_serves_grants_masks_prepared_statements_and_audits_refusals() {
    common::init();
    let nats = NatsServer::start();
    let lake = tempfile::tempdir().unwrap();
    let products = common::payments_products();
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats_client);
    medallion_bus::ensure_streams(&js, &Default::default())
        .await
        .unwrap();
    // The catalog with a Flight SQL port (plain TCP: TLS is the e2e's).
    let flight = free_port();
    let (_runtimes, _catalog, http) = common::start_platform_with(
        &nats,
        lake.path(),
        products.path(),
        &[("MEDALLION_FLIGHT_ADDR", format!("127.0.0.1:{flight}"))],
    )
    .await;

    // 120 good rows over 3 hours and 2 countries, and 5 that the
    // positive_amount expectation sends to quarantine.
    let lines: Vec<String> = (0..GOOD_ROWS + 5)
        .map(|i| {
            let amount = if i < GOOD_ROWS { (i % 50 + 1) as i64 } else { -1 };
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-29T0{}:00:00Z","user_id":"user-{}","amount":{amount},"currency":"EUR","country":"{}"}}"#,
                i % 3,
                i % 7,
                ["FR", "DE"][i % 2]
            )
        })
        .collect();
    js.publish(
        "medallion.ingest.finance.payments",
        Bytes::from(lines.join("\n")),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let api = Api {
        base: format!("http://127.0.0.1:{http}"),
        http: reqwest::Client::new(),
    };
    let admin = mint_hs256(SECRET.as_bytes(), "ada", &["admin"], 600);
    let analyst = mint_hs256(SECRET.as_bytes(), "alan", &["analyst"], 600);
    let auditor = mint_hs256(SECRET.as_bytes(), "grace", &["auditor"], 600);
    let gold_sum = format!("SELECT sum(payments) AS n FROM {GOLD}");
    eventually(
        Duration::from_secs(90),
        "gold and quarantine written",
        || async {
            let (s, v) = api.query(&admin, &gold_sum).await;
            let (qs, qv) = api
                .query(&admin, &format!("SELECT count(*) AS n FROM {QUARANTINE}"))
                .await;
            s == 200 && v["rows"][0]["n"] == GOOD_ROWS && qs == 200 && qv["rows"][0]["n"] == 5
        },
    )
    .await;

    // Log in as a BI tool does: Basic with the JWT as password; the bearer
    // header it gets back is what the next calls send.
    let mut alan = client(flight, None).await;
    let payload = alan.handshake("alan", &analyst).await.unwrap();
    assert_eq!(payload, Bytes::from(analyst.clone()));
    assert_eq!(alan.token(), Some(&analyst));
    let refused = client(flight, None)
        .await
        .handshake("bob", &analyst)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("not the token's subject"),
        "{refused}"
    );

    // The object browser shows the grants and nothing else.
    assert_eq!(
        table_names(&tables(&mut alan, false).await),
        BTreeSet::from([GOLD.to_string()])
    );
    let mut ada = client(flight, Some(&admin)).await;
    assert_eq!(
        table_names(&tables(&mut ada, false).await),
        [BRONZE, SILVER, QUARANTINE, GOLD].map(String::from).into()
    );
    let mut grace = client(flight, Some(&auditor)).await;
    let listed = tables(&mut grace, true).await;
    assert_eq!(
        table_names(&listed),
        [SILVER, QUARANTINE, GOLD].map(String::from).into()
    );
    assert_eq!(strings(&listed, "table_type"), vec!["TABLE"; 3]);
    // include_schema: the IPC schema of each table; the masked column is
    // still listed (it is queryable, as NULL).
    let schemas = listed.column_by_name("table_schema").unwrap();
    let schemas = schemas.as_any().downcast_ref::<BinaryArray>().unwrap();
    let silver_row = strings(&listed, "table_name")
        .iter()
        .position(|t| t == "payments")
        .unwrap();
    let silver_schema = Schema::try_from(arrow_flight::IpcMessage(Bytes::copy_from_slice(
        schemas.value(silver_row),
    )))
    .unwrap();
    for column in ["event_id", "user_id", "amount", "country"] {
        assert!(
            silver_schema.field_with_name(column).is_ok(),
            "{column} in {silver_schema:?}"
        );
    }
    let info = alan.get_catalogs().await.unwrap();
    assert_eq!(
        strings(&fetch(&mut alan, info).await, "catalog_name"),
        vec!["gold"]
    );
    let info = ada.get_catalogs().await.unwrap();
    assert_eq!(
        strings(&fetch(&mut ada, info).await, "catalog_name"),
        vec!["bronze", "gold", "silver"]
    );
    let schemas_like = |pattern: &str| CommandGetDbSchemas {
        catalog: Some("silver".into()),
        db_schema_filter_pattern: Some(pattern.into()),
    };
    let info = ada.get_db_schemas(schemas_like("fin_n%")).await.unwrap();
    let found = fetch(&mut ada, info).await;
    assert_eq!(strings(&found, "db_schema_name"), vec!["finance"]);
    assert_eq!(strings(&found, "catalog_name"), vec!["silver"]);
    let info = ada.get_db_schemas(schemas_like("fin")).await.unwrap();
    assert_eq!(fetch(&mut ada, info).await.num_rows(), 0);
    let only_gold_tables = CommandGetTables {
        catalog: Some("silver".into()),
        table_name_filter_pattern: Some("%quarantine".into()),
        ..Default::default()
    };
    let info = ada.get_tables(only_gold_tables).await.unwrap();
    assert_eq!(
        table_names(&fetch(&mut ada, info).await),
        BTreeSet::from([QUARANTINE.to_string()])
    );

    // A Gold query: the same rows as over HTTP.
    let gold_query =
        format!("SELECT country, hour, payments, revenue FROM {GOLD} ORDER BY country, hour");
    let answer = query(&mut alan, &gold_query).await.unwrap();
    let (s, over_http) = api.query(&analyst, &gold_query).await;
    assert_eq!(s, 200, "{over_http}");
    let rows = over_http["rows"].as_array().unwrap();
    assert_eq!(answer.num_rows(), rows.len());
    assert_eq!(answer.num_rows(), 6, "2 countries x 3 hours");
    let countries = strings(&answer, "country");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["country"], countries[i].as_str());
        assert_eq!(row["payments"], int(&answer, "payments", i));
    }
    let total: i64 = (0..answer.num_rows())
        .map(|i| int(&answer, "payments", i))
        .sum();
    assert_eq!(total, GOOD_ROWS as i64);

    // Masks hold: the auditor reads silver with user_id NULL.
    let masked = query(&mut grace, &format!("SELECT user_id, amount FROM {SILVER}"))
        .await
        .unwrap();
    assert_eq!(masked.num_rows(), GOOD_ROWS);
    assert_eq!(
        masked.column_by_name("user_id").unwrap().null_count(),
        GOOD_ROWS
    );
    assert_eq!(masked.column_by_name("amount").unwrap().null_count(), 0);

    // Not granted: refused when planned (GetFlightInfo), with the gate's words.
    let denied = query(&mut alan, &format!("SELECT * FROM {SILVER}"))
        .await
        .unwrap_err();
    assert!(
        denied.contains("PermissionDenied") || denied.contains("permission"),
        "{denied}"
    );
    assert!(
        denied.contains(&format!("{SILVER} is not granted")),
        "{denied}"
    );
    // A ticket made for someone else is planned again under the bearer's grants.
    let info = grace
        .execute(format!("SELECT count(*) AS n FROM {SILVER}"), None)
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let stolen = alan.do_get(ticket).await.map(|_| ()).unwrap_err();
    assert!(stolen.to_string().contains("not granted"), "{stolen}");

    // A prepared statement with `?`, bound and run twice.
    let mut prepared = alan
        .prepare(
            format!("SELECT count(*) AS n FROM {GOLD} WHERE payments > ?"),
            None,
        )
        .await
        .unwrap();
    let params = prepared.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 1);
    assert_eq!(params.field(0).data_type(), &DataType::Int64);
    assert_eq!(prepared.dataset_schema().unwrap().field(0).name(), "n");
    let bind = |v: i64| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("0", DataType::Int64, true)])),
            vec![Arc::new(Int64Array::from(vec![v]))],
        )
        .unwrap()
    };
    prepared.set_parameters(bind(0)).unwrap();
    let info = prepared.execute().await.unwrap();
    assert_eq!(int(&fetch(&mut alan, info).await, "n", 0), 6);
    prepared.set_parameters(bind(1_000)).unwrap();
    let info = prepared.execute().await.unwrap();
    assert_eq!(int(&fetch(&mut alan, info).await, "n", 0), 0);
    prepared.close().await.unwrap();
    // Unbound parameters are named, not a planner's internals.
    let mut unbound = alan
        .prepare(
            format!("SELECT count(*) AS n FROM {GOLD} WHERE payments > ?"),
            None,
        )
        .await
        .unwrap();
    let info = unbound.execute().await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let e = alan.do_get(ticket).await.map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("none are bound"), "{e}");
    // Denied at prepare time too.
    let e = alan
        .prepare(format!("SELECT * FROM {BRONZE}"), None)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");

    // Read-only, one statement per call, and no token no answer.
    let e = ada
        .execute_update(format!("DELETE FROM {GOLD}"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = query(&mut ada, "SELECT 1; SELECT 2").await.unwrap_err();
    assert!(e.contains("exactly one statement"), "{e}");
    let e = query(&mut ada, &format!("DROP TABLE {GOLD}"))
        .await
        .unwrap_err();
    assert!(
        e.contains("InvalidArgument") || e.contains("invalid"),
        "{e}"
    );
    let mut anonymous = client(flight, None).await;
    let e = anonymous.get_catalogs().await.unwrap_err();
    assert!(e.to_string().contains("no credentials"), "{e}");
    let mut forged = client(flight, Some(&format!("{}x", &analyst[..analyst.len() - 1]))).await;
    let e = query(&mut forged, "SELECT 1").await.unwrap_err();
    // tonic shows the code by its description.
    assert!(e.contains("authentication credentials"), "{e}");
    assert!(e.contains("invalid token"), "{e}");

    // Time travel from call metadata: version 0 of gold predates nothing
    // useful, but it is the version asked for, and a bad value is refused.
    let mut at_zero = client(flight, Some(&admin)).await;
    at_zero.set_header("medallion-version", "0");
    let old = query(&mut at_zero, &gold_sum).await.unwrap();
    assert!(int(&old, "n", 0) <= GOOD_ROWS as i64);
    at_zero.set_header("medallion-version", "zero");
    let e = query(&mut at_zero, &gold_sum).await.unwrap_err();
    assert!(e.contains("medallion-version"), "{e}");

    // The refusals are audited, with the protocol they came by.
    let (s, v) = api
        .call("GET", "/v1/audit?user=alan", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let records = v["records"].as_array().unwrap();
    let flight_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["protocol"] == "flight-sql")
        .collect();
    assert!(
        flight_records
            .iter()
            .any(|r| r["allowed"] == false && r["target"].as_str().unwrap_or("").contains(SILVER)),
        "{flight_records:?}"
    );
    assert!(
        flight_records
            .iter()
            .any(|r| r["allowed"] == true && r["target"] == gold_query.as_str()),
        "{flight_records:?}"
    );
}
