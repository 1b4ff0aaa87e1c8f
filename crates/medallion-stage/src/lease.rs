//! The lease manager of one replica: announces the replica, works out which
//! units it should hold ([`crate::assign`]), takes their leases, renews them
//! and hands back the ones that belong elsewhere — in its own task, so a long
//! step of the stage never delays a renewal.
//!
//! The stage hears what changed through [`Ownership::next_change`]:
//! `Acquired` (start the unit), `Release` (finish the step in hand, ack what
//! was pulled, then call [`Ownership::released`]) and `Lost` (stop at once:
//! another replica may hold it now). Before committing, a stage asks
//! [`Ownership::holds`]; the Delta transaction check fences the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medallion_bus::ownership::{
    LeaseRecord, MemberRecord, Owners, OwnersChange, UnitId, UnitStatus,
};
use medallion_runtime::prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::assign::assign;

/// What the stage must do about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The lease is ours: start working on the unit.
    Acquired(UnitId),
    /// The unit belongs to another replica now: finish, then [`Ownership::released`].
    Release(UnitId),
    /// The lease could not be renewed: stop working on the unit now.
    Lost(UnitId),
}

/// Who this replica is and how long its leases live.
#[derive(Debug, Clone)]
pub struct OwnershipSettings {
    pub replica: String,
    pub ttl: Duration,
}

impl OwnershipSettings {
    pub fn from_env(env: &mut medallion_runtime::EnvReader) -> Self {
        let replica = env.optional("MEDALLION_REPLICA_ID").unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            format!("{host}-{}", std::process::id())
        });
        let ttl = env.duration("MEDALLION_LEASE_TTL");
        if ttl < Duration::from_secs(1) {
            env.invalid(
                "MEDALLION_LEASE_TTL",
                "must be at least 1s (leases are renewed every third of it)",
            );
        }
        OwnershipSettings {
            replica: medallion_bus::ownership::replica_token(&replica),
            ttl,
        }
    }
}

#[derive(Clone)]
struct Metrics {
    owned: IntGaugeVec,
    backlog: IntGaugeVec,
    rebalances: IntCounterVec,
    replicas: IntGaugeVec,
}

impl Metrics {
    fn register(r: &Registry) -> Result<Metrics, medallion_runtime::prometheus::Error> {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(g.clone()))?;
            Ok::<_, medallion_runtime::prometheus::Error>(g)
        };
        let rebalances = IntCounterVec::new(
            Opts::new(
                "medallion_rebalances_total",
                "Units this replica acquired, handed over or lost",
            ),
            &["stage", "kind"],
        )?;
        r.register(Box::new(rebalances.clone()))?;
        Ok(Metrics {
            owned: gauge(
                "medallion_unit_owned",
                "1 for each unit (product partition) this replica holds",
                &["stage", "product", "partition", "replica"],
            )?,
            backlog: gauge(
                "medallion_unit_backlog",
                "Upstream messages or versions of a unit not yet committed",
                &["stage", "product", "partition"],
            )?,
            rebalances,
            replicas: gauge(
                "medallion_stage_replicas",
                "Live replicas of the stage, as this replica sees them",
                &["stage"],
            )?,
        })
    }
}

struct Held {
    revision: u64,
    /// Past this, the lease may have expired on the server: not ours to use.
    valid_until: Instant,
    releasing: bool,
}

