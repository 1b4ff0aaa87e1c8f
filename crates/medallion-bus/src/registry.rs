//! The product registry: every DataProduct spec, stored in the JetStream KV
//! bucket `medallion_products` under `<domain>.<product>`, one revision per
//! change (the bucket keeps the last 64 per product). The catalog is the only
//! writer; transform and aggregate watch it and hot-reload. Keeping it in
//! NATS means no extra database to run, and replicas of every service see
//! the same version.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Notify;
use tracing::warn;

use crate::{BusError, StreamSettings};

pub const PRODUCTS_BUCKET: &str = "medallion_products";
const HISTORY: i64 = 64;

/// The registry key of a product.
pub fn key(domain: &str, product: &str) -> String {
    format!("{domain}.{product}")
}

/// One stored version of a spec.
#[derive(Debug, Clone)]
pub struct SpecVersion {
    pub revision: u64,
    /// The document as registered; `None` for a deletion.
    pub document: Option<String>,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Why a conditional write did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// Someone else changed the product since `expected` was read.
    Conflict,
    Bus(BusError),
}

#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
}

fn err(message: impl ToString) -> BusError {
    BusError::Stream {
        stream: format!("KV_{PRODUCTS_BUCKET}"),
        message: message.to_string(),
    }
}

impl Registry {
    /// Opens the bucket, creating it on first use.
    pub async fn open(js: &jetstream::Context, s: &StreamSettings) -> Result<Registry, BusError> {
        let kv = crate::attempts::open_bucket(
            js,
            kv::Config {
                bucket: PRODUCTS_BUCKET.into(),
                description: "Medallion DataProduct specs, one revision per change".into(),
                history: HISTORY,
                num_replicas: s.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(err)?;
        Ok(Registry { kv })
    }

    /// The current document of every registered product, by key.
    pub async fn documents(&self) -> Result<BTreeMap<String, String>, BusError> {
        let mut keys = self.kv.keys().await.map_err(err)?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(err)?);
        }
        let mut out = BTreeMap::new();
        for k in names {
            if let Some(e) = self.current(&k).await? {
                out.insert(k, e.1);
            }
        }
        Ok(out)
    }

