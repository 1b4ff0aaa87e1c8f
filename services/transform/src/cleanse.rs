//! Per-column cleansing of decoded strings: standardize, type, require, mask.
//!
//! Each step reports failures per row instead of failing the batch, so one bad
//! value sends one record to quarantine and the rest of the batch flows on.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, StringArray, StringBuilder};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::DataType;
use hmac::{Hmac, Mac};
use medallion_spec::{Column, PiiMode, Standardize};
use sha2::Sha256;

/// Applies trim/upper/lower. Every value is also trimmed of surrounding
/// whitespace before a non-string cast (" 12 " is the number 12).
pub fn standardize(raw: &StringArray, column: &Column) -> StringArray {
    let case = column.standardize;
    let trim = case.is_some() || !column.data_type.is_string();
    let recase = |s: &str| match case {
        Some(Standardize::Upper) => s.chars().any(char::is_lowercase),
        Some(Standardize::Lower) => s.chars().any(char::is_uppercase),
        _ => false,
    };
    let changes = |s: &str| (trim && s.trim().len() != s.len()) || recase(s);
    // Most values are already clean: share the decoded buffer instead of
    // copying every string.
    if !raw.iter().flatten().any(changes) {
        return raw.clone();
    }
    let mut out = StringBuilder::with_capacity(raw.len(), raw.value_data().len());
    for v in raw.iter() {
        let Some(s) = v else {
            out.append_null();
            continue;
        };
        let s = if trim { s.trim() } else { s };
        match case {
            Some(Standardize::Upper) if recase(s) => out.append_value(s.to_uppercase()),
            Some(Standardize::Lower) if recase(s) => out.append_value(s.to_lowercase()),
            _ => out.append_value(s),
        }
    }
    out.finish()
}

/// Casts to the declared type; a value that does not convert is an error on
/// its row (never a silent NULL).
pub fn cast_column(
    values: &StringArray,
    column: &Column,
    row_errors: &mut [Vec<String>],
) -> ArrayRef {
    let target = column.data_type.arrow_type();
    if target == DataType::Utf8 {
        return Arc::new(values.clone());
    }
    let options = CastOptions {
        safe: true,
        ..Default::default()
    };
    let typed = if matches!(target, DataType::Timestamp(..)) {
        crate::rfc3339::cast_timestamps(values, &target)
    } else {
        match cast_with_options(values, &target, &options) {
            Ok(a) => a,
            // Safe casts report per-value failures as NULL; an error here means
            // the kernel refused the whole array, so every non-null value is wrong.
            Err(_) => arrow::array::new_null_array(&target, values.len()),
        }
    };
    let non_finite = (target == DataType::Float64)
        .then(|| typed.as_any().downcast_ref::<Float64Array>().cloned())
        .flatten();
    let mut bad = vec![false; values.len()];
    for (i, is_bad) in bad.iter_mut().enumerate() {
        if values.is_null(i) {
            continue;
        }
        let bad_float = non_finite
            .as_ref()
            .map(|f| !f.is_null(i) && !f.value(i).is_finite())
            .unwrap_or(false);
        if typed.is_null(i) || bad_float {
            let shown: String = values.value(i).chars().take(80).collect();
            row_errors[i].push(format!(
                "column {}: {:?} is not a valid {}",
                column.name, shown, column.data_type
            ));
            *is_bad = true;
        }
    }
    // Rows with errors leave the batch later; their value is NULL meanwhile.
    arrow::compute::nullif(&typed, &arrow::array::BooleanArray::from(bad)).unwrap_or(typed)
}

/// `required: true` columns must have a value.
pub fn check_required(values: &ArrayRef, column: &Column, row_errors: &mut [Vec<String>]) {
    if !column.required {
        return;
    }
    for (i, errs) in row_errors.iter_mut().enumerate().take(values.len()) {
        if values.is_null(i) && errs.is_empty() {
            errs.push(format!("column {}: required but missing", column.name));
        }
    }
}

/// Keyed hash or redaction of a PII column.
pub fn mask_pii(values: ArrayRef, column: &Column, key: Option<&[u8]>) -> ArrayRef {
    match column.pii {
        None => values,
        Some(PiiMode::Redact) => arrow::array::new_null_array(values.data_type(), values.len()),
        Some(PiiMode::Hash) => {
            let key = key.expect(
                "the transform config requires MEDALLION_PII_KEY when a product hashes PII",
            );
            let strings = values.as_string::<i32>();
            let hashed: StringArray = strings
                .iter()
                .map(|v| v.map(|s| pii_token(key, s)))
                .collect();
            Arc::new(hashed)
        }
    }
}

/// HMAC-SHA256 of the value, hex: the same input gives the same token in every
/// table (joins keep working), and without the key it cannot be reversed or
/// confirmed by hashing guesses.
pub fn pii_token(key: &[u8], value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medallion_spec::ColumnType;

    fn col(t: &str) -> Column {
        serde_yaml::from_str(&format!("{{name: c, type: '{t}'}}")).unwrap()
    }

    fn cast(t: &str, values: &[Option<&str>]) -> (ArrayRef, Vec<Vec<String>>) {
        let c = col(t);
        let raw = StringArray::from(values.to_vec());
        let mut errs = vec![Vec::new(); values.len()];
        let std = standardize(&raw, &c);
        (cast_column(&std, &c, &mut errs), errs)
    }

    #[test]
    fn casts_each_type_and_reports_bad_values() {
        let (a, e) = cast("int64", &[Some(" 12 "), Some("x"), None]);
        assert_eq!(a.as_primitive::<arrow::datatypes::Int64Type>().value(0), 12);
        assert!(e[1][0].contains("\"x\" is not a valid int64"), "{e:?}");
        assert!(e[2].is_empty() && a.is_null(2));

        let (_, e) = cast("float64", &[Some("1.5"), Some("NaN"), Some("inf")]);
        assert!(e[0].is_empty() && !e[1].is_empty() && !e[2].is_empty());

        let (a, e) = cast(
            "timestamp",
            &[Some("2024-05-01T10:00:00+02:00"), Some("yesterday")],
        );
        let ts = a.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_714_550_400_000_000, "converted to UTC");
        assert!(!e[1].is_empty());

        let (a, e) = cast("decimal(10,2)", &[Some("12.345"), Some("1e400x")]);
        assert_eq!(a.data_type(), &DataType::Decimal128(10, 2));
        assert!(e[0].is_empty() && !e[1].is_empty());

        let (_, e) = cast("date", &[Some("2024-02-30")]);
        assert!(!e[0].is_empty(), "no 30th of February");
        let (a, e) = cast("bool", &[Some("true"), Some("maybe")]);
        assert!(a.as_boolean().value(0) && !e[1].is_empty());
        assert_eq!(col("string").data_type, ColumnType::String);
    }

    #[test]
    fn pii_tokens_are_keyed_and_stable() {
        let a = pii_token(b"k1", "alice");
        assert_eq!(a, pii_token(b"k1", "alice"));
        assert_ne!(a, pii_token(b"k2", "alice"));
        assert_eq!(a.len(), 64);
    }
}
