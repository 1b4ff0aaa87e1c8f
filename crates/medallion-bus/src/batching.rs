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

/// A micro-batch being filled, kept across calls of [`Batcher::next`]: a
/// service's `select!` also waits for ticks and spec changes, and a
/// [`next_batch`] future dropped mid-batch loses the messages it pulled (they
/// come back only after the ack wait, and the tick reads their versions from
/// the table without their traces). Polling `stream.next()` is cancel-safe,
/// so keeping the rest here makes `next` cancel-safe.
pub struct Batcher<S> {
    pub stream: S,
    limits: BatchLimits,
    pending: Vec<Message>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl<S, E> Batcher<S>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(stream: S, limits: BatchLimits) -> Self {
        Batcher {
            stream,
            limits,
            pending: Vec::new(),
            bytes: 0,
            deadline: None,
        }
    }

    /// The same batches as [`next_batch`], cancel-safe.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Batch {
        loop {
            if !self.pending.is_empty()
                && (self.pending.len() >= self.limits.messages || self.bytes >= self.limits.bytes)
            {
                return Batch::Messages(self.take());
            }
            let item = match self.deadline {
                None => tokio::select! {
                    _ = shutdown.cancelled() => return Batch::Shutdown,
                    m = self.stream.next() => m,
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, self.stream.next()).await
                {
                    Err(_) => return Batch::Messages(self.take()),
                    Ok(m) => m,
                },
            };
            match item {
                Some(Ok(m)) => {
                    if self.deadline.is_none() {
                        self.deadline = Some(Instant::now() + self.limits.wait);
                    }
                    self.bytes += m.payload.len();
                    self.pending.push(m);
                }
                Some(Err(e)) => return Batch::Broken(self.take(), e.to_string()),
                None => return Batch::Broken(self.take(), "message stream ended".into()),
            }
        }
    }

    fn take(&mut self) -> Vec<Message> {
        self.deadline = None;
        self.bytes = 0;
        std::mem::take(&mut self.pending)
    }
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
