//! Small files that must survive a crash: the highest accepted epoch and the service state.
//! Each is replaced atomically (write a temporary file, fsync it, rename, fsync the directory),
//! so a crash leaves either the old or the new content, never a torn one.
//!
//! The state directory is private: the journal holds hook output, the epoch file fences
//! leaders, and the artifact cache holds what gets installed, so the directory is 0700 and
//! every file in it 0600, and the agent refuses to start on a directory that others can write.

use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// Group or others may write in it: they could rewrite the journal, lower the epoch or
    /// swap an artifact. Not repaired automatically: something may already have been planted.
    #[error("state directory {path} is writable by {who} (mode {mode:04o}): refusing to start; make it private with `chmod 700 {path}` after checking its contents")]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// "group", "others" or "group and others".
        who: &'static str,
    },
    /// Someone other than the agent's user (or root) owns it, and so controls it.
    #[error("state directory {path} is owned by uid {owner}, but the agent runs as uid {uid}: refusing to start; `chown {uid} {path}` after checking its contents")]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The agent's effective uid.
        uid: u32,
    },
    /// It exists but is not a directory (or, for `artifacts`, is a symlink).
    #[error("state directory {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// It could not be created, inspected or made private.
    #[error("state directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl StateDirError {
    /// Only I/O failures may go away by themselves; the others need an operator.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateDirError::Io { .. })
    }
}

/// Creates a new file (never an existing one, never through a symlink) that only the agent's
/// user can read and write.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Files the agent writes directly in the state directory.
const OWN_FILES: [&str; 4] = ["journal.jsonl", "epoch", "service.json", "agent.addr"];

/// Creates `dir` 0700 if it is missing, then checks that it is a directory that only the agent's
/// user (or root) controls: refused when owned by another user or writable by group or others;
/// made 0700 when merely readable by them (our own directory, created under a loose umask or
/// by an older agent: tightening it loses nothing).
fn ensure_private_dir(dir: &Path, follow: bool) -> Result<(), StateDirError> {
    let io = |source| StateDirError::Io {
        path: dir.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    // The state dir itself may be a symlink to another disk; `artifacts` inside it may not.
    let meta = if follow {
        std::fs::metadata(dir)
    } else {
        std::fs::symlink_metadata(dir)
    }
    .map_err(io)?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(StateDirError::NotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("group and others"),
        (true, false) => Some("group"),
        (false, true) => Some("others"),
        (false, false) => None,
    };
    if let Some(who) = who {
        return Err(StateDirError::Writable {
            path: dir.to_owned(),
            mode,
            who,
        });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(io)?;
        tracing::info!(path = %dir.display(), was = format!("{mode:04o}"), "state directory made private (0700)");
    }
    Ok(())
}

/// Makes an existing regular file 0600 (files left by an older agent); symlinks and missing
/// files are left alone.
fn tighten_file(path: &Path) -> Result<(), StateDirError> {
    let io = |source| StateDirError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() && m.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(io)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Where the agent keeps its durable files.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// What the agent last did to the service, kept across agent restarts so that a drained
/// service is not mistaken for a failed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Left to run normally: serving if it accepts connections, failed if not.
    #[default]
    Running,
    /// A graceful drain is under way.
    Draining,
    /// Drained and stopped.
    Drained,
    /// Stopped at once.
    Stopped,
    /// An install or rollback is running.
    Installing,
    /// A restart is under way.
    Starting,
    /// The last operation on the service failed and left it in an unknown state.
    Failed,
}

/// The agent's record of the service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// What the agent last did to the service.
    pub phase: Phase,
    /// The version the agent last installed (empty until it installs one).
    pub installed_version: String,
    /// The sha256 of the installed artifact (kept in the artifact cache).
    pub installed_sha256: String,
    /// The version installed before the current one, for rollback.
    pub previous_version: String,
    /// The previous artifact's sha256.
    pub previous_sha256: String,
}

impl StateDir {
    /// Opens the state directory, creating it (and its parents) if needed, and checks that
    /// it is private (see [`StateDirError`]). Files an older agent wrote with looser modes are
    /// made 0600.
    pub fn open(root: &Path) -> Result<StateDir, StateDirError> {
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Parents keep the default mode: they are not ours.
            std::fs::create_dir_all(parent).map_err(|source| StateDirError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        ensure_private_dir(root, true)?;
        let dir = StateDir {
            root: root.to_owned(),
        };
        let artifacts = dir.artifacts();
        ensure_private_dir(&artifacts, false)?;
        for name in OWN_FILES {
            tighten_file(&root.join(name))?;
        }
        let entries = std::fs::read_dir(&artifacts).map_err(|source| StateDirError::Io {
            path: artifacts.clone(),
            source,
        })?;
        for e in entries.flatten() {
            tighten_file(&e.path())?;
        }
        Ok(dir)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The journal file.
    pub fn journal_path(&self) -> PathBuf {
        self.root.join("journal.jsonl")
    }

    /// Where verified artifacts are kept, named by their sha256.
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// The highest epoch accepted so far (0 when none).
    pub fn load_epoch(&self) -> std::io::Result<Epoch> {
        match std::fs::read_to_string(self.root.join("epoch")) {
            Ok(s) => s.trim().parse::<u64>().map(Epoch).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "epoch file {} is corrupt: {e}",
                        self.root.join("epoch").display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Epoch::NONE),
            Err(e) => Err(e),
        }
    }

    /// Stores a new highest epoch durably.
    pub fn store_epoch(&self, epoch: Epoch) -> std::io::Result<()> {
        self.replace("epoch", format!("{}\n", epoch.get()).as_bytes())
    }

    /// The service record (default when the agent has never written one).
    pub fn load_service(&self) -> std::io::Result<ServiceRecord> {
        let path = self.root.join("service.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("service record {} is corrupt: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ServiceRecord::default()),
            Err(e) => Err(e),
        }
    }

