//! Nothing a test starts may outlive the test process, even when that process is SIGKILLed
//! (a runner's timeout, `panic = "abort"`, an operator's `kill -9`) and no `Drop` runs.
//!
//! Two mechanisms, because the harness starts two kinds of processes:
//!
//! - **Direct children** (agents, coordinators, etcd members) are started through
//!   `rollgate-sample tied`, which asks the kernel to SIGKILL it when its parent dies
//!   (`PR_SET_PDEATHSIG`) and then `exec`s the real program: same pid, same arguments, so tests
//!   signal and wait for it as before. The kernel sends that signal when the *thread* that
//!   forked the child ends, not the process; so every such child is forked by one thread that
//!   lives as long as the process ([`spawn_std`], [`spawn_tokio`]), never by a runtime's worker
//!   or blocking thread, which may end before the test does.
//! - **Daemonised sample front ends** (`rollgate-sample start`, run by the harness or by an
//!   agent's hook) are nobody's child once `start` returns. [`crate::FrontEnd::create`] writes
//!   the test process's identity to `<dir>/owner` ([`OWNER_FILE`]), and `rollgate-sample serve`
//!   exits, closing its listener, within [`OWNER_POLL`] of that process being gone. A file
//!   rather than an environment variable: it reaches the service whoever starts it (the
//!   harness, an agent whose hooks could one day run with a cleaned environment, a person
//!   debugging a test's directory by hand), and it is there to read afterwards.
//!
//! A process is identified by its pid *and* its start time (from `/proc/<pid>/stat`), so a pid
//! reused by an unrelated process is never mistaken for the owner.

use anyhow::{anyhow, Context};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

/// The file in a front end's directory naming the process that owns it.
pub const OWNER_FILE: &str = "owner";

/// How often a sample front end checks that its owner is still there.
pub const OWNER_POLL: Duration = Duration::from_millis(500);

/// A process, by pid and start time (clock ticks since boot), so that pid reuse is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> anyhow::Result<ProcessId> {
        let pid = std::process::id();
        ProcessId::of(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat"))
    }

    /// Process `pid` as it is now, if it runs (a zombie does not count).
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state), so field 22 (starttime) is fields[19].
        let state = *fields.first()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let start = fields.get(19)?.parse().ok()?;
        Some(ProcessId { pid, start })
    }

    /// True while this very process (not another one that reused its pid) runs.
    pub fn is_alive(&self) -> bool {
        ProcessId::of(self.pid).is_some_and(|now| now.start == self.start)
    }
}

impl std::fmt::Display for ProcessId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pid, self.start)
    }
}

impl std::str::FromStr for ProcessId {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<ProcessId> {
        let mut it = s.split_whitespace();
        let (Some(pid), Some(start), None) = (it.next(), it.next(), it.next()) else {
            anyhow::bail!("expected \"<pid> <start time>\", got {s:?}");
        };
        Ok(ProcessId {
            pid: pid.parse().context("pid")?,
            start: start.parse().context("start time")?,
        })
    }
}

/// Records this process as the owner of the service in `dir`.
pub fn write_owner(dir: &Path) -> anyhow::Result<()> {
    let me = ProcessId::current()?;
    let path = dir.join(OWNER_FILE);
    std::fs::write(&path, format!("{me}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The owner recorded in `dir`: `Ok(None)` when there is none (a service started by hand).
pub fn read_owner(dir: &Path) -> anyhow::Result<Option<ProcessId>> {
    let path = dir.join(OWNER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Ok(Some(text.parse().with_context(|| {
                format!("bad owner file {}", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A command that runs `program` tied to this process: `rollgate-sample tied --parent <pid> --
/// <program> <args you add>`. Start it with [`spawn_std`].
pub fn tied_std(program: impl AsRef<OsStr>) -> anyhow::Result<std::process::Command> {
    let mut c = std::process::Command::new(crate::bin("rollgate-sample")?);
    c.arg("tied")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(program);
    Ok(c)
}

/// [`tied_std`] for tokio. Start it with [`spawn_tokio`].
pub fn tied_tokio(program: impl AsRef<OsStr>) -> anyhow::Result<tokio::process::Command> {
    Ok(tokio::process::Command::from(tied_std(program)?))
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the process's spawner thread (started on first use, never ended) and returns
/// its result: children forked there keep their parent-death signal until the process ends.
fn on_spawner_thread<R: Send + 'static>(
    job: impl FnOnce() -> std::io::Result<R> + Send + 'static,
) -> std::io::Result<R> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    let gone = || std::io::Error::other("the harness's spawner thread is gone");
    let tx = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("rollgate-spawner".into())
                .spawn(move || rx.into_iter().for_each(|job| job()))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
        .ok_or_else(|| std::io::Error::other("cannot start the harness's spawner thread"))?;
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    tx.send(Box::new(move || {
        let _ = done_tx.send(job());
    }))
    .map_err(|_| gone())?;
    done_rx.recv().map_err(|_| gone())?
}

/// Spawns `cmd` (made with [`tied_std`]) from the spawner thread.
pub fn spawn_std(mut cmd: std::process::Command) -> std::io::Result<std::process::Child> {
    on_spawner_thread(move || cmd.spawn())
}

/// Spawns `cmd` (made with [`tied_tokio`]) from the spawner thread, registered with the
/// caller's tokio runtime.
pub fn spawn_tokio(mut cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| std::io::Error::other(format!("spawn_tokio outside a runtime: {e}")))?;
    on_spawner_thread(move || {
        let _entered = handle.enter();
        cmd.spawn()
    })
}
