//! Back-off for a product whose tables cannot be opened or committed (the
//! lake unwritable or unreachable): without it every tick and every upstream
//! event retried at once and logged an error each time. Transform and
//! aggregate keep one per product.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_millis(200);
const MAX: Duration = Duration::from_secs(5);

/// Per key: when the next attempt may run, and how many failed in a row.
pub struct Backoff<K>(HashMap<K, (Instant, u32)>);

impl<K: Eq + Hash> Default for Backoff<K> {
    fn default() -> Self {
        Backoff(HashMap::new())
    }
}

impl<K: Eq + Hash> Backoff<K> {
    /// Whether an attempt for `key` may run now.
    pub fn ready(&self, key: &K) -> bool {
        self.0.get(key).is_none_or(|(at, _)| Instant::now() >= *at)
    }

    /// Records a failure; returns how many in a row. The wait doubles from
    /// 200 ms up to 5 s.
    pub fn failed(&mut self, key: K) -> u32 {
        let e = self.0.entry(key).or_insert((Instant::now(), 0));
        e.1 += 1;
        let wait = FIRST.saturating_mul(1 << (e.1 - 1).min(6)).min(MAX);
        e.0 = Instant::now() + wait;
        e.1
    }

    /// Resets `key`: call it when the work itself succeeded (a commit
    /// landed), not when a first step did (the tables opened): on a full
    /// disk opening works and every commit fails.
    pub fn succeeded(&mut self, key: &K) {
        self.0.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_reset() {
        let mut b = Backoff::default();
        assert!(b.ready(&"p"));
        assert_eq!(b.failed("p"), 1);
        assert!(!b.ready(&"p"));
        assert!(b.ready(&"q"));
        assert_eq!(b.failed("p"), 2);
        b.succeeded(&"p");
        assert!(b.ready(&"p"));
    }
}
