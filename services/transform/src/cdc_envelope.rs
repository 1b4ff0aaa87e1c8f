//! Change events (`spec.cdc`) → operation, sequence and row image. The image
//! then goes through the product's contract like any record; a change event
//! that cannot be read goes to quarantine with the reason.

use std::borrow::Cow;

use medallion_spec::CdcPlan;
use medallion_spec::model::CdcFormat;
use serde_json::Value;

/// What a change does to its key's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    /// A row of the connector's initial snapshot (Debezium `r`): an insert.
    Snapshot,
    Update,
    Delete,
}

impl Op {
    /// The code stored in the change batch's `__op` column.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Snapshot => "r",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }

    pub fn from_code(code: &str) -> Option<Op> {
        match code.to_ascii_lowercase().as_str() {
            "c" | "insert" | "create" => Some(Op::Insert),
            "r" | "snapshot" | "read" => Some(Op::Snapshot),
            "u" | "update" => Some(Op::Update),
            "d" | "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// A sequence value. One product's sequences are all of one kind, so the
/// derived order (integers before strings) never compares across kinds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SeqValue {
    Int(i64),
    Str(String),
}

/// One record of a change feed.
#[derive(Debug)]
pub enum Unwrapped<'a> {
    Change {
        op: Op,
        /// From the envelope (debezium); `None` for generic, whose sequence
        /// is a declared column read after typing.
        seq: Option<SeqValue>,
        image: Cow<'a, [u8]>,
    },
    /// Debezium's null record after a delete: not data.
    Tombstone,
    Invalid(String),
}

/// Reads one record of a change feed.
pub fn unwrap<'a>(plan: &CdcPlan, record: &'a [u8]) -> Unwrapped<'a> {
    let text = record.trim_ascii();
    if text.is_empty() || text == b"null" {
        return Unwrapped::Tombstone;
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return Unwrapped::Invalid(format!("change event is not JSON: {e}")),
    };
    let Value::Object(mut top) = value else {
        return Unwrapped::Invalid("a change event is a JSON object".into());
    };
    match plan.format {
        CdcFormat::Generic => {
            let field = plan.operation.as_deref().unwrap_or("op");
            let op = match top.get(field) {
                Some(Value::String(s)) => match Op::from_code(s) {
                    Some(op) => op,
                    None => return Unwrapped::Invalid(unknown_op(field, s)),
                },
                _ => {
                    return Unwrapped::Invalid(format!(
                        "operation field `{field}` (spec.cdc.operation) is missing or not a string"
                    ));
                }
            };
            Unwrapped::Change {
                op,
                seq: None,
                image: Cow::Borrowed(record),
            }
        }
        CdcFormat::Debezium => {
            // Schema-wrapped events (JsonConverter with schemas.enable) carry
            // the envelope in `payload`.
            let envelope = if top.contains_key("schema") && top.contains_key("payload") {
                match top.remove("payload") {
                    Some(Value::Object(p)) => p,
                    Some(Value::Null) => return Unwrapped::Tombstone,
                    _ => {
                        return Unwrapped::Invalid(
                            "`payload` of a schema-wrapped change event is not an object".into(),
                        );
                    }
                }
            } else {
                top
            };
            let op = match envelope.get("op") {
                Some(Value::String(s)) if s == "t" => {
                    return Unwrapped::Invalid(
                        "truncate events (`op: t`) are not applied; refresh the product to empty it".into(),
                    );
                }
                Some(Value::String(s)) if s.len() == 1 => match Op::from_code(s) {
                    Some(op) => op,
                    None => return Unwrapped::Invalid(unknown_op("op", s)),
                },
                Some(Value::String(s)) => return Unwrapped::Invalid(unknown_op("op", s)),
                _ => return Unwrapped::Invalid("`op` is missing or not a string".into()),
            };
            let seq = match sequence(plan, &envelope) {
                Ok(s) => s,
                Err(e) => return Unwrapped::Invalid(e),
            };
            let side = if op == Op::Delete { "before" } else { "after" };
            let image = match envelope.get(side) {
                Some(v @ Value::Object(_)) => serde_json::to_vec(v).expect("a JSON value encodes"),
                _ => {
                    return Unwrapped::Invalid(format!(
                        "`{side}` is missing or not an object for op `{}`",
                        op.code()
                    ));
                }
            };
            Unwrapped::Change {
                op,
                seq: Some(seq),
                image: Cow::Owned(image),
            }
        }
    }
}

fn unknown_op(field: &str, value: &str) -> String {
    format!("`{field}` is `{value}`; a change is c/insert, u/update, d/delete or r/snapshot")
}

/// The envelope's sequence: one integer field, or several fields rendered
/// so that their string order is the order of the fields compared in turn
/// (integers zero-padded to 20 digits, joined by `/`).
fn sequence(plan: &CdcPlan, envelope: &serde_json::Map<String, Value>) -> Result<SeqValue, String> {
    let mut parts = Vec::with_capacity(plan.sequence_paths.len());
    for path in &plan.sequence_paths {
        let mut at: Option<&Value> = None;
        for (i, segment) in path.iter().enumerate() {
            at = if i == 0 {
                envelope.get(segment)
            } else {
                at.and_then(|v| v.get(segment))
            };
        }
        let name = path.join(".");
        match at {
            None | Some(Value::Null) => {
                return Err(format!(
                    "sequence field `{name}` (spec.cdc.sequence_by) is missing in the change event"
                ));
            }
            Some(v) => parts.push((name, v)),
        }
    }
    if let [(name, v)] = parts.as_slice() {
        return integer(v)
            .map(SeqValue::Int)
            .ok_or_else(|| format!("sequence field `{name}` is {v}, not an integer"));
    }
    let mut out = String::new();
    for (i, (name, v)) in parts.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        match (integer(v), v) {
            (Some(n), _) if n >= 0 => out.push_str(&format!("{n:020}")),
            (_, Value::String(s)) => out.push_str(s),
            _ => {
                return Err(format!(
                    "sequence field `{name}` is {v}; a sequence part is a non-negative integer or a string"
                ));
            }
        }
    }
    Ok(SeqValue::Str(out))
}

