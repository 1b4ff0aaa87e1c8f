//! Arrow IPC stream encoding of event payloads, split to fit the server's `max_payload`.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow_ipc::CompressionType;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};

/// Encodes batches as one Arrow IPC stream with LZ4-frame compressed buffers
/// (cheap to compress, and raw JSON payloads shrink several-fold).
pub fn encode(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let options =
        IpcWriteOptions::default().try_with_compression(Some(CompressionType::LZ4_FRAME))?;
    let mut out = Vec::new();
    {
        let mut writer = StreamWriter::try_new_with_options(&mut out, schema, options)?;
        for b in batches {
            writer.write(b)?;
        }
        writer.finish()?;
    }
    Ok(out)
}

/// Decodes an Arrow IPC stream; an empty stream (schema only) yields no batches.
pub fn decode(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Splits `batch` into encoded parts no bigger than `limit` bytes each.
/// Returns `None` when a single row does not fit: such a commit is announced
/// without rows, and consumers read it from the table instead.
pub fn encode_split(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    limit: usize,
) -> Result<Option<Vec<Vec<u8>>>, ArrowError> {
    let whole = encode(schema, batches)?;
    if whole.len() <= limit {
        return Ok(Some(vec![whole]));
    }
    let total_rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if total_rows == 0 {
        return Ok(None);
    }
    let combined = arrow::compute::concat_batches(schema, batches)?;
    // Aim under the limit from the average row size, then halve whatever still overflows.
    let per_part =
        ((total_rows as f64 * limit as f64 / whole.len() as f64) * 0.8).max(1.0) as usize;
    let mut parts = Vec::new();
    let mut pending: Vec<(usize, usize)> = (0..total_rows)
        .step_by(per_part)
        .map(|start| (start, per_part.min(total_rows - start)))
        .rev()
        .collect();
    while let Some((offset, len)) = pending.pop() {
        let slice = combined.slice(offset, len);
        let bytes = encode(schema, std::slice::from_ref(&slice))?;
        if bytes.len() <= limit {
            parts.push(bytes);
        } else if len == 1 {
            return Ok(None);
        } else {
            let half = len / 2;
            pending.push((offset + half, len - half));
            pending.push((offset, half));
        }
    }
    Ok(Some(parts))
}

/// An empty IPC stream carrying only the schema.
pub fn encode_empty(schema: &SchemaRef) -> Result<Vec<u8>, ArrowError> {
    encode(schema, &[])
}

pub fn concat(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    if batches.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    arrow::compute::concat_batches(schema, batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use proptest::prelude::*;

    fn batch(payloads: &[Vec<u8>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("payload", DataType::Binary, false),
            Field::new("seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(BinaryArray::from_iter_values(payloads.iter())),
                Arc::new(Int64Array::from_iter_values(0..payloads.len() as i64)),
            ],
        )
        .unwrap()
    }

    proptest! {
        #[test]
        fn split_parts_fit_and_round_trip(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..60),
            limit in 4_000usize..40_000,
        ) {
            let b = batch(&payloads);
            let schema = b.schema();
            let parts = encode_split(&schema, std::slice::from_ref(&b), limit).unwrap();
            let parts = parts.expect("every row fits the limit here");
            let mut rows = Vec::new();
            for p in &parts {
                prop_assert!(p.len() <= limit);
                let (s, batches) = decode(p).unwrap();
                prop_assert_eq!(&s, &schema);
                rows.extend(batches);
            }
            let back = concat(&schema, &rows).unwrap();
            prop_assert_eq!(back, b);
        }
    }

    #[test]
    fn a_row_bigger_than_the_limit_is_reported() {
        // Incompressible bytes (xorshift), so LZ4 cannot shrink the row under the limit.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let random: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let b = batch(&[random]);
        assert!(
            encode_split(&b.schema(), &[b.clone()], 10_000)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn empty_stream_round_trips() {
        let b = batch(&[]);
        let bytes = encode_empty(&b.schema()).unwrap();
        let (s, batches) = decode(&bytes).unwrap();
        assert_eq!(s, b.schema());
        assert!(batches.is_empty());
    }
}
