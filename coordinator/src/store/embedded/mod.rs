//! The embedded store: a snapshot and an append-only log, for a single coordinator without
//! etcd.
//!
//! The keyspace (every key with its create and mod revisions, and a global revision counter,
//! like etcd's MVCC keyspace without history) is held in memory, so reads never touch the disk.
//! On disk it is `<path>`, a snapshot of the keyspace at some revision, and `<path>.log`, one
//! JSON line per transaction after it (its revision and operations). A write costs one appended
//! line and one fsync, whatever the size of the keyspace.
//!
//! A record is committed once its line, newline included, is synced: the newline is the commit
//! mark, as in the agent's journal. On open the snapshot is loaded and the log replayed; a last
//! line without its newline (or a last line that does not parse, with nothing after it) is a
//! torn append that was never acknowledged, and is cut off; a bad line with records after it is
//! corruption, and the store refuses to open ([`StoreError::Corrupt`], naming file and offset),
//! as it does when the revisions of the log do not follow each other.
//!
//! Writes never run on the caller's thread: one writer thread owns the log. It takes every
//! transaction waiting for it, decides each in order against the keyspace as the ones before it
//! leave it (the fencing check included, so a stale leader's write is refused atomically), and
//! appends them with one fsync (group commit). Only then are they applied in memory, in that
//! order, and answered: a write is visible and acknowledged only once durable. A failed append
//! leaves the log's tail unknown, so the writer then refuses every write until the store is
//! reopened.
//!
//! When the log outgrows the snapshot ([`Compaction`]), the writer writes a new snapshot and
//! empties the log. Each step leaves a store that opens to the same keyspace: the snapshot goes
//! to `<path>.tmp` and is synced (a crash leaves a stray temp file, removed on open), renamed
//! over `<path>` and the directory synced (a crash leaves the new snapshot with the old log,
//! whose records it already holds: replay skips records at or below the snapshot's revision),
//! and only then is the log truncated and synced.
//!
//! An exclusive `flock` on `<path>.lock`, held as long as any clone of the store lives (and
//! until its writer thread has finished), keeps a second coordinator (in this process or
//! another) from using the same files.
//!
//! Leadership mirrors the etcd store: a campaign creates `election/<epoch>`, whose create
//! revision is the epoch, and every leader write checks it. Revisions persist, so every run's
//! epoch is above every earlier run's.

use super::{Candidate, KeyValue, LeaderInfo, Leadership, StoreError, WriteOp};
use nix::fcntl::{Flock, FlockArg};
use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::ops::Bound;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

mod files;
mod writer;

use files::*;
use writer::*;

/// The election keys, relative.
const ELECTION_PREFIX: &str = "election/";
/// The snapshot format written by this code. 1 was a single file rewritten on every write.
const FORMAT: u32 = 2;
/// At most this many transactions share one fsync.
const MAX_BATCH: usize = 256;

/// What an election key holds.
#[derive(Debug, Serialize, Deserialize)]
struct ElectionValue {
    id: String,
    address: String,
}

/// The leadership handed out by this store and not yet given up.
#[derive(Debug, Clone)]
struct Live {
    key: String,
    lost: CancellationToken,
}

#[derive(Debug)]
struct State {
    data: Data,
    leader: Option<Live>,
}

/// What the handles and the writer thread share.
struct Inner {
    path: PathBuf,
    state: RwLock<State>,
    /// Signalled when leadership is given up.
    released: Notify,
}

struct Shared {
    inner: Arc<Inner>,
    /// Closed on drop, which ends the writer thread once it has answered what was sent.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    /// Held for the life of the store: dropping it releases the lock. Dropped after the writer
    /// thread has ended, so that nobody can open the files while it still appends.
    _lock: Flock<File>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            // Every handle is gone, so no job is waited for: this waits at most for the last
            // batch's fsync, and keeps the lock until the files are left alone.
            let _ = writer.join();
        }
        // Nobody can write through this leadership any more, so say so.
        if let Some(live) = write_state(&self.inner.state).leader.take() {
            live.lost.cancel();
        }
    }
}

