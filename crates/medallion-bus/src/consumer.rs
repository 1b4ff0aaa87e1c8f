//! The durable consumer a downstream stage reads its upstream events with.
//!
//! Events are triggers plus a fast path for the rows: the stage's own cursor
//! is the transaction version in its output table, so an event is acked once
//! its version is processed or known to be covered, and any event lost to
//! retention or a crash is made up by reading the upstream table.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};

use crate::BusError;

pub async fn stage_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    ack_wait: Duration,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let err = |e: String| BusError::Consumer {
        consumer: durable.to_string(),
        stream: stream.to_string(),
        message: e,
    };
    let s = crate::streams::open_stream(js, stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    crate::streams::while_cluster_settles(durable, || {
        s.create_consumer(pull::Config {
            durable_name: Some(durable.to_string()),
            filter_subject: filter.to_string(),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 10_000,
            ..Default::default()
        })
    })
    .await
    .map_err(|e| err(e.to_string()))
}

/// Bytes the server may send per pull request. Unbounded (the client's
/// default), a backlog of big events was sent all at once while the stage
/// was busy, and some messages of it were not delivered to the stream
/// (seen as gaps in the stream sequences, redelivered only after the ack
/// wait): the stage read those versions back from the table instead.
const PULL_BYTES: usize = 16 << 20;

/// The consumer's messages, fetched in pulls of at most [`PULL_BYTES`].
pub async fn pull_messages(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
) -> Result<pull::Stream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(200)
        .max_bytes_per_batch(PULL_BYTES)
        .heartbeat(Duration::from_secs(15))
        .messages()
        .await
}
