//! A busy reader of big messages keeps its connection: pulls are bounded in
//! bytes, so the server never queues past its `max_pending` for the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use medallion_bus::ordered::{OrderedReadError, ordered_messages};
use medallion_testkit::NatsServer;

const MESSAGES: usize = 240;
const SIZE: usize = 500 << 10;

// One thread, blocked now and then: the connection's reader does not run
// either, as on a machine whose cores are all busy, so whatever the server
// sends piles up on its side.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_reader_of_big_messages_is_not_cut_off() {
    let nats = NatsServer::start();
    let disconnects = Arc::new(AtomicUsize::new(0));
    let seen = disconnects.clone();
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if matches!(e, async_nats::Event::Disconnected) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "BIG".into(),
            subjects: vec!["big.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // 120 MB waiting: an unbounded pull of 500 queues all of it at once.
    let mut acks = Vec::new();
    for i in 0..MESSAGES {
        let mut body = vec![b'x'; SIZE];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        acks.push(js.publish("big.a", body.into()).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    let mut messages = ordered_messages(
        &stream,
        OrderedConfig {
            name: Some("reader".into()),
            filter_subjects: vec!["big.a".into()],
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        },
        client.server_info().max_payload,
    )
    .await
    .unwrap();
    for i in 0..MESSAGES {
        let m = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} never came"))
            .expect("the stream goes on")
            .expect("no gap");
        assert_eq!(
            u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
            i as u64
        );
        if i % 40 == 0 {
            // A commit in progress, encoding on this thread.
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    assert_eq!(
        disconnects.load(Ordering::SeqCst),
        0,
        "the server cut the reader off"
    );
}

#[test]
fn a_gap_names_both_sequences() {
    let e = OrderedReadError::Gap { after: 7, got: 9 };
    assert!(e.to_string().contains("from 7 to 9"));
}
