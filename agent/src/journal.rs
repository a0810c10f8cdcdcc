//! The operation journal: append-only JSON lines, fsynced after every record.
//!
//! An operation writes a `begin` record before it acts and an `end` record after; replaying
//! the file gives one entry per operation id. An operation with a `begin` and no `end` was cut
//! short by a crash or restart: it reads back as interrupted, and repeating its id runs it again
//! (recorded as a further attempt) rather than leaving it undone.
//!
//! An `adopt` record says that a caller with a newer epoch took over a running operation (a
//! new leader repeating the step it found under way): from then on the operation carries the
//! adopter's epoch, in memory and after a replay.
//!
//! A record is in the journal once its line, newline included, is: the newline is the commit
//! mark. Each append writes the whole line and fsyncs it before it returns, and only then does
//! the caller act (after `begin`) or answer (after `end`); so a last line without its newline is
//! an append that never returned, and it is cut off at open, even when it happens to parse.
//! Keeping it instead would make the replay depend on how much of an unsynced write the disk
//! happened to keep, and the cases it could save are already handled: a `begin` that never
//! returned ran nothing, and an operation whose `end` is missing reads back as interrupted and
//! runs again when repeated, which every step tolerates. Cutting it also means the next append
//! starts on a line of its own instead of being glued onto the torn one, which would make the
//! journal unreadable and the agent unable to start.

use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Graceful drain, then stop.
    Drain,
    /// Immediate stop.
    Stop,
    /// Install an artifact.
    Install,
    /// Reinstall the previous version.
    Rollback,
    /// Start or restart the service.
    Restart,
    /// Check the service stays good.
    Verify,
}

impl OpKind {
    /// The lower-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Drain => "drain",
            OpKind::Stop => "stop",
            OpKind::Install => "install",
            OpKind::Rollback => "rollback",
            OpKind::Restart => "restart",
            OpKind::Verify => "verify",
        }
    }
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Under way now.
    Running,
    /// Done, and it worked.
    Succeeded,
    /// Done, and it did not work.
    Failed,
    /// The agent stopped while it ran.
    Interrupted,
}

/// One operation as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// The caller's operation id.
    pub id: String,
    /// What it does.
    pub kind: OpKind,
    /// The epoch it ran under.
    pub epoch: Epoch,
    /// Where it stands.
    pub state: OpState,
    /// Unix ms when the current attempt began.
    pub started_at_ms: u64,
    /// Unix ms when it ended (0 while running).
    pub finished_at_ms: u64,
    /// One line on what happened.
    pub message: String,
    /// The installed version afterwards.
    pub version: String,
    /// Tail of the hook output.
    pub output: String,
    /// Attempts so far (more than 1 only after interruptions).
    pub attempt: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Begin {
        id: String,
        kind: OpKind,
        epoch: Epoch,
        at_ms: u64,
        attempt: u32,
    },
    Adopt {
        id: String,
        epoch: Epoch,
        at_ms: u64,
    },
    End {
        id: String,
        at_ms: u64,
        state: OpState,
        message: String,
        version: String,
        output: String,
    },
}

/// The journal: the file, and every operation replayed from it.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// The length of the file's whole, synced records: where the next one goes.
    len: u64,
    ops: HashMap<String, OpRecord>,
    last: Option<String>,
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be opened, read, written or synced.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line in the middle of the file is not a journal record.
    #[error("journal {path}: line {line} is corrupt: {message}")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        message: String,
    },
}

