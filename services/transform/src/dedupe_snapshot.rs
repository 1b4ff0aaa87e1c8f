//! The dedupe key set's snapshot beside the Silver table, so a restart or
//! another replica starts from it instead of reading every Silver file.
//!
//! `_medallion/dedupe-<version>.bin` holds the set as of Silver `version`:
//! per generation its times, its in-memory keys and the runs it references;
//! each run is uploaded once to `_medallion/keys/<id>.run` (sorted keys, the
//! same bytes as the local file), so a snapshot writes only the keys still
//! in memory, at most the budget's worth. A snapshot is written only after
//! every run it names exists; a run no snapshot names is deleted once it is
//! older than [`RUN_GRACE`] (another replica may be about to name it).

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use deltalake::{ObjectStore, Path};
use futures::{StreamExt, TryStreamExt};
use medallion_lake::LakeError;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tracing::{info, warn};

use crate::dedupe::{Generation, KeyHashSet, KeySet, now_ms};
use crate::key_budget::SpillDir;
use crate::key_run::{KeyRun, file_name};

pub const SNAPSHOT_DIR: &str = "_medallion";
const RUNS_DIR: &str = "_medallion/keys";
/// How long an unnamed run is kept: longer than a replica takes between
/// uploading a run and writing the snapshot that names it.
const RUN_GRACE: Duration = Duration::from_secs(600);
/// Run references sit before the keys: reading this much of another
/// replica's snapshot finds them.
const HEADER_READ: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error("local key run: {0}")]
    Io(#[from] std::io::Error),
}

/// A snapshot as read, before its runs are fetched.
struct Decoded {
    generations: Vec<(Generation, Vec<RunRef>)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct RunRef {
    id: u64,
    len: u64,
}

fn run_path(id: u64) -> Path {
    Path::from(format!("{RUNS_DIR}/{}", file_name(id)))
}

impl KeySet {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.in_memory() * 16);
        out.extend_from_slice(b"MDK3");
        out.extend_from_slice(&(self.generations.len() as u32).to_le_bytes());
        for g in &self.generations {
            out.extend_from_slice(&g.started_ms.to_le_bytes());
            out.extend_from_slice(&g.last_ms.to_le_bytes());
            out.extend_from_slice(&(g.keys.len() as u64).to_le_bytes());
            out.extend_from_slice(&(g.runs.len() as u32).to_le_bytes());
            for r in &g.runs {
                out.extend_from_slice(&r.id.to_le_bytes());
                out.extend_from_slice(&r.len().to_le_bytes());
            }
        }
        for g in &self.generations {
            let mut v: Vec<u128> = g.keys.iter().copied().collect();
            v.sort_unstable();
            for k in v {
                out.extend_from_slice(&k.to_le_bytes());
            }
        }
        out
    }

    /// Writes the set as of Silver `version`: its runs not yet beside the
    /// table, then the snapshot (atomically: object stores put whole
    /// objects), then removes what no snapshot needs any more.
    pub async fn save(
        &mut self,
        store: &dyn ObjectStore,
        version: i64,
    ) -> Result<(), SnapshotError> {
        for g in &mut self.generations {
            for r in &mut g.runs {
                // Checked each time: another replica's clean-up may have
                // removed a run this one still names.
                if r.uploaded && store.head(&run_path(r.id)).await.is_ok() {
                    continue;
                }
                upload(store, r).await?;
                r.uploaded = true;
            }
        }
        let path = Path::from(format!(
            "{SNAPSHOT_DIR}/dedupe-{version:020}-{:016x}.bin",
            writer()
        ));
        store
            .put(&path, PutPayload::from(Bytes::from(self.encode())))
            .await?;
        // The snapshot is written: what follows is clean-up, and its failure
        // only leaves objects for the next save.
        let named: HashSet<u64> = self
            .generations
            .iter()
            .flat_map(|g| g.runs.iter().map(|r| r.id))
            .collect();
        if let Err(e) = clean_up(store, &path, version, named).await {
            warn!(error = %e, "old dedupe snapshots or key runs not removed; the next snapshot tries again");
        }
        Ok(())
    }

    /// The newest snapshot at or below `max_version` whose runs can all be
    /// fetched, its runs downloaded into the directory `spill` makes (or,
    /// without one, read into memory).
    pub async fn load(
        store: &dyn ObjectStore,
        max_version: i64,
        mut spill: impl FnMut() -> std::io::Result<Option<SpillDir>>,
    ) -> Result<Option<(i64, KeySet)>, SnapshotError> {
        let mut snaps = list_snapshots(store).await?;
        snaps.sort_by_key(|s| std::cmp::Reverse(s.version));
        for s in snaps {
            let (v, p) = (s.version, s.path);
            if v > max_version {
                continue;
            }
            let bytes = match store.get(&p).await {
                Ok(r) => r.bytes().await?,
                // Replaced by a newer one since the listing.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(decoded) = decode(&bytes) else {
                warn!(snapshot = %p, "dedupe snapshot unreadable; trying an older one");
                continue;
            };
            match fetch_runs(store, decoded, spill()?).await {
                Ok(set) => return Ok(Some((v, set))),
                Err(e) => {
                    warn!(snapshot = %p, error = %e, "dedupe snapshot's key runs cannot be fetched; trying an older one")
                }
            }
        }
        Ok(None)
    }
}

