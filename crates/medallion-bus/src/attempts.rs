//! The attempts ledger: how many times a stage has started on the same piece
//! of work without getting past it, kept in the JetStream KV bucket
//! `medallion_attempts` so it survives the process.
//!
//! A panic is caught in-process, but a record that aborts the process, blows
//! the stack or gets it OOM-killed leaves nothing behind but a restart that
//! would meet the same record again, forever. Before each unit of work a
//! stage records where it starts (`begin`); finding the same start already
//! recorded means an earlier process died on it, and the stage can switch to
//! a careful mode (transform: check the work in a child process first and
//! dead-letter what kills the child). Moving past the start makes the next
//! `begin` overwrite the entry, so no cleanup step is needed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::{BusError, StreamSettings};

pub const ATTEMPTS_BUCKET: &str = "medallion_attempts";

/// Opens a KV bucket, creating it on first use. Servers in a fresh cluster
/// may not have elected a leader yet, hence the retries.
pub async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, String> {
    // As long as stream declarations wait (a cluster electing its meta
    // leader or learning its peers refuses or times out for a while):
    // twenty quick tries were not always enough for R3 buckets.
    let started = std::time::Instant::now();
    let mut attempt: u64 = 0;
    loop {
        let error = match js.get_key_value(&config.bucket).await {
            Ok(kv) => return Ok(kv),
            Err(_) => match js.create_key_value(config.clone()).await {
                Ok(kv) => return Ok(kv),
                Err(e) => e.to_string(),
            },
        };
        attempt += 1;
        if started.elapsed() >= crate::streams::CLUSTER_WAIT {
            return Err(error);
        }
        if attempt % 10 == 0 {
            tracing::warn!(bucket = %config.bucket, %error, attempt, "JetStream cannot place the bucket yet; waiting for the cluster");
        }
        tokio::time::sleep(Duration::from_millis(100 * attempt.min(10))).await;
    }
}

#[derive(Clone)]
pub struct Attempts {
    kv: kv::Store,
    /// The start this process last recorded per key, and its count. Only the
    /// first `begin` of a key in a process can find a predecessor's entry;
    /// after that the entry is ours, and beginning the same start again is
    /// this process retrying (a failed commit), not another death: it keeps
    /// the count it had.
    mine: Arc<Mutex<HashMap<String, (String, u32)>>>,
}

impl Attempts {
    pub async fn open(js: &jetstream::Context, s: &StreamSettings) -> Result<Attempts, BusError> {
        let kv = open_bucket(
            js,
            kv::Config {
                bucket: ATTEMPTS_BUCKET.into(),
                description:
                    "Medallion: where each stage last started work it may not have finished".into(),
                history: 1,
                num_replicas: s.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(|message| BusError::Stream {
            stream: format!("KV_{ATTEMPTS_BUCKET}"),
            message,
        })?;
        Ok(Attempts {
            kv,
            mine: Default::default(),
        })
    }

    /// Records that work on `key` starts at `start` and returns the number of
    /// processes that have begun it: 1, unless earlier processes started at
    /// the same `start` and died before beginning anything after it.
    pub async fn begin(&self, key: &str, start: &str) -> Result<u32, BusError> {
        let err = |e: &dyn std::fmt::Display| BusError::Stream {
            stream: format!("KV_{ATTEMPTS_BUCKET}"),
            message: format!("{key}: {e}"),
        };
        let known = self.mine.lock().expect("not poisoned").get(key).cloned();
        let n = match known {
            Some((s, n)) if s == start => return Ok(n),
            Some(_) => 1,
            None => {
                let earlier = self.kv.get(key).await.map_err(|e| err(&e))?;
                earlier
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| parse(v, start))
                    .unwrap_or(0)
                    + 1
            }
        };
        self.kv
            .put(key, format!("{n} {start}").into())
            .await
            .map_err(|e| err(&e))?;
        self.mine
            .lock()
            .expect("not poisoned")
            .insert(key.to_string(), (start.to_string(), n));
        Ok(n)
    }
}

/// The count stored for `start`, if the entry is about that start.
fn parse(value: &str, start: &str) -> Option<u32> {
    let (n, s) = value.split_once(' ')?;
    (s == start).then(|| n.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_the_same_start() {
        assert_eq!(super::parse("3 17", "17"), Some(3));
        assert_eq!(super::parse("3 17", "18"), None);
        assert_eq!(super::parse("garbage", "17"), None);
        assert_eq!(super::parse("x 17", "17"), None);
    }
}