    /// The current `(revision, document)` of a key; `None` if absent or deleted.
    pub async fn current(&self, key: &str) -> Result<Option<(u64, String)>, BusError> {
        match self.kv.entry(key).await.map_err(err)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((
                e.revision,
                String::from_utf8_lossy(&e.value).into_owned(),
            ))),
            _ => Ok(None),
        }
    }

    /// Writes `document` if the product is still at `expected` (`None`: not
    /// registered); returns the new revision.
    pub async fn write(
        &self,
        key: &str,
        document: &str,
        expected: Option<u64>,
    ) -> Result<u64, WriteError> {
        let value = Bytes::from(document.to_string());
        let result = match expected {
            Some(rev) => self
                .kv
                .update(key, value, rev)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => WriteError::Conflict,
                    _ => WriteError::Bus(err(e)),
                }),
            None => self
                .kv
                .create(key, value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => WriteError::Conflict,
                    _ => WriteError::Bus(err(e)),
                }),
        };
        result
    }

    /// Unregisters a product (its history stays until the bucket's limit).
    pub async fn delete(&self, key: &str, expected: u64) -> Result<(), WriteError> {
        self.kv
            .delete_expect_revision(key, Some(expected))
            .await
            .map_err(|e| match e.kind() {
                kv::DeleteErrorKind::WrongLastRevision => WriteError::Conflict,
                _ => WriteError::Bus(err(e)),
            })
    }

    /// Every stored version of a product, oldest first.
    pub async fn history(&self, key: &str) -> Result<Vec<SpecVersion>, BusError> {
        let mut h = self.kv.history(key).await.map_err(err)?;
        let mut out = Vec::new();
        while let Some(e) = h.next().await {
            let e = e.map_err(err)?;
            out.push(SpecVersion {
                revision: e.revision,
                document: (e.operation == kv::Operation::Put)
                    .then(|| String::from_utf8_lossy(&e.value).into_owned()),
                at: chrono::DateTime::from_timestamp(
                    e.created.unix_timestamp(),
                    e.created.nanosecond(),
                )
                .unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// A signal raised on every change, from a background watch that
    /// re-subscribes after a disconnect. Readers re-read [`documents`]
    /// (Self::documents) when woken; a periodic re-read covers a missed wake.
    pub fn changes(&self) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let (kv, n) = (self.kv.clone(), notify.clone());
        tokio::spawn(async move {
            loop {
                match kv.watch_all().await {
                    Ok(mut w) => {
                        while let Some(e) = w.next().await {
                            if e.is_err() {
                                break;
                            }
                            n.notify_one();
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot watch the product registry; retrying"),
                }
                // Anything missed while away is picked up by the periodic re-read.
                n.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        notify
    }
}

/// Where a pipeline service takes its product specs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecOrigin {
    /// The catalog's registry (production).
    Registry,
    /// A folder read directly, for running a service without a catalog.
    Folder(PathBuf),
}

impl SpecOrigin {
    pub fn from_env(env: &mut medallion_runtime::EnvReader) -> SpecOrigin {
        let folder = env
            .path("MEDALLION_PRODUCTS")
            .unwrap_or_else(|| PathBuf::from("./products"));
        match env.optional("MEDALLION_SPEC_SOURCE").as_deref() {
            None | Some("registry") => SpecOrigin::Registry,
            Some("folder") => SpecOrigin::Folder(folder),
            Some(other) => {
                env.invalid(
                    "MEDALLION_SPEC_SOURCE",
                    format!("{other:?} is not a spec source; use `registry` (the catalog's, default) or `folder` (MEDALLION_PRODUCTS, no catalog)"),
                );
                SpecOrigin::Registry
            }
        }
    }
}

/// A running service's view of its spec source.
pub enum SpecSource {
    Registry(Registry, Arc<Notify>),
    Folder(PathBuf),
}

impl SpecSource {
    pub async fn open(
        origin: &SpecOrigin,
        js: &jetstream::Context,
        s: &StreamSettings,
    ) -> Result<SpecSource, BusError> {
        Ok(match origin {
            SpecOrigin::Registry => {
                let r = Registry::open(js, s).await?;
                let n = r.changes();
                SpecSource::Registry(r, n)
            }
            SpecOrigin::Folder(dir) => SpecSource::Folder(dir.clone()),
        })
    }

    pub async fn documents(&self) -> Result<BTreeMap<String, String>, BusError> {
        match self {
            SpecSource::Registry(r, _) => r.documents().await,
            SpecSource::Folder(dir) => Ok(medallion_spec::products::read_folder(dir)),
        }
    }

    /// Resolves when the source may have changed (never for a folder, which
    /// is re-read on the service's reload tick).
    pub async fn changed(&self) {
        match self {
            SpecSource::Registry(_, n) => n.notified().await,
            SpecSource::Folder(_) => std::future::pending().await,
        }
    }
}

/// Brings `products` in line with the source, logging what changed and
/// keeping readiness honest: an unreadable registry or a spec this service
/// cannot run is a named problem on `/readyz` until it is fixed.
pub async fn sync_specs(
    source: &SpecSource,
    products: &mut medallion_spec::products::Products,
    check: impl Fn(&medallion_spec::Contract) -> Result<(), String>,
    salt: u64,
    health: &medallion_runtime::Health,
) -> medallion_spec::products::Changes {
    let documents = match source.documents().await {
        Ok(d) => {
            health.clear_problem("registry");
            d
        }
        Err(e) => {
            warn!(error = %e, "cannot read the product registry; the loaded specs keep running");
            health.set_problem("registry", format!("cannot read the product registry: {e}"));
            return Default::default();
        }
    };
    let changes = products.sync(&documents, check, salt).await;
    for id in &changes.updated {
        tracing::info!(product = %format!("{}.{}", id.0, id.1), "product spec loaded");
    }
    for id in &changes.removed {
        tracing::info!(product = %format!("{}.{}", id.0, id.1), "product spec removed");
    }
    for s in &changes.rejected {
        let e = products
            .problems
            .get(s)
            .map(String::as_str)
            .unwrap_or_default();
        tracing::error!(source = %s, error = %e, "product spec rejected; the last valid version keeps running");
    }
    match products.problem_summary() {
        None => health.clear_problem("specs"),
        Some(p) => health.set_problem("specs", p),
    }
    changes
}