async fn fetch_runs(
    store: &dyn ObjectStore,
    decoded: Decoded,
    spill: Option<SpillDir>,
) -> Result<KeySet, SnapshotError> {
    let started = std::time::Instant::now();
    let mut generations = VecDeque::new();
    let mut fetched = 0u64;
    for (mut g, refs) in decoded.generations {
        for r in refs {
            let mut body = store.get(&run_path(r.id)).await?.into_stream();
            fetched += r.len;
            match &spill {
                Some(dir) => {
                    let local = dir.path.join(file_name(r.id));
                    let tmp = local.with_extension("download");
                    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
                    while let Some(chunk) = body.next().await {
                        f.write_all(&chunk?)?;
                    }
                    f.flush()?;
                    drop(f);
                    std::fs::rename(&tmp, &local)?;
                    let mut run = crate::dedupe::blocking(|| KeyRun::open(r.id, local))?;
                    if run.len() != r.len {
                        return Err(std::io::Error::other(format!(
                            "key run {:016x} has {} keys, the snapshot says {}",
                            r.id,
                            run.len(),
                            r.len
                        ))
                        .into());
                    }
                    run.uploaded = true;
                    g.runs.push(run);
                }
                None => {
                    let bytes: Vec<Bytes> = body.try_collect().await?;
                    let mut all = Vec::new();
                    for b in bytes {
                        all.extend_from_slice(&b);
                    }
                    if all.len() as u64 != r.len * 16 {
                        return Err(std::io::Error::other("key run of the wrong length").into());
                    }
                    let mut keys = all.as_slice();
                    let mut k = [0u8; 16];
                    while keys.read_exact(&mut k).is_ok() {
                        g.keys.insert(u128::from_le_bytes(k));
                    }
                }
            }
        }
        generations.push_back(g);
    }
    if fetched > 0 {
        info!(
            keys = fetched,
            ms = started.elapsed().as_millis() as u64,
            "dedupe key runs fetched"
        );
    }
    Ok(KeySet {
        generations,
        ..Default::default()
    }
    .with_spill(spill))
}

async fn upload(store: &dyn ObjectStore, run: &KeyRun) -> Result<(), SnapshotError> {
    let upload = store.put_multipart(&run_path(run.id)).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
    let copied: Result<(), SnapshotError> = async {
        let mut f = run.reader()?;
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            w.wait_for_capacity(4).await?;
            w.write(&buf[..n]);
        }
    }
    .await;
    match copied {
        Ok(()) => {
            w.finish().await?;
            Ok(())
        }
        Err(e) => {
            // No half-uploaded parts left behind on the store.
            let _ = w.abort().await;
            Err(e)
        }
    }
}

