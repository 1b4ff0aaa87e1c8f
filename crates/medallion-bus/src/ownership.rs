//! Who works on what: the units of work of each pipeline stage and the
//! replica that holds each, kept in the JetStream KV bucket `medallion_owners`.
//!
//! A unit is one partition of one product in one stage. Its lease is the key
//! `<stage>.unit.<domain>.<product>.<partition>`, taken with a create (which
//! JetStream refuses while the key exists), kept with compare-and-set updates
//! on the revision, and given back with a delete. The bucket's `max_age` is
//! the lease time-to-live: a replica that stops renewing loses its leases
//! and its membership (`<stage>.member.<replica>`) when the server expires
//! them, with no clean-up step. NATS (its raft groups on a cluster) is the
//! only arbiter; the Delta transaction check is the fence behind it for a
//! replica that lost a lease while committing.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{BusError, StreamSettings};

pub const OWNERS_BUCKET: &str = "medallion_owners";

/// One partition of one product in a stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitId {
    pub domain: String,
    pub product: String,
    pub partition: u32,
}

impl UnitId {
    pub fn new(domain: impl Into<String>, product: impl Into<String>, partition: u32) -> Self {
        UnitId {
            domain: domain.into(),
            product: product.into(),
            partition,
        }
    }

    /// `<domain>.<product>`.
    pub fn product_name(&self) -> String {
        format!("{}.{}", self.domain, self.product)
    }

    fn key_suffix(&self) -> String {
        format!("{}.{}.{}", self.domain, self.product, self.partition)
    }

    fn parse_suffix(s: &str) -> Option<UnitId> {
        let mut it = s.split('.');
        let (d, p, n) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        Some(UnitId::new(d, p, n.parse().ok()?))
    }
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}#{}", self.domain, self.product, self.partition)
    }
}

/// A live replica of a stage, as it last reported itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub replica: String,
    /// Distinguishes two processes that were given the same replica id.
    pub instance: String,
    pub started_at: String,
    /// Units it holds, with the work waiting for each.
    pub units: Vec<UnitStatus>,
    /// Units acquired or handed over since it started.
    pub rebalances: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub unit: UnitId,
    /// Upstream messages or versions not yet committed (-1: unknown).
    pub backlog: i64,
}

/// The value of a unit's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub replica: String,
    pub instance: String,
    pub since: String,
}

/// Every stage's members and leases, for operators.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OwnersView {
    pub members: Vec<(String, MemberRecord)>,
    pub leases: Vec<(String, UnitId, LeaseRecord)>,
}

/// One change in a stage's part of the owners bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnersChange {
    /// A replica announced itself (each heartbeat).
    Member(String),
    /// A replica left the stage (a graceful stop).
    MemberLeft(String),
    /// A unit's lease was taken or renewed.
    Held(UnitId),
    /// A unit's lease was given back.
    Freed(UnitId),
}

