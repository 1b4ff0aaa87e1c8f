//! Shared by the transform's pure-pipeline tests.

use std::sync::Arc;

use arrow::array::{
    BinaryArray, Int64Array, MapBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use medallion_spec::layout::bronze_schema;

/// A Bronze batch holding `payloads` at stream sequences `first_seq..`.
pub fn bronze<P: AsRef<[u8]>>(payloads: &[P], first_seq: i64) -> RecordBatch {
    let n = payloads.len();
    let mut headers = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for _ in 0..n {
        headers.append(true).unwrap();
    }
    let schema = bronze_schema();
    let map_field = schema.field_with_name("headers").unwrap().clone();
    let headers = headers.finish();
    let headers = arrow::compute::cast(&headers, map_field.data_type()).unwrap();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(BinaryArray::from_iter_values(
                payloads.iter().map(|p| p.as_ref()),
            )),
            Arc::new(Int64Array::from_iter_values(
                first_seq..first_seq + n as i64,
            )),
            Arc::new(StringArray::from(vec!["medallion.ingest.d.p"; n])),
            Arc::new(TimestampMicrosecondArray::from(vec![1_000_000; n]).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(vec![2_000_000; n]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec![None::<&str>; n])),
            headers,
        ],
    )
    .unwrap()
}
