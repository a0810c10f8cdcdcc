//! Running the service's hook commands: argv lists, no shell, under a time limit, keeping a
//! bounded tail of the output.
//!
//! Each hook runs in a process group of its own, so that whatever it started can be stopped
//! with it: when the time limit passes, or when the agent stops waiting for it (the operation's
//! future dropped at shutdown), the whole group is SIGKILLed, not only the hook process. A hook
//! that exits in time leaves its group alone, because a start hook legitimately leaves the
//! service running as a daemon. (A daemon that moves itself into another group or session, as
//! service managers do, is beyond the agent's reach either way.)
//!
//! The outcome is decided when the hook process itself exits, not when its output pipes close:
//! a daemon it started may inherit them and hold them open for as long as it runs. After the
//! exit, output is collected for at most [`OUTPUT_GRACE`]; whatever arrives later is read and
//! thrown away, so that such a daemon is neither blocked on a full pipe nor killed by SIGPIPE.
//!
//! Output is read as it comes and only its last [`OUTPUT_TAIL_BYTES`] per stream are kept, so a
//! hook that prints without end costs no more memory than one that prints a line.

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

/// How much of a hook's output is kept (the tail): enough to see why it failed.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// How long output is still collected after the hook process exited: long enough for what it
/// wrote just before exiting, short enough that a daemon holding the pipe open costs nothing.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(150);

/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 8192;

/// Why a hook could not be run at all (a hook that runs and fails is a [`HookOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The configured command is an empty list.
    #[error("the command is empty: it needs at least a program")]
    EmptyCommand,
    /// The program could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program (first argv element).
        program: String,
        /// Why the OS refused.
        source: std::io::Error,
    },
    /// The program started, but its exit status could not be read.
    #[error("cannot wait for {program:?}: {source}")]
    Wait {
        /// The program (first argv element).
        program: String,
        /// Why waiting failed.
        source: std::io::Error,
    },
}

impl HookError {
    /// True when running the same command again may work: a missing or non-executable
    /// program, or an empty command, is a configuration error that will not go away.
    pub fn is_retryable(&self) -> bool {
        match self {
            HookError::EmptyCommand => false,
            HookError::Spawn { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            HookError::Wait { .. } => true,
        }
    }
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Exit code (None when killed by a signal or the time limit).
    pub code: Option<i32>,
    /// stdout then stderr, tail only.
    pub output: String,
    /// True when the time limit killed it.
    pub timed_out: bool,
}

impl HookOutcome {
    /// True when it exited 0 in time.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// One line for an error message, e.g. "exited with 3" or "timed out after 5s".
    pub fn describe(&self, name: &str, limit: Duration) -> String {
        if self.timed_out {
            format!("{name} command timed out after {}", humantime_fmt(limit))
        } else {
            match self.code {
                Some(c) => format!("{name} command exited with {c}"),
                None => format!("{name} command was killed by a signal"),
            }
        }
    }
}

fn humantime_fmt(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The hook process, and the duty to kill its process group unless it exited on its own.
///
/// Dropping it (the caller's future cancelled, or a time-out) SIGKILLs the group. The group id
/// is the hook's pid, which the kernel cannot hand to another process while the hook is not
/// yet reaped; once it is reaped the id could be reused, so [`HookProcess::exited`] gives the
/// duty up at exactly that point.
struct HookProcess {
    child: Child,
    group: Option<Pid>,
}

impl HookProcess {
    fn kill_group(&mut self) {
        if let Some(group) = self.group.take() {
            match killpg(group, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    tracing::warn!(error = %e, pgid = group.as_raw(), "cannot kill a hook's process group")
                }
            }
        }
    }

    /// The hook exited and was reaped: what it left running is meant to keep running.
    fn exited(&mut self) {
        self.group = None;
    }
}

impl Drop for HookProcess {
    fn drop(&mut self) {
        // Before `child` is dropped (and reaped by tokio), while its pid still names the group.
        self.kill_group();
    }
}

/// The last `OUTPUT_TAIL_BYTES` of a stream, kept as it is read.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(OUTPUT_TAIL_BYTES)..];
        // Dropping the front only when the buffer would pass twice the tail keeps the copying
        // amortised and the memory under 2 × OUTPUT_TAIL_BYTES, however much is pushed.
        if self.bytes.len() + chunk.len() > 2 * OUTPUT_TAIL_BYTES {
            let keep = OUTPUT_TAIL_BYTES - chunk.len();
            let cut = self.bytes.len().saturating_sub(keep);
            self.bytes.drain(..cut);
        }
        self.bytes.extend_from_slice(chunk);
    }

    fn get(&self) -> &[u8] {
        &self.bytes[self.bytes.len().saturating_sub(OUTPUT_TAIL_BYTES)..]
    }
}

