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

/// Trace contexts of events whose versions could not be processed when the
/// event came (tables not open, a failed commit): kept for whichever pass
/// processes those versions next, the timer's included, so the traces do
/// not end at the previous stage. At most `MAX_LINKS` per key.
pub struct PendingLinks<K> {
    links: HashMap<K, Vec<String>>,
}

impl<K> Default for PendingLinks<K> {
    fn default() -> Self {
        PendingLinks {
            links: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> PendingLinks<K> {
    /// The links for a pass: those kept from earlier events, then `new`.
    pub fn take(&mut self, key: &K, new: &[String]) -> Vec<String> {
        let mut out = self.links.remove(key).unwrap_or_default();
        out.extend_from_slice(new);
        out
    }

    /// Keeps the links of a pass that processed nothing, for the next one.
    pub fn keep(&mut self, key: &K, mut links: Vec<String>) {
        if links.is_empty() {
            return;
        }
        links.truncate(crate::event::MAX_LINKS);
        self.links.insert(key.clone(), links);
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

    #[test]
    fn links_wait_for_the_pass_that_processes_their_versions() {
        let mut p = PendingLinks::default();
        let first = p.take(&"p", &["a".to_string()]);
        assert_eq!(first, ["a"]);
        p.keep(&"p", first);
        assert_eq!(p.take(&"p", &["b".to_string()]), ["a", "b"]);
        assert!(p.take(&"p", &[]).is_empty(), "taken once");
        p.keep(
            &"p",
            (0..crate::event::MAX_LINKS + 5)
                .map(|i| i.to_string())
                .collect(),
        );
        assert_eq!(p.take(&"p", &[]).len(), crate::event::MAX_LINKS);
    }
}
