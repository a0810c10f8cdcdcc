//! The embedded store: one JSON file, for a single coordinator without etcd.
//!
//! The file holds every key with its create and mod revisions, and a global revision counter,
//! like etcd's MVCC keyspace without history. Each write rewrites it atomically (temp file,
//! fsync, rename, fsync of the directory), so a crash leaves the old or the new state, never a
//! mix. An exclusive `flock` on `<path>.lock`, held as long as any clone of the store lives,
//! keeps a second coordinator (in this process or another) from using the same file.
//!
//! Leadership mirrors the etcd store: a campaign creates `election/<epoch>`, whose create
//! revision is the epoch, and every leader write checks it. Revisions persist, so every run's
//! epoch is above every earlier run's.

use super::{Candidate, KeyValue, LeaderInfo, Leadership, StoreError, WriteOp};
use nix::fcntl::{Flock, FlockArg};
use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The election keys, relative.
const ELECTION_PREFIX: &str = "election/";
/// The file format written by this code.
const FORMAT: u32 = 1;
/// How often a waiting campaign looks at its cancel token (a token cannot wake a condvar).
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// The file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Data {
    format: u32,
    /// The revision of the last write; the next write gets `revision + 1`.
    revision: i64,
    keys: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The value, hex-encoded (values are arbitrary bytes).
    value: String,
    create_revision: i64,
    mod_revision: i64,
}

/// What an election key holds.
#[derive(Debug, Serialize, Deserialize)]
struct ElectionValue {
    id: String,
    address: String,
}

/// The leadership handed out by this store and not yet given up.
#[derive(Debug)]
struct Live {
    key: String,
    lost: CancellationToken,
}

#[derive(Debug)]
struct State {
    data: Data,
    leader: Option<Live>,
}

struct Shared {
    path: PathBuf,
    state: Mutex<State>,
    /// Signalled when leadership is given up.
    released: Condvar,
    /// Held for the life of the store: dropping it releases the lock.
    _lock: Flock<File>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle is gone: nobody can write through this leadership any more, so say so.
        if let Some(live) = lock_state(&self.state).leader.take() {
            live.lost.cancel();
        }
    }
}

/// Progress and leadership in one local file, for a single coordinator. Cheap to clone; all
/// clones share the state and the file lock.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Every mutation replaces `data` whole after it is on disk, so a panic elsewhere cannot leave
/// the state half-changed: recovering a poisoned lock is safe.
fn lock_state(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what} {}: {e}", path.display()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn to_kv(key: &str, e: &Entry) -> Result<KeyValue, StoreError> {
    let value = hex::decode(&e.value)
        .map_err(|err| StoreError::Corrupt(format!("value of {key} is not hex: {err}")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value,
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
    })
}

