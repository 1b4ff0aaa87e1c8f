//! A sorted run of key hashes in a local file: the part of a product's
//! dedupe keys that does not fit in its memory budget.
//!
//! In memory a run keeps only a blocked Bloom filter (10 bits, one cache
//! line per key) and the first key of every 4 KiB block (16 bytes per 256
//! keys): ~1.3 bytes per key instead of the hash set's ~20–40. A key the
//! filter rules out (every new key but ~1 in 100) costs one cache miss; one
//! it lets through costs a binary search and one 4 KiB read from the page
//! cache.
//!
//! The local file is a cache: its source of truth is the copy uploaded beside
//! the Silver table with the dedupe snapshot, so a run lost with its pod is
//! downloaded again, and a local read error ends the process (the restart
//! rebuilds from the table) rather than letting a duplicate through or
//! dropping a new row.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Keys per block: the unit of one read.
const BLOCK_KEYS: usize = 256;
const KEY_BYTES: usize = 16;
const BLOOM_BITS_PER_KEY: usize = 10;
/// Bits set per key, 9 bits of the key's low half each (7 × 9 ≤ 64).
const BLOOM_PROBES: u32 = 7;

pub struct KeyRun {
    pub id: u64,
    len: u64,
    path: PathBuf,
    file: File,
    bloom: Bloom,
    fences: Vec<u128>,
    /// Whether the copy beside the table is known to exist.
    pub uploaded: bool,
}

impl std::fmt::Debug for KeyRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRun")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}

pub fn file_name(id: u64) -> String {
    format!("{id:016x}.run")
}

impl KeyRun {
    /// Writes `keys` (ascending; repeats are dropped) as run `id` in `dir`.
    /// `expected` sizes the Bloom filter: an upper bound of the count.
    pub fn write(
        dir: &Path,
        id: u64,
        keys: impl IntoIterator<Item = io::Result<u128>>,
        expected: usize,
    ) -> io::Result<KeyRun> {
        let path = dir.join(file_name(id));
        let tmp = path.with_extension("tmp");
        // A temp cleaner may have taken the directory.
        std::fs::create_dir_all(dir)?;
        let written = Self::write_to(&tmp, keys, expected);
        // A failed write (disk full) must not keep the space it took.
        let index = match written {
            Ok(index) => index,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &path)?;
        index.finish(id, path)
    }

