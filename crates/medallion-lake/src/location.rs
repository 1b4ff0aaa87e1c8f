//! Where the lake is: a local directory, a `file://` URI or an object store URI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medallion_spec::TableRef;
use url::Url;

use crate::LakeError;

/// The root of every table: `<lake>/<layer>/<domain>/<table>`.
#[derive(Debug, Clone)]
pub struct Lake {
    root: Url,
    storage_options: HashMap<String, String>,
}

impl Lake {
    /// Accepts `MEDALLION_LAKE` as written by a user: a path (relative paths are
    /// resolved against the working directory), `file:///abs/path` or `s3://bucket/prefix`.
    pub fn from_location(location: &str) -> Result<Lake, LakeError> {
        Self::with_options(location, HashMap::new())
    }

    pub fn with_options(
        location: &str,
        storage_options: HashMap<String, String>,
    ) -> Result<Lake, LakeError> {
        let location = location.trim();
        if location.is_empty() {
            return Err(LakeError::Location {
                location: location.into(),
                message: "empty; set MEDALLION_LAKE to a directory or a file:// or s3:// URI"
                    .into(),
            });
        }
        let root = if location.contains("://") {
            let url = Url::parse(location).map_err(|e| LakeError::Location {
                location: location.into(),
                message: e.to_string(),
            })?;
            match url.scheme() {
                "file" => {
                    let path = url.to_file_path().map_err(|_| LakeError::Location {
                        location: location.into(),
                        message: "not an absolute file:// path".into(),
                    })?;
                    local_root(&path, location)?
                }
                "s3" | "s3a" => {
                    crate::object_stores::register_s3();
                    with_trailing_slash(url)
                }
                other => {
                    return Err(LakeError::Location {
                        location: location.into(),
                        message: format!(
                            "unsupported scheme `{other}`; use a path, file:// or s3://"
                        ),
                    });
                }
            }
        } else {
            local_root(Path::new(location), location)?
        };
        Ok(Lake {
            root,
            storage_options,
        })
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// A local lake's directory, if the lake is local.
    pub fn local_path(&self) -> Option<PathBuf> {
        (self.root.scheme() == "file")
            .then(|| self.root.to_file_path().ok())
            .flatten()
    }

    pub fn table_url(&self, table: &TableRef) -> Url {
        // Every segment of `path()` is a validated name: joining cannot escape the root.
        self.root
            .join(&format!("{}/", table.path()))
            .expect("validated table path joins onto the lake root")
    }

    /// Checks that the lake can be written, so a read-only mount or a missing
    /// bucket is reported at start rather than at the first commit.
    pub async fn check_writable(&self) -> Result<(), LakeError> {
        if let Some(dir) = self.local_path() {
            // Unique per call: services sharing a process (the CLI, tests)
            // check at the same moment and must not delete each other's probe.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let probe = dir.join(format!(".medallion-write-check-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&probe, b"ok"))
                .and_then(|_| std::fs::remove_file(&probe))
                .map_err(|e| LakeError::Location {
                    location: dir.display().to_string(),
                    message: format!(
                        "cannot write there ({e}); point MEDALLION_LAKE at a writable directory"
                    ),
                })?;
        }
        Ok(())
    }
}

fn local_root(path: &Path, original: &str) -> Result<Url, LakeError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| LakeError::Location {
                location: original.into(),
                message: e.to_string(),
            })?
            .join(path)
    };
    std::fs::create_dir_all(&abs).map_err(|e| LakeError::Location {
        location: abs.display().to_string(),
        message: format!(
            "cannot create the lake directory ({e}); point MEDALLION_LAKE at a writable directory"
        ),
    })?;
    let abs = abs.canonicalize().unwrap_or(abs);
    Url::from_directory_path(&abs).map_err(|_| LakeError::Location {
        location: original.into(),
        message: "not a valid directory path".into(),
    })
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_and_file_urls_resolve_to_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let a = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
        let b = Lake::from_location(&format!("file://{}", dir.path().display())).unwrap();
        assert_eq!(a.root(), b.root());
        let t = a.table_url(&TableRef::silver("finance", "payments"));
        assert!(t.as_str().ends_with("/silver/finance/payments/"), "{t}");
    }

    #[test]
    fn unsupported_schemes_are_named() {
        let err = Lake::from_location("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
    }
}

impl Lake {
    /// `MEDALLION_LAKE`, resolved now so a bad location is a startup error.
    pub fn from_env(env: &mut medallion_runtime::EnvReader) -> Option<Lake> {
        let location = env.string("MEDALLION_LAKE");
        match Lake::from_location(&location) {
            Ok(l) => Some(l),
            Err(e) => {
                env.invalid("MEDALLION_LAKE", e.to_string());
                None
            }
        }
    }
}
