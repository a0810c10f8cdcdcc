//! Small files that must survive a crash: the highest accepted epoch and the service state.
//! Each is replaced atomically (write a temporary file, fsync it, rename, fsync the directory),
//! so a crash leaves either the old or the new content, never a torn one.

use rollgate_common::Epoch;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// Opens (creating if needed) the state directory.
    pub fn open(root: &Path) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(root.join("artifacts"))?;
        Ok(StateDir {
            root: root.to_owned(),
        })
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

    fn replace(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        let tmp = self.root.join(format!(".{name}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
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
    fn epoch_and_record_survive_reopen() -> std::io::Result<()> {
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

    #[test]
    fn corrupt_epoch_is_an_error_not_zero() -> std::io::Result<()> {
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
