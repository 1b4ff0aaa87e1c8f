//! Micro-batches from a JetStream message stream, bounded by count, bytes and time.

use std::time::Duration;

use async_nats::jetstream::Message;
use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub messages: usize,
    pub bytes: usize,
    pub wait: Duration,
}

/// Why [`next_batch`] returned.
pub enum Batch {
    /// Messages to process (never empty).
    Messages(Vec<Message>),
    /// Shutdown was requested while waiting for the first message.
    Shutdown,
    /// The message stream failed or ended; messages gathered so far come along.
    Broken(Vec<Message>, String),
    /// No message for the idle period given to [`next_batch_or_idle`].
    Idle,
}

/// Waits for a first message, then gathers more until a limit is reached or
/// `limits.wait` has passed since the first one arrived.
pub async fn next_batch<S, E>(
    stream: &mut S,
    limits: BatchLimits,
    shutdown: &CancellationToken,
) -> Batch
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    next_batch_or_idle(stream, limits, None, shutdown).await
}

/// [`next_batch`], but returns [`Batch::Idle`] when no first message comes
/// within `idle`, so the caller can check that its consumer is still live.
pub async fn next_batch_or_idle<S, E>(
    stream: &mut S,
    limits: BatchLimits,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
) -> Batch
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let idle = async {
        match idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let first = tokio::select! {
        _ = shutdown.cancelled() => return Batch::Shutdown,
        _ = idle => return Batch::Idle,
        m = stream.next() => m,
    };
    let first = match first {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Batch::Broken(Vec::new(), e.to_string()),
        None => return Batch::Broken(Vec::new(), "message stream ended".into()),
    };
    let deadline = Instant::now() + limits.wait;
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < limits.messages && bytes < limits.bytes {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => break,
            Ok(Some(Ok(m))) => {
                bytes += m.payload.len();
                batch.push(m);
            }
            Ok(Some(Err(e))) => return Batch::Broken(batch, e.to_string()),
            Ok(None) => return Batch::Broken(batch, "message stream ended".into()),
        }
    }
    Batch::Messages(batch)
}

impl BatchLimits {
    pub fn from_env(env: &mut medallion_runtime::EnvReader) -> Self {
        BatchLimits {
            messages: env.usize("MEDALLION_BATCH_ROWS", 1),
            bytes: env.usize("MEDALLION_BATCH_BYTES", 1024),
            wait: env.duration("MEDALLION_BATCH_WAIT"),
        }
    }
}
