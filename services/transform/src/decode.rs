//! Raw payloads → records → a batch of strings, one column per declared column.
//!
//! Decoding uses arrow's own JSON and CSV decoders over many records at once,
//! after a single-pass reader has taken the plain flat JSON objects
//! ([`crate::flat_json`], same output).
//! Every column is first read as a string (numbers and booleans are kept as
//! their text), so one mistyped value cannot fail a whole batch: typing is a
//! separate, per-value step. When a batch does not decode (malformed JSON, a
//! CSV line with the wrong number of fields), it is split in halves until the
//! bad records are isolated; each gets its own reason.

use std::sync::Arc;

use arrow::array::{Array, BinaryArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use medallion_spec::SourceFormat;

/// One record: a line of an ndjson/csv message, or a whole json message.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Row of the Bronze batch it came from.
    pub row: usize,
    /// Line within the message (0 for json).
    pub line: i64,
    pub bytes: &'a [u8],
}

/// Splits every message into records. A message with no record at all (an
/// empty ndjson payload) becomes one empty record, so it is quarantined rather
/// than vanishing.
pub fn split_records(format: SourceFormat, payloads: &BinaryArray) -> Vec<Record<'_>> {
    let mut out = Vec::with_capacity(payloads.len());
    for row in 0..payloads.len() {
        let bytes: &[u8] = if payloads.is_null(row) {
            b""
        } else {
            payloads.value(row)
        };
        match format {
            SourceFormat::Json => out.push(Record {
                row,
                line: 0,
                bytes,
            }),
            SourceFormat::Ndjson | SourceFormat::Csv => {
                let before = out.len();
                let mut start = 0;
                let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
                for (line, end) in ends.enumerate() {
                    let l = &bytes[start..end];
                    start = end + 1;
                    let l = l.strip_suffix(b"\r").unwrap_or(l);
                    if l.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    out.push(Record {
                        row,
                        line: line as i64,
                        bytes: l,
                    });
                }
                if out.len() == before {
                    out.push(Record {
                        row,
                        line: 0,
                        bytes,
                    });
                }
            }
        }
    }
    out
}

/// How many records [`split_records`] will find in a Bronze batch, cheaply
/// (non-empty lines for ndjson/csv, messages for json), to size micro-batches.
pub fn count_records(format: SourceFormat, bronze_batch: &RecordBatch) -> usize {
    let Some(payloads) = bronze_batch
        .column_by_name(medallion_spec::layout::bronze::PAYLOAD)
        .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
    else {
        return bronze_batch.num_rows();
    };
    match format {
        SourceFormat::Json => payloads.len(),
        SourceFormat::Ndjson | SourceFormat::Csv => payloads
            .iter()
            .map(|p| p.map_or(1, |p| memchr::memchr_iter(b'\n', p).count() + 1))
            .sum(),
    }
}