impl OwnersChange {
    fn of(e: &kv::Entry) -> Option<OwnersChange> {
        let mut it = e.key.splitn(3, '.');
        let (Some(_stage), Some(kind), Some(rest)) = (it.next(), it.next(), it.next()) else {
            return None;
        };
        let put = e.operation == kv::Operation::Put;
        match kind {
            "member" if put => Some(OwnersChange::Member(rest.to_string())),
            "member" => Some(OwnersChange::MemberLeft(rest.to_string())),
            "unit" => {
                let u = UnitId::parse_suffix(rest)?;
                Some(if put {
                    OwnersChange::Held(u)
                } else {
                    OwnersChange::Freed(u)
                })
            }
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Owners {
    kv: kv::Store,
    stream: jetstream::stream::Stream,
}

fn err(message: impl ToString) -> BusError {
    BusError::Stream {
        stream: format!("KV_{OWNERS_BUCKET}"),
        message: message.to_string(),
    }
}

fn member_key(stage: &str, replica: &str) -> String {
    format!("{stage}.member.{replica}")
}

fn unit_key(stage: &str, unit: &UnitId) -> String {
    format!("{stage}.unit.{}", unit.key_suffix())
}

/// A replica id as a KV key token: anything outside `[A-Za-z0-9_-]` becomes `-`.
pub fn replica_token(id: &str) -> String {
    let t: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if t.is_empty() { "replica".into() } else { t }
}

impl Owners {
    /// Opens the bucket, creating it with `ttl` as the lease time-to-live.
    /// An existing bucket keeps its own (every replica must be given the
    /// same `MEDALLION_LEASE_TTL`; a mismatch is logged).
    pub async fn open(
        js: &jetstream::Context,
        s: &StreamSettings,
        ttl: Duration,
    ) -> Result<Owners, BusError> {
        let kv = crate::attempts::open_bucket(
            js,
            kv::Config {
                bucket: OWNERS_BUCKET.into(),
                description: "Medallion: live replicas of each stage and the units they hold"
                    .into(),
                history: 1,
                max_age: ttl,
                num_replicas: s.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(err)?;
        let owners = Self::from_store(js, kv).await?;
        let mut stream = owners.stream.clone();
        if let Ok(info) = stream.info().await
            && info.config.max_age != ttl
        {
            tracing::warn!(
                bucket_ttl = ?info.config.max_age,
                configured = ?ttl,
                "the owners bucket was created with another lease TTL; it keeps its own (set MEDALLION_LEASE_TTL alike on every replica)"
            );
        }
        Ok(owners)
    }

    /// Opens the bucket for reading; `None` while no stage has created it.
    pub async fn open_existing(js: &jetstream::Context) -> Result<Option<Owners>, BusError> {
        match js.get_key_value(OWNERS_BUCKET).await {
            Ok(kv) => Ok(Some(Self::from_store(js, kv).await?)),
            Err(_) => Ok(None),
        }
    }

    async fn from_store(js: &jetstream::Context, kv: kv::Store) -> Result<Owners, BusError> {
        // Right after an R3 bucket is placed its stream's info request can
        // time out while the raft group elects a leader: wait as for streams.
        let stream = crate::streams::open_stream(js, &format!("KV_{OWNERS_BUCKET}")).await?;
        Ok(Owners { kv, stream })
    }

    /// How long an unrenewed lease lives (the bucket's `max_age`).
    pub async fn ttl(&self) -> Result<Duration, BusError> {
        let mut s = self.stream.clone();
        Ok(s.info().await.map_err(err)?.config.max_age)
    }

    /// Writes the replica's membership (also its liveness: it expires with the TTL).
    pub async fn heartbeat(&self, stage: &str, m: &MemberRecord) -> Result<(), BusError> {
        let value = serde_json::to_vec(m).map_err(err)?;
        self.kv
            .put(member_key(stage, &m.replica), value.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Leaves the stage at once (a graceful stop), instead of after the TTL.
    pub async fn leave(&self, stage: &str, replica: &str) -> Result<(), BusError> {
        self.kv
            .delete(member_key(stage, replica))
            .await
            .map_err(err)
    }

    /// The live members of a stage.
    pub async fn members(&self, stage: &str) -> Result<Vec<MemberRecord>, BusError> {
        Ok(self
            .entries(&format!("{stage}.member.*"))
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Takes a unit's lease if nobody holds it; its revision, or `None` when
    /// another replica does.
    pub async fn acquire(
        &self,
        stage: &str,
        unit: &UnitId,
        lease: &LeaseRecord,
    ) -> Result<Option<u64>, BusError> {
        let value = serde_json::to_vec(lease).map_err(err)?;
        match self.kv.create(unit_key(stage, unit), value.into()).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Renews a held lease; the new revision, or `None` when it was lost
    /// (expired, or taken since).
    pub async fn renew(
        &self,
        stage: &str,
        unit: &UnitId,
        revision: u64,
        lease: &LeaseRecord,
    ) -> Result<Option<u64>, BusError> {
        let value = serde_json::to_vec(lease).map_err(err)?;
        match self
            .kv
            .update(unit_key(stage, unit), value.into(), revision)
            .await
        {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Gives a held lease back, unless it changed hands already.
    pub async fn release(&self, stage: &str, unit: &UnitId, revision: u64) -> Result<(), BusError> {
        match self
            .kv
            .delete_expect_revision(unit_key(stage, unit), Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// A stage's members and leases as they change, so a replica acts on
    /// a join, a leave or a lease given back at once rather than at its next
    /// renewal. Expiries are not reported (a killed replica's keys just age
    /// out): the periodic listing finds those. Ends when the watch fails.
    pub async fn watch(
        &self,
        stage: &str,
    ) -> Result<futures::stream::BoxStream<'static, OwnersChange>, BusError> {
        let watch = self.kv.watch(format!("{stage}.>")).await.map_err(err)?;
        Ok(watch
            .take_while(|e| std::future::ready(e.is_ok()))
            .filter_map(|e| std::future::ready(e.ok().and_then(|e| OwnersChange::of(&e))))
            .boxed())
    }

    /// Every stage's live members and held leases.
    pub async fn view(&self) -> Result<OwnersView, BusError> {
        let mut view = OwnersView::default();
        for (key, value) in self.entries(">").await? {
            let mut it = key.splitn(3, '.');
            let (Some(stage), Some(kind), Some(rest)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            match kind {
                "member" => {
                    if let Ok(m) = serde_json::from_slice(&value) {
                        view.members.push((stage.to_string(), m));
                    }
                }
                "unit" => {
                    if let (Some(u), Ok(l)) =
                        (UnitId::parse_suffix(rest), serde_json::from_slice(&value))
                    {
                        view.leases.push((stage.to_string(), u, l));
                    }
                }
                _ => {}
            }
        }
        Ok(view)
    }

    /// Current (key, value) of every live key matching `filter` (a subject
    /// pattern below the bucket's prefix). Listed from the stream's subjects:
    /// a KV watch does not report keys that expire.
    async fn entries(&self, filter: &str) -> Result<Vec<(String, bytes::Bytes)>, BusError> {
        let prefix = format!("$KV.{OWNERS_BUCKET}.");
        let mut info = self
            .stream
            .clone()
            .info_with_subjects(format!("{prefix}{filter}"))
            .await
            .map_err(err)?;
        let mut subjects = Vec::new();
        while let Some(s) = info.next().await {
            subjects.push(s.map_err(err)?.0);
        }
        subjects.sort();
        let mut out = Vec::new();
        for subject in subjects {
            let key = subject
                .strip_prefix(&prefix)
                .unwrap_or(&subject)
                .to_string();
            // Expired between the listing and the read, or deleted: not live.
            if let Ok(Some(e)) = self.kv.entry(key.clone()).await
                && e.operation == kv::Operation::Put
            {
                out.push((key, e.value));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_keys_round_trip() {
        let u = UnitId::new("finance", "card_payments", 3);
        assert_eq!(
            unit_key("transform", &u),
            "transform.unit.finance.card_payments.3"
        );
        assert_eq!(UnitId::parse_suffix(&u.key_suffix()), Some(u.clone()));
        assert_eq!(u.to_string(), "finance.card_payments#3");
        assert_eq!(UnitId::parse_suffix("a.b"), None);
        assert_eq!(UnitId::parse_suffix("a.b.x"), None);
    }

    #[test]
    fn replica_ids_become_key_tokens() {
        assert_eq!(
            replica_token("medallion-transform-7d9f-x2"),
            "medallion-transform-7d9f-x2"
        );
        assert_eq!(replica_token("host.example:41"), "host-example-41");
        assert_eq!(replica_token(""), "replica");
    }
}
