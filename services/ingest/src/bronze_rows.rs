//! Raw NATS messages → Bronze rows (payload bytes untouched).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use async_nats::HeaderMap;
use bytes::Bytes;

/// One message as ingest saw it.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub stream_seq: u64,
    /// JetStream's store time, microseconds since the epoch.
    pub published_us: i64,
    pub received_us: i64,
    pub msg_id: Option<String>,
    pub traceparent: Option<String>,
}

/// Builds one Bronze batch with the table's schema.
pub fn to_batch(schema: &SchemaRef, messages: &[&RawMessage]) -> Result<RecordBatch, ArrowError> {
    let n = messages.len();
    let payload_bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let mut payload = BinaryBuilder::with_capacity(n, payload_bytes);
    let mut seq = Int64Builder::with_capacity(n);
    let mut subject = StringBuilder::with_capacity(n, n * 32);
    let mut published = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut msg_id = StringBuilder::with_capacity(n, n * 16);
    let names = MapFieldNames {
        entry: "key_value".into(),
        key: "key".into(),
        value: "value".into(),
    };
    let mut headers = MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new());
    for m in messages {
        payload.append_value(&m.payload);
        seq.append_value(m.stream_seq as i64);
        subject.append_value(&m.subject);
        published.append_value(m.published_us);
        received.append_value(m.received_us);
        msg_id.append_option(m.msg_id.as_deref());
        match &m.headers {
            Some(h) if !h.is_empty() => {
                let mut entries: Vec<(String, String)> = h
                    .iter()
                    .map(|(k, vs)| {
                        let v: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
                        (k.to_string(), v.join(", "))
                    })
                    .collect();
                // Header maps are unordered; a stable order makes Bronze reproducible.
                entries.sort();
                for (k, v) in entries {
                    headers.keys().append_value(k);
                    headers.values().append_value(v);
                }
                headers.append(true)?;
            }
            _ => headers.append(false)?,
        }
    }
    let headers = headers.finish();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(payload.finish()),
        Arc::new(seq.finish()),
        Arc::new(subject.finish()),
        Arc::new(published.finish()),
        Arc::new(received.finish()),
        Arc::new(msg_id.finish()),
        Arc::new(headers),
    ];
    // The table's schema is authoritative (field names and nullability as Delta
    // reports them); casting would hide a real mismatch, so build against it.
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                arrow::compute::cast(&c, f.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, MapArray};
    use medallion_spec::layout::bronze_schema;

    fn msg(seq: u64, payload: &[u8], headers: Option<HeaderMap>) -> RawMessage {
        RawMessage {
            subject: "medallion.ingest.d.p".into(),
            payload: Bytes::copy_from_slice(payload),
            headers,
            stream_seq: seq,
            published_us: 1,
            received_us: 2,
            msg_id: None,
            traceparent: None,
        }
    }

    #[test]
    fn payload_bytes_are_kept_exactly() {
        let mut h = HeaderMap::new();
        h.insert("b", "2");
        h.insert("a", "1");
        let msgs = [msg(1, b"\xff\x00not utf8", Some(h)), msg(2, b"", None)];
        let refs: Vec<&RawMessage> = msgs.iter().collect();
        let b = to_batch(&bronze_schema(), &refs).unwrap();
        let payload = b.column(0).as_binary::<i32>();
        assert_eq!(payload.value(0), b"\xff\x00not utf8");
        assert_eq!(payload.value(1), b"");
        let headers = b.column(6).as_any().downcast_ref::<MapArray>().unwrap();
        assert!(headers.is_null(1));
        let first = headers.value(0);
        let keys = first.column(0).as_string::<i32>();
        assert_eq!((keys.value(0), keys.value(1)), ("a", "b"));
    }
}
