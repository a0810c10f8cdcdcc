//! The embedded store's files: the snapshot and the log's records, and how a keyspace is
//! rebuilt from them (the same [`apply`] for the writer and for replay).

use super::*;

/// When the log is folded into a new snapshot: once it is larger than both `min_log_bytes` and
/// `factor` times the snapshot. The factor bounds the bytes written per write to a constant
/// share of the record (each byte of snapshot is rewritten once per `factor` bytes of log); the
/// minimum keeps a small keyspace from being rewritten every few writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compaction {
    pub(crate) min_log_bytes: u64,
    pub(crate) factor: u64,
}

impl Compaction {
    pub(super) const DEFAULT: Compaction = Compaction {
        min_log_bytes: 4 << 20,
        factor: 4,
    };

    pub(super) fn due(&self, log: u64, snapshot: u64) -> bool {
        log > self.min_log_bytes && log > snapshot.saturating_mul(self.factor)
    }
}

/// The snapshot's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Data {
    pub(super) format: u32,
    /// The revision of the last write; the next write gets `revision + 1`.
    pub(super) revision: i64,
    pub(super) keys: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    /// The value, hex-encoded (values are arbitrary bytes).
    pub(super) value: String,
    pub(super) create_revision: i64,
    pub(super) mod_revision: i64,
}

/// One operation of a log record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum LogOp {
    /// `value` hex-encoded, as in [`Entry`].
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    DeleteRange {
        start: String,
        end: String,
    },
}

impl From<WriteOp> for LogOp {
    fn from(op: WriteOp) -> LogOp {
        match op {
            WriteOp::Put { key, value } => LogOp::Put {
                key,
                value: hex::encode(value),
            },
            WriteOp::Delete { key } => LogOp::Delete { key },
            WriteOp::DeleteRange { start, end } => LogOp::DeleteRange { start, end },
        }
    }
}

/// One line of the log: a transaction that changed something, at its revision.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    pub(super) rev: i64,
    pub(super) ops: Vec<LogOp>,
}

/// Where keys are read and changed: the keyspace itself (open, replay), or the keyspace seen
/// through the changes of transactions not yet durable (the writer).
pub(super) trait Keyspace {
    fn entry(&self, key: &str) -> Option<&Entry>;
    fn set(&mut self, key: String, entry: Option<Entry>);
    fn keys_in(&self, start: &str, end: &str) -> Vec<String>;
}

impl Keyspace for BTreeMap<String, Entry> {
    fn entry(&self, key: &str) -> Option<&Entry> {
        self.get(key)
    }

    fn set(&mut self, key: String, entry: Option<Entry>) {
        match entry {
            Some(e) => {
                self.insert(key, e);
            }
            None => {
                self.remove(&key);
            }
        }
    }

    fn keys_in(&self, start: &str, end: &str) -> Vec<String> {
        // BTreeMap::range panics on an inverted range; etcd deletes nothing.
        if start >= end {
            return Vec::new();
        }
        self.range::<str, _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The committed keys plus the changes decided on top of them (`None`: deleted).
pub(super) struct Overlay<'a> {
    pub(super) base: &'a BTreeMap<String, Entry>,
    pub(super) over: BTreeMap<String, Option<Entry>>,
}

impl Keyspace for Overlay<'_> {
    fn entry(&self, key: &str) -> Option<&Entry> {
        match self.over.get(key) {
            Some(e) => e.as_ref(),
            None => self.base.get(key),
        }
    }

    fn set(&mut self, key: String, entry: Option<Entry>) {
        self.over.insert(key, entry);
    }

    fn keys_in(&self, start: &str, end: &str) -> Vec<String> {
        if start >= end {
            return Vec::new();
        }
        let mut keys: BTreeSet<String> = self.base.keys_in(start, end).into_iter().collect();
        for (k, e) in self
            .over
            .range::<str, _>((Bound::Included(start), Bound::Excluded(end)))
        {
            if e.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        keys.into_iter().collect()
    }
}

/// Applies `ops` at revision `rev`. True when anything changed: like etcd, a transaction that
/// changes nothing makes no revision (and no record). Replay runs this same function, so the
/// keyspace it rebuilds is the one the writer had.
pub(super) fn apply(ks: &mut impl Keyspace, rev: i64, ops: &[LogOp]) -> bool {
    let mut changed = false;
    for op in ops {
        match op {
            LogOp::Put { key, value } => {
                let create_revision = ks.entry(key).map_or(rev, |e| e.create_revision);
                ks.set(
                    key.clone(),
                    Some(Entry {
                        value: value.clone(),
                        create_revision,
                        mod_revision: rev,
                    }),
                );
                changed = true;
            }
            LogOp::Delete { key } => {
                if ks.entry(key).is_some() {
                    ks.set(key.clone(), None);
                    changed = true;
                }
            }
            LogOp::DeleteRange { start, end } => {
                for k in ks.keys_in(start, end) {
                    ks.set(k, None);
                    changed = true;
                }
            }
        }
    }
    changed
}

pub(super) fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what} {}: {e}", path.display()))
}

pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A rename or a new file is durable only once its directory entry is.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync directory", dir, e))
}

pub(super) fn to_kv(key: &str, e: &Entry) -> Result<KeyValue, StoreError> {
    let value = hex::decode(&e.value)
        .map_err(|err| StoreError::Corrupt(format!("value of {key} is not hex: {err}")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value,
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
    })
}

pub(super) fn encode_record(rev: i64, ops: Vec<LogOp>) -> Result<(Record, Vec<u8>), StoreError> {
    let record = Record { rev, ops };
    let mut line = serde_json::to_vec(&record)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode a log record: {e}")))?;
    line.push(b'\n');
    Ok((record, line))
}

