//! A single-pass reader for the common shape of event JSON: one flat object
//! per record, plain strings, numbers, booleans, nulls.
//!
//! arrow-json first builds a tape of every token of every record and then
//! walks it per column; for flat records most of that work is bookkeeping.
//! This reader copies each declared field's text straight into its column in
//! one pass. It accepts a strict subset of what arrow-json accepts and gives
//! exactly the strings arrow-json gives for it (the string path of
//! [`crate::decode`]: numbers and booleans as their text); anything else —
//! an escape, a nested value, a repeated field, odd commas, invalid UTF-8, a
//! NUL byte — is not guessed at: the record is handed back and goes through
//! arrow-json, which also names what is wrong with it. A property test holds
//! the two paths to the same output.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::SchemaRef;

use crate::decode::Record;

/// What one pass gave: the rows of the records it read (in record order),
/// their record indices, and the indices of the records it handed back.
pub struct FlatRead {
    pub batch: RecordBatch,
    pub ok: Vec<usize>,
    pub rest: Vec<usize>,
}

/// A declared field's value in the record being read.
#[derive(Clone, Copy)]
enum Value {
    Missing,
    Null,
    /// Byte range of the text within the record.
    Text(u32, u32),
    True,
    False,
}

pub fn read(schema: &SchemaRef, records: &[Record<'_>]) -> FlatRead {
    let names: Vec<&[u8]> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_bytes())
        .collect();
    let bytes: usize = records.iter().map(|r| r.bytes.len()).sum();
    let mut builders: Vec<StringBuilder> = names
        .iter()
        .map(|_| StringBuilder::with_capacity(records.len(), bytes / names.len().max(1)))
        .collect();
    let mut values = vec![Value::Missing; names.len()];
    let mut ok = Vec::with_capacity(records.len());
    let mut rest = Vec::new();
    for (i, r) in records.iter().enumerate() {
        values.fill(Value::Missing);
        // arrow-json refuses invalid UTF-8 anywhere in a record; checked once
        // here, every value below is a slice of this `str`.
        let Ok(text) = std::str::from_utf8(r.bytes) else {
            rest.push(i);
            continue;
        };
        if !read_record(r.bytes, &names, &mut values) {
            rest.push(i);
            continue;
        }
        for (b, v) in builders.iter_mut().zip(&values) {
            match *v {
                Value::Missing | Value::Null => b.append_null(),
                Value::True => b.append_value("true"),
                Value::False => b.append_value("false"),
                // Ranges start and end next to ASCII delimiters: char boundaries.
                Value::Text(s, e) => b.append_value(&text[s as usize..e as usize]),
            }
        }
        ok.push(i);
    }
    let columns: Vec<ArrayRef> = builders
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("one string column per field");
    FlatRead { batch, ok, rest }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

fn is_number(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
}

/// Reads one record into `values`; false when it is not a plain flat object.
/// A NUL byte (refused by the string path) ends a key or string scan, and
/// anywhere else it is not valid syntax, so no record with one is read here.
fn read_record(rec: &[u8], names: &[&[u8]], values: &mut [Value]) -> bool {
    if rec.len() > u32::MAX as usize {
        return false;
    }
    let n = rec.len();
    let mut p = 0;
    let skip_ws = |mut p: usize| {
        while p < n && is_ws(rec[p]) {
            p += 1;
        }
        p
    };
    p = skip_ws(p);
    if p >= n || rec[p] != b'{' {
        return false;
    }
    p = skip_ws(p + 1);
    if p < n && rec[p] == b'}' {
        return skip_ws(p + 1) == n;
    }
    // Fields usually come in the declared order: try the next one first.
    let mut guess = 0;
    loop {
        // "key"
        if p >= n || rec[p] != b'"' {
            return false;
        }
        let Some(len) = memchr::memchr3(b'"', b'\\', 0, &rec[p + 1..]) else {
            return false;
        };
        let key_end = p + 1 + len;
        if rec[key_end] != b'"' {
            return false; // an escaped key, or NUL
        }
        let key = &rec[p + 1..key_end];
        p = skip_ws(key_end + 1);
        if p >= n || rec[p] != b':' {
            return false;
        }
        p = skip_ws(p + 1);
        if p >= n {
            return false;
        }
        let field = if names.get(guess) == Some(&key) {
            Some(guess)
        } else {
            names.iter().position(|k| *k == key)
        };
        // The value.
        let value = match rec[p] {
            b'"' => {
                let Some(len) = memchr::memchr3(b'"', b'\\', 0, &rec[p + 1..]) else {
                    return false;
                };
                let end = p + 1 + len;
                if rec[end] != b'"' {
                    return false; // an escape (arrow-json unescapes it), or NUL
                }
                let v = Value::Text((p + 1) as u32, end as u32);
                p = end + 1;
                v
            }
            b'-' | b'0'..=b'9' => {
                let start = p;
                while p < n && is_number(rec[p]) {
                    p += 1;
                }
                Value::Text(start as u32, p as u32)
            }
            b't' if rec[p..].starts_with(b"true") => {
                p += 4;
                Value::True
            }
            b'f' if rec[p..].starts_with(b"false") => {
                p += 5;
                Value::False
            }
            b'n' if rec[p..].starts_with(b"null") => {
                p += 4;
                Value::Null
            }
            _ => return false, // nested, or not a value
        };
        if let Some(f) = field {
            if !matches!(values[f], Value::Missing) {
                return false; // repeated field: leave the choice to arrow-json
            }
            values[f] = value;
            guess = f + 1;
        }
        p = skip_ws(p);
        if p >= n {
            return false;
        }
        match rec[p] {
            b',' => p = skip_ws(p + 1),
            b'}' => return skip_ws(p + 1) == n,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_with_arrow, raw_schema};
    use arrow::array::Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use medallion_spec::SourceFormat;
    use proptest::prelude::*;

    fn schema() -> SchemaRef {
        raw_schema(&Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("x y", DataType::Utf8, true),
        ]))
    }

    fn recs(lines: &[Vec<u8>]) -> Vec<Record<'_>> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| Record {
                row: 0,
                line: i as i64,
                bytes: l,
            })
            .collect()
    }

    #[test]
    fn reads_flat_objects_and_hands_back_the_rest() {
        let lines: Vec<Vec<u8>> = [
            &br#"{"id":"a","n":1.5e3,"x y":true,"extra":"z"}"#[..],
            br#" { "n" : -2 , "id" : "b" } "#,
            br#"{"id":"c\"q","n":1}"#,
            br#"{"id":"d","n":{"deep":1}}"#,
            br#"{"id":"e","id":"f"}"#,
            br#"{"id":"g",,"n":1}"#,
            br#"{}"#,
            br#"{"id":null,"n":false}"#,
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        let r = read(&schema(), &recs(&lines));
        assert_eq!(r.ok, vec![0, 1, 6, 7]);
        assert_eq!(r.rest, vec![2, 3, 4, 5]);
        let id = r
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let n = r
            .batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        assert_eq!((id.value(0), n.value(0)), ("a", "1.5e3"));
        assert_eq!((id.value(1), n.value(1)), ("b", "-2"));
        assert!(id.is_null(2) && n.is_null(2));
        assert!(id.is_null(3) && n.value(3) == "false");
    }

    /// A record from pieces that the fast path reads and pieces it must hand
    /// back; whichever it does, the result must be arrow-json's.
    fn record() -> impl Strategy<Value = Vec<u8>> {
        let key = prop_oneof![
            Just("id".to_string()),
            Just("n".to_string()),
            Just("x y".to_string()),
            Just("other".to_string()),
            Just("i\\u0064".to_string()),
        ];
        let value = prop_oneof![
            "[a-zA-Z0-9 ._:-]{0,12}".prop_map(|s| format!("\"{s}\"")),
            "[0-9eE.+-]{1,8}".prop_map(|s| {
                if s.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) {
                    s
                } else {
                    format!("1{s}")
                }
            }),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("null".to_string()),
            Just("\"es\\\"c\\n\"".to_string()),
            Just("\"\\u00e9t\\u00e9\"".to_string()),
            Just("\"h\u{e9}llo \u{1F600}\"".to_string()),
            Just("{\"a\":[1,2]}".to_string()),
            Just("[1,\"x\"]".to_string()),
            Just("tru".to_string()),
            Just("nul".to_string()),
            Just("\"unterminated".to_string()),
        ];
        let ws = prop_oneof![Just(""), Just(" "), Just("\t"), Just(" \r ")];
        let sep = prop_oneof![8 => Just(","), 1 => Just(",,"), 1 => Just(" ")];
        (
            proptest::collection::vec((key, value, ws.clone(), sep), 0..6),
            ws,
            prop_oneof![8 => Just(""), 1 => Just("}"), 1 => Just("x"), 1 => Just("{\"id\":\"z\"}")],
            prop_oneof![20 => Just(vec![]), 1 => Just(vec![0u8]), 1 => Just(vec![0xff, 0xfe])],
        )
            .prop_map(|(members, ws, tail, raw)| {
                let mut s = format!("{ws}{{");
                for (i, (k, v, w, sep)) in members.iter().enumerate() {
                    if i > 0 {
                        s.push_str(sep);
                    }
                    s.push_str(&format!("{w}\"{k}\"{w}:{w}{v}{w}"));
                }
                s.push('}');
                s.push_str(tail);
                let mut b = s.into_bytes();
                if !raw.is_empty() {
                    let at = b.len() / 2;
                    b.splice(at..at, raw);
                }
                b
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn same_rows_as_arrow_json(lines in proptest::collection::vec(record(), 1..12)) {
            let records = recs(&lines);
            let schema = schema();
            let fast = crate::decode::decode(SourceFormat::Ndjson, &schema, &records);
            let slow = decode_with_arrow(SourceFormat::Ndjson, &schema, &records);
            prop_assert_eq!(&fast.ok, &slow.ok);
            prop_assert_eq!(&fast.errors, &slow.errors);
            prop_assert_eq!(&fast.batch, &slow.batch);
        }
    }
}
