//! The chain: a downstream table takes its upstream's versions in order,
//! whichever replica processes them.
//!
//! Upstream versions are dealt to a product's partitions in blocks, round-robin
//! ([`medallion_spec::version_partition`]). A replica computes the versions
//! of the partitions it holds as soon as they are there — the costly part
//! runs on every replica at once — but commits them only when every earlier
//! version with data is committed (its "turn"), with one Delta transaction
//! app id per table whose version is the last upstream version covered. So
//! the table is the same as one process would have written: rows in
//! upstream order, one transaction version per step, never two replicas'
//! commits for the same versions (the transaction check refuses a late
//! one). Versions without data (the table's creation, a compaction) need
//! nobody's turn.

use std::collections::BTreeSet;

/// The partitions of one product and which of them this replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    pub count: u32,
    pub held: BTreeSet<u32>,
}

impl Partitions {
    /// One partition, held: a product run by a single process.
    pub fn single() -> Self {
        Partitions {
            count: 1,
            held: BTreeSet::from([0]),
        }
    }

    /// Whether every partition is held here: no other replica commits, so
    /// steps need no turn and may span any versions.
    pub fn all_held(&self) -> bool {
        (0..self.count).all(|k| self.held.contains(&k))
    }

    /// Whether this replica processes upstream version `v`.
    pub fn takes(&self, v: i64) -> bool {
        self.held
            .contains(&medallion_spec::version_partition(v, self.count))
    }
}

/// The next versions this replica can process, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Consecutive upstream versions, each this replica's or without data;
    /// the first and the last are this replica's.
    pub versions: Vec<i64>,
    /// Every version with data before the first is committed: the run may
    /// be committed now. Otherwise it can only be computed ahead.
    pub ready: bool,
}

impl Run {
    pub fn first(&self) -> i64 {
        self.versions[0]
    }

    pub fn last(&self) -> i64 {
        *self.versions.last().expect("a run is never empty")
    }
}

/// Plans the next run after `processed` up to `latest`. `has_data(v)` says
/// whether another replica's version `v` holds data (`None`: cannot tell
/// now, so it counts as data). `None` when nothing after `processed` is
/// this replica's.
pub fn plan(
    processed: i64,
    latest: i64,
    partitions: &Partitions,
    mut has_data: impl FnMut(i64) -> Option<bool>,
) -> Option<Run> {
    let mut versions = Vec::new();
    let mut ready = true;
    let mut gap = Vec::new();
    for v in (processed + 1)..=latest {
        if partitions.takes(v) {
            versions.append(&mut gap);
            versions.push(v);
            continue;
        }
        let data = has_data(v).unwrap_or(true);
        match (versions.is_empty(), data) {
            // Before our first version: another replica's data must be
            // committed first.
            (true, true) => ready = false,
            (true, false) => {}
            // Inside a run: another replica's data ends it.
            (false, true) => break,
            (false, false) => gap.push(v),
        }
    }
    (!versions.is_empty()).then_some(Run { versions, ready })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(count: u32, held: &[u32]) -> Partitions {
        Partitions {
            count,
            held: held.iter().copied().collect(),
        }
    }

    #[test]
    fn one_replica_takes_everything_at_once() {
        let r = plan(-1, 5, &Partitions::single(), |_| unreachable!()).unwrap();
        assert_eq!(r.versions, vec![0, 1, 2, 3, 4, 5]);
        assert!(r.ready);
        assert!(plan(5, 5, &Partitions::single(), |_| None).is_none());
        let all = parts(3, &[0, 1, 2]);
        assert!(all.all_held());
        assert_eq!(
            plan(2, 6, &all, |_| unreachable!()).unwrap().versions,
            vec![3, 4, 5, 6]
        );
    }

    #[test]
    fn a_run_waits_for_earlier_data_of_other_replicas() {
        // Two partitions in blocks of four, we hold 1: versions 4–7 and
        // 12–15 are ours.
        let p = parts(2, &[1]);
        assert!(!p.all_held());
        let r = plan(3, 9, &p, |_| Some(true)).unwrap();
        assert_eq!(r.versions, vec![4, 5, 6, 7]);
        assert!(r.ready, "versions up to 3 are committed");
        let r = plan(7, 13, &p, |_| Some(true)).unwrap();
        assert_eq!(r.versions, vec![12, 13]);
        assert!(!r.ready, "versions 8-11 hold data of the other replica");
        // Versions 8–11 without data (a compaction): 12 is ready, and the
        // run from 4 goes on through them.
        let r = plan(7, 13, &p, |v| Some(!(8..=11).contains(&v))).unwrap();
        assert_eq!((r.versions, r.ready), (vec![12, 13], true));
        let r = plan(3, 13, &p, |v| Some(!(8..=11).contains(&v))).unwrap();
        assert_eq!(r.versions, (4..=13).collect::<Vec<_>>());
        assert!(r.ready);
        // Unknown counts as data.
        let r = plan(7, 13, &p, |_| None).unwrap();
        assert_eq!((r.versions, r.ready), (vec![12, 13], false));
    }

    #[test]
    fn trailing_versions_without_data_are_left_to_the_next_run() {
        let p = parts(2, &[0]);
        let r = plan(-1, 6, &p, |_| Some(false)).unwrap();
        assert_eq!(r.versions, vec![0, 1, 2, 3]);
        assert!(r.ready);
        assert!(plan(3, 6, &p, |_| Some(false)).is_none());
    }
}
