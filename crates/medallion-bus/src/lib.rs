//! The event bus every Medallion service shares: NATS connection settings,
//! the JetStream streams, Arrow IPC stage events and trace context headers.

pub mod attempts;
pub mod batching;
pub mod codec;
pub mod connect;
pub mod consumer;
pub mod dlq;
pub mod erasures;
mod error;
pub mod event;
pub mod headers;
pub mod horizon;
pub mod ordered;
pub mod ownership;
pub mod quality;
pub mod registry;
pub mod streams;
pub mod trace;

pub use connect::NatsSettings;
pub use error::BusError;
pub use event::{
    Announced, AssembledCommit, Commit, EventPart, Operation, PartsInFlight, announced, assemble,
    publish_commit,
};
pub use streams::{StreamSettings, ensure_streams};

/// The largest message the connected server accepts.
pub fn max_payload(client: &async_nats::Client) -> usize {
    client.server_info().max_payload
}

/// Connects and declares every stream: the first step of each service.
pub async fn connect_and_declare(
    nats: &NatsSettings,
    streams: &StreamSettings,
) -> Result<(async_nats::Client, async_nats::jetstream::Context), BusError> {
    let client = nats.connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    ensure_streams(&js, streams).await?;
    Ok((client, js))
}

/// Flushes pending publishes at shutdown, but never waits for an unreachable
/// server longer than `limit`: a SIGTERM must end the process.
pub async fn flush_for_shutdown(client: &async_nats::Client, limit: std::time::Duration) {
    if tokio::time::timeout(limit, client.flush()).await.is_err() {
        tracing::warn!("NATS flush at shutdown timed out; the server is unreachable");
    }
}