    fn write_to(
        tmp: &Path,
        keys: impl IntoIterator<Item = io::Result<u128>>,
        expected: usize,
    ) -> io::Result<Index> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
        let mut index = Index::new(expected);
        let mut last = None;
        for k in keys {
            let k = k?;
            if last.is_some_and(|l| l >= k) {
                if last == Some(k) {
                    continue;
                }
                return Err(io::Error::other("run keys out of order"));
            }
            last = Some(k);
            index.push(k);
            out.write_all(&k.to_le_bytes())?;
        }
        // No fsync: the file is a cache that a restart never reuses.
        out.flush()?;
        Ok(index)
    }

    /// Opens a run file written by [`KeyRun::write`] (or downloaded), reading
    /// it once to build the filter and the block index.
    pub fn open(id: u64, path: PathBuf) -> io::Result<KeyRun> {
        let size = std::fs::metadata(&path)?.len();
        if size % KEY_BYTES as u64 != 0 {
            return Err(io::Error::other(format!(
                "{} is not a key run: {size} bytes",
                path.display()
            )));
        }
        let mut index = Index::new((size / KEY_BYTES as u64) as usize);
        let mut last = None;
        for k in read_keys(File::open(&path)?) {
            let k = k?;
            if last.is_some_and(|l| l >= k) {
                return Err(io::Error::other(format!(
                    "{} is not sorted",
                    path.display()
                )));
            }
            last = Some(k);
            index.push(k);
        }
        index.finish(id, path)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes this run keeps in memory.
    pub fn memory_bytes(&self) -> usize {
        self.bloom.blocks.len() * 64 + self.fences.len() * KEY_BYTES
    }

    pub fn contains(&self, k: u128) -> bool {
        if !self.bloom.may_contain(k) {
            return false;
        }
        let block = self.fences.partition_point(|f| *f <= k);
        if block == 0 {
            return false;
        }
        let start = (block - 1) * BLOCK_KEYS;
        let n = BLOCK_KEYS.min(self.len as usize - start);
        let mut buf = [0u8; BLOCK_KEYS * KEY_BYTES];
        if let Err(e) = self
            .file
            .read_exact_at(&mut buf[..n * KEY_BYTES], (start * KEY_BYTES) as u64)
        {
            // See the module docs: no answer here is safe.
            tracing::error!(path = %self.path.display(), error = %e, "dedupe key run unreadable; stopping so the restart rebuilds it from the table");
            std::process::abort();
        }
        let key_at = |i: usize| {
            u128::from_le_bytes(
                buf[i * KEY_BYTES..(i + 1) * KEY_BYTES]
                    .try_into()
                    .expect("16 bytes"),
            )
        };
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match key_at(mid).cmp(&k) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }

    /// The keys in ascending order. Read through the file this run holds
    /// open, so a temp-directory cleaner removing the path does not lose it.
    pub fn keys(&self) -> io::Result<impl Iterator<Item = io::Result<u128>> + use<>> {
        Ok(read_keys(self.reader()?))
    }

    /// The run's bytes from the start, through the file it holds open.
    pub fn reader(&self) -> io::Result<impl Read + use<>> {
        Ok(FromStart {
            file: self.file.try_clone()?,
            at: 0,
        })
    }

    /// Merges runs into one new run `id` in `dir`.
    pub fn merge(dir: &Path, id: u64, runs: &[KeyRun]) -> io::Result<KeyRun> {
        let mut heads = Vec::with_capacity(runs.len());
        for r in runs {
            let mut it = r.keys()?;
            let first = it.next().transpose()?;
            heads.push((first, it));
        }
        let expected = runs.iter().map(|r| r.len as usize).sum();
        let merged = std::iter::from_fn(move || {
            let (i, _) = heads
                .iter()
                .enumerate()
                .filter_map(|(i, (h, _))| h.map(|k| (i, k)))
                .min_by_key(|(_, k)| *k)?;
            let (head, it) = &mut heads[i];
            let k = head.take().expect("chosen head");
            match it.next().transpose() {
                Ok(next) => *head = next,
                Err(e) => return Some(Err(e)),
            }
            Some(Ok(k))
        });
        KeyRun::write(dir, id, merged, expected)
    }
}

impl Drop for KeyRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a file by offset: lookups read the same file at the same time
/// (also by offset), so the shared file position is never used.
struct FromStart {
    file: File,
    at: u64,
}

impl Read for FromStart {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn read_keys(r: impl Read) -> impl Iterator<Item = io::Result<u128>> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    std::iter::from_fn(move || {
        let mut b = [0u8; KEY_BYTES];
        match r.read_exact(&mut b) {
            Ok(()) => Some(Ok(u128::from_le_bytes(b))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) => Some(Err(e)),
        }
    })
}

/// The in-memory part of a run, built while its keys stream by.
struct Index {
    bloom: Bloom,
    fences: Vec<u128>,
    len: u64,
}

impl Index {
    fn new(expected: usize) -> Index {
        Index {
            bloom: Bloom::new(expected),
            fences: Vec::with_capacity(expected / BLOCK_KEYS + 1),
            len: 0,
        }
    }

    fn push(&mut self, k: u128) {
        if self.len.is_multiple_of(BLOCK_KEYS as u64) {
            self.fences.push(k);
        }
        self.bloom.insert(k);
        self.len += 1;
    }

    fn finish(mut self, id: u64, path: PathBuf) -> io::Result<KeyRun> {
        self.fences.shrink_to_fit();
        Ok(KeyRun {
            id,
            len: self.len,
            file: File::open(&path)?,
            path,
            bloom: self.bloom,
            fences: self.fences,
            uploaded: false,
        })
    }
}

/// A Bloom filter whose probes for one key fall in one 64-byte block. Keys
/// are uniform hashes already: the high half picks the block, the low half
/// the bits.
struct Bloom {
    blocks: Vec<[u64; 8]>,
}

