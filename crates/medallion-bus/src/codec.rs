//! Arrow IPC stream encoding of event payloads, split to fit the server's `max_payload`.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow_ipc::CompressionType;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};

/// zstd's fastest standard level: the default (3) encodes at half the speed
/// for 3% less size.
const ZSTD_LEVEL: i32 = 1;

/// Encodes batches as one Arrow IPC stream with zstd (level 1) compressed
/// buffers. On a part of a Bronze event (JSON payloads) zstd 1 encodes as
/// fast as LZ4 frames, decodes 1.9× faster and leaves 38% fewer bytes for
/// NATS to store and deliver (5.4× against 3.4×; `docs/benchmarks.md`,
/// "Event codec"). Every Arrow IPC reader decodes both.
pub fn encode(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::ZSTD))?
        .try_with_compression_level(Some(ZSTD_LEVEL))?;
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

/// Splits `batches` into encoded parts no bigger than `limit` bytes each, in
/// row order. Returns `None` when a single row does not fit: such a commit is
/// announced without rows, and consumers read it from the table instead.
///
/// Compression is most of the cost of an event, so each row is compressed
/// about once: a commit whose uncompressed size fits is encoded whole, a
/// bigger one part by part, each part sized by the compression ratio the
/// parts before it achieved; only a part that still overflows is re-encoded
/// (halved).
pub fn encode_split(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    limit: usize,
) -> Result<Option<Vec<Vec<u8>>>, ArrowError> {
    let total_rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let raw: usize = batches.iter().map(raw_size).sum();
    // Compressed over uncompressed, as last seen; 1 until something was encoded.
    let mut ratio = 1.0f64;
    if total_rows == 0 || raw <= limit {
        let whole = encode(schema, batches)?;
        if whole.len() <= limit {
            return Ok(Some(vec![whole]));
        }
        if total_rows == 0 {
            return Ok(None);
        }
        ratio = whole.len() as f64 / raw.max(1) as f64;
    }
    let per_row = raw.max(1) as f64 / total_rows as f64;
    let mut rows = RowCursor::new(batches);
    let mut parts = Vec::new();
    while rows.remaining() > 0 {
        let fit = (limit as f64 * 0.9 / (per_row * ratio)).max(1.0) as usize;
        let mut take = fit.min(rows.remaining());
        loop {
            let bytes = encode(schema, &rows.peek(take))?;
            if bytes.len() <= limit {
                ratio = bytes.len() as f64 / (per_row * take as f64);
                rows.advance(take);
                parts.push(bytes);
                break;
            }
            if take == 1 {
                return Ok(None);
            }
            take /= 2;
        }
    }
    Ok(Some(parts))
}

/// Bytes of the rows `batch` holds (a slice counts only its own rows).
fn raw_size(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// A position in a sequence of batches, handing out the next rows as slices
/// (no copy) that may span batch boundaries.
struct RowCursor<'a> {
    batches: &'a [RecordBatch],
    batch: usize,
    offset: usize,
    remaining: usize,
}

impl<'a> RowCursor<'a> {
    fn new(batches: &'a [RecordBatch]) -> Self {
        RowCursor {
            batches,
            batch: 0,
            offset: 0,
            remaining: batches.iter().map(|b| b.num_rows()).sum(),
        }
    }

    fn remaining(&self) -> usize {
        self.remaining
    }

    /// The next `n` rows, without moving.
    fn peek(&self, mut n: usize) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        let (mut b, mut offset) = (self.batch, self.offset);
        while n > 0 && b < self.batches.len() {
            let len = (self.batches[b].num_rows() - offset).min(n);
            if len > 0 {
                out.push(self.batches[b].slice(offset, len));
            }
            n -= len;
            b += 1;
            offset = 0;
        }
        out
    }

    fn advance(&mut self, mut n: usize) {
        self.remaining -= n.min(self.remaining);
        while n > 0 && self.batch < self.batches.len() {
            let left = self.batches[self.batch].num_rows() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.batch += 1;
            self.offset = 0;
        }
    }
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

    /// The codec of each record batch message in an IPC stream.
    fn codecs(mut bytes: &[u8]) -> Vec<Option<CompressionType>> {
        let mut out = Vec::new();
        while bytes.len() >= 8 {
            let len = i32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            let message = arrow_ipc::root_as_message(&bytes[8..8 + len]).unwrap();
            if let Some(b) = message.header_as_record_batch() {
                out.push(b.compression().map(|c| c.codec()));
            }
            bytes = &bytes[8 + len + message.bodyLength() as usize..];
        }
        out
    }

    #[test]
    fn events_are_zstd_compressed_and_shrink_json() {
        let line =
            br#"{"event_id":"e-1","ts":"2026-11-02T10:00:00Z","amount":12.5,"country":"FR"}"#;
        let payloads: Vec<Vec<u8>> = (0..200).map(|_| line.repeat(20)).collect();
        let b = batch(&payloads);
        let bytes = encode(&b.schema(), &[b.clone(), b.clone()]).unwrap();
        assert_eq!(codecs(&bytes), vec![Some(CompressionType::ZSTD); 2]);
        assert!(
            bytes.len() * 20 < 2 * b.get_array_memory_size(),
            "{}",
            bytes.len()
        );
        assert_eq!(decode(&bytes).unwrap().1, vec![b.clone(), b]);
    }

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
            cuts in proptest::collection::vec(0usize..60, 0..4),
        ) {
            let b = batch(&payloads);
            let schema = b.schema();
            // The same rows as several batches (slices, some empty), as a
            // commit of many writer batches arrives.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(b.num_rows())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain(std::iter::once(b.num_rows())) {
                pieces.push(b.slice(at, c - at));
                at = c;
            }
            let parts = encode_split(&schema, &pieces, limit).unwrap();
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
    fn parts_are_filled_not_fragmented() {
        // Compressible rows: the whole commit compresses to a few limits' worth;
        // the parts must come close to that, not one small part per guess.
        let words = [
            "alpha", "bravo", "delta", "gamma", "omega", "sigma", "kappa", "theta",
        ];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let payloads: Vec<Vec<u8>> = (0..400)
            .map(|i| {
                let text: Vec<&str> = (0..150)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        words[(x % 8) as usize]
                    })
                    .collect();
                format!("{{\"id\":{i},\"text\":\"{}\"}}", text.join(" ")).into_bytes()
            })
            .collect();
        let b = batch(&payloads);
        let limit = 20_000;
        let whole = encode(&b.schema(), std::slice::from_ref(&b)).unwrap().len();
        let parts = encode_split(&b.schema(), &[b.slice(0, 150), b.slice(150, 250)], limit)
            .unwrap()
            .unwrap();
        assert!(
            whole > 2 * limit,
            "the test needs several parts ({whole} bytes)"
        );
        assert!(
            parts.len() <= whole / limit + 3,
            "{} parts for {whole} bytes at limit {limit}",
            parts.len()
        );
        let rows: usize = parts
            .iter()
            .map(|p| {
                decode(p)
                    .unwrap()
                    .1
                    .iter()
                    .map(|b| b.num_rows())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(rows, 400);
    }

    #[test]
    fn a_row_bigger_than_the_limit_is_reported() {
        // Incompressible bytes (xorshift), so compression cannot shrink the row under the limit.
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
