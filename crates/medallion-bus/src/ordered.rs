//! Reading a stream in order, without acks, in pulls bounded in bytes.
//!
//! async-nats' ordered consumer asks for 500 messages per pull with no byte
//! bound. With 200 KB messages (1,000 events each) the server queued 100 MB
//! for the connection at once, passed its 64 MB `max_pending` and closed the
//! connection as a slow consumer; ingest then heard nothing until its idle
//! check re-read the stream (seen as 3.5–7 s for 2M events instead of ~1.5).
//! This is the same consumer (ephemeral, in memory, no acks, one delivery),
//! pulled the way the stage feeds pull, and the consumer sequence is checked
//! as the ordered consumer does: a gap ends the stream with an error, and
//! the caller reads again from where its table stands.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::pull::{self, OrderedConfig},
};
use futures::Stream;

use crate::BusError;

/// Messages per pull when they are small (one event each): as many as the
/// ordered consumer asked for, and twice that to halve the pull round trips.
const PULL_MESSAGES: usize = 1_000;
/// Bytes per pull when messages are big; at most ~1.5× of it is in flight
/// (the next pull goes out at half), far below the server's 64 MB.
const PULL_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OrderedReadError {
    #[error("{0}")]
    Pull(#[from] pull::MessagesError),
    #[error(
        "consumer sequence jumped from {after} to {got}: messages were lost on the way (a reconnect)"
    )]
    Gap { after: u64, got: u64 },
    #[error("a message without JetStream metadata ({0}): its place in the stream is unknown")]
    NoInfo(String),
}

/// The messages of `config`'s subjects in stream order; `max_payload` is the
/// server's, so a pull always has room for the biggest message.
pub async fn ordered_messages(
    stream: &jetstream::stream::Stream,
    config: OrderedConfig,
    max_payload: usize,
) -> Result<OrderedMessages, BusError> {
    let name = config.name.clone().unwrap_or_default();
    let err = |e: String| BusError::Consumer {
        consumer: name.clone(),
        stream: stream.cached_info().config.name.clone(),
        message: e,
    };
    let consumer = stream
        .create_consumer(pull::Config::from(config))
        .await
        .map_err(|e| err(e.to_string()))?;
    let inner = consumer
        .stream()
        .max_messages_per_batch(PULL_MESSAGES)
        .max_bytes_per_batch(pull_bytes(max_payload))
        .heartbeat(Duration::from_secs(15))
        .messages()
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(OrderedMessages {
        inner,
        last: 0,
        broken: false,
    })
}

/// A pull must fit one message (with its headers), or that message is
/// never sent; no more, so a server with a big `max_payload` does not get
/// the unbounded pull back.
fn pull_bytes(max_payload: usize) -> usize {
    PULL_BYTES.max(max_payload + (64 << 10))
}

pub struct OrderedMessages {
    inner: pull::Stream,
    /// Consumer sequence of the last message handed out.
    last: u64,
    broken: bool,
}

impl Stream for OrderedMessages {
    type Item = Result<jetstream::Message, OrderedReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.broken {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => {
                let got = match m.info() {
                    Ok(info) => info.consumer_sequence,
                    Err(e) => {
                        self.broken = true;
                        return Poll::Ready(Some(Err(OrderedReadError::NoInfo(e.to_string()))));
                    }
                };
                let after = self.last;
                if got != after + 1 {
                    self.broken = true;
                    return Poll::Ready(Some(Err(OrderedReadError::Gap { after, got })));
                }
                self.last = got;
                Poll::Ready(Some(Ok(m)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pull_bytes;

    #[test]
    fn a_pull_fits_the_biggest_message() {
        assert_eq!(pull_bytes(1 << 20), 16 << 20);
        assert_eq!(pull_bytes(32 << 20), (32 << 20) + (64 << 10));
    }
}