#[derive(Default)]
struct State {
    units: BTreeSet<UnitId>,
    held: BTreeMap<UnitId, Held>,
    /// Units the stage has finished with after a `Release`.
    released: BTreeSet<UnitId>,
    backlog: BTreeMap<UnitId, i64>,
    rebalances: u64,
    /// Shutting down: hand units back, take none.
    leaving: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

/// This replica's leases in one stage.
pub struct Ownership {
    stage: &'static str,
    replica: String,
    shared: Arc<Shared>,
    changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Ownership {
    /// Starts announcing the replica and managing its leases.
    pub fn start(
        owners: Owners,
        stage: &'static str,
        settings: &OwnershipSettings,
        registry: &Registry,
    ) -> Result<Ownership, medallion_runtime::prometheus::Error> {
        let metrics = Metrics::register(registry)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let manager = Manager {
            owners,
            stage,
            ttl: settings.ttl,
            lease: LeaseRecord {
                replica: settings.replica.clone(),
                instance: uuid::Uuid::new_v4().to_string(),
                since: chrono::Utc::now().to_rfc3339(),
            },
            shared: shared.clone(),
            tx,
            metrics,
        };
        let task = tokio::spawn(manager.run(stop.clone()));
        Ok(Ownership {
            stage,
            replica: settings.replica.clone(),
            shared,
            changes: rx,
            stop,
            task: Some(task),
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// The units the stage has (every partition of every product it runs).
    pub fn set_units(&self, units: BTreeSet<UnitId>) {
        let mut s = self.shared.state.lock().expect("not poisoned");
        if s.units != units {
            s.units = units;
            drop(s);
            self.shared.wake.notify_one();
        }
    }

    /// Work waiting for a unit, reported in `/metrics` and to the catalog.
    pub fn set_backlog(&self, unit: &UnitId, backlog: i64) {
        let mut s = self.shared.state.lock().expect("not poisoned");
        s.backlog.insert(unit.clone(), backlog);
    }

    /// The next change for the stage to act on (cancel-safe).
    pub async fn next_change(&mut self) -> Option<Change> {
        self.changes.recv().await
    }

    /// The stage has finished with a unit it was asked to release.
    pub fn released(&self, unit: &UnitId) {
        let mut s = self.shared.state.lock().expect("not poisoned");
        s.released.insert(unit.clone());
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Whether this replica may commit for `unit` now.
    pub fn holds(&self, unit: &UnitId) -> bool {
        let s = self.shared.state.lock().expect("not poisoned");
        s.held
            .get(unit)
            .is_some_and(|h| Instant::now() < h.valid_until)
    }

    /// A handle for tasks that work on units: [`OwnershipHandle::holds`] and
    /// [`OwnershipHandle::set_backlog`].
    pub fn handle(&self) -> OwnershipHandle {
        OwnershipHandle {
            shared: self.shared.clone(),
        }
    }

    /// Units held now.
    pub fn held(&self) -> BTreeSet<UnitId> {
        let s = self.shared.state.lock().expect("not poisoned");
        s.held.keys().cloned().collect()
    }

    /// The replica is shutting down: from now on it takes no unit, and
    /// leaves the member list so the others take its units as it hands them
    /// back.
    pub fn stop_acquiring(&self) {
        self.shared.state.lock().expect("not poisoned").leaving = true;
        self.shared.wake.notify_one();
    }

    /// Hands every lease back and leaves the stage: call after the stage has
    /// stopped working on its units (a graceful shutdown).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// What a unit's worker task may ask of the replica's ownership.
#[derive(Clone)]
pub struct OwnershipHandle {
    shared: Arc<Shared>,
}

impl OwnershipHandle {
    /// Whether this replica may commit for `unit` now.
    pub fn holds(&self, unit: &UnitId) -> bool {
        let s = self.shared.state.lock().expect("not poisoned");
        s.held
            .get(unit)
            .is_some_and(|h| Instant::now() < h.valid_until)
    }

    pub fn set_backlog(&self, unit: &UnitId, backlog: i64) {
        let mut s = self.shared.state.lock().expect("not poisoned");
        s.backlog.insert(unit.clone(), backlog);
    }
}

impl Ownership {
    /// Stops renewing without handing anything back, as a killed process
    /// would: the leases expire after the TTL.
    pub fn abandon(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        // After `abandon` the task is gone and nothing is handed back.
        if self.task.is_some() {
            self.stop.cancel();
        }
    }
}

/// How long a cycle that a change calls for waits for more changes.
const COALESCE: Duration = Duration::from_millis(50);

async fn next_owners_change(
    changes: &mut Option<futures::stream::BoxStream<'static, OwnersChange>>,
) -> Option<OwnersChange> {
    use futures::StreamExt;
    match changes {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// A change that may move units: a replica joins (its first heartbeat) or
/// leaves, or a lease is given back (perhaps to this replica). Renewals and
/// the heartbeats of known members change nothing.
fn worth_a_cycle(c: &OwnersChange, members: &mut BTreeSet<String>) -> bool {
    match c {
        OwnersChange::Member(m) => members.insert(m.clone()),
        OwnersChange::MemberLeft(m) => {
            members.remove(m);
            true
        }
        OwnersChange::Freed(_) => true,
        OwnersChange::Held(_) => false,
    }
}

struct Manager {
    owners: Owners,
    stage: &'static str,
    ttl: Duration,
    lease: LeaseRecord,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Change>,
    metrics: Metrics,
}

impl Manager {
    fn period(&self) -> Duration {
        self.ttl / 3
    }

    async fn run(self, stop: CancellationToken) {
        let started = chrono::Utc::now().to_rfc3339();
        let mut changes = None;
        let mut members = BTreeSet::new();
        'cycles: loop {
            if let Some(listed) = self.cycle(&started).await {
                // The listing also drops members that expired unseen, so
                // one that comes back under the same id counts as joining.
                members = listed;
            }
            if changes.is_none() {
                // Without it the stage still works, a period slower.
                changes = self.owners.watch(self.stage).await.ok();
            }
            let mut next = tokio::time::Instant::now() + self.period();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break 'cycles,
                    _ = tokio::time::sleep_until(next) => break,
                    _ = self.shared.wake.notified() => break,
                    c = next_owners_change(&mut changes) => match c {
                        // Soon, not at once: a rebalance frees several
                        // leases in a row, one cycle takes them all.
                        Some(c) if worth_a_cycle(&c, &mut members) => {
                            next = next.min(tokio::time::Instant::now() + COALESCE);
                        }
                        Some(_) => {}
                        None => changes = None,
                    },
                }
            }
        }
        self.leave().await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("not poisoned")
    }

    /// One renewal period's work; the stage's members, when listed.
    async fn cycle(&self, started: &str) -> Option<BTreeSet<String>> {
        self.renew().await;
        self.hand_back().await;
        if self.state().leaving {
            let _ = self.owners.leave(self.stage, &self.lease.replica).await;
            return None;
        }
        let member = {
            let s = self.state();
            MemberRecord {
                replica: self.lease.replica.clone(),
                instance: self.lease.instance.clone(),
                started_at: started.to_string(),
                units: s
                    .held
                    .keys()
                    .map(|u| UnitStatus {
                        unit: u.clone(),
                        backlog: s.backlog.get(u).copied().unwrap_or(-1),
                    })
                    .collect(),
                rebalances: s.rebalances,
            }
        };
        if let Err(e) = self.owners.heartbeat(self.stage, &member).await {
            warn!(stage = self.stage, error = %e, "cannot announce this replica; keeping the units it holds");
            return None;
        }
        let mut members: Vec<String> = match self.owners.members(self.stage).await {
            Ok(m) => m.into_iter().map(|m| m.replica).collect(),
            Err(e) => {
                warn!(stage = self.stage, error = %e, "cannot list the replicas of the stage");
                return None;
            }
        };
        if !members.contains(&self.lease.replica) {
            members.push(self.lease.replica.clone());
        }
        self.metrics
            .replicas
            .with_label_values(&[self.stage])
            .set(members.len() as i64);
        let units: Vec<UnitId> = self.state().units.iter().cloned().collect();
        let assignment = assign(&units, &members);
        let mine: BTreeSet<UnitId> = assignment
            .iter()
            .filter(|(_, m)| **m == self.lease.replica)
            .map(|(u, _)| (*u).clone())
            .collect();
        // Held but no longer ours (reassigned, or the product is gone).
        let to_release: Vec<UnitId> = {
            let mut s = self.state();
            let mut out = Vec::new();
            for (u, h) in s.held.iter_mut() {
                if !mine.contains(u) && !h.releasing {
                    h.releasing = true;
                    out.push(u.clone());
                }
            }
            out
        };
        for u in to_release {
            info!(stage = self.stage, unit = %u, "unit belongs to another replica now; handing it over");
            let _ = self.tx.send(Change::Release(u));
        }
        for u in mine {
            if self.state().held.contains_key(&u) {
                continue;
            }
            let asked = Instant::now();
            match self.owners.acquire(self.stage, &u, &self.lease).await {
                Ok(Some(revision)) => {
                    {
                        let mut s = self.state();
                        s.held.insert(
                            u.clone(),
                            Held {
                                revision,
                                valid_until: asked + self.valid_for(),
                                releasing: false,
                            },
                        );
                        s.rebalances += 1;
                    }
                    self.count(&u, true, "acquired");
                    info!(stage = self.stage, unit = %u, "unit acquired");
                    let _ = self.tx.send(Change::Acquired(u));
                }
                // Its previous holder has not handed it back yet.
                Ok(None) => {}
                Err(e) => warn!(stage = self.stage, unit = %u, error = %e, "cannot take the lease"),
            }
        }
        let s = self.state();
        for (u, b) in &s.backlog {
            if s.held.contains_key(u) {
                self.metrics
                    .backlog
                    .with_label_values(&[self.stage, &u.product_name(), &u.partition.to_string()])
                    .set(*b);
            }
        }
        Some(members.into_iter().collect())
    }

    /// How long a renewal sent now keeps the lease ours, with a margin for
    /// the server's expiry timer running a little ahead of ours.
    fn valid_for(&self) -> Duration {
        self.ttl.mul_f64(0.8)
    }

    async fn renew(&self) {
        let held: Vec<(UnitId, u64)> = self
            .state()
            .held
            .iter()
            .map(|(u, h)| (u.clone(), h.revision))
            .collect();
        for (u, revision) in held {
            let asked = Instant::now();
            match self
                .owners
                .renew(self.stage, &u, revision, &self.lease)
                .await
            {
                Ok(Some(rev)) => {
                    if let Some(h) = self.state().held.get_mut(&u) {
                        h.revision = rev;
                        h.valid_until = asked + self.valid_for();
                    }
                }
                Ok(None) => self.lose(&u, "the lease expired or was taken"),
                Err(e) => {
                    let expired = self
                        .state()
                        .held
                        .get(&u)
                        .is_none_or(|h| Instant::now() >= h.valid_until);
                    if expired {
                        self.lose(&u, &format!("the lease could not be renewed in time: {e}"));
                    } else {
                        warn!(stage = self.stage, unit = %u, error = %e, "cannot renew the lease; retrying");
                    }
                }
            }
        }
    }

    fn lose(&self, u: &UnitId, why: &str) {
        let was = self.state().held.remove(u).is_some();
        if was {
            warn!(stage = self.stage, unit = %u, reason = why, "unit lost");
            self.count(u, false, "lost");
            let _ = self.tx.send(Change::Lost(u.clone()));
        }
    }

    /// Deletes the leases of units the stage has finished with.
    async fn hand_back(&self) {
        let done: Vec<(UnitId, u64)> = {
            let mut s = self.state();
            let released = std::mem::take(&mut s.released);
            released
                .into_iter()
                .filter_map(|u| s.held.remove(&u).map(|h| (u, h.revision)))
                .collect()
        };
        for (u, revision) in done {
            if let Err(e) = self.owners.release(self.stage, &u, revision).await {
                warn!(stage = self.stage, unit = %u, error = %e, "cannot delete the lease; it expires on its own");
            }
            self.count(&u, false, "released");
            info!(stage = self.stage, unit = %u, "unit handed over");
        }
    }

    fn count(&self, u: &UnitId, owned: bool, kind: &str) {
        let labels = [
            self.stage,
            &u.product_name(),
            &u.partition.to_string(),
            &self.lease.replica,
        ];
        if owned {
            self.metrics.owned.with_label_values(&labels).set(1);
        } else {
            let _ = self.metrics.owned.remove_label_values(&labels);
            let _ = self.metrics.backlog.remove_label_values(&labels[..3]);
        }
        self.metrics
            .rebalances
            .with_label_values(&[self.stage, kind])
            .inc();
    }

    /// At shutdown: every lease back, and out of the member list, so the
    /// other replicas take over at their next cycle instead of after the TTL.
    async fn leave(&self) {
        let held: Vec<(UnitId, u64)> = {
            let mut s = self.state();
            std::mem::take(&mut s.held)
                .into_iter()
                .map(|(u, h)| (u, h.revision))
                .collect()
        };
        for (u, revision) in held {
            let _ = self.owners.release(self.stage, &u, revision).await;
            self.count(&u, false, "released");
        }
        let _ = self.owners.leave(self.stage, &self.lease.replica).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_leaves_and_given_back_leases_wake_the_manager_and_renewals_do_not() {
        let mut members = BTreeSet::from(["a".to_string()]);
        let u = UnitId::new("d", "p", 0);
        assert!(!worth_a_cycle(
            &OwnersChange::Member("a".into()),
            &mut members
        ));
        assert!(worth_a_cycle(
            &OwnersChange::Member("b".into()),
            &mut members
        ));
        assert!(!worth_a_cycle(
            &OwnersChange::Member("b".into()),
            &mut members
        ));
        assert!(!worth_a_cycle(&OwnersChange::Held(u.clone()), &mut members));
        assert!(worth_a_cycle(&OwnersChange::Freed(u), &mut members));
        assert!(worth_a_cycle(
            &OwnersChange::MemberLeft("b".into()),
            &mut members
        ));
        // Back under the same id after leaving: a join again.
        assert!(worth_a_cycle(
            &OwnersChange::Member("b".into()),
            &mut members
        ));
    }
}
