//! How far a stage's timer may read its upstream table without events.
//!
//! A downstream stage takes each upstream version from its event (rows and
//! the producers' trace contexts) and, on a timer, from the table for
//! versions whose event never came. A version committed just before a tick
//! would otherwise be taken from the table while its event is still on the
//! way, and the event's traces would end at the previous stage. The timer
//! only takes versions that were already there at the previous tick: a
//! version's event gets one whole interval to arrive.

use std::collections::HashMap;
use std::hash::Hash;

pub struct TickHorizon<K> {
    seen: HashMap<K, i64>,
}

impl<K> Default for TickHorizon<K> {
    fn default() -> Self {
        TickHorizon {
            seen: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> TickHorizon<K> {
    /// At a tick that sees `latest` upstream: the newest version the timer
    /// may take (-1: none yet).
    pub fn through(&mut self, key: &K, latest: i64) -> i64 {
        let previous = self.seen.insert(key.clone(), latest).unwrap_or(-1);
        previous.min(latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_waits_one_tick_for_its_event() {
        let mut h = TickHorizon::default();
        assert_eq!(
            h.through(&"p", 3),
            -1,
            "first tick: everything may still be announced"
        );
        assert_eq!(h.through(&"p", 5), 3, "versions seen at the previous tick");
        assert_eq!(h.through(&"p", 5), 5);
        assert_eq!(h.through(&"q", 0), -1, "per table");
        // A table re-created with fewer versions is not read past its end.
        assert_eq!(h.through(&"p", 1), 1);
    }
}
