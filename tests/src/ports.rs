//! Ports for the processes tests start, kept by the test process until it exits.
//!
//! A port taken with `bind(0)` and let go is free only for a moment: the kernel may hand it to
//! another process's `bind(0)` or outgoing connection, and a test whose front end is stopped (or
//! not yet started) leaves its port unbound for seconds. CI once saw a fleet's set-up refuse an
//! install because another test's process had taken the stopped front end's port.
//!
//! So [`free_port`] picks from just below the kernel's ephemeral range, which `bind(0)` and
//! outgoing connections never use, and takes an advisory `flock` on one file per port in a
//! directory every test run on this machine shares. The kernel drops the lock when the process
//! dies; a second descriptor of the same process conflicts too, so the threads of one
//! `cargo test` process do not share a port either.

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

/// How many ports below the ephemeral range the tests pick from.
const SPAN: u16 = 12_000;

/// The locks this process holds: one per port it handed out.
static HELD: Mutex<Vec<Flock<File>>> = Mutex::new(Vec::new());

/// A port on 127.0.0.1 that no other test (of this or another run) is given while this process
/// lives, and that was free when picked.
pub fn free_port() -> anyhow::Result<u16> {
    let Some((lo, hi)) = reserved_range() else {
        // No room outside the ephemeral range: fall back to a port free a moment ago.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    };
    // Under `cargo test` one process keeps a lock file open per port of the whole suite.
    static RAISE: std::sync::Once = std::sync::Once::new();
    RAISE.call_once(|| {
        let _ = crate::fleet::raise_nofile(8_192);
    });
    let dir = ports_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the port lock directory {}", dir.display()))?;
    let span = u32::from(hi - lo);
    // Processes start their search at different places, so they rarely try the same files.
    let seed = std::process::id().wrapping_mul(7_919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut held = HELD
        .lock()
        .map_err(|_| anyhow::anyhow!("the port lock list was poisoned"))?;
    for i in 0..span {
        let offset = u16::try_from((seed.wrapping_add(i)) % span).unwrap_or(0);
        let port = lo + offset;
        let Some(lock) = try_lock(&dir.join(port.to_string()))? else {
            continue;
        };
        // A process outside the tests may listen there.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push(lock);
        return Ok(port);
    }
    bail!(
        "no free port in {lo}..{hi}: every one is locked in {} or in use",
        dir.display()
    )
}

/// `[lo, hi)`: the ports just below the ephemeral range, or `None` if there is no such room.
fn reserved_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let low = text
        .as_deref()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|s| s.parse::<u16>().ok())
        // Linux's default.
        .unwrap_or(32_768);
    let lo = low.checked_sub(SPAN)?;
    (lo >= 1_024).then_some((lo, low))
}

/// Shared by every run on the machine: next to the cluster lock, outside a run's own TMPDIR.
fn ports_dir() -> PathBuf {
    let lock = crate::cluster_lock_path();
    lock.parent()
        .map(|p| p.to_owned())
        .unwrap_or_else(std::env::temp_dir)
        .join("rollgate-test-ports")
}

fn try_lock(path: &std::path::Path) -> anyhow::Result<Option<Flock<File>>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        // Made by another user (sticky /tmp): reading is enough for flock.
        .or_else(|_| File::open(path))
    {
        Ok(f) => f,
        // Not ours to use: try the next port.
        Err(_) => return Ok(None),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_handed_out_twice_and_sit_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        if let Some((lo, hi)) = reserved_range() {
            assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?}");
        }
        // Another open file description cannot take a handed-out port's lock.
        let again = try_lock(&ports_dir().join(ports[0].to_string())).expect("lockable");
        assert!(again.is_none(), "port {} was not kept", ports[0]);
    }
}
