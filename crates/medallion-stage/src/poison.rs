//! Poison rows: input whose processing panics every time (a bug meeting
//! unforeseen data). The stages share how such rows are found — bisection
//! under `catch_unwind`, each suspect retried up to `MEDALLION_MAX_DELIVER`
//! times, since a panic that does not repeat is not poison — and keep what is
//! their own: what a row is (a Bronze message, a Silver row), how it is
//! described and where it is parked.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::error::ArrowError;
use futures::FutureExt;

/// The text of a caught panic.
pub fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic without a message".into())
}

/// Runs `f`, turning a panic into `Err(message)`.
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// Awaits `f`, turning a panic into `Err(message)`.
pub async fn guarded_async<T>(f: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|p| panic_message(p.as_ref()))
}

/// A row that failed on its own every time it was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    pub row: usize,
    /// The last failure's message.
    pub reason: String,
    /// How many times it was tried (the bisection counts as the first).
    pub deliveries: u32,
}

/// The rows of `batch` that make `attempt` fail by themselves, `max_deliver`
/// times in a row, in row order. A slice that passes is not searched
/// further, so a clean batch costs one attempt. Empty when no single row
/// fails (the failure needs several rows together, or did not repeat).
pub async fn isolate<F, Fut>(batch: &RecordBatch, max_deliver: u32, mut attempt: F) -> Vec<Suspect>
where
    F: FnMut(RecordBatch) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut found = Vec::new();
    let mut stack = vec![(0usize, batch.num_rows())];
    while let Some((offset, len)) = stack.pop() {
        if len == 0 {
            continue;
        }
        match attempt(batch.slice(offset, len)).await {
            Ok(()) => {}
            Err(m) if len == 1 => found.push((offset, m)),
            Err(_) => {
                let half = len / 2;
                // Popped first half first: suspects come out in row order.
                stack.push((offset + half, len - half));
                stack.push((offset, half));
            }
        }
    }
    let mut out = Vec::new();
    for (row, first) in found {
        let mut reason = first;
        let mut deliveries = 1;
        let mut repeated = true;
        while deliveries < max_deliver {
            deliveries += 1;
            match attempt(batch.slice(row, 1)).await {
                Err(m) => reason = m,
                Ok(()) => {
                    repeated = false;
                    break;
                }
            }
        }
        if repeated {
            out.push(Suspect {
                row,
                reason,
                deliveries,
            });
        }
    }
    out
}

/// [`isolate`] for an `attempt` that does not await (runs on any thread).
pub fn isolate_sync(
    batch: &RecordBatch,
    max_deliver: u32,
    mut attempt: impl FnMut(&RecordBatch) -> Result<(), String>,
) -> Vec<Suspect> {
    // Every future here is ready at once: no runtime is needed.
    futures::executor::block_on(isolate(batch, max_deliver, |b| {
        std::future::ready(attempt(&b))
    }))
}

/// `batch` without the suspects' rows.
pub fn without(batch: &RecordBatch, suspects: &[Suspect]) -> Result<RecordBatch, ArrowError> {
    let mut keep = vec![true; batch.num_rows()];
    for s in suspects {
        keep[s.row] = false;
    }
    filter_record_batch(batch, &BooleanArray::from(keep))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn batch(values: Vec<i64>) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(values))],
        )
        .unwrap()
    }

    fn panics_on(bad: &'static [i64]) -> impl FnMut(&RecordBatch) -> Result<(), String> {
        move |b| {
            guarded(|| {
                for v in b.column(0).as_primitive::<Int64Type>().values() {
                    if bad.contains(v) {
                        panic!("bad value {v}");
                    }
                }
            })
        }
    }

    #[test]
    fn finds_exactly_the_rows_that_always_panic() {
        let b = batch((0..100).collect());
        let s = isolate_sync(&b, 5, panics_on(&[3, 64, 99]));
        assert_eq!(s.iter().map(|s| s.row).collect::<Vec<_>>(), [3, 64, 99]);
        assert!(
            s.iter()
                .all(|s| s.deliveries == 5 && s.reason == format!("bad value {}", s.row))
        );
        let rest = without(&b, &s).unwrap();
        assert_eq!(rest.num_rows(), 97);
    }

    #[test]
    fn a_clean_batch_costs_one_attempt() {
        let mut calls = 0;
        let s = isolate_sync(&batch((0..64).collect()), 5, |_| {
            calls += 1;
            Ok(())
        });
        assert!(s.is_empty());
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_panic_that_does_not_repeat_is_not_poison() {
        let mut seen = 0;
        let s = isolate_sync(&batch(vec![1, 2, 3]), 5, |b| {
            let has = b
                .column(0)
                .as_primitive::<Int64Type>()
                .values()
                .contains(&2);
            if has {
                seen += 1;
                // Fails while bisecting, passes on the first retry.
                if seen <= 3 {
                    return Err("flaky".into());
                }
            }
            Ok(())
        });
        assert!(s.is_empty(), "{s:?}");
    }

    #[test]
    fn a_panic_that_needs_two_rows_together_finds_nothing() {
        let s = isolate_sync(&batch(vec![1, 2, 3, 4]), 5, |b| {
            let v = b.column(0).as_primitive::<Int64Type>().values();
            if v.contains(&1) && v.contains(&4) {
                Err("needs both".into())
            } else {
                Ok(())
            }
        });
        assert!(s.is_empty());
    }
}
