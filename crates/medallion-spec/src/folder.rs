//! Product specs from the `MEDALLION_PRODUCTS` folder, re-read while running:
//! a changed file is recompiled and takes effect without a restart; a file
//! that no longer compiles keeps the last good version running and reports
//! why (file, field, fix) in logs and readiness.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Contract;
use xxhash_rust::xxh3::xxh3_64;

pub type ProductId = (String, String);

pub struct Products {
    dir: PathBuf,
    files: HashMap<PathBuf, u64>,
    by_file: HashMap<PathBuf, ProductId>,
    pub contracts: BTreeMap<ProductId, Arc<Contract>>,
    pub problems: BTreeMap<PathBuf, String>,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub updated: Vec<ProductId>,
    pub removed: Vec<ProductId>,
    /// Files that changed and no longer compile (reason in `problems`).
    pub rejected: Vec<PathBuf>,
}

impl Products {
    pub fn new(dir: PathBuf) -> Self {
        Products {
            dir,
            files: HashMap::new(),
            by_file: HashMap::new(),
            contracts: BTreeMap::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Re-reads the folder. `check` adds a service's own requirements to the
    /// spec's validation (e.g. transform needs a PII key to hash); `salt` is
    /// mixed into the change detection so a changed requirement re-checks.
    pub async fn reload(
        &mut self,
        check: impl Fn(&Contract) -> Result<(), String>,
        salt: u64,
    ) -> Changes {
        let mut changes = Changes::default();
        let mut present = Vec::new();
        for path in yaml_files(&self.dir) {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            present.push(path.clone());
            let hash = xxh3_64(text.as_bytes()) ^ salt;
            if self.files.get(&path) == Some(&hash) {
                continue;
            }
            self.files.insert(path.clone(), hash);
            match compile(&text, &check).await {
                Ok(c) => {
                    let id = (c.domain().to_string(), c.name().to_string());
                    self.problems.remove(&path);
                    if let Some(old) = self.by_file.insert(path.clone(), id.clone())
                        && old != id
                    {
                        self.contracts.remove(&old);
                        changes.removed.push(old);
                    }
                    self.contracts.insert(id.clone(), Arc::new(c));
                    changes.updated.push(id);
                }
                Err(e) => {
                    changes.rejected.push(path.clone());
                    self.problems.insert(path, e);
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            self.files.remove(&p);
            self.problems.remove(&p);
            if let Some(id) = self.by_file.remove(&p) {
                self.contracts.remove(&id);
                changes.removed.push(id);
            }
        }
        changes
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

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    out.sort();
    out
}
