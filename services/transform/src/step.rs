//! One step of a product: Bronze versions → Silver rows, quarantine rows and
//! quality counts, computed on every core and checked for poison; pure but
//! for reading Bronze, so a step can be computed ahead of its commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{BooleanArray, RecordBatch};
use medallion_lake::read_commit;
use medallion_runtime::failpoint;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_spec::{Contract, TableRef};
use tracing::warn;

use crate::crash_check::CrashCheck;
use crate::dedupe::{KeyHashSet, KeySet};
use crate::pipeline::{Output, QualityCounts, drop_keys_seen, slices, transform};
use crate::poison::{self, Poison};
use crate::state::{LAYER, ProductState, now_us, pid};

/// One step's output, ready to commit: the Bronze versions through `last`.
pub(crate) struct Step {
    pub out_silver: Vec<RecordBatch>,
    /// The key of each row of `out_silver`, batch by batch.
    pub silver_keys: Vec<Vec<u128>>,
    pub out_quarantine: Vec<RecordBatch>,
    pub counts: QualityCounts,
    pub new_keys: KeyHashSet,
    pub last: i64,
    pub halt: Option<String>,
    /// Messages of versions up to `last` dead-lettered instead of transformed.
    pub poison: Vec<Poison>,
}

impl Step {
    /// Drops rows whose key was committed since the step was computed (by
    /// another replica, whose versions come first): first occurrence wins.
    pub fn drop_committed(&mut self, keys: &KeySet) {
        for (batch, row_keys) in self.out_silver.iter_mut().zip(self.silver_keys.iter_mut()) {
            let keep: Vec<bool> = row_keys.iter().map(|k| !keys.contains(*k)).collect();
            let removed = keep.iter().filter(|k| !**k).count();
            if removed == 0 {
                continue;
            }
            *batch = arrow::compute::filter_record_batch(batch, &BooleanArray::from(keep.clone()))
                .expect("one flag per row");
            let mut flags = keep.iter();
            row_keys.retain(|_| *flags.next().expect("one flag per key"));
            self.counts.rows_out -= removed as u64;
            self.counts.duplicates += removed as u64;
        }
        self.new_keys.retain(|k| !keys.contains(*k));
    }
}

/// Payload bytes per unit of parallel transform work (see [`slices`]).
const SLICE_BYTES: usize = 1 << 20;

/// Transforms the Bronze versions of `run` (as many as make `max_rows`
/// records) against the keys committed so far.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn step(
    state: &ProductState,
    bronze: &deltalake::DeltaTable,
    bronze_ref: &TableRef,
    run: &[i64],
    fast: &mut BTreeMap<i64, Vec<RecordBatch>>,
    pii_key: Option<&[u8]>,
    max_rows: usize,
    max_deliver: u32,
    crash_check: Option<&CrashCheck>,
    metrics: &PipelineMetrics,
) -> Result<Step, String> {
    let product = pid(&state.contract);
    let format = state.contract.product.spec.source.format;
    // Gather Bronze versions until the step holds `max_rows` records.
    let mut inputs: Vec<(i64, RecordBatch)> = Vec::new();
    let mut versions = Vec::new();
    let mut records = 0usize;
    for &v in run {
        let batches = match fast.remove(&v) {
            Some(b) => b,
            None => {
                metrics.catch_up_commits.with_label_values(&[LAYER]).inc();
                match read_commit(bronze_ref, bronze, v)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Some(c) => c.batches,
                    None => {
                        warn!(
                            product,
                            version = v,
                            "bronze version no longer in the log; skipped"
                        );
                        Vec::new()
                    }
                }
            }
        };
        // Messages an erasure emptied are not data any more.
        let batches: Vec<RecordBatch> = batches
            .into_iter()
            .map(crate::forget_match::without_erased_messages)
            .collect();
        records += batches
            .iter()
            .map(|b| crate::decode::count_records(format, b))
            .sum::<usize>();
        inputs.extend(
            batches
                .iter()
                .flat_map(|b| slices(b, SLICE_BYTES))
                .map(|b| (v, b)),
        );
        versions.push(v);
        failpoint::hit("transform.after_version");
        if records >= max_rows {
            break;
        }
    }

    let checked = match crash_check {
        Some(check) => isolate_killers(&product, check, &mut inputs, max_deliver),
        None => Vec::new(),
    };
    let mut outputs = transform_parallel(
        &state.contract,
        pii_key,
        &state.keys,
        &inputs,
        now_us(),
        max_deliver,
    );
    for (i, killers) in checked {
        outputs[i].1.extend(killers);
    }

    // Fold in Bronze order; keys of earlier batches of this step count as seen
    // (first occurrence wins), and a version with a halt ends the step before it.
    let mut out_silver = Vec::new();
    let mut silver_keys = Vec::new();
    let mut out_quarantine = Vec::new();
    let mut counts = QualityCounts::default();
    // Sized once: grown by doubling, its rehashes were 2% of the CPU.
    let mut pending = KeyHashSet::with_capacity_and_hasher(
        outputs
            .iter()
            .map(|(r, _)| r.as_ref().map_or(0, |o| o.new_keys.len()))
            .sum(),
        Default::default(),
    );
    let mut last = state.processed;
    let mut halt = None;
    let mut poisoned = Vec::new();
    let mut outputs = inputs.iter().map(|(v, _)| *v).zip(outputs).peekable();
    for v in versions {
        let mut version_out = Vec::new();
        let mut version_poison = Vec::new();
        while let Some((_, (r, p))) = outputs.next_if(|(ov, _)| *ov == v) {
            for x in &p {
                warn!(product, bronze_version = v, stream_seq = x.stream_seq, deliveries = x.deliveries, reason = %x.reason, "poison message isolated; dead-lettering it");
            }
            version_poison.extend(p);
            match r {
                Ok(o) => version_out.push(o),
                Err(h) => {
                    halt.get_or_insert(h);
                }
            }
        }
        if halt.is_some() {
            // Poison of this version is parked when the version commits.
            break;
        }
        poisoned.extend(version_poison);
        for mut o in version_out {
            drop_keys_seen(&mut o, &pending);
            pending.extend(o.new_keys.iter().copied());
            counts.add(&o.counts);
            out_silver.push(o.silver);
            silver_keys.push(o.new_keys);
            out_quarantine.push(o.quarantine);
        }
        last = v;
    }
    tracing::Span::current()
        .record("to", last)
        .record("rows", counts.rows_out);
    Ok(Step {
        out_silver,
        silver_keys,
        out_quarantine,
        counts,
        new_keys: pending,
        last,
        halt,
        poison: poisoned,
    })
}

