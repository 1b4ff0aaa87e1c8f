//! Timestamps in the shape events nearly always carry —
//! `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` — read in one pass.
//!
//! arrow's string → timestamp cast parses each value into chrono types and,
//! because the column is `Timestamp(µs, "UTC")`, looks the zone up per value:
//! a twentieth of the transform's CPU on the shared benchmark. This reader
//! takes only that exact shape with in-range fields and gives the value
//! arrow gives; any other text (a space for `T`, no offset, a leap second,
//! a bad date) goes through arrow's cast, which also decides whether it is
//! valid. A property test holds the two to the same result.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, TimestampMicrosecondArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::DataType;

/// Casts strings to `target` (a microsecond timestamp): the common shape here,
/// everything else by arrow's cast. NULL where a value does not convert.
pub fn cast_timestamps(values: &StringArray, target: &DataType) -> ArrayRef {
    let DataType::Timestamp(_, tz) = target else {
        unreachable!("cast_timestamps is called for timestamp columns only")
    };
    let mut out: Vec<Option<i64>> = Vec::with_capacity(values.len());
    let mut others: Vec<usize> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        out.push(match v {
            None => None,
            Some(s) => match micros(s.as_bytes()) {
                Some(us) => Some(us),
                None => {
                    others.push(i);
                    None
                }
            },
        });
    }
    if !others.is_empty() {
        let text = StringArray::from_iter(others.iter().map(|i| Some(values.value(*i))));
        let options = CastOptions {
            safe: true,
            ..Default::default()
        };
        if let Ok(cast) = cast_with_options(&text, target, &options) {
            let cast = cast
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .expect("a timestamp cast gives microseconds")
                .clone();
            for (j, i) in others.iter().enumerate() {
                out[*i] = cast.is_valid(j).then(|| cast.value(j));
            }
        }
    }
    let array = TimestampMicrosecondArray::from(out);
    Arc::new(match tz {
        Some(tz) => array.with_timezone(tz.clone()),
        None => array,
    })
}

/// Microseconds since the epoch for exactly
/// `YYYY-MM-DDTHH:MM:SS[.d{1,9}](Z|±HH:MM)`, every field in range; `None`
/// for anything else (not necessarily invalid: arrow decides).
pub fn micros(s: &[u8]) -> Option<i64> {
    if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || s[10] != b'T' {
        return None;
    }
    if s[13] != b':' || s[16] != b':' {
        return None;
    }
    let year = digits(&s[0..4])? as i64;
    let month = digits(&s[5..7])?;
    let day = digits(&s[8..10])?;
    let hour = digits(&s[11..13])?;
    let minute = digits(&s[14..16])?;
    let second = digits(&s[17..19])?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut p = 19;
    let mut fraction_us = 0i64;
    if s[p] == b'.' {
        let start = p + 1;
        let mut end = start;
        while end < s.len() && s[end].is_ascii_digit() {
            end += 1;
        }
        let n = end - start;
        if n == 0 || n > 9 {
            return None;
        }
        // Nanoseconds truncated to microseconds, as arrow does.
        let nanos = digits(&s[start..end])? as i64 * 10i64.pow(9 - n as u32);
        fraction_us = nanos / 1000;
        p = end;
    }
    let offset_s = match &s[p..] {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2])?;
            let m = digits(&[*m1, *m2])?;
            if h > 23 || m > 59 {
                return None;
            }
            let secs = (h * 3600 + m * 60) as i64;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset_s;
    Some(secs * 1_000_000 + fraction_us)
}

