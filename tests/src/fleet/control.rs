//! The simulator's control: one command per line on its stdin, one JSON answer per line on its
//! stdout (no port to find, and it ends with the process that started it).
//!
//! - `crash ID...`, `hang ID...`, `restore ID...`: change agents' [`Mode`].
//! - `fenced EPOCH`: how many agents accepted an epoch of at least EPOCH, and when the first
//!   and the last did (unix µs).
//! - `mark`, then `first-calls`: per pool, when the first operation call since the mark arrived.
//! - `versions`: how many agents run each version.
//!
//! The first line the simulator prints is `{"agents": [[id, pool, domain, addr], ...]}`.

use super::gate::Mode;
use super::{FleetSpec, Identity, SimFleet};
use crate::Pki;
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Answers one command line.
pub fn answer(fleet: &SimFleet, line: &str) -> Value {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return json!({"error": "empty command"});
    };
    let args: Vec<&str> = words.collect();
    let set = |mode: Mode| {
        let mut unknown = Vec::new();
        let mut changed = 0;
        for id in &args {
            match fleet.agent(id) {
                Some(a) => {
                    a.mode.send_replace(mode);
                    changed += 1;
                }
                None => unknown.push(*id),
            }
        }
        if unknown.is_empty() {
            json!({"changed": changed})
        } else {
            json!({"error": format!("unknown agents: {unknown:?}")})
        }
    };
    match cmd {
        "crash" => set(Mode::Crashed),
        "hang" => set(Mode::Hung),
        "restore" => set(Mode::Up),
        "fenced" => {
            let Some(epoch) = args.first().and_then(|e| e.parse::<u64>().ok()) else {
                return json!({"error": "fenced needs an epoch"});
            };
            let times: Vec<u64> = fleet
                .agents
                .iter()
                .filter_map(|a| a.fenced_at(epoch))
                .collect();
            json!({
                "total": fleet.agents.len(),
                "fenced": times.len(),
                "first_us": times.iter().min(),
                "last_us": times.iter().max(),
            })
        }
        "mark" => {
            fleet.agents.iter().for_each(|a| a.mark());
            json!({"marked": fleet.agents.len()})
        }
        "first-calls" => {
            let mut pools: BTreeMap<String, u64> = BTreeMap::new();
            for a in &fleet.agents {
                if let Some(t) = a.first_call_us() {
                    let e = pools.entry(a.id.pool.clone()).or_insert(t);
                    *e = (*e).min(t);
                }
            }
            json!({"pools": pools})
        }
        "versions" => {
            let mut v: BTreeMap<String, u64> = BTreeMap::new();
            for a in &fleet.agents {
                *v.entry(a.version()).or_default() += 1;
            }
            json!({"versions": v})
        }
        other => json!({"error": format!("unknown command {other:?}")}),
    }
}

/// Prints the agents, then answers commands from `input` (one line each) until it ends or
/// says `quit`.
pub async fn serve(
    fleet: &SimFleet,
    mut input: tokio::sync::mpsc::Receiver<String>,
    mut output: impl std::io::Write,
) -> anyhow::Result<()> {
    let agents: Vec<Value> = fleet
        .identities()
        .into_iter()
        .map(|i| json!([i.server_id, i.pool, i.domain, i.addr.to_string()]))
        .collect();
    say(&mut output, json!({ "agents": agents }))?;
    while let Some(line) = input.recv().await {
        if line.trim() == "quit" {
            break;
        }
        say(&mut output, answer(fleet, &line))?;
    }
    Ok(())
}

fn say(output: &mut impl std::io::Write, v: Value) -> anyhow::Result<()> {
    writeln!(output, "{v}")?;
    output.flush()?;
    Ok(())
}

/// Lines of this process's stdin, read on a thread of their own (stdin blocks).
pub fn stdin_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn identity(v: &Value) -> anyhow::Result<Identity> {
    let field = |i: usize| {
        v.get(i)
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("bad agent entry {v}"))
    };
    Ok(Identity {
        server_id: field(0)?.to_owned(),
        pool: field(1)?.to_owned(),
        domain: field(2)?.to_owned(),
        addr: field(3)?.parse()?,
    })
}

/// A running `rollgate-fleet` process, driven over its stdin/stdout.
pub struct FleetProc {
    /// Every simulated agent.
    pub agents: Vec<Identity>,
    /// Its log (stderr).
    pub log: std::path::PathBuf,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl FleetProc {
    /// Starts `rollgate-fleet` for `spec`, its agents' certificates signed by `pki`'s CA
    /// (whose key is written under `root` for it), and waits until every agent listens.
    pub async fn start(root: &Path, pki: &Pki, spec: &FleetSpec) -> anyhow::Result<FleetProc> {
        let dir = root.join("fleet");
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("ca.key");
        rollgate_common::pki::write_file(&key, &pki.ca_key_pem(), 0o600)?;
        let log = dir.join("fleet.log");
        let mut cmd = crate::owner::tied_tokio(crate::bin("rollgate-fleet")?)?;
        cmd.arg("--agents")
            .arg(spec.agents.to_string())
            .arg("--pools")
            .arg(spec.pools.to_string())
            .arg("--domains")
            .arg(spec.domains.to_string())
            .arg("--version")
            .arg(&spec.version)
            .arg("--step-ms")
            .arg(spec.step.as_millis().to_string())
            .arg("--report-interval-ms")
            .arg(spec.report_interval.as_millis().to_string())
            .arg("--ca-cert")
            .arg(pki.ca_cert_path())
            .arg("--ca-key")
            .arg(&key)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        let mut child = crate::owner::spawn_tokio(cmd).context("cannot start rollgate-fleet")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut me = FleetProc {
            agents: Vec::new(),
            log,
            child,
            stdin,
            stdout,
        };
        // Signing 10,000 certificates on a busy machine takes a while.
        let first = me.read(Duration::from_secs(300)).await?;
        me.agents = first
            .get("agents")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("rollgate-fleet said {first} instead of its agents"))?
            .iter()
            .map(identity)
            .collect::<anyhow::Result<_>>()?;
        Ok(me)
    }

    async fn read(&mut self, limit: Duration) -> anyhow::Result<Value> {
        match tokio::time::timeout(limit, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(serde_json::from_str(&line)?),
            Ok(Ok(None)) => bail!(
                "rollgate-fleet exited ({:?}): {}",
                self.child.try_wait().ok().flatten(),
                tail(&self.log)
            ),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("rollgate-fleet did not answer within {limit:?}"),
        }
    }

    /// Sends one command and returns its answer (an `error` answer is an error).
    pub async fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let v = self.read(Duration::from_secs(60)).await?;
        if let Some(e) = v.get("error") {
            bail!("rollgate-fleet refused {command:?}: {e}");
        }
        Ok(v)
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The `[[pools]]` tables driving these agents.
    pub fn pools_toml(&self, extra: &str) -> String {
        super::pools_toml(&self.agents, extra)
    }
}
