//! Running the service's hook commands: argv lists, no shell, under a time limit, output kept.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How much of a hook's output is kept (the tail): enough to see why it failed.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

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

/// Runs `argv` with extra environment `env`, killing it (and failing) after `limit`.
/// An error here means the command could not be started at all.
pub async fn run(
    argv: &[String],
    env: &[(&str, String)],
    limit: Duration,
) -> std::io::Result<HookOutcome> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        out.extend_from_slice(&err);
        (status, out)
    };
    match tokio::time::timeout(limit, collect).await {
        Ok((status, out)) => {
            let status = status?;
            Ok(HookOutcome {
                code: status.code(),
                output: tail(&out),
                timed_out: false,
            })
        }
        Err(_) => Ok(HookOutcome {
            code: None,
            output: String::new(),
            timed_out: true,
        }),
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] of `bytes` as text.
pub fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn captures_output_and_exit_code() -> std::io::Result<()> {
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
    async fn passes_environment() -> std::io::Result<()> {
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
    async fn kills_after_the_limit() -> std::io::Result<()> {
        let o = run(&argv(&["sleep", "30"]), &[], Duration::from_millis(50)).await?;
        assert!(o.timed_out);
        assert!(o
            .describe("drain", Duration::from_millis(50))
            .contains("timed out"));
        Ok(())
    }

    #[tokio::test]
    async fn missing_program_is_an_error() {
        let e = run(&argv(&["/nonexistent/hook"]), &[], Duration::from_secs(1)).await;
        assert!(e.is_err());
    }

    #[test]
    fn tail_keeps_the_end() {
        let long = vec![b'a'; OUTPUT_TAIL_BYTES + 10];
        assert_eq!(tail(&long).len(), OUTPUT_TAIL_BYTES);
    }
}
