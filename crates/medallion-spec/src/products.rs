//! The set of compiled product specs a service runs, kept in step with a
//! source of spec documents (the catalog's registry, or a folder). A changed
//! document is recompiled and takes effect without a restart; one that no
//! longer compiles keeps the last good version running and reports why
//! (source, field, fix) in logs and readiness.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::Contract;
use xxhash_rust::xxh3::xxh3_64;

pub type ProductId = (String, String);

/// Spec documents by source name (a registry key or a file path).
pub type Documents = BTreeMap<String, String>;

#[derive(Default)]
pub struct Products {
    seen: HashMap<String, u64>,
    by_source: HashMap<String, ProductId>,
    pub contracts: BTreeMap<ProductId, Arc<Contract>>,
    /// Why a document is not running, by source name.
    pub problems: BTreeMap<String, String>,
}

/// What a sync changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub updated: Vec<ProductId>,
    pub removed: Vec<ProductId>,
    /// Documents that changed and no longer compile (reason in `problems`).
    pub rejected: Vec<String>,
}

impl Products {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the compiled set in line with `documents`. `check` adds a
    /// service's own requirements to the spec's validation (e.g. transform
    /// needs a PII key to hash); `salt` is mixed into the change detection so
    /// a changed requirement re-checks.
    pub async fn sync(
        &mut self,
        documents: &Documents,
        check: impl Fn(&Contract) -> Result<(), String>,
        salt: u64,
    ) -> Changes {
        let mut changes = Changes::default();
        for (source, text) in documents {
            let hash = xxh3_64(text.as_bytes()) ^ salt;
            if self.seen.get(source) == Some(&hash) {
                continue;
            }
            self.seen.insert(source.clone(), hash);
            match compile(text, &check).await {
                Ok(c) => {
                    let id = (c.domain().to_string(), c.name().to_string());
                    self.problems.remove(source);
                    if let Some(old) = self.by_source.insert(source.clone(), id.clone())
                        && old != id
                    {
                        self.contracts.remove(&old);
                        changes.removed.push(old);
                    }
                    self.contracts.insert(id.clone(), Arc::new(c));
                    changes.updated.push(id);
                }
                Err(e) => {
                    changes.rejected.push(source.clone());
                    self.problems.insert(source.clone(), e);
                }
            }
        }
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|s| !documents.contains_key(*s))
            .cloned()
            .collect();
        for s in gone {
            self.seen.remove(&s);
            self.problems.remove(&s);
            if let Some(id) = self.by_source.remove(&s) {
                self.contracts.remove(&id);
                changes.removed.push(id);
            }
        }
        changes
    }

    /// Every problem on one line, for readiness.
    pub fn problem_summary(&self) -> Option<String> {
        (!self.problems.is_empty()).then(|| {
            self.problems
                .iter()
                .map(|(s, e)| format!("{s}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

async fn compile(
    text: &str,
    check: &impl Fn(&Contract) -> Result<(), String>,
) -> Result<Contract, String> {
    let c = Contract::from_yaml(text).await.map_err(|e| e.to_string())?;
    check(&c)?;
    Ok(c)
}

/// The `*.yaml` / `*.yml` documents of a folder, by path. Unreadable files
/// are skipped (a file being written is read again on the next pass).
pub fn read_folder(dir: &Path) -> Documents {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Documents::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            Some((p.display().to_string(), text))
        })
        .collect()
}
