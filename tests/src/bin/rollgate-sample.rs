//! `rollgate-sample`: a small real front end for tests and the demo.
//!
//! It serves TCP on 127.0.0.1:<port>: each line `VERSION` is answered with the version, any other
//! line is echoed, and an HTTP `GET /health` is answered 200 (503 while `<dir>/unhealthy`
//! exists). On SIGUSR1 (drain) it closes its listener so new connections are refused, lets open
//! connections finish, and exits when the last one closes. SIGTERM stops it at once.
//!
//! It also plays its own service manager, so an agent can drive it with plain commands:
//! `start` (daemonise and wait until it accepts), `stop`, `drain`, `install` (reads
//! ROLLGATE_ARTIFACT and ROLLGATE_VERSION; fails while `<dir>/fail-install` exists; comes up
//! unhealthy when `<dir>/break-on-install` names the version installed),
//! `version`, `busy` (exit 0 while `<dir>/busy` exists), and `make-artifact` to build a release.
//!
//! When `<dir>/owner` names a process (the test that made the directory, see
//! `rollgate_tests::owner`), `serve` exits as soon as that process is gone, so that a killed
//! test leaves no front end behind. `tied --parent PID -- PROGRAM ARGS...` runs a program that
//! the kernel kills when its parent dies: the harness starts its agents, coordinators and etcd
//! members that way.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rollgate_tests::owner::{read_owner, ProcessId, OWNER_POLL};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "rollgate-sample",
    about = "a sample front end that rollgate can drive"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve in the foreground.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        port: u16,
    },
    /// Start in the background and wait until it accepts connections.
    Start {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        port: u16,
    },
    /// Stop at once (SIGTERM, then SIGKILL after 10s).
    Stop {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop taking new connections; exit when open ones have finished.
    Drain {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Install the release in $ROLLGATE_ARTIFACT as version $ROLLGATE_VERSION.
    Install {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print the installed version.
    Version {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Exit 0 while busy, 1 when not.
    Busy {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write a release artifact for VERSION to OUT.
    MakeArtifact { version: String, out: PathBuf },
    /// Run PROGRAM (same pid, by exec) so that it is SIGKILLed when process PARENT, which
    /// must be the one that started this command, dies.
    Tied {
        #[arg(long)]
        parent: u32,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<OsString>,
    },
}

const MAGIC: &str = "rollgate-sample-release";

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Serve { dir, port } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve(dir, port)),
        Cmd::Start { dir, port } => start(&dir, port),
        Cmd::Stop { dir } => stop(&dir),
        Cmd::Drain { dir } => {
            if let Some(pid) = running_pid(&dir) {
                kill(pid, Signal::SIGUSR1).context("cannot signal the service")?;
            }
            Ok(())
        }
        Cmd::Install { dir } => install(&dir),
        Cmd::Version { dir } => {
            println!("{}", version(&dir)?);
            Ok(())
        }
        Cmd::Busy { dir } => std::process::exit(if dir.join("busy").exists() { 0 } else { 1 }),
        Cmd::MakeArtifact { version, out } => {
            std::fs::write(&out, format!("{MAGIC} {version}\n"))?;
            Ok(())
        }
        Cmd::Tied { parent, argv } => tied(parent, &argv),
    }
}

fn tied(parent: u32, argv: &[OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let (program, args) = argv.split_first().context("no program to run")?;
    // Kept across exec; sent when the thread that forked us ends (see rollgate_tests::owner).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    // The parent may have died before the line above: then nothing would ever signal us.
    if std::os::unix::process::parent_id() != parent {
        bail!("parent {parent} is gone: not starting {program:?}");
    }
    let err = std::process::Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("cannot run {program:?}"))
}

fn version(dir: &Path) -> anyhow::Result<String> {
    let p = dir.join("current").join("VERSION");
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("no installed version at {}", p.display()))?
        .trim()
        .to_owned())
}