impl Bloom {
    fn new(expected: usize) -> Bloom {
        let blocks = (expected.max(1) * BLOOM_BITS_PER_KEY).div_ceil(512);
        Bloom {
            blocks: vec![[0; 8]; blocks],
        }
    }

    fn block(&self, k: u128) -> usize {
        (((k >> 64) as u64 as u128 * self.blocks.len() as u128) >> 64) as usize
    }

    fn bits(k: u128) -> impl Iterator<Item = usize> {
        let low = k as u64;
        (0..BLOOM_PROBES).map(move |i| ((low >> (9 * i)) & 511) as usize)
    }

    fn insert(&mut self, k: u128) {
        let b = self.block(k);
        let block = &mut self.blocks[b];
        for bit in Bloom::bits(k) {
            block[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, k: u128) -> bool {
        let block = &self.blocks[self.block(k)];
        Bloom::bits(k).all(|bit| block[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run_of(dir: &Path, id: u64, keys: &std::collections::BTreeSet<u128>) -> KeyRun {
        KeyRun::write(dir, id, keys.iter().map(|k| Ok(*k)), keys.len()).unwrap()
    }

    proptest! {
        /// A run answers exactly the keys written to it (the filter only
        /// ever lets extra keys through to the file, never loses one), after
        /// a merge and after being opened again from its file.
        #[test]
        fn runs_answer_exactly_their_keys(
            a in proptest::collection::btree_set(any::<u128>(), 0..700),
            b in proptest::collection::btree_set(0u128..2000, 0..700),
            probes in proptest::collection::vec(any::<u128>(), 0..200),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (ra, rb) = (run_of(dir.path(), 1, &a), run_of(dir.path(), 2, &b));
            let merged = KeyRun::merge(dir.path(), 3, &[ra, rb]).unwrap();
            let all: std::collections::BTreeSet<u128> = a.union(&b).copied().collect();
            prop_assert_eq!(merged.len(), all.len() as u64);
            let reopened = {
                let copy = dir.path().join("copy.run");
                std::fs::copy(merged.path(), &copy).unwrap();
                KeyRun::open(9, copy).unwrap()
            };
            for k in all.iter().copied().chain(probes).chain(0..50) {
                prop_assert_eq!(merged.contains(k), all.contains(&k), "key {}", k);
                prop_assert_eq!(reopened.contains(k), all.contains(&k), "key {}", k);
            }
            let back: Vec<u128> = reopened.keys().unwrap().map(Result::unwrap).collect();
            prop_assert_eq!(back, all.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_filter_rules_out_nearly_every_absent_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys: std::collections::BTreeSet<u128> = (0..100_000u64)
            .map(|i| xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
            .collect();
        let run = run_of(dir.path(), 1, &keys);
        let passed = (100_000..200_000u64)
            .map(|i| xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
            .filter(|k| run.bloom.may_contain(*k))
            .count();
        // ~1% at 10 bits per key; well under 3% whatever the seed.
        assert!(passed < 3_000, "{passed} of 100000 absent keys passed");
        assert!(run.memory_bytes() < 100_000 * 2, "{}", run.memory_bytes());
    }

    /// A temp-directory cleaner deleting the path loses nothing: the run
    /// reads through the file it holds open.
    #[test]
    fn a_run_whose_path_was_deleted_still_answers_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let a = run_of(dir.path(), 1, &(0u128..600).collect());
        let b = run_of(dir.path(), 2, &(600u128..700).collect());
        std::fs::remove_file(a.path()).unwrap();
        assert!(a.contains(5) && a.contains(599) && !a.contains(600));
        let merged = KeyRun::merge(dir.path(), 3, &[a, b]).unwrap();
        assert_eq!(merged.len(), 700);
    }

    #[test]
    fn a_dropped_run_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_of(dir.path(), 7, &[1u128, 2].into());
        let path = run.path().to_path_buf();
        assert!(path.exists());
        drop(run);
        assert!(!path.exists());
    }
}