async fn remove_unnamed_runs(
    store: &dyn ObjectStore,
    named: &HashSet<u64>,
) -> Result<(), SnapshotError> {
    let prefix = Path::from(RUNS_DIR);
    let runs: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let cutoff = chrono::Utc::now() - RUN_GRACE;
    for m in runs {
        let id = m
            .location
            .filename()
            .and_then(|n| n.strip_suffix(".run"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        if id.is_some_and(|id| !named.contains(&id)) && m.last_modified < cutoff {
            let _ = store.delete(&m.location).await;
        }
    }
    Ok(())
}

async fn read_run_refs(store: &dyn ObjectStore, p: &Path) -> Option<Vec<RunRef>> {
    let size = store.head(p).await.ok()?.size;
    let bytes = store.get_range(p, 0..size.min(HEADER_READ)).await.ok()?;
    let (gens, _) = decode_header(&bytes)?;
    Some(gens.into_iter().flat_map(|(_, _, _, refs)| refs).collect())
}

type Header = Vec<(i64, i64, usize, Vec<RunRef>)>;

/// The MDK3 header: per generation its times, in-memory key count and runs;
/// and where the keys start.
fn decode_header(bytes: &[u8]) -> Option<(Header, usize)> {
    let body = bytes.strip_prefix(b"MDK3")?;
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = body.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let gens = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..gens {
        let started = u64_of(take(8)?) as i64;
        let last = u64_of(take(8)?) as i64;
        let keys = usize::try_from(u64_of(take(8)?)).ok()?;
        let runs = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut refs = Vec::new();
        for _ in 0..runs {
            let id = u64_of(take(8)?);
            let len = u64_of(take(8)?);
            refs.push(RunRef { id, len });
        }
        out.push((started, last, keys, refs));
    }
    Some((out, 4 + at))
}

fn keys_of(body: &[u8], n: usize) -> Option<(KeyHashSet, &[u8])> {
    let len = n.checked_mul(16)?;
    let (k, rest) = (body.get(..len)?, body.get(len..)?);
    let set = k
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect();
    Some((set, rest))
}

fn decode(bytes: &[u8]) -> Option<Decoded> {
    let u32_at = |b: &[u8]| -> Option<usize> {
        Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize)
    };
    let mut generations = Vec::new();
    if bytes.starts_with(b"MDK3") {
        let (header, start) = decode_header(bytes)?;
        let mut rest = bytes.get(start..)?;
        for (started, last, n, refs) in header {
            let (keys, after) = keys_of(rest, n)?;
            let mut g = Generation::new(started, last);
            g.keys = keys;
            generations.push((g, refs));
            rest = after;
        }
        return rest.is_empty().then_some(Decoded { generations });
    }
    if let Some(body) = bytes.strip_prefix(b"MDK1") {
        // One generation: written before horizons existed.
        let (set, rest) = keys_of(body.get(4..)?, u32_at(body)?)?;
        if !rest.is_empty() {
            return None;
        }
        // Kept for the horizon from now: when they were added is unknown.
        let mut g = Generation::new(now_ms(), now_ms());
        g.keys = set;
        generations.push((g, Vec::new()));
    } else {
        let body = bytes.strip_prefix(b"MDK2")?;
        let n = u32_at(body)?;
        let mut rest = body.get(4..)?;
        for _ in 0..n {
            let started = i64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let last = i64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
            let count = u32_at(rest.get(16..)?)?;
            let (set, after) = keys_of(rest.get(20..)?, count)?;
            let mut g = Generation::new(started, last);
            g.keys = set;
            generations.push((g, Vec::new()));
            rest = after;
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(Decoded { generations })
}

/// This process's name in snapshot names: each replica sharing a product
/// keeps its own newest snapshot, so one replica's clean-up never removes
/// the snapshot (and runs) another is still naming.
fn writer() -> u64 {
    static WRITER: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *WRITER.get_or_init(crate::dedupe::new_run_id)
}

struct Listed {
    version: i64,
    /// `None`: a snapshot named before writers were (one writer per product).
    writer: Option<u64>,
    path: Path,
    modified: chrono::DateTime<chrono::Utc>,
}

async fn list_snapshots(store: &dyn ObjectStore) -> Result<Vec<Listed>, SnapshotError> {
    let prefix = Path::from(SNAPSHOT_DIR);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?.to_string();
            let stem = name.strip_prefix("dedupe-")?.strip_suffix(".bin")?;
            let (v, writer) = match stem.split_once('-') {
                Some((v, w)) => (v, Some(u64::from_str_radix(w, 16).ok()?)),
                None => (stem, None),
            };
            Some(Listed {
                version: v.parse().ok()?,
                writer,
                path: m.location,
                modified: m.last_modified,
            })
        })
        .collect())
}