fn install(dir: &Path) -> anyhow::Result<()> {
    if dir.join("fail-install").exists() {
        bail!(
            "install refused: {} exists",
            dir.join("fail-install").display()
        );
    }
    let artifact = std::env::var("ROLLGATE_ARTIFACT").context("ROLLGATE_ARTIFACT is not set")?;
    let version = std::env::var("ROLLGATE_VERSION").context("ROLLGATE_VERSION is not set")?;
    let text =
        std::fs::read_to_string(&artifact).with_context(|| format!("cannot read {artifact}"))?;
    let expected = format!("{MAGIC} {version}");
    if text.trim() != expected {
        bail!("artifact {artifact} is not a release of version {version}");
    }
    let release = dir.join("releases").join(&version);
    std::fs::create_dir_all(&release)?;
    std::fs::write(release.join("VERSION"), format!("{version}\n"))?;
    // Append-only record of installs, so tests can check that nothing was installed twice.
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("installs.log"))?;
    writeln!(log, "{version}")?;
    let tmp = dir.join("current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&release, &tmp)?;
    std::fs::rename(&tmp, dir.join("current"))?;
    // Fault injection for tests: <dir>/break-on-install names a version that comes up unhealthy.
    let breaks = std::fs::read_to_string(dir.join("break-on-install"))
        .map(|v| v.trim() == version)
        .unwrap_or(false);
    if breaks {
        std::fs::write(dir.join("unhealthy"), "")?;
    } else {
        let _ = std::fs::remove_file(dir.join("unhealthy"));
    }
    // Fault injection for tests: <dir>/slow-install holds milliseconds to linger after installing,
    // so a test can kill the agent while its install command is still running.
    if let Some(ms) = std::fs::read_to_string(dir.join("slow-install"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms.min(60_000)));
    }
    println!("installed {version} into {}", release.display());
    Ok(())
}

fn pidfile(dir: &Path) -> PathBuf {
    dir.join("sample.pid")
}

fn alive(pid: Pid) -> bool {
    if kill(pid, None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); it is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn running_pid(dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(pidfile(dir)).ok()?;
    let pid = Pid::from_raw(text.trim().parse().ok()?);
    alive(pid).then_some(pid)
}

fn start(dir: &Path, port: u16) -> anyhow::Result<()> {
    if running_pid(dir).is_some() {
        return Ok(());
    }
    version(dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sample.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve")
        .arg("--dir")
        .arg(dir)
        .arg("--port")
        .arg(port.to_string());
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: signals to the agent's group do not reach the service.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().context("cannot spawn the service")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
        {
            println!("started pid {} on port {port}", child.id());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "service did not accept connections on port {port} within 10s (see {})",
        dir.join("sample.log").display()
    )
}

fn stop(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(dir) else {
        return Ok(());
    };
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(pidfile(dir));
    println!("stopped pid {pid}");
    Ok(())
}

/// Resolves when `owner` (if any) is gone: checked every [`OWNER_POLL`].
async fn owner_gone(owner: Option<ProcessId>) {
    let Some(owner) = owner else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(OWNER_POLL);
    loop {
        tick.tick().await;
        if !owner.is_alive() {
            eprintln!("owner process {} is gone: exiting", owner.pid);
            return;
        }
    }
}

async fn serve(dir: PathBuf, port: u16) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let version = Arc::new(version(&dir)?);
    let orphaned = owner_gone(read_owner(&dir)?);
    tokio::pin!(orphaned);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    std::fs::write(pidfile(&dir), std::process::id().to_string())?;
    eprintln!("serving version {version} on port {port}");
    let open = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                open.fetch_add(1, Ordering::SeqCst);
                let (v, d, o, tx) = (Arc::clone(&version), dir.clone(), Arc::clone(&open), closed_tx.clone());
                tokio::spawn(async move {
                    let _ = handle(stream, &v, &d).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(());
                });
            }
            _ = usr1.recv() => break,
            _ = term.recv() => return Ok(()),
            () = &mut orphaned => return Ok(()),
        }
    }
    drop(listener);
    eprintln!(
        "draining: listener closed, {} connection(s) open",
        open.load(Ordering::SeqCst)
    );
    while open.load(Ordering::SeqCst) > 0 {
        tokio::select! {
            _ = closed_rx.recv() => {}
            _ = term.recv() => return Ok(()),
            () = &mut orphaned => return Ok(()),
        }
    }
    eprintln!("drained");
    Ok(())
}

async fn handle(stream: TcpStream, version: &str, dir: &Path) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("GET /health") {
            let (code, body) = if dir.join("unhealthy").exists() {
                ("503 Service Unavailable", "unhealthy\n".to_owned())
            } else {
                ("200 OK", format!("ok {version}\n"))
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            w.write_all(resp.as_bytes()).await?;
            return Ok(());
        }
        let reply = if line.trim() == "VERSION" {
            version.to_owned()
        } else {
            line
        };
        w.write_all(reply.as_bytes()).await?;
        w.write_all(b"\n").await?;
    }
    Ok(())
}
