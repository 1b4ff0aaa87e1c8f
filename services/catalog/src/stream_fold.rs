//! A view kept by folding a whole JetStream stream, from its start, forever.
//! After an interruption the view is rebuilt from the start (cleared first,
//! so counts are never doubled); retention bounds what it covers.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio::sync::RwLock;

/// Spawns the fold of `stream` into a fresh `T` with `apply` per message;
/// `headers_only` when the payloads are not needed.
pub fn follow<T, F>(
    js: jetstream::Context,
    stream: &'static str,
    headers_only: bool,
    mut apply: F,
) -> Arc<RwLock<T>>
where
    T: Default + Send + Sync + 'static,
    F: FnMut(&mut T, &jetstream::Message) + Send + 'static,
{
    let view: Arc<RwLock<T>> = Default::default();
    let v = view.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = fold(&js, stream, headers_only, &v, &mut apply).await {
                tracing::warn!(stream, error = %e, "stream fold interrupted; re-reading it");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    view
}

async fn fold<T: Default, F: FnMut(&mut T, &jetstream::Message)>(
    js: &jetstream::Context,
    stream: &str,
    headers_only: bool,
    view: &RwLock<T>,
    apply: &mut F,
) -> Result<(), String> {
    let consumer = js
        .get_stream(stream)
        .await
        .map_err(|e| e.to_string())?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            headers_only,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    *view.write().await = T::default();
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        apply(&mut *view.write().await, &m);
    }
    Err(format!("{stream} ended"))
}
