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
use std::time::{Duration, Instant};

pub struct TickHorizon<K> {
    seen: HashMap<K, i64>,
    /// The last pull left messages waiting in the consumer: until then the
    /// timer takes nothing, the events of a backlog being on their way.
    backlog_until: Option<Instant>,
}

impl<K> Default for TickHorizon<K> {
    fn default() -> Self {
        TickHorizon {
            seen: HashMap::new(),
            backlog_until: None,
        }
    }
}

impl<K: Hash + Eq + Clone> TickHorizon<K> {
    /// At a tick that sees `latest` upstream: the newest version the timer
    /// may take (-1: none yet).
    pub fn through(&mut self, key: &K, latest: i64) -> i64 {
        if self.backlog_until.is_some_and(|t| Instant::now() < t) {
            return -1;
        }
        let previous = self.seen.insert(key.clone(), latest).unwrap_or(-1);
        previous.min(latest)
    }

    /// After each pull: whether messages were still waiting. A consumer
    /// that stops delivering gets the timer back after `grace`.
    pub fn pulled(&mut self, more_waiting: bool, grace: Duration) {
        self.backlog_until = more_waiting.then(|| Instant::now() + grace);
    }
}

/// How far one catch-up pass over an upstream table may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// To the table's latest version (versions without events are read).
    Latest,
    /// As far as the timer may ([`TickHorizon::through`]).
    Tick,
    /// To this version at most.
    Through(i64),
}

impl Reach {
    /// For a pull of events: to the latest version, unless more messages
    /// wait in the consumer: then only as far as this pull announced, since
    /// the versions after it are most likely in the messages still waiting
    /// (a backlog would otherwise be read from the table while its events
    /// are fetched and thrown away). `None`: nothing announced whole yet.
    pub fn for_pull(more_waiting: bool, announced: &crate::Announced) -> Option<Reach> {
        match (more_waiting, announced.through) {
            (false, _) => Some(Reach::Latest),
            (true, Some(v)) => Some(Reach::Through(v)),
            (true, None) => None,
        }
    }
}

/// Whether the consumer had more messages waiting when it delivered the
/// last of `messages`.
pub fn more_waiting(messages: &[async_nats::jetstream::Message]) -> bool {
    messages
        .last()
        .and_then(|m| m.info().ok())
        .is_some_and(|i| i.pending > 0)
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

    /// Keeps `links` with those already kept, for the next pass.
    pub fn add(&mut self, key: &K, links: &[String]) {
        let all = self.take(key, links);
        self.keep(key, all);
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
    fn the_timer_leaves_a_backlog_to_its_events() {
        let mut h = TickHorizon::default();
        h.through(&"p", 3);
        h.pulled(true, Duration::from_secs(60));
        assert_eq!(h.through(&"p", 5), -1, "events still waiting");
        h.pulled(false, Duration::from_secs(60));
        assert_eq!(h.through(&"p", 5), 3);
        h.pulled(true, Duration::ZERO);
        assert_eq!(h.through(&"p", 5), 5, "the consumer stopped delivering");
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
        p.add(&"p", &["c".to_string()]);
        p.add(&"p", &["d".to_string()]);
        assert_eq!(p.take(&"p", &[]), ["c", "d"]);
    }

    #[test]
    fn a_pull_with_more_waiting_stops_at_what_it_announced() {
        let mut a = crate::Announced::default();
        assert_eq!(Reach::for_pull(false, &a), Some(Reach::Latest));
        assert_eq!(Reach::for_pull(true, &a), None);
        a.through = Some(4);
        assert_eq!(Reach::for_pull(true, &a), Some(Reach::Through(4)));
        assert_eq!(Reach::for_pull(false, &a), Some(Reach::Latest));
    }
}
