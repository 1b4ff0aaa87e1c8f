//! Unit feeds against a real nats-server: a unit being handed over gets its
//! last messages and its end out ahead of a busy replica's backlog of other
//! units' messages, so a handover does not wait for that backlog.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use medallion_bus::batching::BatchLimits;
use medallion_bus::ownership::UnitId;
use medallion_stage::feed::{Feeds, unit_consumer};
use medallion_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const BUSY: usize = 1_000;
const LEAVING: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_unit_ends_ahead_of_the_other_units_backlog() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "FEEDS".into(),
        subjects: vec!["feeds.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for (subject, n) in [("feeds.busy", BUSY), ("feeds.leaving", LEAVING)] {
        for i in 0..n {
            js.publish(subject, format!("{i}").into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let busy = UnitId::new("d", "busy", 0);
    let leaving = UnitId::new("d", "leaving", 0);
    let consumer = async |u: &UnitId, subject: &str| {
        unit_consumer(
            &js,
            "FEEDS",
            "test",
            u,
            subject.into(),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    };
    let mut feeds = Feeds::new(BatchLimits {
        messages: 20,
        bytes: 1 << 30,
        wait: Duration::from_millis(10),
    });
    // The busy unit fills the channel first; the leaving unit's messages
    // (and, once it is stopped, its end) wait behind them.
    feeds.start(busy.clone(), consumer(&busy, "feeds.busy").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    feeds.start(leaving.clone(), consumer(&leaving, "feeds.leaving").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    feeds.stop(&leaving);
    // Its fetch in hand expires (1 s) while nothing is read.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let never = CancellationToken::new();
    let (mut busy_out, mut leaving_out) = (0, 0);
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(10), feeds.next(&never))
            .await
            .expect("a batch within 10 s")
            .expect("feeds never close");
        for (u, m) in &batch.messages {
            if *u == leaving {
                assert_eq!(m.payload, format!("{leaving_out}").as_bytes(), "in order");
                leaving_out += 1;
            } else {
                busy_out += 1;
            }
        }
        if batch.ended.contains(&leaving) {
            break;
        }
    }
    eprintln!("the stopping unit ended after {busy_out} messages of the busy one");
    assert_eq!(
        leaving_out, LEAVING,
        "every message it pulled, before its end"
    );
    // Behind one channel shared by the units, its end came after the 400
    // busy messages queued ahead of it.
    assert!(
        busy_out < 200,
        "the stopping unit waited for {busy_out} messages of another unit"
    );
    assert!(feeds.is_running(&busy));
    assert!(!feeds.is_running(&leaving));
    // The busy unit's messages all come after, none lost, in order.
    while busy_out < BUSY {
        let batch = tokio::time::timeout(Duration::from_secs(10), feeds.next(&never))
            .await
            .expect("a batch within 10 s")
            .expect("feeds never close");
        for (u, m) in &batch.messages {
            assert_eq!(*u, busy);
            assert_eq!(m.payload, format!("{busy_out}").as_bytes(), "in order");
            busy_out += 1;
        }
    }
    feeds.kill_all();
}