/// Progress and leadership in local files, for a single coordinator. Cheap to clone; all
/// clones share the state, the writer thread and the file lock.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.shared.inner.path)
            .finish_non_exhaustive()
    }
}

/// Only the writer thread changes the state, after the change is durable, and from changes
/// it decided whole beforehand: a poisoned lock means that thread panicked, and every later
/// write then fails because the thread is gone. Reading what it left is safe.
fn read_state(m: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    m.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn get_in(st: &State, key: &str) -> Result<Option<KeyValue>, StoreError> {
    st.data.keys.get(key).map(|e| to_kv(key, e)).transpose()
}

fn range_in(st: &State, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    st.data
        .keys
        .range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, e)| to_kv(k, e))
        .collect()
}

fn page_in(st: &State, page: &super::KeyPage) -> Result<Vec<KeyValue>, StoreError> {
    if page.start >= page.end {
        return Ok(Vec::new());
    }
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

fn write_state(m: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    m.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path` (the snapshot; the log is `<path>.log`), locking
    /// `<path>.lock`. Fails with [`StoreError::Locked`] while another store holds it, in this
    /// process or another. Blocking: it reads and replays the files (once, at start-up).
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with(path, Compaction::DEFAULT)
    }

    pub(crate) fn open_with(
        path: &Path,
        compaction: Compaction,
    ) -> Result<EmbeddedStore, StoreError> {
        let dir = parent_dir(path);
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

        // A snapshot write cut short: the snapshot and the log in place are whole without it.
        let tmp = with_suffix(path, ".tmp");
        match std::fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "removed the temp file of an unfinished compaction")
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot remove", &tmp, e)),
        }
        let log_path = with_suffix(path, ".log");
        restrict(path)?;
        restrict(&log_path)?;
        let (mut data, snapshot_len) = read_snapshot(path)?;
        let bytes = match std::fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("cannot read", &log_path, e)),
        };
        let good = replay(&log_path, &bytes, &mut data)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| io_error("cannot open", &log_path, e))?;
        // Cut a torn tail so the next record starts on a line of its own, durably before any
        // record goes after it.
        if bytes.len() as u64 > good {
            tracing::warn!(
                path = %log_path.display(),
                dropped_bytes = bytes.len() as u64 - good,
                "cutting a torn last record off the store's log (an append cut short by a crash)"
            );
            file.set_len(good)
                .and_then(|()| file.sync_data())
                .map_err(|e| io_error("cannot cut", &log_path, e))?;
        }
        // The log may have just been created: its directory entry must be durable before a
        // write that lives only in it is acknowledged.
        sync_dir(dir)?;
        let mut log = Log {
            path: log_path,
            file,
            len: good,
        };

        // We hold the lock, so any election key left behind belongs to a coordinator that died
        // without resigning: clear it, or leader() would report a ghost.
        let stale: Vec<LogOp> = data
            .keys
            .keys_in(ELECTION_PREFIX, "election0")
            .into_iter()
            .map(|key| LogOp::Delete { key })
            .collect();
        if !stale.is_empty() {
            let rev = data.revision + 1;
            let (record, line) = encode_record(rev, stale)?;
            log.append(&line)?;
            apply(&mut data.keys, rev, &record.ops);
            data.revision = rev;
            tracing::info!(path = %path.display(), keys = record.ops.len(), "cleared the election key of a previous run");
        }

        let inner = Arc::new(Inner {
            path: path.to_owned(),
            state: RwLock::new(State { data, leader: None }),
            released: Notify::new(),
        });
        let (jobs, rx) = mpsc::channel();
        let writer = Writer {
            inner: inner.clone(),
            log,
            snapshot_len,
            compaction,
            retry_compaction_at: 0,
            broken: None,
        };
        let writer = std::thread::Builder::new()
            .name("rollgate-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_error("cannot start the writer thread of", path, e))?;
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                inner,
                jobs: Some(jobs),
                writer: Some(writer),
                _lock: lock,
            }),
        })
    }

    /// The store file (the snapshot).
    pub fn path(&self) -> &Path {
        &self.shared.inner.path
    }

    /// Hands a change to the writer thread and waits, without blocking the caller's thread, for
    /// it to be durable (or refused).
    async fn submit(&self, request: Request) -> Result<Answer, StoreError> {
        let gone = || {
            StoreError::Unavailable(format!(
                "the writer thread of the embedded store {} has stopped",
                self.shared.inner.path.display()
            ))
        };
        let (reply, answer) = oneshot::channel();
        self.shared
            .jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(Job { request, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let st = read_state(&self.shared.inner.state);
        get_in(&st, key)
    }

    /// Reads every key under `prefix`, sorted by key.
    pub fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let st = read_state(&self.shared.inner.state);
        range_in(&st, prefix)
    }

    /// See [`super::Store::page`].
    pub fn page(&self, page: &super::KeyPage) -> Result<Vec<KeyValue>, StoreError> {
        let st = read_state(&self.shared.inner.state);
        page_in(&st, page)
    }

    /// See [`super::Store::read_all`]: every read under one hold of the state's lock.
    pub fn read_all(&self, reads: &[super::Read]) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let st = read_state(&self.shared.inner.state);
        reads
            .iter()
            .map(|r| match r {
                super::Read::Key(k) => Ok(get_in(&st, k)?.into_iter().collect()),
                super::Read::Prefix(p) => range_in(&st, p),
                super::Read::Page(p) => page_in(&st, p),
            })
            .collect()
    }

    /// The current leader: the election key with the lowest create revision.
    pub fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let st = read_state(&self.shared.inner.state);
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

    /// Wins at once when nobody leads through this store; otherwise waits (asynchronously, on
    /// any runtime) until the current leadership is resigned or its `lost` token cancelled, or
    /// `cancel` fires. `ttl` only fills [`Leadership::ttl`]: the leadership ends on resign or
    /// when the store is dropped. A [`Leadership`] dropped without resign (and with `lost` not
    /// cancelled) holds until the store is dropped; a campaign dropped before it returns gives
    /// up what it may have won.
    pub async fn campaign(
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
        let lost = CancellationToken::new();
        // Disarmed once the leadership is handed over: a caller that stops waiting for it
        // cannot resign it, so it must not keep the store led.
        let unclaimed = lost.clone().drop_guard();
        loop {
            if cancel.is_cancelled() {
                return Err(StoreError::Cancelled);
            }
            // Registered before asking, so that a resign between the answer and the wait is
            // not missed.
            let released = self.shared.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let request = Request::Campaign {
                value: value.clone(),
                lost: lost.clone(),
            };
            match self.submit(request).await? {
                Answer::Revision(rev) => {
                    let key = format!("{ELECTION_PREFIX}{rev:016x}");
                    tracing::info!(id = %me.id, epoch = rev, path = %self.path().display(), "leading through the embedded store");
                    return Ok(Leadership {
                        epoch: Epoch(rev.unsigned_abs()),
                        key,
                        lost: unclaimed.disarm(),
                        ttl,
                        lease_id: 0,
                    });
                }
                Answer::Busy(holder) => {
                    tokio::select! {
                        () = cancel.cancelled() => return Err(StoreError::Cancelled),
                        () = holder.cancelled() => {}
                        () = &mut released => {}
                    }
                }
            }
        }
    }

    /// Applies `ops` at one new revision if and only if the election key still has create
    /// revision `leadership.epoch`, once durable. Returns the revision of the write.
    pub async fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError> {
        let epoch = leadership.epoch;
        if leadership.lost.is_cancelled() {
            return Err(StoreError::Fenced { epoch });
        }
        let request = Request::Write {
            key: leadership.key.clone(),
            epoch,
            lost: leadership.lost.clone(),
            ops,
        };
        revision(self.submit(request).await?)
    }

    /// Gives leadership up: deletes the election key and cancels `leadership.lost`. Waiting
    /// campaigns wake at once.
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        leadership.lost.cancel();
        let request = Request::Resign {
            key: leadership.key.clone(),
            epoch: leadership.epoch,
        };
        revision(self.submit(request).await?).map(drop)
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

    fn put_op(key: &str, value: &str) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn lead(s: &EmbeddedStore, id: &str) -> Result<Leadership, StoreError> {
        s.campaign(&me(id), Duration::from_secs(5), &CancellationToken::new())
            .await
    }

    /// Every key with its value and revisions, and the store's revision, for comparing a
    /// store with its reopened self.
    fn dump(s: &EmbeddedStore) -> (i64, Vec<(String, String, i64, i64)>) {
        let st = read_state(&s.shared.inner.state);
        let keys = st
            .data
            .keys
            .iter()
            .filter(|(k, _)| !k.starts_with(ELECTION_PREFIX))
            .map(|(k, e)| {
                (
                    k.clone(),
                    e.value.clone(),
                    e.create_revision,
                    e.mod_revision,
                )
            })
            .collect();
        (st.data.revision, keys)
    }

    fn log_of(path: &Path) -> PathBuf {
        with_suffix(path, ".log")
    }

    #[tokio::test]
    async fn files_are_private_and_a_shared_directory_is_refused() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("state");
        let path = dir.join("store.json");
        let tiny = Compaction {
            min_log_bytes: 0,
            factor: 0,
        };
        {
            let s = EmbeddedStore::open_with(&path, tiny)?;
            let l = lead(&s, "a").await?;
            s.fenced_write(&l, vec![put_op("k", "v")]).await?;
        }
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600, "the snapshot (compaction ran)");
        assert_eq!(mode(&log_of(&path)), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".lock")), 0o600);

        // Files left readable by an older build are restricted on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        std::fs::set_permissions(log_of(&path), std::fs::Permissions::from_mode(0o644))?;
        drop(EmbeddedStore::open(&path)?);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&log_of(&path)), 0o600);

        // Another user could replace the files in a group- or world-writable directory.
        for loose in [0o777, 0o770, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(loose))?;
            let err = EmbeddedStore::open(&path).expect_err("a shared directory");
            assert!(matches!(err, StoreError::Unsafe(_)), "{err}");
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn writes_read_back_with_revisions() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let l = lead(&s, "a").await?;
        let r1 = s
            .fenced_write(
                &l,
                vec![put_op("p/a", "1"), put_op("p/b", "2"), put_op("q", "3")],
            )
            .await?;
        assert!(r1 > l.epoch.get() as i64);
        let a = s.get("p/a")?.ok_or("p/a missing")?;
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"1"[..], r1, r1)
        );
        let r2 = s
            .fenced_write(
                &l,
                vec![put_op("p/a", "one"), WriteOp::Delete { key: "p/b".into() }],
            )
            .await?;
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
            s.fenced_write(&l, vec![WriteOp::Delete { key: "nope".into() }])
                .await?,
            r2
        );
        Ok(())
    }

    #[tokio::test]
    async fn data_and_revisions_survive_reopen_and_epochs_grow() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/store.json");
        let first = {
            let s = EmbeddedStore::open(&path)?;
            let l = lead(&s, "a").await?;
            s.fenced_write(&l, vec![put_op("k", "v")]).await?;
            // Dropped without resigning, as a crash would.
            l
        };
        assert!(
            first.lost.is_cancelled(),
            "dropping the store must end its leadership"
        );
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(s.leader()?, None, "a dead run's election key is cleared");
        assert_eq!(s.get("k")?.map(|kv| kv.value), Some(b"v".to_vec()));
        let l = lead(&s, "b").await?;
        assert!(
            l.epoch > first.epoch,
            "epoch {} must exceed the previous run's {}",
            l.epoch,
            first.epoch
        );
        assert_eq!(
            s.fenced_write(&first, vec![put_op("k", "stale")])
                .await
                .err()
                .map(|e| e.to_string()),
            Some(StoreError::Fenced { epoch: first.epoch }.to_string())
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_write_appends_one_line_and_leaves_the_snapshot_alone() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let s = EmbeddedStore::open(&path)?;
        let l = lead(&s, "a").await?;
        let bulk = (0..1000)
            .map(|i| put_op(&format!("pools/p/{i:04}"), &"x".repeat(64)))
            .collect();
        s.fenced_write(&l, bulk).await?;
        let before = std::fs::metadata(log_of(&path))?.len();
        for i in 0..20 {
            s.fenced_write(&l, vec![put_op("pools/p/0001", &format!("{i}"))])
                .await?;
        }
        let grown = std::fs::metadata(log_of(&path))?.len() - before;
        // One short line per write, not the ~100 KiB keyspace.
        assert!(grown < 20 * 100, "the log grew {grown} bytes for 20 writes");
        assert!(!path.exists(), "no snapshot before the first compaction");
        let text = std::fs::read_to_string(log_of(&path))?;
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 22, "campaign, bulk write, 20 writes");
        Ok(())
    }

    #[tokio::test]
    async fn second_open_is_locked_until_all_clones_drop() -> TestResult {
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
    fn corrupt_or_old_snapshot_is_reported() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        std::fs::write(&path, b"{not json")?;
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StoreError::Corrupt(_))
        ));
        // An earlier build's single file is refused by name, not misread.
        std::fs::write(
            &path,
            br#"{"format":1,"revision":3,"keys":{"k":{"value":"76","create_revision":2,"mod_revision":3}}}"#,
        )?;
        let err = EmbeddedStore::open(&path).expect_err("format 1");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(
            err.to_string().contains("earlier build (format 1)"),
            "{err}"
        );
        std::fs::write(&path, br#"{"format":9,"revision":3,"keys":{}}"#)?;
        let err = EmbeddedStore::open(&path).expect_err("format 9");
        assert!(err.to_string().contains("format 9"), "{err}");
        Ok(())
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_next_write_starts_a_clean_line() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let state = {
            let s = EmbeddedStore::open(&path)?;
            let l = lead(&s, "a").await?;
            s.fenced_write(&l, vec![put_op("k", "1")]).await?;
            dump(&s)
        };
        // A crash mid-append: part of a line, no newline.
        let mut f = OpenOptions::new().append(true).open(log_of(&path))?;
        f.write_all(br#"{"rev":99,"ops":[{"put":{"key":"k","va"#)?;
        drop(f);
        let s = EmbeddedStore::open(&path)?;
        // Reopening clears the election key: one revision more, same keys.
        assert_eq!(dump(&s).1, state.1);
        assert_eq!(dump(&s).0, state.0 + 1);
        let l = lead(&s, "b").await?;
        s.fenced_write(&l, vec![put_op("k", "2")]).await?;
        let after = dump(&s);
        drop(s);
        let text = std::fs::read_to_string(log_of(&path))?;
        assert!(!text.contains("\"va{"), "the torn bytes are gone: {text}");
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(dump(&s).1, after.1);

        // A whole last line whose newline got to the disk but not all of its bytes is torn
        // too, as long as nothing follows it.
        drop(s);
        let mut f = OpenOptions::new().append(true).open(log_of(&path))?;
        f.write_all(b"{\"rev\":\n")?;
        drop(f);
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(dump(&s).1, after.1);
        Ok(())
    }

    /// An append that fails (here: the disk fills up mid-record) is never acknowledged nor
    /// applied, and since the log's tail is unknown after it, the store refuses every later
    /// write, saying why, until it is reopened; reopened, it holds exactly what was
    /// acknowledged and takes writes again.
    #[tokio::test]
    async fn a_failed_append_refuses_writes_until_reopened_and_loses_nothing_acknowledged(
    ) -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let log = log_of(&path);
        let s = EmbeddedStore::open(&path)?;
        let l = lead(&s, "a").await?;
        s.fenced_write(&l, vec![put_op("k", "1")]).await?;
        let acknowledged = dump(&s);
        let len = std::fs::metadata(&log)?.len();
        files::disk_full::at(&log, Some(len + 10));

        let err = s
            .fenced_write(&l, vec![put_op("k", "2"), put_op("j", "2")])
            .await
            .err()
            .ok_or("a write past a full disk was acknowledged")?;
        assert!(matches!(err, StoreError::Broken(_)), "{err:?}");
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(dump(&s), acknowledged, "a refused write is not applied");
        assert_eq!(std::fs::metadata(&log)?.len(), len + 10, "a torn record");

        // Room again, but the tail is unknown: refused until reopened, saying so.
        files::disk_full::at(&log, None);
        let err = s
            .fenced_write(&l, vec![put_op("k", "3")])
            .await
            .err()
            .ok_or("a write after a failed append was acknowledged")?;
        assert!(
            matches!(&err, StoreError::Broken(m) if m.contains("no space left"))
                && err.to_string().contains("no writes until it is reopened"),
            "{err}"
        );
        assert_eq!(s.get("k")?.map(|kv| kv.value), Some(b"1".to_vec()));
        drop(l);
        drop(s);

        let s = EmbeddedStore::open(&path)?;
        assert_eq!(dump(&s).1, acknowledged.1, "only what was acknowledged");
        let l = lead(&s, "b").await?;
        s.fenced_write(&l, vec![put_op("k", "4")]).await?;
        assert_eq!(s.get("k")?.map(|kv| kv.value), Some(b"4".to_vec()));
        assert_eq!(s.get("j")?, None);
        Ok(())
    }

    #[tokio::test]
    async fn corruption_before_the_tail_is_refused_with_file_and_offset() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        {
            let s = EmbeddedStore::open(&path)?;
            let l = lead(&s, "a").await?;
            s.fenced_write(&l, vec![put_op("k", "1")]).await?;
            s.fenced_write(&l, vec![put_op("k", "2")]).await?;
        }
        let good = std::fs::read(log_of(&path))?;
        let first_line = good.iter().position(|&b| b == b'\n').ok_or("no line")? + 1;

        // A bad line with records after it.
        let mut bad = good.clone();
        bad[first_line + 2] = b'#';
        std::fs::write(log_of(&path), &bad)?;
        let err = EmbeddedStore::open(&path).expect_err("corrupt middle");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("store.json.log"), "{msg}");
        assert!(msg.contains(&format!("at byte {first_line}")), "{msg}");

        // A record missing from the middle: the revisions jump.
        let lines: Vec<&[u8]> = good.split_inclusive(|&b| b == b'\n').collect();
        let gap: Vec<u8> = [lines[0], lines[2]].concat();
        std::fs::write(log_of(&path), &gap)?;
        let err = EmbeddedStore::open(&path).expect_err("a gap");
        assert!(err.to_string().contains("was due"), "{err}");
        Ok(())
    }

    /// Writes enough, with compaction after every batch, that the store has been compacted,
    /// and returns what it holds.
    async fn compacted_store(
        path: &Path,
    ) -> Result<(i64, Vec<(String, String, i64, i64)>), Box<dyn std::error::Error>> {
        let every_time = Compaction {
            min_log_bytes: 0,
            factor: 0,
        };
        let s = EmbeddedStore::open_with(path, every_time)?;
        let l = lead(&s, "a").await?;
        for i in 0..5 {
            s.fenced_write(
                &l,
                vec![put_op(&format!("k{i}"), "v"), put_op("k0", &format!("{i}"))],
            )
            .await?;
        }
        s.fenced_write(
            &l,
            vec![WriteOp::DeleteRange {
                start: "k1".into(),
                end: "k3".into(),
            }],
        )
        .await?;
        s.resign(&l).await?;
        Ok(dump(&s))
    }

    #[tokio::test]
    async fn compaction_keeps_the_keyspace_and_empties_the_log() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let state = compacted_store(&path).await?;
        assert_eq!(
            std::fs::metadata(log_of(&path))?.len(),
            0,
            "the log is empty"
        );
        assert!(path.exists(), "a snapshot was written");
        let keys: Vec<&str> = state.1.iter().map(|k| k.0.as_str()).collect();
        assert_eq!(keys, ["k0", "k3", "k4"]);
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(dump(&s), state);

        // The default bound: a small log is not compacted.
        let l = lead(&s, "b").await?;
        s.fenced_write(&l, vec![put_op("k9", "v")]).await?;
        assert!(std::fs::metadata(log_of(&path))?.len() > 0);
        Ok(())
    }

    #[tokio::test]
    async fn every_crash_point_of_a_compaction_reopens_to_the_same_keyspace() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        // The state before a compaction: a snapshot (from an earlier one) and a log after it.
        let before = {
            let s = EmbeddedStore::open(&path)?;
            let l = lead(&s, "a").await?;
            for i in 0..5 {
                s.fenced_write(&l, vec![put_op(&format!("k{i}"), &format!("{i}"))])
                    .await?;
            }
            s.resign(&l).await?;
            dump(&s)
        };
        let old_log = std::fs::read(log_of(&path))?;
        let old_snapshot = std::fs::read(&path).ok();
        // The same keyspace folded into a snapshot, as the compaction would write it.
        let new_snapshot = {
            let st = Data {
                format: FORMAT,
                revision: before.0,
                keys: before
                    .1
                    .iter()
                    .map(|(k, v, c, m)| {
                        (
                            k.clone(),
                            Entry {
                                value: v.clone(),
                                create_revision: *c,
                                mod_revision: *m,
                            },
                        )
                    })
                    .collect(),
            };
            serde_json::to_vec(&st)?
        };
        let restore = |snapshot: Option<&[u8]>, log: &[u8]| -> std::io::Result<()> {
            match snapshot {
                Some(b) => std::fs::write(&path, b)?,
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
            std::fs::write(log_of(&path), log)
        };
        let tmp = with_suffix(&path, ".tmp");
        let check = |what: &str| -> TestResult {
            let s = EmbeddedStore::open(&path).map_err(|e| format!("{what}: {e}"))?;
            assert_eq!(dump(&s).1, before.1, "{what}");
            assert!(!tmp.exists(), "{what}: the temp file is removed");
            Ok(())
        };

        // 1. Crashed while writing the temp snapshot: half of it is there.
        restore(old_snapshot.as_deref(), &old_log)?;
        std::fs::write(&tmp, &new_snapshot[..new_snapshot.len() / 2])?;
        check("half-written temp snapshot")?;

        // 2. Crashed after syncing the temp snapshot, before the rename.
        restore(old_snapshot.as_deref(), &old_log)?;
        std::fs::write(&tmp, &new_snapshot)?;
        check("whole temp snapshot, not renamed")?;

        // 3. Crashed after the rename, before the log was emptied: the new snapshot with the
        //    old log, whose records it holds. Writing on from there must reopen too.
        restore(Some(&new_snapshot), &old_log)?;
        check("new snapshot with the old log")?;
        {
            let s = EmbeddedStore::open(&path)?;
            let l = lead(&s, "b").await?;
            s.fenced_write(&l, vec![put_op("k0", "after")]).await?;
        }
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(s.get("k0")?.map(|kv| kv.value), Some(b"after".to_vec()));
        drop(s);

        // 4. Crashed after the log was emptied: the new snapshot alone.
        restore(Some(&new_snapshot), b"")?;
        check("new snapshot, empty log")?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_get_consecutive_revisions_and_replay_alike() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.json");
        let s = EmbeddedStore::open(&path)?;
        let l = lead(&s, "a").await?;
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (s, l) = (s.clone(), l.clone());
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..25 {
                    let ops = vec![
                        put_op(&format!("w{w}"), &format!("{i}")),
                        put_op("all", &format!("{w}.{i}")),
                    ];
                    revs.push(s.fenced_write(&l, ops).await?);
                }
                Ok::<_, StoreError>(revs)
            }));
        }
        let mut revs = Vec::new();
        for t in tasks {
            let mine = t.await??;
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "one writer's revisions grow"
            );
            revs.extend(mine);
        }
        revs.sort_unstable();
        let first = revs[0];
        assert_eq!(revs, (first..first + 200).collect::<Vec<_>>());
        // What is in memory is what the log replays to.
        let mem = dump(&s);
        s.resign(&l).await?;
        drop(s);
        let s = EmbeddedStore::open(&path)?;
        assert_eq!(dump(&s).1, mem.1);
        Ok(())
    }

    #[tokio::test]
    async fn stale_leadership_is_fenced_and_resign_is_idempotent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let l = lead(&s, "a").await?;
        let info = s.leader()?.ok_or("no leader")?;
        assert_eq!((info.id.as_str(), info.epoch), ("a", l.epoch));
        s.resign(&l).await?;
        assert!(l.lost.is_cancelled());
        s.resign(&l).await?;
        assert_eq!(s.leader()?, None);
        // The store itself refuses, not only the cancelled token.
        let forged = Leadership {
            lost: CancellationToken::new(),
            ..l.clone()
        };
        assert!(matches!(
            s.fenced_write(&forged, vec![put_op("k", "v")]).await,
            Err(StoreError::Fenced { .. })
        ));
        assert!(forged.lost.is_cancelled(), "a refused write cancels lost");
        assert_eq!(s.get("k")?, None);
        Ok(())
    }

    /// The runtime's only thread must stay free while a campaign waits: the resign that ends
    /// the wait runs on it.
    #[tokio::test(flavor = "current_thread")]
    async fn current_thread_runtime_does_not_deadlock() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let first = lead(&s, "a").await?;

        // Cancelled while waiting.
        let cancel = CancellationToken::new();
        let waiter = {
            let (s, cancel) = (s.clone(), cancel.clone());
            tokio::spawn(async move { s.campaign(&me("b"), Duration::from_secs(5), &cancel).await })
        };
        cancel.cancel();
        let r = waiter.await?;
        assert!(matches!(r, Err(StoreError::Cancelled)), "{r:?}");

        // Released by resign.
        let mut waiter = {
            let s = s.clone();
            tokio::spawn(async move { lead(&s, "c").await })
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut waiter)
                .await
                .is_err(),
            "second campaign must wait while the first leads"
        );
        s.resign(&first).await?;
        let second = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
        assert!(second.epoch > first.epoch);
        assert_eq!(s.leader()?.map(|i| i.id), Some("c".to_owned()));
        Ok(())
    }

    #[tokio::test]
    async fn cancelled_lost_token_releases_leadership() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        let first = lead(&s, "a").await?;
        first.lost.cancel();
        let second = lead(&s, "b").await?;
        assert!(second.epoch > first.epoch);
        let forged = Leadership {
            lost: CancellationToken::new(),
            ..first
        };
        assert!(matches!(
            s.fenced_write(&forged, vec![]).await,
            Err(StoreError::Fenced { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn a_campaign_dropped_before_it_returns_does_not_keep_the_store_led() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = EmbeddedStore::open(&dir.path().join("store.json"))?;
        // Polled once: the request is with the writer, then the caller gives up on it.
        {
            let fut = lead(&s, "a");
            tokio::pin!(fut);
            // Answered already on the first poll (the writer was that quick): that leadership
            // is dropped unresigned, which is another case; give it up as its owner would.
            if let Some(Ok(won)) = futures_poll_once(fut.as_mut()).await {
                won.lost.cancel();
            }
        }
        let l = tokio::time::timeout(Duration::from_secs(10), lead(&s, "b")).await??;
        assert_eq!(s.leader()?.map(|i| i.id), Some("b".to_owned()));
        assert!(!l.lost.is_cancelled());
        Ok(())
    }

    /// Polls `fut` once; `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
