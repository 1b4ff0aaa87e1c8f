//! How many dedupe keys a product keeps in memory, and the local directory
//! where the rest go (see [`crate::key_run`]).
//!
//! Each process works in its own directory under `MEDALLION_DEDUPE_DIR`,
//! holding a lock on it for its life: a directory whose lock nobody holds
//! belongs to a process that died (kill -9 leaves it behind) and is removed
//! by the next process to start there. Everything in it is a cache of the
//! copies beside the Silver tables.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A hash set of 16-byte keys spends 17 bytes per slot (key + control
/// byte) and fills 7 of every 8 slots before doubling.
const BYTES_PER_SLOT: usize = 17;
const LOCK_FILE: &str = "lock";

#[derive(Debug)]
pub struct KeyBudget {
    max_hot_keys: usize,
    dir: PathBuf,
    _lock: File,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl KeyBudget {
    /// Claims a directory under `base` for this process, after removing
    /// those of processes that are gone.
    pub fn prepare(base: &Path, memory_bytes: usize) -> io::Result<KeyBudget> {
        std::fs::create_dir_all(base)?;
        for entry in std::fs::read_dir(base)?.flatten() {
            // Only directories named as this code names them: the base may
            // be a shared directory such as /tmp.
            let name = entry.file_name().to_string_lossy().to_string();
            let (hidden, bare) = match name.strip_prefix('.') {
                Some(rest) => (true, rest.to_string()),
                None => (false, name),
            };
            if !is_process_dir_name(&bare) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path();
            let stale = if hidden {
                // A directory still being claimed, or left half-claimed.
                entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                    t.elapsed()
                        .is_ok_and(|age| age > std::time::Duration::from_secs(3600))
                })
            } else {
                File::open(dir.join(LOCK_FILE)).is_ok_and(|lock| lock.try_lock().is_ok())
            };
            if stale {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("p{}-{nanos}", std::process::id());
        // Locked under a hidden name, then renamed: no other process can
        // see it unlocked and take it for a dead one's.
        let claiming = base.join(format!(".{name}"));
        std::fs::create_dir_all(&claiming)?;
        let lock = File::create(claiming.join(LOCK_FILE))?;
        lock.try_lock().map_err(io::Error::other)?;
        let dir = base.join(name);
        std::fs::rename(&claiming, &dir)?;
        Ok(KeyBudget {
            max_hot_keys: max_hot_keys(memory_bytes),
            dir,
            _lock: lock,
        })
    }

    /// Keys a product keeps in its in-memory set before they spill to disk.
    pub fn max_hot_keys(&self) -> usize {
        self.max_hot_keys
    }

    /// A fresh directory for one product's runs, removed when dropped.
    pub fn product_dir(&self, product: &str) -> io::Result<SpillDir> {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{product}-{n}"));
        std::fs::create_dir_all(&path)?;
        Ok(SpillDir {
            path,
            max_hot_keys: self.max_hot_keys,
        })
    }
}

impl Drop for KeyBudget {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `p<pid>-<nanos>`.
fn is_process_dir_name(name: &str) -> bool {
    name.strip_prefix('p')
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(pid, nanos)| {
            !pid.is_empty()
                && !nanos.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && nanos.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The largest set that fits in `memory_bytes` without its next doubling.
fn max_hot_keys(memory_bytes: usize) -> usize {
    let slots = (memory_bytes / BYTES_PER_SLOT).max(1024);
    let slots = 1usize << (usize::BITS - 1 - slots.leading_zeros());
    slots / 8 * 7
}

/// One product's run directory.
#[derive(Debug)]
pub struct SpillDir {
    pub path: PathBuf,
    pub max_hot_keys: usize,
}

impl SpillDir {
    /// For tests and tools: a directory of the caller's choosing.
    pub fn at(path: PathBuf, max_hot_keys: usize) -> io::Result<SpillDir> {
        std::fs::create_dir_all(&path)?;
        Ok(SpillDir { path, max_hot_keys })
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_set_never_outgrows_the_budget() {
        for mb in [1usize, 3, 64, 100, 256, 1000] {
            let bytes = mb << 20;
            let keys = max_hot_keys(bytes);
            // The set holding that many keys has at most this many slots.
            let slots = (keys * 8 / 7).next_power_of_two();
            assert!(slots * BYTES_PER_SLOT <= bytes, "{mb} MiB: {keys} keys");
            assert!(slots * BYTES_PER_SLOT * 2 > bytes, "{mb} MiB wasted");
        }
    }

    #[test]
    fn directories_of_dead_processes_are_removed_and_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("p1-1");
        std::fs::create_dir_all(&dead).unwrap();
        File::create(dead.join(LOCK_FILE)).unwrap();
        // Someone else's directory in a shared base is left alone.
        let foreign = base.path().join("cache");
        std::fs::create_dir_all(&foreign).unwrap();
        File::create(foreign.join(LOCK_FILE)).unwrap();
        let live = KeyBudget::prepare(base.path(), 1 << 20).unwrap();
        assert!(!dead.exists());
        assert!(foreign.exists());
        let other = KeyBudget::prepare(base.path(), 1 << 20).unwrap();
        assert!(live.dir.exists() && other.dir.exists());
        let product = live.product_dir("d.p").unwrap();
        assert!(product.path.starts_with(&live.dir));
        drop(product);
        drop(live);
        assert!(other.dir.exists());
    }
}