/// One of the hook's output pipes, read until EOF or until the hook's outcome is settled.
struct Pipe<R> {
    reader: Option<R>,
    tail: Tail,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin + Send + 'static> Pipe<R> {
    fn new(reader: Option<R>) -> Pipe<R> {
        Pipe {
            reader,
            tail: Tail::default(),
            buf: vec![0; READ_CHUNK],
        }
    }

    fn open(&self) -> bool {
        self.reader.is_some()
    }

    /// Reads one chunk into the tail; at EOF or on an error the pipe is closed. Cancel-safe.
    async fn read_chunk(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return std::future::pending().await;
        };
        match reader.read(&mut self.buf).await {
            Ok(0) | Err(_) => self.reader = None,
            Ok(n) => self.tail.push(&self.buf[..n]),
        }
    }

    /// Stops collecting. Whoever still holds the write end (a daemon the hook started) may go on
    /// writing: it is read and dropped in the background until they close it, since closing the
    /// read end would SIGPIPE them and leaving it unread would block them once the pipe is full.
    fn discard_rest(&mut self) {
        if let Some(mut reader) = self.reader.take() {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
            });
        }
    }
}

/// Runs `argv` with extra environment `env`, killing it and its process group (and failing)
/// after `limit`. An error here means the command could not be run at all.
pub async fn run(
    argv: &[String],
    env: &[(&str, String)],
    limit: Duration,
) -> Result<HookOutcome, HookError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(HookError::EmptyCommand);
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own (its id is the hook's pid), so that everything it starts can be
        // killed together, and the agent's own group is never signalled.
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let mut hook = HookProcess { child, group };
    let mut stdout = Pipe::new(hook.child.stdout.take());
    let mut stderr = Pipe::new(hook.child.stderr.take());

    let time_limit = tokio::time::sleep(limit);
    tokio::pin!(time_limit);
    let status = loop {
        tokio::select! {
            status = hook.child.wait() => break Some(status),
            () = stdout.read_chunk(), if stdout.open() => {}
            () = stderr.read_chunk(), if stderr.open() => {}
            () = &mut time_limit => break None,
        }
    };
    let (code, timed_out) = match status {
        Some(Ok(status)) => {
            hook.exited();
            (status.code(), false)
        }
        Some(Err(source)) => {
            return Err(HookError::Wait {
                program: program.clone(),
                source,
            })
        }
        None => {
            hook.kill_group();
            (None, true)
        }
    };

    // What the hook wrote before it exited (or was killed) is in the pipes already; a daemon it
    // left behind may keep them open, so do not wait for EOF longer than the grace.
    let grace = tokio::time::sleep(OUTPUT_GRACE);
    tokio::pin!(grace);
    while stdout.open() || stderr.open() {
        tokio::select! {
            () = stdout.read_chunk(), if stdout.open() => {}
            () = stderr.read_chunk(), if stderr.open() => {}
            () = &mut grace => break,
        }
    }
    stdout.discard_rest();
    stderr.discard_rest();

    let mut out = stdout.tail.get().to_vec();
    out.extend_from_slice(stderr.tail.get());
    Ok(HookOutcome {
        code,
        output: tail(&out),
        timed_out,
    })
}