/// Writes `data` to `path` so that a crash leaves either the old or the new file.
fn persist(path: &Path, data: &Data) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(data)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode the store: {e}")))?;
    let tmp = with_suffix(path, ".tmp");
    let write = || -> std::io::Result<()> {
        // Owner only: the store holds every plan (artifact URLs included).
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(())
    };
    write().map_err(|e| io_error("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("cannot replace", path, e))?;
    // The rename is durable only once the directory entry is.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync directory", dir, e))
}

/// Refuses a directory others may write to: whoever can replace the store file can write a
/// plan, and a plan runs code on every server.
fn check_private_dir(dir: &Path) -> Result<(), StoreError> {
    let meta = std::fs::metadata(dir).map_err(|e| io_error("cannot inspect", dir, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StoreError::Unsafe(format!(
            "directory {} is writable by group or others (mode {:o}): chmod go-w it, or put the store in a directory of its own",
            dir.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

/// Puts `key` at revision `rev` in `data`.
fn put(data: &mut Data, key: String, value: &[u8], rev: i64) {
    let create_revision = data.keys.get(&key).map_or(rev, |e| e.create_revision);
    data.keys.insert(
        key,
        Entry {
            value: hex::encode(value),
            create_revision,
            mod_revision: rev,
        },
    );
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, locking `<path>.lock`. Fails with
    /// [`StoreError::Locked`] while another store holds it, in this process or another.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir,
            None => Path::new("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("cannot create directory", dir, e))?;
        check_private_dir(dir)?;
        let lock_path = with_suffix(path, ".lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_error("cannot open lock file", &lock_path, e))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Locked {
                    path: path.display().to_string(),
                })
            }
            Err((_, e)) => return Err(io_error("cannot lock", &lock_path, e.into())),
        };

        // A store written by an older build may be readable by others: it holds the plans.
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| io_error("cannot restrict", path, e))?;
            }
        }
        let mut data = match std::fs::read(path) {
            Ok(bytes) => {
                let data: Data = serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::Corrupt(format!("{} is not a rollgate store: {e}", path.display()))
                })?;
                if data.format != FORMAT {
                    return Err(StoreError::Corrupt(format!(
                        "{} has format {}, this build reads {FORMAT}",
                        path.display(),
                        data.format
                    )));
                }
                data
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Data {
                format: FORMAT,
                ..Data::default()
            },
            Err(e) => return Err(io_error("cannot read", path, e)),
        };
        // We hold the lock, so any election key left behind belongs to a coordinator that died
        // without resigning: clear it, or leader() would report a ghost.
        let stale: Vec<String> = data
            .keys
            .range(ELECTION_PREFIX.to_owned()..)
            .map(|(k, _)| k.clone())
            .take_while(|k| k.starts_with(ELECTION_PREFIX))
            .collect();
        if !stale.is_empty() {
            data.revision += 1;
            for k in &stale {
                data.keys.remove(k);
            }
            persist(path, &data)?;
            tracing::info!(path = %path.display(), keys = ?stale, "cleared the election key of a previous run");
        }
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                state: Mutex::new(State { data, leader: None }),
                released: Condvar::new(),
                _lock: lock,
            }),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let st = lock_state(&self.shared.state);
        st.data.keys.get(key).map(|e| to_kv(key, e)).transpose()
    }

    /// Reads every key under `prefix`, sorted by key.
    pub fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let st = lock_state(&self.shared.state);
        st.data
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| to_kv(k, e))
            .collect()
    }

    /// See [`super::Store::page`].
    pub fn page(&self, page: &super::KeyPage) -> Result<Vec<KeyValue>, StoreError> {
        if page.start >= page.end {
            return Ok(Vec::new());
        }
        let st = lock_state(&self.shared.state);
        let range = st.data.keys.range(page.start.clone()..page.end.clone());
        let mut out = if page.from_end {
            range
                .rev()
                .take(page.limit)
                .map(|(k, e)| to_kv(k, e))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            range
                .take(page.limit)
                .map(|(k, e)| to_kv(k, e))
                .collect::<Result<Vec<_>, _>>()?
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The current leader: the election key with the lowest create revision.
    pub fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let st = lock_state(&self.shared.state);
        let first = st
            .data
            .keys
            .range(ELECTION_PREFIX.to_owned()..)
            .take_while(|(k, _)| k.starts_with(ELECTION_PREFIX))
            .min_by_key(|(_, e)| e.create_revision);
        let Some((key, e)) = first else {
            return Ok(None);
        };
        let kv = to_kv(key, e)?;
        let v: ElectionValue = serde_json::from_slice(&kv.value).map_err(|err| {
            StoreError::Corrupt(format!("election key {key} holds no candidate: {err}"))
        })?;
        let epoch = u64::try_from(e.create_revision)
            .map_err(|_| StoreError::Corrupt(format!("negative create revision in {key}")))?;
        Ok(Some(LeaderInfo {
            id: v.id,
            address: v.address,
            epoch: Epoch(epoch),
        }))
    }

    /// Wins at once when nobody leads through this store; otherwise blocks until the current
    /// leadership is resigned (or its `lost` token cancelled), or `cancel` fires. `ttl` only
    /// fills [`Leadership::ttl`]: the leadership ends on resign or when the store is dropped.
    ///
    /// This is a blocking call. Inside a multi-thread tokio runtime the wait runs under
    /// `block_in_place`; inside a current-thread runtime it cannot wait (nothing else could
    /// run to resign) and returns [`StoreError::Unavailable`] instead of deadlocking. A
    /// [`Leadership`] dropped without resign (and with `lost` not cancelled) holds until the
    /// store is dropped.
    pub fn campaign(
        &self,
        me: &Candidate,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Result<Leadership, StoreError> {
        let value = serde_json::to_vec(&ElectionValue {
            id: me.id.clone(),
            address: me.address.clone(),
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode candidate: {e}")))?;
        let mut st = lock_state(&self.shared.state);
        if self.must_wait(&mut st)? {
            drop(st);
            st = self.wait_for_release(cancel)?;
        }
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled);
        }

        let mut data = st.data.clone();
        data.revision += 1;
        let rev = data.revision;
        let key = format!("{ELECTION_PREFIX}{rev:016x}");
        put(&mut data, key.clone(), &value, rev);
        persist(&self.shared.path, &data)?;
        st.data = data;
        let lost = CancellationToken::new();
        st.leader = Some(Live {
            key: key.clone(),
            lost: lost.clone(),
        });
        tracing::info!(id = %me.id, epoch = rev, path = %self.shared.path.display(), "leading through the embedded store");
        Ok(Leadership {
            epoch: Epoch(rev.unsigned_abs()),
            key,
            lost,
            ttl,
            lease_id: 0,
        })
    }

    /// True while a leadership is live. One whose `lost` token was cancelled is given up, as
    /// an etcd lease stops being renewed: its key is removed here.
    fn must_wait(&self, st: &mut State) -> Result<bool, StoreError> {
        let Some(live) = &st.leader else {
            return Ok(false);
        };
        if !live.lost.is_cancelled() {
            return Ok(true);
        }
        let key = live.key.clone();
        let mut data = st.data.clone();
        if data.keys.remove(&key).is_some() {
            data.revision += 1;
            persist(&self.shared.path, &data)?;
            st.data = data;
        }
        st.leader = None;
        Ok(false)
    }

    fn wait_for_release(
        &self,
        cancel: &CancellationToken,
    ) -> Result<MutexGuard<'_, State>, StoreError> {
        let wait = || -> Result<MutexGuard<'_, State>, StoreError> {
            let mut st = lock_state(&self.shared.state);
            loop {
                if cancel.is_cancelled() {
                    return Err(StoreError::Cancelled);
                }
                if !self.must_wait(&mut st)? {
                    return Ok(st);
                }
                st = self
                    .shared
                    .released
                    .wait_timeout(st, CANCEL_POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            Ok(_) => Err(StoreError::Unavailable(
                "the embedded store is already led in this process, and a current-thread runtime cannot wait for it".into(),
            )),
            Err(_) => wait(),
        }
    }

    /// Applies `ops` at one new revision if and only if the election key still has create
    /// revision `leadership.epoch`. Returns the revision of the write.
    pub fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError> {
        let epoch = leadership.epoch;
        if leadership.lost.is_cancelled() {
            return Err(StoreError::Fenced { epoch });
        }
        let mut st = lock_state(&self.shared.state);
        let holds = st
            .data
            .keys
            .get(&leadership.key)
            .is_some_and(|e| u64::try_from(e.create_revision).ok() == Some(epoch.get()));
        if !holds {
            leadership.lost.cancel();
            return Err(StoreError::Fenced { epoch });
        }
        let mut data = st.data.clone();
        let rev = data.revision + 1;
        let mut changed = false;
        for op in ops {
            match op {
                WriteOp::Put { key, value } => {
                    put(&mut data, key, &value, rev);
                    changed = true;
                }
                WriteOp::Delete { key } => changed |= data.keys.remove(&key).is_some(),
                // BTreeMap::range panics on an inverted range; etcd deletes nothing.
                WriteOp::DeleteRange { start, end } if start < end => {
                    let doomed: Vec<String> = data
                        .keys
                        .range(start..end)
                        .map(|(k, _)| k.clone())
                        .collect();
                    changed |= !doomed.is_empty();
                    for k in doomed {
                        data.keys.remove(&k);
                    }
                }
                WriteOp::DeleteRange { .. } => {}
            }
        }
        // Like etcd, a transaction that changes nothing does not make a revision.
        if !changed {
            return Ok(data.revision);
        }
        data.revision = rev;
        persist(&self.shared.path, &data)?;
        st.data = data;
        Ok(rev)
    }

    /// Gives leadership up: deletes the election key and cancels `leadership.lost`. Waiting
    /// campaigns wake at once.
    pub fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        leadership.lost.cancel();
        let mut st = lock_state(&self.shared.state);
        let mine =
            st.data.keys.get(&leadership.key).is_some_and(|e| {
                u64::try_from(e.create_revision).ok() == Some(leadership.epoch.get())
            });
        if mine {
            let mut data = st.data.clone();
            data.keys.remove(&leadership.key);
            data.revision += 1;
            persist(&self.shared.path, &data)?;
            st.data = data;
        }
        if st.leader.as_ref().is_some_and(|l| l.key == leadership.key) {
            st.leader = None;
        }
        drop(st);
        self.shared.released.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[tokio::test]
    async fn files_are_private_and_a_shared_directory_is_refused(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("state");
        let path = dir.join("store.json");
        {
            let s = EmbeddedStore::open(&path)?;
            let l = s.campaign(&me("a"), Duration::from_secs(2), &CancellationToken::new())?;
            s.fenced_write(&l, vec![put_op("k", "v")])?;
        }
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".lock")), 0o600);

        // A store left readable by an older build is restricted on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        drop(EmbeddedStore::open(&path)?);
        assert_eq!(mode(&path), 0o600);

        // Another user could replace the file in a group- or world-writable directory.
        for loose in [0o777, 0o770, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(loose))?;
            let err = EmbeddedStore::open(&path).expect_err("a shared directory");
            assert!(matches!(err, StoreError::Unsafe(_)), "{err}");
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        Ok(())
    }

    fn put_op(key: &str, value: &str) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn writes_read_back_with_revisions() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let l = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;
        let r1 = s.fenced_write(
            &l,
            vec![put_op("p/a", "1"), put_op("p/b", "2"), put_op("q", "3")],
        )?;
        assert!(r1 > l.epoch.get() as i64);
        let a = s.get("p/a")?.ok_or("p/a missing")?;
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"1"[..], r1, r1)
        );
        let r2 = s.fenced_write(
            &l,
            vec![put_op("p/a", "one"), WriteOp::Delete { key: "p/b".into() }],
        )?;
        assert_eq!(r2, r1 + 1);
        let a = s.get("p/a")?.ok_or("p/a missing")?;
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"one"[..], r1, r2)
        );
        assert_eq!(s.get("p/b")?, None);
        let keys: Vec<String> = s.range("p/")?.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["p/a"]);
        // Deleting nothing makes no revision.
        assert_eq!(
            s.fenced_write(&l, vec![WriteOp::Delete { key: "nope".into() }])?,
            r2
        );
        Ok(())
    }

    #[test]
    fn data_and_revisions_survive_reopen_and_epochs_grow() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/store.json");
        let first = {
            let s = EmbeddedStore::open(&path)?;
            let l = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;
            s.fenced_write(&l, vec![put_op("k", "v")])?;
            // Dropped without resigning, as a crash would.
            l
        };
        assert!(
            first.lost.is_cancelled(),
            "dropping the store must end its leadership"
        );
        assert!(
            !with_suffix(&path, ".tmp").exists(),
            "no temp file is left behind"
        );
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(s.leader()?, None, "a dead run's election key is cleared");
        assert_eq!(s.get("k")?.map(|kv| kv.value), Some(b"v".to_vec()));
        let l = s.campaign(&me("b"), Duration::from_secs(5), &CancellationToken::new())?;
        assert!(
            l.epoch > first.epoch,
            "epoch {} must exceed the previous run's {}",
            l.epoch,
            first.epoch
        );
        assert_eq!(
            s.fenced_write(&first, vec![put_op("k", "stale")])
                .err()
                .map(|e| e.to_string()),
            Some(StoreError::Fenced { epoch: first.epoch }.to_string())
        );
        Ok(())
    }

    #[test]
    fn second_open_is_locked_until_all_clones_drop() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let s = EmbeddedStore::open(&path)?;
        let clone = s.clone();
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StoreError::Locked { .. })
        ));
        drop(s);
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StoreError::Locked { .. })
        ));
        drop(clone);
        EmbeddedStore::open(&path)?;
        Ok(())
    }

    #[test]
    fn corrupt_file_is_reported() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        std::fs::write(&path, b"{not json")?;
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
        Ok(())
    }

    #[test]
    fn stale_leadership_is_fenced_and_resign_is_idempotent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let l = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;
        let info = s.leader()?.ok_or("no leader")?;
        assert_eq!((info.id.as_str(), info.epoch), ("a", l.epoch));
        s.resign(&l)?;
        assert!(l.lost.is_cancelled());
        s.resign(&l)?;
        assert_eq!(s.leader()?, None);
        // The store itself refuses, not only the cancelled token.
        let forged = Leadership {
            lost: CancellationToken::new(),
            ..l.clone()
        };
        assert!(matches!(
            s.fenced_write(&forged, vec![put_op("k", "v")]),
            Err(StoreError::Fenced { .. })
        ));
        assert!(forged.lost.is_cancelled(), "a refused write cancels lost");
        assert_eq!(s.get("k")?, None);
        Ok(())
    }

    #[test]
    fn second_campaign_waits_for_resign_or_cancel() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let first = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;

        // Cancelled while waiting.
        let cancel = CancellationToken::new();
        let waiter = {
            let (s, cancel) = (s.clone(), cancel.clone());
            std::thread::spawn(move || s.campaign(&me("b"), Duration::from_secs(5), &cancel))
        };
        cancel.cancel();
        let r = waiter.join().map_err(|_| "campaign thread panicked")?;
        assert!(matches!(r, Err(StoreError::Cancelled)), "{r:?}");

        // Released by resign.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || {
                let r = s.campaign(&me("c"), Duration::from_secs(5), &CancellationToken::new());
                let _ = tx.send(());
                r
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "second campaign must wait while the first leads"
        );
        s.resign(&first)?;
        let second = waiter.join().map_err(|_| "campaign thread panicked")??;
        assert!(second.epoch > first.epoch);
        assert_eq!(s.leader()?.map(|i| i.id), Some("c".to_owned()));
        Ok(())
    }

    #[test]
    fn cancelled_lost_token_releases_leadership() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let first = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;
        first.lost.cancel();
        let second = s.campaign(&me("b"), Duration::from_secs(5), &CancellationToken::new())?;
        assert!(second.epoch > first.epoch);
        let forged = Leadership {
            lost: CancellationToken::new(),
            ..first
        };
        assert!(matches!(
            s.fenced_write(&forged, vec![]),
            Err(StoreError::Fenced { .. })
        ));
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn current_thread_runtime_does_not_deadlock() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let _first = s.campaign(&me("a"), Duration::from_secs(5), &CancellationToken::new())?;
        let r = s.campaign(&me("b"), Duration::from_secs(5), &CancellationToken::new());
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        Ok(())
    }
}