/// An integer, also when sent as a string of digits (some converters render
/// 64-bit values as strings).
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medallion_spec::Contract;

    async fn plan(cdc: &str) -> CdcPlan {
        let yaml = format!(
            "apiVersion: medallion.dev/v1alpha1\nkind: DataProduct\nmetadata: {{name: t}}\nspec:\n  domain: d\n  schema:\n    - {{name: id, type: int64, required: true}}\n    - {{name: seq, type: int64}}\n  key: [id]\n  cdc: {cdc}\n"
        );
        Contract::from_yaml(&yaml).await.unwrap().cdc.unwrap()
    }

    fn change(u: Unwrapped<'_>) -> (Op, Option<SeqValue>, String) {
        match u {
            Unwrapped::Change { op, seq, image } => {
                (op, seq, String::from_utf8(image.into_owned()).unwrap())
            }
            other => panic!("not a change: {other:?}"),
        }
    }

    #[tokio::test]
    async fn debezium_plain_and_wrapped_give_the_same_change() {
        let p = plan("{format: debezium, sequence_by: source.lsn}").await;
        let plain =
            br#"{"before":null,"after":{"id":1,"seq":5},"op":"u","ts_ms":1,"source":{"lsn":240}}"#;
        let wrapped = br#"{"schema":{"type":"struct"},"payload":{"before":null,"after":{"id":1,"seq":5},"op":"u","ts_ms":1,"source":{"lsn":240}}}"#;
        let a = change(unwrap(&p, plain));
        assert_eq!(a, change(unwrap(&p, wrapped)));
        assert_eq!(a.0, Op::Update);
        assert_eq!(a.1, Some(SeqValue::Int(240)));
        assert_eq!(a.2, r#"{"id":1,"seq":5}"#);
    }

    #[tokio::test]
    async fn deletes_read_before_and_tombstones_are_not_data() {
        let p = plan("{format: debezium, sequence_by: source.lsn}").await;
        let d = br#"{"before":{"id":7},"after":null,"op":"d","source":{"lsn":"300"}}"#;
        let (op, seq, image) = change(unwrap(&p, d));
        assert_eq!(
            (op, seq, image.as_str()),
            (Op::Delete, Some(SeqValue::Int(300)), r#"{"id":7}"#)
        );
        assert!(matches!(unwrap(&p, b"null"), Unwrapped::Tombstone));
        assert!(matches!(unwrap(&p, b"  "), Unwrapped::Tombstone));
        assert!(matches!(
            unwrap(&p, br#"{"schema":{},"payload":null}"#),
            Unwrapped::Tombstone
        ));
    }

    #[tokio::test]
    async fn malformed_events_say_why() {
        let p = plan("{format: debezium, sequence_by: source.lsn}").await;
        let reason = |b: &[u8]| match unwrap(&p, b) {
            Unwrapped::Invalid(r) => r,
            other => panic!("accepted {other:?}"),
        };
        assert!(reason(br#"{"op":"x","after":{},"source":{"lsn":1}}"#).contains("`op` is `x`"));
        assert!(reason(br#"{"op":"c","after":{"id":1},"source":{}}"#).contains("source.lsn"));
        assert!(reason(br#"{"op":"c","source":{"lsn":1}}"#).contains("`after` is missing"));
        assert!(reason(br#"{"op":"t","source":{"lsn":1}}"#).contains("truncate"));
        assert!(reason(b"[1]").contains("JSON object"));
        assert!(reason(b"{oops").contains("not JSON"));
    }

    #[tokio::test]
    async fn a_list_of_fields_sorts_as_its_parts() {
        let p =
            plan("{format: debezium, sequence_by: [source.file, source.pos, source.row]}").await;
        let ev = |file: &str, pos: u64, row: u64| {
            format!(
                r#"{{"op":"c","after":{{"id":1}},"source":{{"file":"{file}","pos":{pos},"row":{row}}}}}"#
            )
        };
        let seq = |e: String| change(unwrap(&p, e.as_bytes())).1.unwrap();
        let a = seq(ev("mysql-bin.000003", 9_999, 1));
        let b = seq(ev("mysql-bin.000003", 10_000, 0));
        let c = seq(ev("mysql-bin.000004", 4, 0));
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(
            a,
            SeqValue::Str("mysql-bin.000003/00000000000000009999/00000000000000000001".into())
        );
    }

    #[tokio::test]
    async fn generic_reads_the_operation_column() {
        let p = plan("{format: generic, sequence_by: seq, operation: kind}").await;
        let (op, seq, image) = change(unwrap(&p, br#"{"id":1,"seq":3,"kind":"DELETE"}"#));
        assert_eq!((op, seq), (Op::Delete, None));
        assert_eq!(image, r#"{"id":1,"seq":3,"kind":"DELETE"}"#);
        assert!(matches!(
            unwrap(&p, br#"{"id":1,"seq":3}"#),
            Unwrapped::Invalid(_)
        ));
    }
}