/// The declared columns, all as nullable strings.
pub fn raw_schema(declared: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        declared
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

/// Decoded records: `batch` has one row per record in `ok` (same order).
pub struct Decoded {
    pub batch: RecordBatch,
    pub ok: Vec<usize>,
    pub errors: Vec<(usize, String)>,
}

pub fn decode(format: SourceFormat, schema: &SchemaRef, records: &[Record<'_>]) -> Decoded {
    if format == SourceFormat::Csv {
        return decode_with_arrow(format, schema, records);
    }
    let flat = crate::flat_json::read(schema, records);
    if flat.rest.is_empty() {
        return Decoded {
            batch: flat.batch,
            ok: flat.ok,
            errors: Vec::new(),
        };
    }
    // The records the flat reader handed back go through arrow-json; the rows
    // are put back in record order (first occurrence wins in the dedupe).
    let rest: Vec<Record<'_>> = flat.rest.iter().map(|i| records[*i]).collect();
    let slow = decode_with_arrow(format, schema, &rest);
    let slow_ok: Vec<usize> = slow.ok.iter().map(|i| flat.rest[*i]).collect();
    let errors = slow
        .errors
        .into_iter()
        .map(|(i, e)| (flat.rest[i], e))
        .collect();
    if flat.ok.is_empty() {
        // Nothing was flat (nested or escaped data): arrow-json's rows are
        // already in record order, no need to copy them into place.
        return Decoded {
            batch: slow.batch,
            ok: slow_ok,
            errors,
        };
    }
    let both = arrow::compute::concat_batches(schema, [&flat.batch, &slow.batch])
        .expect("batches share the raw schema");
    let mut order: Vec<(usize, u32)> = flat
        .ok
        .iter()
        .chain(&slow_ok)
        .enumerate()
        .map(|(row, rec)| (*rec, row as u32))
        .collect();
    order.sort_unstable();
    let take = arrow::array::UInt32Array::from_iter_values(order.iter().map(|(_, row)| *row));
    Decoded {
        batch: arrow::compute::take_record_batch(&both, &take).expect("indices in range"),
        ok: order.into_iter().map(|(rec, _)| rec).collect(),
        errors,
    }
}

/// Decodes with arrow's own decoders only (every CSV record; JSON records the
/// flat reader hands back).
pub fn decode_with_arrow(
    format: SourceFormat,
    schema: &SchemaRef,
    records: &[Record<'_>],
) -> Decoded {
    let mut batches = Vec::new();
    let mut ok = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    let indices: Vec<usize> = (0..records.len()).collect();
    decode_range(
        format,
        schema,
        records,
        &indices,
        &mut batches,
        &mut ok,
        &mut errors,
    );
    let batch = if batches.is_empty() {
        RecordBatch::new_empty(schema.clone())
    } else {
        arrow::compute::concat_batches(schema, &batches).expect("batches share the raw schema")
    };
    errors.sort_by_key(|(i, _)| *i);
    Decoded { batch, ok, errors }
}

fn decode_range(
    format: SourceFormat,
    schema: &SchemaRef,
    records: &[Record<'_>],
    idx: &[usize],
    batches: &mut Vec<RecordBatch>,
    ok: &mut Vec<usize>,
    errors: &mut Vec<(usize, String)>,
) {
    if idx.is_empty() {
        return;
    }
    match decode_many(format, schema, records, idx) {
        Ok(b) => {
            batches.push(b);
            ok.extend_from_slice(idx);
        }
        Err(e) if idx.len() == 1 => errors.push((idx[0], e)),
        Err(_) => {
            let (a, b) = idx.split_at(idx.len() / 2);
            decode_range(format, schema, records, a, batches, ok, errors);
            decode_range(format, schema, records, b, batches, ok, errors);
        }
    }
}

/// Decodes the records as one batch; fails unless exactly one row comes out per record.
fn decode_many(
    format: SourceFormat,
    schema: &SchemaRef,
    records: &[Record<'_>],
    idx: &[usize],
) -> Result<RecordBatch, String> {
    let mut buf = Vec::with_capacity(idx.iter().map(|i| records[*i].bytes.len() + 1).sum());
    for i in idx {
        let r = &records[*i];
        if r.bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err("empty record".into());
        }
        if r.bytes.contains(&0) {
            return Err("record contains a NUL byte".into());
        }
        buf.extend_from_slice(r.bytes);
        buf.push(b'\n');
    }
    let batch = match format {
        SourceFormat::Json | SourceFormat::Ndjson => decode_json(schema, &buf, idx.len())?,
        SourceFormat::Csv => decode_csv(schema, &buf, idx.len())?,
    };
    if batch.num_rows() != idx.len() {
        return Err(if idx.len() == 1 {
            format!(
                "expected one {}, found {}",
                format_name(format),
                batch.num_rows()
            )
        } else {
            "record count mismatch".into()
        });
    }
    Ok(batch)
}

fn format_name(f: SourceFormat) -> &'static str {
    match f {
        SourceFormat::Json | SourceFormat::Ndjson => "JSON object",
        SourceFormat::Csv => "CSV record",
    }
}

fn decode_json(schema: &SchemaRef, buf: &[u8], expected: usize) -> Result<RecordBatch, String> {
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_coerce_primitive(true)
        .with_batch_size(expected.max(1) + 1)
        .build_decoder()
        .map_err(|e| e.to_string())?;
    let consumed = decoder
        .decode(buf)
        .map_err(|e| json_reason(&e.to_string()))?;
    if consumed != buf.len() || decoder.has_partial_record() {
        return Err("malformed JSON: incomplete object".into());
    }
    Ok(decoder
        .flush()
        .map_err(|e| json_reason(&e.to_string()))?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

fn json_reason(msg: &str) -> String {
    let msg = msg.strip_prefix("Json error: ").unwrap_or(msg);
    let msg: String = msg.chars().take(300).collect();
    if msg.starts_with("expected") || msg.contains("whilst parsing") || msg.contains("Encountered")
    {
        format!("malformed JSON: {msg}")
    } else {
        msg
    }
}

fn decode_csv(schema: &SchemaRef, buf: &[u8], expected: usize) -> Result<RecordBatch, String> {
    let null = regex::Regex::new("^$").expect("static regex");
    let mut decoder = arrow_csv::ReaderBuilder::new(schema.clone())
        .with_header(false)
        .with_null_regex(null)
        .with_batch_size(expected.max(1) + 1)
        .build_decoder();
    let mut rest = buf;
    while !rest.is_empty() {
        let n = decoder
            .decode(rest)
            .map_err(|e| csv_reason(&e.to_string(), schema))?;
        if n == 0 {
            break;
        }
        rest = &rest[n..];
    }
    decoder
        .decode(&[])
        .map_err(|e| csv_reason(&e.to_string(), schema))?;
    Ok(decoder
        .flush()
        .map_err(|e| csv_reason(&e.to_string(), schema))?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

fn csv_reason(msg: &str, schema: &SchemaRef) -> String {
    let msg = msg.strip_prefix("Csv error: ").unwrap_or(msg);
    if msg.contains("incorrect number of fields") {
        format!(
            "CSV line has the wrong number of fields; expected {} ({})",
            schema.fields().len(),
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "malformed CSV: {}",
            msg.chars().take(300).collect::<String>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    fn schema() -> SchemaRef {
        raw_schema(&Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]))
    }

    #[test]
    fn isolates_bad_records() {
        let payloads = BinaryArray::from_iter_values([
            &b"{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":\"2\"}\n{bad\n{\"id\":\"c\",\"n\":{\"x\":1}}"[..],
            b"",
            b"{\"id\":\"d\",\"n\":true,\"extra\":[1,2]}",
        ]);
        let recs = split_records(SourceFormat::Ndjson, &payloads);
        assert_eq!(recs.len(), 6);
        let d = decode(SourceFormat::Ndjson, &schema(), &recs);
        assert_eq!(d.ok, vec![0, 1, 5]);
        let bad: Vec<usize> = d.errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(bad, vec![2, 3, 4]);
        assert!(d.errors[0].1.contains("malformed JSON"), "{:?}", d.errors);
        let ids = d.batch.column(0).as_string::<i32>();
        let ns = d.batch.column(1).as_string::<i32>();
        assert_eq!((ids.value(1), ns.value(1)), ("b", "2"));
        assert_eq!(ns.value(2), "true");
    }

    #[test]
    fn json_format_needs_exactly_one_object() {
        let payloads = BinaryArray::from_iter_values([
            &b"{\"id\":\"a\"}{\"id\":\"b\"}"[..],
            b"{\n \"id\": \"c\"\n}",
        ]);
        let recs = split_records(SourceFormat::Json, &payloads);
        let d = decode(SourceFormat::Json, &schema(), &recs);
        assert_eq!(d.ok, vec![1]);
        assert!(
            d.errors[0].1.contains("expected one JSON object, found 2"),
            "{:?}",
            d.errors
        );
    }

    #[test]
    fn csv_with_wrong_field_counts() {
        let payloads = BinaryArray::from_iter_values([&b"a,1\nb\nc,3,extra\nd,\n"[..]]);
        let recs = split_records(SourceFormat::Csv, &payloads);
        let d = decode(SourceFormat::Csv, &schema(), &recs);
        assert_eq!(d.ok, vec![0, 3]);
        assert_eq!(d.errors.len(), 2);
        assert!(
            d.errors[0].1.contains("wrong number of fields"),
            "{:?}",
            d.errors
        );
        assert!(d.batch.column(1).is_null(1), "an empty field is NULL");
    }

    #[test]
    fn nul_bytes_and_invalid_utf8_are_reasons_not_crashes() {
        let payloads =
            BinaryArray::from_iter_values([&b"{\"id\":\"a\0\"}"[..], b"{\"id\":\"\xff\xfe\"}"]);
        let recs = split_records(SourceFormat::Json, &payloads);
        let d = decode(SourceFormat::Json, &schema(), &recs);
        assert!(d.ok.is_empty());
        assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
    }
}
