//! Leases against a real nats-server: replicas share the units evenly, at
//! most one holds a unit at a time, a dead replica's units move within the
//! TTL, a stopped one hands its units over at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use medallion_bus::StreamSettings;
use medallion_bus::ownership::{Owners, UnitId};
use medallion_stage::{Change, Ownership, OwnershipSettings};
use medallion_testkit::NatsServer;

const TTL: Duration = Duration::from_secs(3);

fn units(products: usize, partitions: u32) -> BTreeSet<UnitId> {
    (0..products)
        .flat_map(|p| (0..partitions).map(move |k| UnitId::new("d", format!("p{p}"), k)))
        .collect()
}

async fn owners(url: &str) -> Owners {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    Owners::open(&js, &StreamSettings::default(), TTL)
        .await
        .unwrap()
}

/// A replica that does what a stage does with its changes: holds what it
/// acquires, gives back what it is asked to.
struct Replica {
    name: String,
    ownership: Ownership,
    held: BTreeSet<UnitId>,
    /// Units acquired, in order, with when.
    acquired: Vec<(UnitId, Instant)>,
    _registry: medallion_runtime::prometheus::Registry,
}

impl Replica {
    async fn start(url: &str, name: &str, all: &BTreeSet<UnitId>) -> Replica {
        let registry = medallion_runtime::prometheus::Registry::new();
        let ownership = Ownership::start(
            owners(url).await,
            "transform",
            &OwnershipSettings {
                replica: name.into(),
                ttl: TTL,
            },
            &registry,
        )
        .unwrap();
        ownership.set_units(all.clone());
        Replica {
            name: name.into(),
            ownership,
            held: BTreeSet::new(),
            acquired: Vec::new(),
            _registry: registry,
        }
    }

    /// Acts on every change that comes within `d`.
    async fn pump(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while let Ok(Some(c)) = tokio::time::timeout_at(until, self.ownership.next_change()).await {
            match c {
                Change::Acquired(u) => {
                    assert!(
                        self.held.insert(u.clone()),
                        "{} acquired {u} twice",
                        self.name
                    );
                    self.acquired.push((u, Instant::now()));
                }
                Change::Release(u) => {
                    self.held.remove(&u);
                    self.ownership.released(&u);
                }
                Change::Lost(u) => {
                    self.held.remove(&u);
                }
            }
        }
    }
}

async fn pump_all(replicas: &mut [Replica], d: Duration) {
    let step = Duration::from_millis(100) / replicas.len() as u32;
    let until = Instant::now() + d;
    while Instant::now() < until {
        for r in replicas.iter_mut() {
            r.pump(step).await;
        }
        assert_disjoint(replicas);
    }
}

fn assert_disjoint(replicas: &[Replica]) {
    let mut seen: BTreeMap<&UnitId, &str> = BTreeMap::new();
    for r in replicas {
        for u in &r.held {
            if let Some(other) = seen.insert(u, &r.name) {
                panic!("{u} held by {other} and {} at once", r.name);
            }
        }
    }
}

fn loads(replicas: &[Replica]) -> Vec<usize> {
    replicas.iter().map(|r| r.held.len()).collect()
}