/// Writes a new snapshot of `bytes` at `path` so that a crash leaves the old or the new one.
pub(super) fn write_snapshot(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = with_suffix(path, ".tmp");
    let write = || -> std::io::Result<()> {
        // Owner only: the store holds every plan (artifact URLs included).
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| io_error("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("cannot replace", path, e))?;
    sync_dir(parent_dir(path))
}

/// Refuses a directory others may write to: whoever can replace the store's files can write a
/// plan, and a plan runs code on every server.
pub(super) fn check_private_dir(dir: &Path) -> Result<(), StoreError> {
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

/// A file written by an older build may be readable by others: it holds the plans.
pub(super) fn restrict(path: &Path) -> Result<(), StoreError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io_error("cannot restrict", path, e))?;
        }
    }
    Ok(())
}

/// The snapshot at `path` and its size, or an empty keyspace when there is none yet.
pub(super) fn read_snapshot(path: &Path) -> Result<(Data, u64), StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Ok((
                Data {
                    format: FORMAT,
                    ..Data::default()
                },
                0,
            ))
        }
        Err(e) => return Err(io_error("cannot read", path, e)),
    };
    // The format alone first, so that another build's file is named as such, not as garbage.
    #[derive(Deserialize)]
    struct Head {
        format: Option<u32>,
    }
    let head: Head = serde_json::from_slice(&bytes).map_err(|e| {
        StoreError::Corrupt(format!("{} is not a rollgate store: {e}", path.display()))
    })?;
    match head.format {
        Some(FORMAT) => {}
        Some(1) => {
            return Err(StoreError::Corrupt(format!(
                "{} is the single-file store of an earlier build (format 1); this build keeps a snapshot and a log (format {FORMAT}) and does not convert it: move the file away to start with an empty store",
                path.display()
            )))
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "{} has format {}, this build reads {FORMAT}",
                path.display(),
                other.map_or_else(|| "none".to_owned(), |f| f.to_string())
            )))
        }
    }
    let data: Data = serde_json::from_slice(&bytes).map_err(|e| {
        StoreError::Corrupt(format!("{} is not a rollgate store: {e}", path.display()))
    })?;
    let len = bytes.len() as u64;
    Ok((data, len))
}

/// Replays the log `bytes` (of the file `path`) onto `data`. Returns how many leading bytes
/// are whole records: what follows is a torn append.
pub(super) fn replay(path: &Path, bytes: &[u8], data: &mut Data) -> Result<u64, StoreError> {
    // Only lines ending in a newline are records; whatever follows the last newline is torn.
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn_after = bytes.len() > complete;
    let lines: Vec<&[u8]> = bytes[..complete].split_inclusive(|&b| b == b'\n').collect();
    let mut offset = 0usize;
    let mut previous: Option<i64> = None;
    for (i, raw) in lines.iter().enumerate() {
        let corrupt = |what: String| {
            StoreError::Corrupt(format!("{} at byte {offset}: {what}", path.display()))
        };
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        let record: Record = match serde_json::from_slice(text) {
            Ok(r) => r,
            // The last append's newline can reach the disk before all of its line does: with
            // nothing after it, a bad last line is torn too. One with a record after it was
            // synced whole before that record was written, so it is corrupt.
            Err(_) if i + 1 == lines.len() && !torn_after => break,
            Err(e) => return Err(corrupt(format!("not a log record: {e}"))),
        };
        // The records of one log follow each other; the first may be at or below the
        // snapshot's revision (a compaction that stopped before it emptied the log), never
        // beyond the next one.
        let due = previous.map_or(data.revision + 1, |p| p + 1);
        if record.rev > due || (previous.is_some() && record.rev != due) {
            return Err(corrupt(format!(
                "record of revision {} where revision {due} was due",
                record.rev
            )));
        }
        if record.rev > data.revision {
            if !apply(&mut data.keys, record.rev, &record.ops) {
                return Err(corrupt(format!(
                    "record of revision {} changes nothing",
                    record.rev
                )));
            }
            data.revision = record.rev;
        }
        previous = Some(record.rev);
        offset += raw.len();
    }
    Ok(offset as u64)
}

/// The log file, owned by the writer thread (or by open, before that thread starts).
pub(super) struct Log {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) len: u64,
}

impl Log {
    /// Appends whole records and makes them durable.
    pub(super) fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        #[cfg(test)]
        if let Some(room) = disk_full::room(&self.path, self.len) {
            if bytes.len() > room {
                // What fits reaches the file, as on a disk that fills up mid-write.
                let fits = bytes.get(..room).unwrap_or_default();
                let _ = self.file.write_all(fits);
                self.len += fits.len() as u64;
                let e = std::io::Error::new(ErrorKind::StorageFull, "no space left on device");
                return Err(io_error("cannot append to", &self.path, e));
            }
        }
        self.file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error("cannot append to", &self.path, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// Test-only: a log that stops taking bytes at a given length (a disk filling up), so the
/// store's refusal after a failed append can be tested without filling a real disk.
#[cfg(test)]
pub(super) mod disk_full {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FULL_AT: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

    /// Appends to the log at `path` fail once it would grow past `len` bytes.
    pub(in crate::store::embedded) fn at(path: &Path, len: Option<u64>) {
        let mut m = FULL_AT.lock().unwrap_or_else(|p| p.into_inner());
        match len {
            Some(len) => m.insert(path.to_owned(), len),
            None => m.remove(path),
        };
    }

    /// The bytes the log at `path`, now `len` long, still takes, if it is limited.
    pub(super) fn room(path: &Path, len: u64) -> Option<usize> {
        let m = FULL_AT.lock().unwrap_or_else(|p| p.into_inner());
        m.get(path)
            .map(|full| usize::try_from(full.saturating_sub(len)).unwrap_or(usize::MAX))
    }
}