/// A crash check for this step when an earlier process started the same step
/// and never got past it (see [`crate::crash_check`]).
pub(crate) async fn crash_check_if_died_before(
    attempts: &medallion_bus::attempts::Attempts,
    exe: Option<&std::path::Path>,
    state: &ProductState,
    (first, partition): (i64, u32),
    pii_key: Option<&[u8]>,
) -> Option<CrashCheck> {
    let product = pid(&state.contract);
    let start = format!("{}:{first}", state.generation);
    // Per partition: replicas working on other partitions of the product
    // start elsewhere and must not look like a death here.
    let attempt = match attempts
        .begin(&format!("transform.{product}.{partition}"), &start)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            warn!(product, error = %e, "cannot record the attempt; going on without a crash check");
            return None;
        }
    };
    if attempt <= 1 {
        return None;
    }
    warn!(
        product,
        from = first,
        attempt,
        "an earlier process died on these bronze versions; checking them in a child process first"
    );
    match CrashCheck::new(
        exe?.to_path_buf(),
        &state.contract,
        pii_key,
        CRASH_CHECK_TIMEOUT,
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(product, error = %e, "crash check unavailable");
            None
        }
    }
}

/// Longest a child may take over one slice before it counts as a crash.
const CRASH_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs each input in a crash-check child; in an input the child does not
/// survive, finds the records that kill it on their own (`max_deliver` times
/// each) and takes them out. Returns them by input index.
fn isolate_killers(
    product: &str,
    check: &CrashCheck,
    inputs: &mut [(i64, RecordBatch)],
    max_deliver: u32,
) -> Vec<(usize, Vec<Poison>)> {
    let mut out = Vec::new();
    for (i, (v, b)) in inputs.iter_mut().enumerate() {
        // `isolate` runs the whole slice first: a slice the child survives
        // costs one child.
        if let Some(iso) = poison::isolate(b, *v, max_deliver, |x| check.run(*v, x)) {
            warn!(
                product,
                bronze_version = *v,
                killers = iso.poison.len(),
                "the transform dies on these bronze records; dead-lettering them"
            );
            *b = iso.rest;
            out.push((i, iso.poison));
        }
    }
    out
}

/// What one slice of Bronze gave: its output (or the halt it hit), and the
/// messages that crash the transform by themselves, taken out of it.
type SliceResult = (Result<Output, String>, Vec<Poison>);

/// Transforms the batches on every core. Each batch is independent given the
/// committed key set; cross-batch duplicates within the step are removed
/// afterwards by [`drop_keys_seen`], in Bronze order. A panic on hostile input
/// must not take the service down: the messages that crash it on their own
/// are taken out for the dead-letter stream and the rest goes on; if no
/// single message does, the product halts at that version.
fn transform_parallel(
    contract: &Arc<Contract>,
    pii_key: Option<&[u8]>,
    keys: &KeySet,
    inputs: &[(i64, RecordBatch)],
    now: i64,
    max_deliver: u32,
) -> Vec<SliceResult> {
    let one = |(v, b): &(i64, RecordBatch)| -> SliceResult {
        let none = KeyHashSet::default();
        let run = |b: &RecordBatch| {
            poison::guarded(|| {
                poison::inject(b);
                transform(contract, pii_key, b, *v, keys, &none, now)
            })
        };
        let mut r = run(b);
        let mut poisoned = Vec::new();
        if r.is_err()
            && let Some(iso) = poison::isolate(b, *v, max_deliver, |x| {
                run(x)
                    .map(|_| ())
                    .map_err(|m| format!("transform panicked: {m}"))
            })
        {
            poisoned = iso.poison;
            r = run(&iso.rest);
        }
        let r = match r {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(h)) => Err(h.to_string()),
            Err(msg) => Err(format!("transform crashed on bronze version {v}: {msg}")),
        };
        (r, poisoned)
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(inputs.len());
    if workers <= 1 {
        return inputs.iter().map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<SliceResult>> = (0..inputs.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, SliceResult)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(input) = inputs.get(i) else {
                            break;
                        };
                        mine.push((i, one(input)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("transform worker panics are caught"))
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every batch transformed"))
        .collect()
}
