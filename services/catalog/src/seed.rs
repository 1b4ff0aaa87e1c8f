//! Products defined as files in `MEDALLION_PRODUCTS` (a ConfigMap on a
//! cluster): the folder is their desired state, GitOps-style. A file is
//! registered at start and whenever it changes, under the same validation
//! and compatibility rules as a `PUT`; the API refuses to change or delete
//! a product a file defines (edit the file instead), so the two never fight.
//! Removing a file does not unregister its product: deleting data products
//! is an explicit act (`DELETE`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use medallion_bus::registry::{self, Registry, WriteError};
use medallion_spec::products::{ProductId, read_folder};
use medallion_spec::{Contract, breaking_changes};
use tracing::{error, info};
use xxhash_rust::xxh3::xxh3_64;

use crate::audit::{Audit, AuditRecord};

/// The annotation that lets a file take a breaking change: its Silver and
/// Gold tables are rebuilt from Bronze.
pub const FULL_REFRESH_ANNOTATION: &str = "medallion.dev/full-refresh";

/// Set by the Kubernetes controller on the documents it registers
/// (`DataProduct <namespace>/<name>`): ownership travels with the document,
/// so every catalog replica refuses API writes to it, controller or not.
pub const MANAGED_BY_ANNOTATION: &str = "medallion.dev/managed-by";

pub struct FolderSeed {
    dir: PathBuf,
    seen: HashMap<String, u64>,
    /// Products the folder defines, with their file.
    pub managed: BTreeMap<ProductId, String>,
    problems: BTreeMap<String, String>,
}

impl FolderSeed {
    pub fn new(dir: PathBuf) -> Self {
        FolderSeed {
            dir,
            seen: HashMap::new(),
            managed: BTreeMap::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Registers changed files; returns the products whose breaking change
    /// was accepted and whose tables must now be rebuilt.
    pub async fn apply(
        &mut self,
        registry: &Registry,
        health: &medallion_runtime::Health,
        audit: &Audit,
    ) -> Vec<ProductId> {
        let mut rebuild = Vec::new();
        let docs = read_folder(&self.dir);
        self.seen.retain(|f, _| docs.contains_key(f));
        self.problems.retain(|f, _| docs.contains_key(f));
        self.managed.retain(|_, f| docs.contains_key(f));
        for (file, text) in &docs {
            let hash = xxh3_64(text.as_bytes());
            if self.seen.get(file) == Some(&hash) {
                continue;
            }
            match register_file(registry, text).await {
                Ok((id, outcome)) => {
                    self.seen.insert(file.clone(), hash);
                    self.problems.remove(file);
                    self.managed.insert(id.clone(), file.clone());
                    if let Some((revision, full_refresh)) = outcome {
                        if full_refresh {
                            rebuild.push(id.clone());
                        }
                        info!(file = %file, product = %format!("{}.{}", id.0, id.1), revision, full_refresh, "product spec registered from the folder");
                        audit
                            .record(AuditRecord::allowed(
                                &format!("folder:{file}"),
                                "put_product",
                                &format!("{}.{}", id.0, id.1),
                                Some(revision as i64),
                                None,
                            ))
                            .await;
                    }
                }
                Err(Retry(e)) => {
                    // Not marked seen: tried again on the next pass.
                    error!(file = %file, error = %e, "product spec file not registered; retrying");
                    self.problems.insert(file.clone(), e);
                }
                Err(Refused(e) | Breaking(e)) => {
                    self.seen.insert(file.clone(), hash);
                    error!(file = %file, error = %e, "product spec file refused; the registered version stays");
                    self.problems.insert(file.clone(), e);
                }
            }
        }
        if self.problems.is_empty() {
            health.clear_problem("product files");
        } else {
            health.set_problem(
                "product files",
                self.problems
                    .iter()
                    .map(|(f, e)| format!("{f}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        rebuild
    }
}

/// Why a document was not registered.
pub(crate) enum SeedError {
    /// Transient (registry unreachable, a concurrent write): try again.
    Retry(String),
    /// The document cannot be taken as it is (invalid, owned elsewhere).
    Refused(String),
    /// Breaking changes, and no full refresh was asked for.
    Breaking(String),
}
use SeedError::{Breaking, Refused, Retry};

/// Registers one file's document; `Some((revision, full_refresh))` when the registry changed.
async fn register_file(
    registry: &Registry,
    text: &str,
) -> Result<(ProductId, Option<(u64, bool)>), SeedError> {
    let new = Contract::from_yaml(text)
        .await
        .map_err(|e| Refused(e.to_string()))?;
    // Ownership by a custom resource is the controller's to claim, not a file's.
    if managed_by(text).is_some() {
        return Err(Refused(format!(
            "metadata.annotations.{MANAGED_BY_ANNOTATION}: set only by the Kubernetes controller; remove it"
        )));
    }
    let refresh_requested = new
        .product
        .metadata
        .annotations
        .get(FULL_REFRESH_ANNOTATION)
        .is_some_and(|v| v == "true");
    register_document(registry, text, &new, refresh_requested).await
}

/// The owner a registered document names in its `medallion.dev/managed-by`
/// annotation (a DataProduct custom resource), if any.
pub(crate) fn managed_by(document: &str) -> Option<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(document).ok()?;
    doc.get("metadata")?
        .get("annotations")?
        .get(MANAGED_BY_ANNOTATION)?
        .as_str()
        .map(str::to_string)
}

/// Registers a compiled document under the rules every declarative source
/// shares (the folder and the Kubernetes controller): an identical document
/// is a no-op, a breaking change needs `refresh_requested`, a product owned
/// by another custom resource is refused, and the write is compare-and-set.
/// `Some((revision, full_refresh))` when the registry changed.
pub(crate) async fn register_document(
    registry: &Registry,
    text: &str,
    new: &Contract,
    refresh_requested: bool,
) -> Result<(ProductId, Option<(u64, bool)>), SeedError> {
    let id = (new.domain().to_string(), new.name().to_string());
    let key = registry::key(&id.0, &id.1);
    let current = registry
        .current(&key)
        .await
        .map_err(|e| Retry(e.to_string()))?;
    if current.as_ref().is_some_and(|(_, t)| t == text) {
        return Ok((id, None));
    }
    if let Some(owner) = current.as_ref().and_then(|(_, t)| managed_by(t))
        && managed_by(text).as_deref() != Some(owner.as_str())
    {
        return Err(Refused(format!(
            "{}.{} belongs to the custom resource {owner}; change or delete that resource instead",
            id.0, id.1
        )));
    }
    let mut full_refresh = false;
    if let Some((_, old_text)) = &current
        && let Ok(old) = Contract::from_yaml(old_text).await
    {
        let breaking = breaking_changes(&old, new);
        full_refresh = !breaking.is_empty();
        if full_refresh && !refresh_requested {
            return Err(Breaking(format!(
                "breaking changes refused: {}; to rebuild the product's tables from Bronze under the new spec, add the annotation {FULL_REFRESH_ANNOTATION}: \"true\"",
                breaking.join("; ")
            )));
        }
    }
    match registry.write(&key, text, current.map(|(r, _)| r)).await {
        Ok(rev) => Ok((id, Some((rev, full_refresh)))),
        Err(WriteError::Conflict) => Err(Retry("changed concurrently".into())),
        Err(WriteError::Bus(e)) => Err(Retry(e.to_string())),
    }
}
