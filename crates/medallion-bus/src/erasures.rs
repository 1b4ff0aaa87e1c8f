//! Erasure requests (`medallion forget`): the KV bucket `medallion_erasures`
//! holds one entry per request under `<domain>.<product>.<id>`. The catalog
//! writes it (admin only, audited); the transform replica that maintains the
//! product applies it and writes the outcome back. Keeping the request in
//! NATS makes it durable: a stage killed in the middle finds it again on
//! restart and applies it once more, which changes nothing that is already
//! erased.
//!
//! The subject's value is in the entry only while the request is pending:
//! the finished entry keeps the digest the audit log shows, never the value.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{BusError, StreamSettings};

pub const ERASURES_BUCKET: &str = "medallion_erasures";

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureStatus {
    /// Written by the catalog; no stage has finished it yet.
    Pending,
    /// Every layer is rewritten and the old files and log entries are gone.
    Done,
    /// The request cannot be applied as asked (`progress` says why); the
    /// value is gone, as for a finished request.
    Failed,
}

/// What an erasure did: rows removed per table (`bronze` counts records
/// inside messages; Gold is recomputed, not edited).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErasureOutcome {
    /// Records (Bronze: records inside messages) or rows removed.
    pub rows_removed: BTreeMap<String, u64>,
    /// Bytes of data files written by the rewrites.
    pub bytes_rewritten: u64,
    /// Data files deleted from storage (rewritten, or older versions holding
    /// the subject).
    pub files_deleted: u64,
    /// Delta log entries deleted (their statistics may name the subject).
    pub log_entries_deleted: u64,
    /// Milliseconds spent applying it, summed over attempts.
    pub millis: u64,
}

/// One request, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub id: String,
    pub domain: String,
    pub product: String,
    /// The column that identifies the subject (a column of the spec's schema).
    pub column: String,
    /// The subject's value, as it appears in the raw records; `None` once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A keyed digest of `column=value`: lets an auditor match two requests
    /// for the same subject without the value being stored.
    pub digest: String,
    pub requested_by: String,
    /// RFC 3339.
    pub requested_at: String,
    pub status: ErasureStatus,
    /// The step in progress or the last error, for the requester.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ErasureOutcome>,
    /// RFC 3339, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The replica applying it, and when it last said so (ms since the
    /// epoch): another replica takes over a claim older than [`CLAIM_TTL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at_ms: Option<i64>,
}

/// How long a claim holds without being renewed (a replica killed while
/// applying a request gives it up after this).
pub const CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(20);

impl Erasure {
    pub fn key(&self) -> String {
        key(&self.domain, &self.product, &self.id)
    }
}

/// The bucket key of a request.
pub fn key(domain: &str, product: &str, id: &str) -> String {
    format!("{domain}.{product}.{id}")
}

fn err(message: impl ToString) -> BusError {
    BusError::Stream {
        stream: format!("KV_{ERASURES_BUCKET}"),
        message: message.to_string(),
    }
}

/// The erasure requests of every product.
#[derive(Clone)]
pub struct Erasures {
    kv: kv::Store,
}

impl Erasures {
    /// Opens the bucket, creating it on first use.
    pub async fn open(js: &jetstream::Context, s: &StreamSettings) -> Result<Erasures, BusError> {
        let kv = crate::attempts::open_bucket(
            js,
            kv::Config {
                bucket: ERASURES_BUCKET.into(),
                description: "Medallion erasure requests (medallion forget)".into(),
                // Only the latest state of a request: a pending entry holds
                // the subject's value, and no older revision may keep it.
                history: 1,
                num_replicas: s.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(err)?;
        Ok(Erasures { kv })
    }

    /// Stores a new request; fails if its id is taken.
    pub async fn create(&self, e: &Erasure) -> Result<u64, BusError> {
        let body = serde_json::to_vec(e).map_err(err)?;
        self.kv
            .create(e.key(), Bytes::from(body))
            .await
            .map_err(err)
    }

    /// A request and its revision.
    pub async fn get(
        &self,
        domain: &str,
        product: &str,
        id: &str,
    ) -> Result<Option<(u64, Erasure)>, BusError> {
        self.entry(&key(domain, product, id)).await
    }

    async fn entry(&self, key: &str) -> Result<Option<(u64, Erasure)>, BusError> {
        match self.kv.entry(key).await.map_err(err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let parsed: Erasure = serde_json::from_slice(&e.value).map_err(err)?;
                Ok(Some((e.revision, parsed)))
            }
            _ => Ok(None),
        }
    }

    /// Every request of one product (all products when `product` is `None`),
    /// oldest first.
    pub async fn list(
        &self,
        product: Option<(&str, &str)>,
    ) -> Result<Vec<(u64, Erasure)>, BusError> {
        let mut keys = match self.kv.keys().await {
            Ok(k) => k,
            // An empty bucket has no keys to list.
            Err(e) if e.to_string().contains("no keys") => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let prefix = product.map(|(d, p)| format!("{d}.{p}."));
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(err)?;
            if prefix.as_ref().is_none_or(|p| k.starts_with(p.as_str())) {
                names.push(k);
            }
        }
        let mut out = Vec::new();
        for k in names {
            if let Some(e) = self.entry(&k).await? {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.1.requested_at.cmp(&b.1.requested_at));
        Ok(out)
    }

    /// Writes a new state of a request if it is still at `revision`: the new
    /// revision, or `None` when someone else changed it first.
    pub async fn update(&self, e: &Erasure, revision: u64) -> Result<Option<u64>, BusError> {
        let body = serde_json::to_vec(e).map_err(err)?;
        match self.kv.update(e.key(), Bytes::from(body), revision).await {
            Ok(r) => Ok(Some(r)),
            Err(x) if x.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(x) => Err(err(x)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_request_keeps_no_value() {
        let mut e = Erasure {
            id: "x".into(),
            domain: "shop".into(),
            product: "orders".into(),
            column: "customer".into(),
            value: Some("alice@example.com".into()),
            digest: "d".into(),
            requested_by: "admin".into(),
            requested_at: "2026-12-07T00:00:00Z".into(),
            status: ErasureStatus::Pending,
            progress: None,
            outcome: None,
            finished_at: None,
            claimed_by: None,
            claimed_at_ms: None,
        };
        assert!(serde_json::to_string(&e).unwrap().contains("alice"));
        e.value = None;
        e.status = ErasureStatus::Done;
        let s = serde_json::to_string(&e).unwrap();
        assert!(!s.contains("alice") && s.contains("\"done\""), "{s}");
        assert_eq!(serde_json::from_str::<Erasure>(&s).unwrap(), e);
        assert_eq!(e.key(), "shop.orders.x");
    }
}
