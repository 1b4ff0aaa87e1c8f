//! Column types of the Silver contract and their Arrow/Delta representation.

use std::fmt;
use std::str::FromStr;

use arrow::datatypes::{DataType, TimeUnit};
use serde::{Deserialize, Serialize};

/// Timestamps are stored as microseconds in UTC: the only timestamp Delta Lake
/// readers agree on (Delta `timestamp`).
pub fn timestamp_utc() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Bool,
    /// RFC 3339 in, UTC out.
    Timestamp,
    Date,
    Decimal {
        precision: u8,
        scale: i8,
    },
}

/// A column type is written as one string (`decimal(10,2)`), so its schema is
/// a string; the spec validation names a wrong one better than a regex would.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for ColumnType {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ColumnType".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": format!("One of {TYPE_NAMES}"),
        })
    }
}

pub const TYPE_NAMES: &str = "string, int64, float64, bool, timestamp, date, decimal(p,s)";

impl ColumnType {
    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnType::String => DataType::Utf8,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Timestamp => timestamp_utc(),
            ColumnType::Date => DataType::Date32,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
        }
    }

    pub fn is_string(&self) -> bool {
        matches!(self, ColumnType::String)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::String => f.write_str("string"),
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
        }
    }
}

impl FromStr for ColumnType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "string" => ColumnType::String,
            "int64" => ColumnType::Int64,
            "float64" => ColumnType::Float64,
            "bool" => ColumnType::Bool,
            "timestamp" => ColumnType::Timestamp,
            "date" => ColumnType::Date,
            _ => return parse_decimal(&t).ok_or_else(|| unknown_type(s)),
        })
    }
}

fn unknown_type(s: &str) -> String {
    format!("unknown type `{s}`; use one of {TYPE_NAMES}")
}

fn parse_decimal(t: &str) -> Option<ColumnType> {
    let inner = t.strip_prefix("decimal(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',')?;
    let precision: u8 = p.trim().parse().ok()?;
    let scale: i8 = s.trim().parse().ok()?;
    if precision == 0 || precision > 38 || scale < 0 || scale as u8 > precision {
        return None;
    }
    Some(ColumnType::Decimal { precision, scale })
}

impl TryFrom<String> for ColumnType {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<ColumnType> for String {
    fn from(t: ColumnType) -> String {
        t.to_string()
    }
}

/// Parses `60s`, `5m`, `1h`, `1h30m`, `250ms`, `2d` into seconds (fractional).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += n * match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
    }
    Some(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_type() {
        for (s, t) in [
            ("string", ColumnType::String),
            ("int64", ColumnType::Int64),
            ("float64", ColumnType::Float64),
            ("bool", ColumnType::Bool),
            ("timestamp", ColumnType::Timestamp),
            ("date", ColumnType::Date),
            (
                "decimal(10,2)",
                ColumnType::Decimal {
                    precision: 10,
                    scale: 2,
                },
            ),
            (
                "DECIMAL( 38 , 0 )",
                ColumnType::Decimal {
                    precision: 38,
                    scale: 0,
                },
            ),
        ] {
            assert_eq!(s.parse::<ColumnType>().unwrap(), t, "{s}");
        }
    }

    #[test]
    fn rejects_unknown_and_out_of_range() {
        for s in [
            "varchar",
            "decimal(39,2)",
            "decimal(5,6)",
            "decimal(0,0)",
            "decimal(10)",
            "int",
        ] {
            let err = s.parse::<ColumnType>().unwrap_err();
            assert!(err.contains("unknown type"), "{err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap().as_secs(), 60);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert!(parse_duration("ten").is_none());
        assert!(parse_duration("10x").is_none());
        assert!(parse_duration("").is_none());
    }

    proptest! {
        #[test]
        fn display_round_trips(p in 1u8..=38, s in 0i8..=38) {
            prop_assume!(s as u8 <= p);
            let t = ColumnType::Decimal { precision: p, scale: s };
            prop_assert_eq!(t.to_string().parse::<ColumnType>().unwrap(), t);
        }
    }
}
