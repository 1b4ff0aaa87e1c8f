//! Fixed table layouts: Bronze (raw messages) and quarantine (rejected rows).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};

use crate::types::timestamp_utc;

pub mod bronze {
    pub const PAYLOAD: &str = "payload";
    pub const STREAM_SEQ: &str = "stream_seq";
    pub const SUBJECT: &str = "subject";
    pub const PUBLISHED_AT: &str = "published_at";
    pub const RECEIVED_AT: &str = "received_at";
    pub const MSG_ID: &str = "msg_id";
    pub const HEADERS: &str = "headers";
}

pub mod quarantine {
    pub const PAYLOAD: &str = "payload";
    pub const BRONZE_SEQ: &str = "bronze_seq";
    pub const BRONZE_LINE: &str = "bronze_line";
    pub const BRONZE_VERSION: &str = "bronze_version";
    pub const ERRORS: &str = "errors";
    pub const FAILED_EXPECTATIONS: &str = "failed_expectations";
    pub const QUARANTINED_AT: &str = "quarantined_at";
}

/// Map entries named as Delta Lake names them, so readers agree on the type.
pub fn string_map_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "key_value",
            DataType::Struct(Fields::from(vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ])),
            false,
        )),
        false,
    )
}

fn string_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("element", DataType::Utf8, true)))
}

/// Bronze: each message exactly as received, plus where and when it arrived.
pub fn bronze_schema() -> SchemaRef {
    use bronze::*;
    Arc::new(Schema::new(vec![
        Field::new(PAYLOAD, DataType::Binary, false),
        Field::new(STREAM_SEQ, DataType::Int64, false),
        Field::new(SUBJECT, DataType::Utf8, false),
        Field::new(PUBLISHED_AT, timestamp_utc(), false),
        Field::new(RECEIVED_AT, timestamp_utc(), false),
        Field::new(MSG_ID, DataType::Utf8, true),
        Field::new(HEADERS, string_map_type(), true),
    ]))
}

/// Quarantine: the raw record, its Bronze position and every reason it was rejected.
pub fn quarantine_schema() -> SchemaRef {
    use quarantine::*;
    Arc::new(Schema::new(vec![
        Field::new(PAYLOAD, DataType::Binary, false),
        Field::new(BRONZE_SEQ, DataType::Int64, false),
        Field::new(BRONZE_LINE, DataType::Int64, false),
        Field::new(BRONZE_VERSION, DataType::Int64, false),
        Field::new(ERRORS, string_list_type(), true),
        Field::new(FAILED_EXPECTATIONS, string_list_type(), true),
        Field::new(QUARANTINED_AT, timestamp_utc(), false),
    ]))
}