    /// Stores the service record durably.
    pub fn store_service(&self, record: &ServiceRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        self.replace("service.json", &bytes)
    }

    /// Replaces a small file in the state directory atomically, private to the agent.
    pub fn write_private(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        self.replace(name, contents)
    }

    fn replace(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        let tmp = self.root.join(format!(".{name}.tmp"));
        // A leftover from a crash is removed rather than reused: a new file gets mode 0600
        // whatever the old one had.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        {
            let mut f = create_private(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.root.join(name))?;
        sync_dir(&self.root)
    }
}

/// fsyncs a directory so that a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_record_survive_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = StateDir::open(dir.path())?;
        assert_eq!(s.load_epoch()?, Epoch::NONE);
        s.store_epoch(Epoch(42))?;
        let rec = ServiceRecord {
            phase: Phase::Drained,
            installed_version: "2.0".into(),
            ..Default::default()
        };
        s.store_service(&rec)?;
        let s2 = StateDir::open(dir.path())?;
        assert_eq!(s2.load_epoch()?, Epoch(42));
        assert_eq!(s2.load_service()?, rec);
        Ok(())
    }

    fn mode_of(path: &Path) -> std::io::Result<u32> {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
    }

    fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    #[test]
    fn a_new_state_dir_and_every_file_in_it_are_private() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("state");
        let s = StateDir::open(&root)?;
        s.store_epoch(Epoch(3))?;
        s.store_service(&ServiceRecord::default())?;
        s.write_private("agent.addr", b"127.0.0.1:1")?;
        let journal = crate::journal::Journal::open(&s.journal_path())?;
        drop(journal);
        assert_eq!(mode_of(&root)?, 0o700);
        assert_eq!(mode_of(&s.artifacts())?, 0o700);
        for name in ["epoch", "service.json", "journal.jsonl", "agent.addr"] {
            assert_eq!(mode_of(&root.join(name))?, 0o600, "{name}");
        }
        Ok(())
    }

    #[test]
    fn an_older_readable_state_dir_is_made_private() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("state");
        std::fs::create_dir_all(root.join("artifacts"))?;
        set_mode(&root, 0o755)?;
        set_mode(&root.join("artifacts"), 0o755)?;
        // Files an older agent left with the default umask.
        for name in ["epoch", "service.json", "journal.jsonl"] {
            std::fs::write(root.join(name), if name == "epoch" { "1\n" } else { "" })?;
            set_mode(&root.join(name), 0o644)?;
        }
        std::fs::write(root.join("service.json"), b"{}")?;
        std::fs::write(root.join("artifacts").join("a".repeat(64)), b"x")?;
        set_mode(&root.join("artifacts").join("a".repeat(64)), 0o644)?;
        let _s = StateDir::open(&root)?;
        assert_eq!(mode_of(&root)?, 0o700);
        assert_eq!(mode_of(&root.join("artifacts"))?, 0o700);
        for name in ["epoch", "service.json", "journal.jsonl"] {
            assert_eq!(mode_of(&root.join(name))?, 0o600, "{name}");
        }
        assert_eq!(
            mode_of(&root.join("artifacts").join("a".repeat(64)))?,
            0o600
        );
        Ok(())
    }

    #[test]
    fn a_state_dir_writable_by_group_or_others_is_refused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        for (sub, mode) in [("state", 0o770), ("state", 0o707), ("state", 0o1777)] {
            let root = dir.path().join(sub);
            std::fs::create_dir_all(&root)?;
            set_mode(&root, mode)?;
            let err = StateDir::open(&root)
                .err()
                .ok_or(format!("mode {mode:o} must be refused"))?;
            let text = err.to_string();
            assert!(text.contains(&root.display().to_string()), "{text}");
            assert!(text.contains(&format!("{:o}", mode & 0o777)), "{text}");
            assert!(text.contains("chmod 700"), "{text}");
            // Refused, not repaired: someone may already have written in it.
            assert_eq!(mode_of(&root)?, mode);
        }
        // The same for the artifact cache inside a private state dir.
        let root = dir.path().join("other");
        std::fs::create_dir_all(root.join("artifacts"))?;
        set_mode(&root, 0o700)?;
        set_mode(&root.join("artifacts"), 0o777)?;
        let err = StateDir::open(&root)
            .err()
            .ok_or("artifacts 777 must be refused")?;
        assert!(err.to_string().contains("artifacts"), "{err}");
        Ok(())
    }

    #[test]
    fn corrupt_epoch_is_an_error_not_zero() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = StateDir::open(dir.path())?;
        std::fs::write(dir.path().join("epoch"), "garbage")?;
        let err = s
            .load_epoch()
            .expect_err("corrupt epoch must not read as 0");
        assert!(err.to_string().contains("corrupt"));
        Ok(())
    }
}
