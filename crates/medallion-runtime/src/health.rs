//! Liveness and readiness as the services see them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Shared by a service's loops and its `/readyz` handler. A service is ready
/// once it has started and while no loop reports a problem (NATS unreachable,
/// lake unwritable, a product stopped by a `fail` expectation).
#[derive(Clone, Default)]
pub struct Health(Arc<Inner>);

#[derive(Default)]
struct Inner {
    started: AtomicBool,
    problems: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_started(&self) {
        self.0.started.store(true, Ordering::SeqCst);
    }

    /// Records (or replaces) a problem under `key`; the service is not ready until it is cleared.
    pub fn set_problem(&self, key: impl Into<String>, message: impl Into<String>) {
        self.0
            .problems
            .lock()
            .expect("health lock")
            .insert(key.into(), message.into());
    }

    pub fn clear_problem(&self, key: &str) {
        self.0.problems.lock().expect("health lock").remove(key);
    }

    pub fn is_ready(&self) -> bool {
        self.0.started.load(Ordering::SeqCst)
            && self.0.problems.lock().expect("health lock").is_empty()
    }

    pub fn problems(&self) -> BTreeMap<String, String> {
        let mut p = self.0.problems.lock().expect("health lock").clone();
        if !self.0.started.load(Ordering::SeqCst) {
            p.insert("startup".into(), "still starting".into());
        }
        p
    }
}