fn digits(s: &[u8]) -> Option<u32> {
    s.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{TimeUnit, TimestampMicrosecondType};
    use proptest::prelude::*;

    fn utc() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    }

    fn by_arrow(values: &[&str]) -> Vec<Option<i64>> {
        let text = StringArray::from(values.to_vec());
        let options = CastOptions {
            safe: true,
            ..Default::default()
        };
        let cast = cast_with_options(&text, &utc(), &options).unwrap();
        cast.as_primitive::<TimestampMicrosecondType>()
            .iter()
            .collect()
    }

    fn by_us(values: &[&str]) -> Vec<Option<i64>> {
        let cast = cast_timestamps(&StringArray::from(values.to_vec()), &utc());
        assert_eq!(cast.data_type(), &utc());
        cast.as_primitive::<TimestampMicrosecondType>()
            .iter()
            .collect()
    }

    #[test]
    fn reads_the_common_shape_and_hands_the_rest_to_arrow() {
        assert_eq!(
            micros(b"2024-05-01T10:00:00+02:00"),
            Some(1_714_550_400_000_000)
        );
        assert_eq!(micros(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(micros(b"1969-12-31T23:59:59.999999Z"), Some(-1));
        assert_eq!(
            micros(b"2026-11-01T01:49:16.777572Z"),
            Some(1_793_497_756_777_572)
        );
        for other in [
            "2024-05-01 10:00:00Z",
            "2024-05-01T10:00:00",
            "2024-02-30T10:00:00Z",
            "2016-12-31T23:59:60Z",
            "2024-05-01T10:00:00+0200",
            "yesterday",
        ] {
            assert_eq!(micros(other.as_bytes()), None, "{other}");
        }
        let values = [
            "2026-11-01T01:49:16.777572Z",
            "2024-05-01 10:00:00",
            "2024-02-30T10:00:00Z",
            "not a time",
        ];
        assert_eq!(by_us(&values), by_arrow(&values));
        assert_eq!(
            by_us(&values)[1],
            Some(1_714_557_600_000_000),
            "arrow read it"
        );
    }

    fn piece(choices: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::sample::select(choices).prop_map(str::to_string)
    }

    fn num(width: usize, max: u32) -> impl Strategy<Value = String> {
        (0..=max).prop_map(move |n| format!("{n:0width$}"))
    }

    /// Timestamps built from valid and invalid pieces: the common shape with
    /// fields at and past their limits, other separators and offsets, and
    /// bytes of noise.
    fn timestamp() -> impl Strategy<Value = String> {
        (
            prop_oneof![
                num(4, 9999),
                // Leap-year rules and the epoch's neighbourhood.
                piece(&[
                    "1900", "2000", "2100", "2024", "2023", "1970", "1969", "0000"
                ]),
                piece(&["+2024", "-001", "20a4", "99999"])
            ],
            prop_oneof![num(2, 13), piece(&["02", "02", "1", "0a"])],
            prop_oneof![num(2, 32), piece(&["28", "29", "30", "31", "7"])],
            piece(&["T", "T", "T", " ", "t", "x"]),
            prop_oneof![num(2, 25), piece(&["7"])],
            num(2, 61),
            prop_oneof![num(2, 61), Just(String::new())],
            prop_oneof![
                Just(String::new()),
                (1usize..12).prop_map(|n| format!(".{}", "123456789012".get(..n).unwrap())),
                piece(&[".", ",5", ".12a"])
            ],
            prop_oneof![
                piece(&[
                    "Z", "Z", "z", "", "+00:00", "-00:00", "+0530", "+05", "UTC", " Z", "Z "
                ]),
                (prop::bool::ANY, num(2, 25), num(2, 61))
                    .prop_map(|(neg, h, m)| { format!("{}{h}:{m}", if neg { '-' } else { '+' }) })
            ],
        )
            .prop_map(|(y, mo, d, t, h, mi, s, f, z)| {
                let sec = if s.is_empty() {
                    String::new()
                } else {
                    format!(":{s}")
                };
                format!("{y}-{mo}-{d}{t}{h}:{mi}{sec}{f}{z}")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn same_values_as_arrows_cast(values in prop::collection::vec(timestamp(), 1..20)) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            prop_assert_eq!(by_us(&refs), by_arrow(&refs), "{:?}", values);
        }

        #[test]
        fn the_common_shape_is_read_here(
            y in 0u32..=9999, mo in 1u32..=12, d in 1u32..=28,
            h in 0u32..=23, mi in 0u32..=59, s in 0u32..=59,
            us in 0u32..1_000_000, oh in 0u32..=23, om in 0u32..=59, neg in prop::bool::ANY,
        ) {
            let sign = if neg { '-' } else { '+' };
            let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}{sign}{oh:02}:{om:02}");
            prop_assert!(micros(text.as_bytes()).is_some(), "{}", text);
            prop_assert_eq!(by_us(&[&text]), by_arrow(&[&text]), "{}", text);
        }
    }
}