/// The last [`OUTPUT_TAIL_BYTES`] of `bytes` as text.
pub fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::time::Instant;

    /// How long a test waits for something that should happen at once.
    const WAIT: Duration = Duration::from_secs(10);

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `sh -c script sh args...`: the script sees `args` as $1, $2, ...
    fn script(script: &str, args: &[&Path]) -> Vec<String> {
        let mut v = argv(&["sh", "-c", script, "sh"]);
        v.extend(args.iter().map(|p| p.display().to_string()));
        v
    }

    /// The start time of `pid` while it runs (a zombie does not count), so that a reused pid is
    /// not mistaken for the process a test saw.
    fn started_at(pid: i32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces: fields are counted after its closing ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
            return None;
        }
        fields.get(19)?.parse().ok()
    }

    /// A process a test saw running; SIGKILLed when the test ends, however it ends, so that a
    /// failing test leaks nothing either.
    struct Seen {
        pid: i32,
        start: u64,
    }

    impl Seen {
        fn alive(&self) -> bool {
            started_at(self.pid) == Some(self.start)
        }

        async fn gone_within(&self, limit: Duration) -> bool {
            let deadline = Instant::now() + limit;
            while self.alive() {
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        }
    }

    impl Drop for Seen {
        fn drop(&mut self) {
            if self.alive() {
                let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            }
        }
    }

    /// The process whose pid a script wrote to `file`, waiting for the file up to `WAIT`.
    async fn seen(file: &Path) -> Result<Seen, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if let Ok(pid) = text.trim().parse::<i32>() {
                let start = started_at(pid).ok_or_else(|| {
                    format!("process {pid} from {} is not running", file.display())
                })?;
                return Ok(Seen { pid, start });
            }
            if Instant::now() >= deadline {
                return Err(format!("no pid in {} after {WAIT:?}", file.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This process's peak resident memory, in bytes.
    fn peak_rss() -> Result<u64, Box<dyn std::error::Error>> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or("no VmHWM in /proc/self/status")?;
        Ok(kb * 1024)
    }

    #[tokio::test]
    async fn captures_output_and_exit_code() -> TestResult {
        let o = run(
            &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            &[],
            Duration::from_secs(5),
        )
        .await?;
        assert_eq!(o.code, Some(3));
        assert!(
            o.output.contains("out") && o.output.contains("err"),
            "{}",
            o.output
        );
        assert!(!o.success());
        Ok(())
    }

    #[tokio::test]
    async fn passes_environment() -> TestResult {
        let o = run(
            &argv(&["sh", "-c", "printf %s \"$ROLLGATE_VERSION\""]),
            &[("ROLLGATE_VERSION", "9.1".into())],
            Duration::from_secs(5),
        )
        .await?;
        assert_eq!(o.output, "9.1");
        assert!(o.success());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn kills_after_the_limit() -> TestResult {
        let o = run(&argv(&["sleep", "30"]), &[], Duration::from_millis(50)).await?;
        assert!(o.timed_out);
        assert!(o
            .describe("drain", Duration::from_millis(50))
            .contains("timed out"));
        Ok(())
    }

    #[tokio::test]
    async fn missing_program_or_empty_command_is_an_error_not_worth_retrying() {
        let e = run(&argv(&["/nonexistent/hook"]), &[], Duration::from_secs(1)).await;
        assert!(
            matches!(&e, Err(e @ HookError::Spawn { .. }) if !e.is_retryable()
                && e.to_string().contains("/nonexistent/hook")),
            "{e:?}"
        );
        let e = run(&[], &[], Duration::from_secs(1)).await;
        assert!(matches!(e, Err(HookError::EmptyCommand)), "{e:?}");
    }

    #[tokio::test]
    async fn a_timed_out_hook_is_killed_with_everything_it_started() -> TestResult {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("grandchild.pid");
        let o = run(
            &script(
                "sleep 60 & echo $! > \"$1\"; echo waiting; sleep 60",
                &[&pid_file],
            ),
            &[],
            Duration::from_secs(2),
        )
        .await?;
        // Gone already (then its pid file names a dead process), or going.
        if let Ok(grandchild) = seen(&pid_file).await {
            assert!(
                grandchild.gone_within(WAIT).await,
                "the hook's background child {} still runs after the time-out",
                grandchild.pid
            );
        }
        assert!(o.timed_out, "{o:?}");
        assert_eq!(o.output, "waiting\n", "the tail is kept on a time-out too");
        Ok(())
    }

    #[tokio::test]
    async fn dropping_a_running_hook_kills_everything_it_started() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (hook_file, grandchild_file) = (dir.path().join("hook.pid"), dir.path().join("gc.pid"));
        let argv = script(
            "echo $$ > \"$1\"; sleep 60 & echo $! > \"$2\"; sleep 60",
            &[&hook_file, &grandchild_file],
        );
        // Boxed, so that dropping it below drops the future itself.
        let mut hook = Box::pin(run(&argv, &[], Duration::from_secs(60)));
        // Run the hook until it has started its child, then cancel it as a shutdown would.
        let deadline = Instant::now() + WAIT;
        while !(hook_file.exists() && grandchild_file.exists()) {
            assert!(
                Instant::now() < deadline,
                "the hook did not start its child"
            );
            tokio::select! {
                o = &mut hook => return Err(format!("the hook ended: {o:?}").into()),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let (hook_proc, grandchild) = (seen(&hook_file).await?, seen(&grandchild_file).await?);
        drop(hook);
        assert!(hook_proc.gone_within(WAIT).await, "the hook still runs");
        assert!(
            grandchild.gone_within(WAIT).await,
            "the hook's background child {} still runs after the hook was dropped",
            grandchild.pid
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_daemon_holding_the_output_pipe_neither_delays_the_hook_nor_is_killed() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("daemon.pid");
        let limit = Duration::from_secs(20);
        let began = Instant::now();
        let o = run(
            &script("sleep 60 & echo $! > \"$1\"; echo started", &[&pid_file]),
            &[],
            limit,
        )
        .await?;
        let took = began.elapsed();
        let daemon = seen(&pid_file).await?;
        assert!(o.success(), "{o:?}");
        assert_eq!(o.output, "started\n");
        assert!(
            took < limit / 4,
            "the hook took {took:?}: it waited for the daemon"
        );
        assert!(daemon.alive(), "the daemon the hook started was killed");
        Ok(())
    }

    #[tokio::test]
    async fn a_daemon_writing_to_the_inherited_pipe_later_is_not_killed_by_sigpipe() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (pid_file, wrote) = (dir.path().join("daemon.pid"), dir.path().join("wrote"));
        // The daemon writes well after the hook's output grace, then says so.
        let o = run(
            &script(
                "(sleep 1; echo tick; echo tick >&2; : > \"$2\"; exec sleep 60) & \
                 echo $! > \"$1\"; echo started",
                &[&pid_file, &wrote],
            ),
            &[],
            Duration::from_secs(20),
        )
        .await?;
        let daemon = seen(&pid_file).await?;
        assert!(o.success(), "{o:?}");
        let deadline = Instant::now() + WAIT;
        while !wrote.exists() {
            assert!(
                daemon.alive(),
                "the daemon died writing to the pipe it inherited"
            );
            assert!(Instant::now() < deadline, "the daemon never wrote");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(daemon.alive(), "the daemon died after writing");
        Ok(())
    }

    #[tokio::test]
    async fn a_hook_printing_64_mib_costs_only_the_tail() -> TestResult {
        const PRINTED: u64 = 64 << 20;
        let before = peak_rss()?;
        let o = run(
            &argv(&[
                "sh",
                "-c",
                &format!("head -c {PRINTED} /dev/zero | tr '\\0' a; echo; echo END >&2"),
            ]),
            &[],
            Duration::from_secs(60),
        )
        .await?;
        let grew = peak_rss()?.saturating_sub(before);
        assert!(
            o.success(),
            "{}",
            o.describe("print", Duration::from_secs(60))
        );
        assert_eq!(o.output.len(), OUTPUT_TAIL_BYTES);
        assert!(o.output.ends_with("aaaa\nEND\n"), "{:?}", &o.output[4000..]);
        assert!(
            grew < PRINTED / 2,
            "peak memory grew by {grew} bytes while the hook printed {PRINTED}"
        );
        Ok(())
    }

    #[test]
    fn tail_keeps_the_end() {
        let long = vec![b'a'; OUTPUT_TAIL_BYTES + 10];
        assert_eq!(tail(&long).len(), OUTPUT_TAIL_BYTES);
    }

    #[test]
    fn the_tail_buffer_keeps_the_last_bytes_in_bounded_memory() {
        let mut t = Tail::default();
        let mut all = Vec::new();
        for i in 0..5000usize {
            // Chunks of every size, some larger than the tail itself.
            let chunk: Vec<u8> = (0..(i * 37) % (OUTPUT_TAIL_BYTES + 500))
                .map(|j| (i + j) as u8)
                .collect();
            t.push(&chunk);
            all.extend_from_slice(&chunk);
            assert!(t.bytes.len() <= 2 * OUTPUT_TAIL_BYTES, "{}", t.bytes.len());
            assert!(
                t.bytes.capacity() <= 4 * OUTPUT_TAIL_BYTES,
                "{}",
                t.bytes.capacity()
            );
            assert_eq!(t.get(), &all[all.len().saturating_sub(OUTPUT_TAIL_BYTES)..]);
        }
    }
}