fn balanced(replicas: &[Replica], total: usize) -> bool {
    let l = loads(replicas);
    l.iter().sum::<usize>() == total && l.iter().max().unwrap() - l.iter().min().unwrap() <= 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_units_evenly_and_take_over_from_the_dead_and_the_departed() {
    let nats = NatsServer::start();
    let all = units(6, 4);
    let mut rs = vec![
        Replica::start(&nats.url(), "a", &all).await,
        Replica::start(&nats.url(), "b", &all).await,
        Replica::start(&nats.url(), "c", &all).await,
    ];
    // Spread within a few renewal periods, then stable.
    let started = Instant::now();
    while !balanced(&rs, all.len()) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not balanced: {:?}",
            loads(&rs)
        );
        pump_all(&mut rs, Duration::from_millis(300)).await;
    }
    assert_eq!(loads(&rs), vec![8, 8, 8]);
    pump_all(&mut rs, Duration::from_secs(3)).await;
    assert!(
        balanced(&rs, all.len()),
        "moved while stable: {:?}",
        loads(&rs)
    );

    // A fourth replica joins: it gets a fair share, nobody holds a unit twice.
    rs.push(Replica::start(&nats.url(), "d", &all).await);
    let joined = Instant::now();
    while !balanced(&rs, all.len()) {
        assert!(
            joined.elapsed() < Duration::from_secs(15),
            "join: {:?}",
            loads(&rs)
        );
        pump_all(&mut rs, Duration::from_millis(300)).await;
    }
    assert_eq!(loads(&rs), vec![6, 6, 6, 6]);
    eprintln!("join rebalanced in {:?}", joined.elapsed());

    // "c" dies (its task stops renewing without giving anything back).
    let dead = rs.remove(2);
    let orphaned = dead.held.clone();
    dead.ownership.abandon();
    let died = Instant::now();
    while !balanced(&rs, all.len()) {
        assert!(died.elapsed() < TTL * 4, "after a death: {:?}", loads(&rs));
        pump_all(&mut rs, Duration::from_millis(300)).await;
    }
    let took = died.elapsed();
    eprintln!("death rebalanced in {took:?}");
    for u in &orphaned {
        assert!(rs.iter().any(|r| r.held.contains(u)), "{u} has no owner");
    }

    // "d" stops gracefully: its units are back at once, not after the TTL.
    let d = rs.pop().unwrap();
    let handed = d.held.clone();
    d.ownership.shutdown().await;
    let left = Instant::now();
    while !balanced(&rs, all.len()) {
        assert!(
            left.elapsed() < TTL,
            "graceful leave took longer than the TTL: {:?}",
            loads(&rs)
        );
        pump_all(&mut rs, Duration::from_millis(200)).await;
    }
    eprintln!("graceful leave rebalanced in {:?}", left.elapsed());
    for u in &handed {
        assert!(rs.iter().any(|r| r.held.contains(u)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_reports_joins_leaves_and_leases_given_back() {
    use futures::StreamExt;
    use medallion_bus::ownership::{LeaseRecord, MemberRecord, OwnersChange};
    let nats = NatsServer::start();
    let o = owners(&nats.url()).await;
    let mut changes = o.watch("transform").await.unwrap();
    let u = UnitId::new("finance", "payments", 1);
    let member = MemberRecord {
        replica: "a".into(),
        instance: "i".into(),
        started_at: "now".into(),
        units: vec![],
        rebalances: 0,
    };
    let lease = LeaseRecord {
        replica: "a".into(),
        instance: "i".into(),
        since: "now".into(),
    };
    o.heartbeat("transform", &member).await.unwrap();
    // Another stage's keys are not this stage's business.
    o.heartbeat("aggregate", &member).await.unwrap();
    let rev = o.acquire("transform", &u, &lease).await.unwrap().unwrap();
    o.release("transform", &u, rev).await.unwrap();
    o.leave("transform", "a").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let c = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("a change within 5 s")
            .expect("the watch goes on");
        seen.push(c);
    }
    assert_eq!(
        seen,
        vec![
            OwnersChange::Member("a".into()),
            OwnersChange::Held(u.clone()),
            OwnersChange::Freed(u),
            OwnersChange::MemberLeft("a".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_refused_while_held_and_taken_once_it_expires() {
    let nats = NatsServer::start();
    let o = owners(&nats.url()).await;
    let u = UnitId::new("finance", "payments", 0);
    let lease = |r: &str| medallion_bus::ownership::LeaseRecord {
        replica: r.into(),
        instance: r.into(),
        since: "now".into(),
    };
    let rev = o
        .acquire("transform", &u, &lease("a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.acquire("transform", &u, &lease("b")).await.unwrap(), None);
    let rev2 = o
        .renew("transform", &u, rev, &lease("a"))
        .await
        .unwrap()
        .unwrap();
    // A stale revision cannot renew: someone else's write is in between.
    assert_eq!(
        o.renew("transform", &u, rev, &lease("a")).await.unwrap(),
        None
    );
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert_eq!(
        o.renew("transform", &u, rev2, &lease("a")).await.unwrap(),
        None,
        "expired"
    );
    let rev3 = o
        .acquire("transform", &u, &lease("b"))
        .await
        .unwrap()
        .unwrap();
    o.release("transform", &u, rev3).await.unwrap();
    assert!(
        o.acquire("transform", &u, &lease("a"))
            .await
            .unwrap()
            .is_some(),
        "released"
    );
    let view = o.view().await.unwrap();
    assert_eq!(view.leases.len(), 1);
    assert_eq!(view.leases[0].2.replica, "a");
}