/// Removes this writer's older snapshots, other writers' snapshots that a
/// newer one superseded and that were not rewritten for [`RUN_GRACE`] (their
/// replica stopped or moved), and runs no remaining snapshot names.
async fn clean_up(
    store: &dyn ObjectStore,
    written: &Path,
    version: i64,
    mut named: HashSet<u64>,
) -> Result<(), SnapshotError> {
    let cutoff = chrono::Utc::now() - RUN_GRACE;
    for s in list_snapshots(store).await? {
        if &s.path == written {
            continue;
        }
        let own = s.writer.is_none_or(|w| w == writer());
        if own || (s.version < version && s.modified < cutoff) {
            let _ = store.delete(&s.path).await;
            continue;
        }
        match read_run_refs(store, &s.path).await {
            Some(refs) => named.extend(refs.iter().map(|r| r.id)),
            // Unreadable (being replaced, say): keep every run this time.
            None => return Ok(()),
        }
    }
    remove_unnamed_runs(store, &named).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;
    use proptest::prelude::*;

    /// A snapshot without runs, decoded in memory.
    fn round_trip(set: &KeySet) -> KeySet {
        let d = decode(&set.encode()).unwrap();
        KeySet {
            generations: d.generations.into_iter().map(|(g, _)| g).collect(),
            ..Default::default()
        }
    }

    proptest! {
        #[test]
        fn snapshot_round_trips(keys in proptest::collection::hash_set(any::<u128>(), 0..500)) {
            let mut set = KeySet::default();
            set.extend(keys.iter().copied());
            let back = round_trip(&set);
            prop_assert_eq!(back.len(), keys.len());
            prop_assert!(keys.iter().all(|k| back.contains(*k)));
        }
    }

    proptest! {
        /// With a horizon, a key is remembered at least that long and
        /// forgotten within 1.25 times it; generations survive a snapshot.
        #[test]
        fn a_horizon_forgets_keys_between_one_and_five_quarters_of_it(
            steps in proptest::collection::vec((0i64..400, 0u128..50), 1..200),
        ) {
            let h = 1_000i64;
            let mut set = KeySet::default().with_horizon(Some(std::time::Duration::from_millis(h as u64)));
            let mut now = 1_000_000i64;
            let mut last_added: std::collections::HashMap<u128, i64> = Default::default();
            for (dt, k) in steps {
                now += dt;
                set.forget_old(now);
                for (key, at) in &last_added {
                    let age = now - at;
                    if age < h {
                        prop_assert!(set.contains(*key), "key {key} forgotten after {age} ms");
                    }
                    if age > h + h / 4 {
                        prop_assert!(!set.contains(*key), "key {key} kept after {age} ms");
                    }
                }
                set.extend_at([k], now);
                last_added.insert(k, now);
                if k % 7 == 0 {
                    set = round_trip(&set);
                    set.horizon_ms = Some(h);
                }
            }
        }
    }

    #[test]
    fn a_snapshot_of_the_first_format_is_read() {
        let mut v1 = b"MDK1".to_vec();
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(&5u128.to_le_bytes());
        v1.extend_from_slice(&9u128.to_le_bytes());
        let d = decode(&v1).unwrap();
        let keys = &d.generations[0].0.keys;
        assert!(keys.contains(&5) && keys.contains(&9) && keys.len() == 2);
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let mut set = KeySet::default();
        set.extend([1, 2, 3]);
        let bytes = set.encode();
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
    }

    fn spill_dir(root: &std::path::Path, name: &str, max: usize) -> SpillDir {
        SpillDir::at(root.join(name), max).unwrap()
    }

    /// Keys beyond the budget spill to runs, merge, are uploaded once with
    /// the snapshot and come back, runs and all, in another directory (a
    /// restart or another replica); runs no snapshot names are cleaned up.
    #[tokio::test]
    async fn spilled_keys_survive_a_snapshot_and_a_move() {
        let lake = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(lake.path()).unwrap();
        let mut set = KeySet::default().with_spill(Some(spill_dir(local.path(), "a", 1000)));
        let keys: Vec<u128> = (0..20_000u64)
            .map(|i| xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
            .collect();
        for chunk in keys.chunks(300) {
            set.extend(chunk.iter().copied());
            assert!(set.in_memory() <= 1000, "{} in memory", set.in_memory());
        }
        assert_eq!(set.len(), keys.len());
        assert!(set.runs() >= 1 && set.runs() < 12, "{} runs", set.runs());
        set.save(&store, 5).await.unwrap();
        let uploaded: Vec<_> = store
            .list(Some(&Path::from(RUNS_DIR)))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(uploaded.len(), set.runs());

        let (v, back) = KeySet::load(&store, 10, || Ok(Some(spill_dir(local.path(), "b", 1000))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((v, back.len(), back.runs()), (5, keys.len(), set.runs()));
        assert!(keys.iter().all(|k| back.contains(*k)));
        assert!(!back.contains(7));
        // Without a local directory the runs are read into memory.
        let (_, mem) = KeySet::load(&store, 10, || Ok(None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((mem.len(), mem.runs()), (keys.len(), 0));
        assert!(keys.iter().all(|k| mem.contains(*k)));
        // A snapshot older than every one written is not there to load.
        assert!(
            KeySet::load(&store, 4, || Ok(None))
                .await
                .unwrap()
                .is_none()
        );
    }

    /// Two replicas sharing a product: one's save keeps the other's recent
    /// snapshot and the old runs it names; a snapshot its writer stopped
    /// rewriting goes, with its runs, once superseded and past the grace.
    #[tokio::test]
    async fn another_replicas_snapshot_keeps_its_runs_until_it_goes_quiet() {
        let lake = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(lake.path()).unwrap();
        let mut other = KeySet::default().with_spill(Some(spill_dir(local.path(), "o", 1000)));
        other.extend((10u128..3000).map(|i| i << 70));
        assert!(other.runs() > 0);
        for r in other.generations.iter().flat_map(|g| &g.runs) {
            upload(&store, r).await.unwrap();
        }
        let theirs = lake.path().join(format!(
            "{SNAPSHOT_DIR}/dedupe-{:020}-{:016x}.bin",
            5,
            writer() ^ 1
        ));
        std::fs::write(&theirs, other.encode()).unwrap();
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        let age = |p: &std::path::Path| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap()
        };
        let runs_dir = lake.path().join(RUNS_DIR);
        let run_files = || std::fs::read_dir(&runs_dir).unwrap().count();
        for e in std::fs::read_dir(&runs_dir).unwrap() {
            age(&e.unwrap().path());
        }
        let mut mine = KeySet::default();
        mine.extend([1u128, 2]);
        mine.save(&store, 9).await.unwrap();
        assert!(theirs.exists(), "a live replica's snapshot was removed");
        assert_eq!(
            run_files(),
            other.runs(),
            "runs a live snapshot names were removed"
        );

        age(&theirs);
        mine.save(&store, 10).await.unwrap();
        assert!(!theirs.exists(), "a quiet, superseded snapshot stayed");
        assert_eq!(run_files(), 0, "runs no snapshot names stayed");
    }

    #[tokio::test]
    async fn a_snapshot_whose_run_is_gone_gives_way_to_an_older_one() {
        let lake = tempfile::tempdir().unwrap();
        let local = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(lake.path()).unwrap();
        let mut old = KeySet::default();
        old.extend([1u128, 2]);
        old.save(&store, 3).await.unwrap();
        let mut set = KeySet::default().with_spill(Some(spill_dir(local.path(), "a", 1000)));
        set.extend((10u128..3000).map(|i| i << 70));
        assert!(set.runs() > 0);
        // Written directly so the older snapshot stays.
        for g in &mut set.generations {
            for r in &mut g.runs {
                upload(&store, r).await.unwrap();
            }
        }
        store
            .put(
                &Path::from(format!("{SNAPSHOT_DIR}/dedupe-{:020}.bin", 8)),
                PutPayload::from(set.encode()),
            )
            .await
            .unwrap();
        for r in set.generations.iter().flat_map(|g| &g.runs) {
            store.delete(&run_path(r.id)).await.unwrap();
        }
        let (v, back) = KeySet::load(&store, 10, || Ok(Some(spill_dir(local.path(), "b", 1000))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((v, back.len()), (3, 2));
    }
}