impl Journal {
    /// Opens the journal, replaying every record. A torn last line (a crash mid-append: no
    /// newline at the end, or a last line that does not parse) is cut off; a bad line anywhere
    /// else is an error, since the journal can then not be trusted.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut ops: HashMap<String, OpRecord> = HashMap::new();
        let mut last = None;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        // Only lines ending in a newline are records (see the module doc); whatever follows the
        // last newline is a torn append.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn_after = bytes.len() > complete;
        let lines: Vec<&[u8]> = bytes[..complete].split_inclusive(|&b| b == b'\n').collect();
        let mut good_len: u64 = 0;
        for (i, raw) in lines.iter().enumerate() {
            let text = raw.strip_suffix(b"\n").unwrap_or(raw);
            if text.trim_ascii().is_empty() {
                good_len += raw.len() as u64;
                continue;
            }
            let line: Line = match serde_json::from_slice(text) {
                Ok(l) => l,
                // The last append's newline can reach the disk without all of its line (a
                // crash mid-write of a line spanning two pages): with nothing appended after
                // it, a bad last line is torn too. One with a later append after it was
                // synced before that append began, so it is corrupt.
                Err(_) if i + 1 == lines.len() && !torn_after => break,
                Err(e) => {
                    return Err(JournalError::Corrupt {
                        path: path.to_owned(),
                        line: i + 1,
                        message: e.to_string(),
                    })
                }
            };
            good_len += raw.len() as u64;
            match line {
                Line::Begin {
                    id,
                    kind,
                    epoch,
                    at_ms,
                    attempt,
                } => {
                    last = Some(id.clone());
                    ops.insert(
                        id.clone(),
                        OpRecord {
                            id,
                            kind,
                            epoch,
                            state: OpState::Running,
                            started_at_ms: at_ms,
                            finished_at_ms: 0,
                            message: String::new(),
                            version: String::new(),
                            output: String::new(),
                            attempt,
                        },
                    );
                }
                Line::Adopt { id, epoch, .. } => {
                    if let Some(rec) = ops.get_mut(&id) {
                        rec.epoch = epoch;
                    }
                }
                Line::End {
                    id,
                    at_ms,
                    state,
                    message,
                    version,
                    output,
                } => {
                    if let Some(rec) = ops.get_mut(&id) {
                        rec.state = state;
                        rec.finished_at_ms = at_ms;
                        rec.message = message;
                        rec.version = version;
                        rec.output = output;
                    }
                }
            }
        }
        for rec in ops.values_mut() {
            if rec.state == OpState::Running {
                rec.state = OpState::Interrupted;
                rec.message = "the agent stopped while this operation ran".into();
            }
        }
        // Hook output ends up here: private to the agent (StateDir::open tightens an older file).
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // Cut a torn tail so the next append starts on a line of its own, durably before any
        // record goes after it.
        let len = file.metadata().map_err(io)?.len();
        if len > good_len {
            tracing::warn!(
                journal = %path.display(),
                dropped_bytes = len - good_len,
                "cutting a torn last record off the journal (an append cut short by a crash)"
            );
            file.set_len(good_len).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        if let Some(dir) = path.parent() {
            crate::durable::sync_dir(dir).map_err(io)?;
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            len: good_len,
            ops,
            last,
        })
    }

    /// The record for an operation id.
    pub fn get(&self, id: &str) -> Option<&OpRecord> {
        self.ops.get(id)
    }

    /// The operation begun most recently.
    pub fn last(&self) -> Option<&OpRecord> {
        self.last.as_deref().and_then(|id| self.ops.get(id))
    }

    /// Every operation, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &OpRecord> {
        self.ops.values()
    }

    /// Records that an operation begins; durable before it returns.
    pub fn begin(
        &mut self,
        id: &str,
        kind: OpKind,
        epoch: Epoch,
        at_ms: u64,
    ) -> Result<OpRecord, JournalError> {
        let attempt = self.ops.get(id).map_or(1, |r| r.attempt + 1);
        self.append(&Line::Begin {
            id: id.to_owned(),
            kind,
            epoch,
            at_ms,
            attempt,
        })?;
        let rec = OpRecord {
            id: id.to_owned(),
            kind,
            epoch,
            state: OpState::Running,
            started_at_ms: at_ms,
            finished_at_ms: 0,
            message: String::new(),
            version: String::new(),
            output: String::new(),
            attempt,
        };
        self.ops.insert(id.to_owned(), rec.clone());
        self.last = Some(id.to_owned());
        Ok(rec)
    }

    /// Records that a caller with `epoch` adopted the operation `id` while it ran; durable
    /// before it returns. The operation's record carries `epoch` from now on.
    pub fn adopt(&mut self, id: &str, epoch: Epoch, at_ms: u64) -> Result<(), JournalError> {
        self.append(&Line::Adopt {
            id: id.to_owned(),
            epoch,
            at_ms,
        })?;
        if let Some(rec) = self.ops.get_mut(id) {
            rec.epoch = epoch;
        }
        Ok(())
    }

    /// Records how an operation ended; durable before it returns.
    pub fn end(&mut self, rec: &OpRecord) -> Result<(), JournalError> {
        self.append(&Line::End {
            id: rec.id.clone(),
            at_ms: rec.finished_at_ms,
            state: rec.state,
            message: rec.message.clone(),
            version: rec.version.clone(),
            output: rec.output.clone(),
        })?;
        self.ops.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    fn append(&mut self, line: &Line) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut bytes = serde_json::to_vec(line).map_err(|e| io(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        // An earlier append that failed part-way (ENOSPC, EIO) may have left part of its line
        // behind, unacknowledged: cut it, or this record would be glued onto it as one
        // unreadable line in the middle of the journal.
        if self.file.metadata().map_err(io)?.len() > self.len {
            self.file.set_len(self.len).map_err(io)?;
        }
        self.file.write_all(&bytes).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(mut r: OpRecord, state: OpState) -> OpRecord {
        r.state = state;
        r.finished_at_ms = r.started_at_ms + 5;
        r.message = "ok".into();
        r
    }

    #[test]
    fn replays_finished_and_interrupted_operations() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            let a = j.begin("a", OpKind::Drain, Epoch(3), 100)?;
            j.end(&done(a, OpState::Succeeded))?;
            j.begin("b", OpKind::Install, Epoch(3), 200)?;
        }
        let mut j = Journal::open(&path)?;
        assert_eq!(j.get("a").map(|r| r.state), Some(OpState::Succeeded));
        assert_eq!(j.get("b").map(|r| r.state), Some(OpState::Interrupted));
        assert_eq!(j.last().map(|r| r.id.as_str()), Some("b"));
        let b = j.begin("b", OpKind::Install, Epoch(4), 300)?;
        assert_eq!(b.attempt, 2);
        Ok(())
    }

    #[test]
    fn an_adoption_gives_the_operation_the_adopters_epoch_also_after_replay(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            let a = j.begin("a", OpKind::Drain, Epoch(1), 100)?;
            j.adopt("a", Epoch(2), 150)?;
            assert_eq!(j.get("a").map(|r| r.epoch), Some(Epoch(2)));
            let mut a = done(a, OpState::Succeeded);
            a.epoch = Epoch(2);
            j.end(&a)?;
            j.begin("b", OpKind::Verify, Epoch(2), 200)?;
            j.adopt("b", Epoch(5), 250)?;
        }
        let text = std::fs::read_to_string(&path)?;
        assert!(
            text.contains(r#"{"event":"adopt","id":"a","epoch":2,"at_ms":150}"#),
            "{text}"
        );
        let j = Journal::open(&path)?;
        let a = j.get("a").ok_or("a")?;
        assert_eq!((a.epoch, a.state), (Epoch(2), OpState::Succeeded));
        let b = j.get("b").ok_or("b")?;
        assert_eq!((b.epoch, b.state), (Epoch(5), OpState::Interrupted));
        Ok(())
    }

    /// Every line of the journal at `path`, checked to end in a newline and to parse.
    fn lines_of(path: &Path) -> Result<Vec<Line>, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(path)?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(format!("journal does not end with a newline: {text:?}").into());
        }
        Ok(text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }

    fn append_raw(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        OpenOptions::new().append(true).open(path)?.write_all(bytes)
    }

    #[test]
    fn torn_tail_is_dropped_but_corrupt_middle_is_refused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            let a = j.begin("a", OpKind::Stop, Epoch(1), 1)?;
            j.end(&done(a, OpState::Succeeded))?;
        }
        append_raw(&path, b"{\"event\":\"begin\",\"id\":\"x")?;
        {
            let mut j = Journal::open(&path)?;
            assert!(j.get("x").is_none());
            j.begin("c", OpKind::Stop, Epoch(1), 2)?;
        }
        let j = Journal::open(&path)?;
        assert!(
            j.get("c").is_some(),
            "append after a torn tail must start a clean line"
        );
        assert_eq!(lines_of(&path)?.len(), 3);
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("garbage\n{text}"))?;
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Corrupt { line: 1, .. })
        ));
        Ok(())
    }

    #[test]
    fn a_whole_last_record_without_its_newline_is_cut_and_the_next_append_starts_a_new_line(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            let a = j.begin("a", OpKind::Drain, Epoch(1), 100)?;
            j.end(&done(a, OpState::Succeeded))?;
            j.begin("b", OpKind::Stop, Epoch(1), 200)?;
        }
        // The crash came after b's line reached the disk but before its newline did.
        let mut bytes = std::fs::read(&path)?;
        assert_eq!(bytes.pop(), Some(b'\n'));
        let cut = bytes.len();
        std::fs::write(&path, &bytes)?;
        let b_before_append = {
            let mut j = Journal::open(&path)?;
            let b = j.get("b").cloned();
            let c = j.begin("c", OpKind::Install, Epoch(2), 300)?;
            j.end(&done(c, OpState::Failed))?;
            b
        };
        let j = Journal::open(&path)?;
        assert_eq!(lines_of(&path)?.len(), 4, "a begin, a end, c begin, c end");
        assert_eq!(j.get("a").map(|r| r.state), Some(OpState::Succeeded));
        assert_eq!(j.get("c").map(|r| r.state), Some(OpState::Failed));
        assert_eq!(j.last().map(|r| r.id.as_str()), Some("c"));
        // b's begin never returned, so b never ran: it is not in the journal.
        assert!(b_before_append.is_none(), "{b_before_append:?}");
        assert!(j.get("b").is_none());
        assert!(std::fs::metadata(&path)?.len() > cut as u64);
        Ok(())
    }

    #[test]
    fn an_end_without_its_newline_leaves_the_operation_interrupted(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            let a = j.begin("a", OpKind::Install, Epoch(1), 100)?;
            j.end(&done(a, OpState::Succeeded))?;
        }
        let mut bytes = std::fs::read(&path)?;
        assert_eq!(bytes.pop(), Some(b'\n'));
        std::fs::write(&path, &bytes)?;
        let mut j = Journal::open(&path)?;
        // As when the crash came just before the end was written: a repeat runs it again.
        assert_eq!(j.get("a").map(|r| r.state), Some(OpState::Interrupted));
        assert_eq!(j.begin("a", OpKind::Install, Epoch(1), 200)?.attempt, 2);
        assert_eq!(lines_of(&path)?.len(), 2, "a begin, a begin again");
        Ok(())
    }

    #[test]
    fn a_bad_line_with_records_after_it_is_corruption_even_before_a_torn_tail(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            j.begin("a", OpKind::Stop, Epoch(1), 1)?;
        }
        let good = std::fs::read_to_string(&path)?;
        // A bad line between two records.
        std::fs::write(&path, format!("{good}{{\"event\":\"beg\n{good}"))?;
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
        // A bad last whole line followed by a torn one: something was appended after it, so it
        // was synced whole once, and it is not torn but corrupt.
        std::fs::write(&path, format!("{good}not json\n{{\"event\""))?;
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
        // A bad last whole line with nothing after it may be a torn write whose newline reached
        // the disk before the rest of its line did: cut, like any torn tail.
        std::fs::write(&path, format!("{good}{{\"event\":\0\0\0\n"))?;
        let mut j = Journal::open(&path)?;
        assert!(j.get("a").is_some());
        j.begin("b", OpKind::Stop, Epoch(1), 2)?;
        assert_eq!(lines_of(&path)?.len(), 2);
        Ok(())
    }

    #[test]
    fn part_of_a_line_left_by_a_failed_append_is_cut_before_the_next_record(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("journal.jsonl");
        {
            let mut j = Journal::open(&path)?;
            j.begin("a", OpKind::Stop, Epoch(1), 1)?;
            // What a write cut short by a full disk leaves behind, while the journal stays open.
            append_raw(&path, b"{\"event\":\"end\",\"id\":\"a\",\"at")?;
            j.begin("b", OpKind::Stop, Epoch(1), 2)?;
        }
        let j = Journal::open(&path)?;
        assert!(j.get("a").is_some() && j.get("b").is_some());
        assert_eq!(lines_of(&path)?.len(), 2);
        Ok(())
    }
}
