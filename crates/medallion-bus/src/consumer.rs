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
