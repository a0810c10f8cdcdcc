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
//! [`FleetProc`] drives one or several such processes as one fleet.

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

/// One `rollgate-fleet` process, serving a slice of the fleet.
struct Shard {
    log: std::path::PathBuf,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Shard {
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

    async fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
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
}

/// The simulated fleet, served by one `rollgate-fleet` process or, when one process's
/// open-file limit cannot hold every agent's listener and connections, by several, each
/// serving a slice; driven over their stdin/stdout as if they were one.
pub struct FleetProc {
    /// Every simulated agent.
    pub agents: Vec<Identity>,
    shards: Vec<Shard>,
    /// Which shard serves each agent.
    shard_of: std::collections::HashMap<String, usize>,
}

/// How many agents one process can serve with `peers` coordinators connected to each, within
/// its open-file limit: a listener and a connection per peer per agent, and as much again,
/// because a coordinator that times out a slow handshake on a busy machine dials again while
/// the first connection is still being torn down (at 5,000 agents on 2 busy cores, a single
/// process with 3 descriptors per agent ran out: "Too many open files").
pub fn agents_per_process(peers: usize) -> usize {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, h)| h);
    let usable = usize::try_from(hard.saturating_sub(1024)).unwrap_or(usize::MAX);
    (usable / (2 * (1 + peers.max(1)))).max(1)
}

impl FleetProc {
    /// Starts `rollgate-fleet` for `spec` (as many processes as the open-file limit needs with
    /// `peers` coordinators connected to every agent), the agents' certificates signed by
    /// `pki`'s CA (whose key is written under `root` for it), and waits until every agent
    /// listens.
    pub async fn start(
        root: &Path,
        pki: &Pki,
        spec: &FleetSpec,
        peers: usize,
    ) -> anyhow::Result<FleetProc> {
        let dir = root.join("fleet");
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("ca.key");
        rollgate_common::pki::write_file(&key, &pki.ca_key_pem(), 0o600)?;
        let per = agents_per_process(peers);
        let mut me = FleetProc {
            agents: Vec::new(),
            shards: Vec::new(),
            shard_of: Default::default(),
        };
        let mut first = 0;
        while first < spec.agents {
            let count = per.min(spec.agents - first);
            let n = me.shards.len();
            let log = dir.join(format!("fleet-{n}.log"));
            let mut cmd = crate::owner::tied_tokio(crate::bin("rollgate-fleet")?)?;
            cmd.arg("--agents")
                .arg(spec.agents.to_string())
                .arg("--first")
                .arg(first.to_string())
                .arg("--count")
                .arg(count.to_string())
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
            let mut child =
                crate::owner::spawn_tokio(cmd).context("cannot start rollgate-fleet")?;
            let stdin = child.stdin.take().context("no stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
            let mut shard = Shard {
                log,
                child,
                stdin,
                stdout,
            };
            // Signing thousands of certificates on a busy machine takes a while.
            let hello = shard.read(Duration::from_secs(300)).await?;
            let agents = hello
                .get("agents")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("rollgate-fleet said {hello} instead of its agents"))?
                .iter()
                .map(identity)
                .collect::<anyhow::Result<Vec<_>>>()?;
            for a in &agents {
                me.shard_of.insert(a.server_id.clone(), n);
            }
            me.agents.extend(agents);
            me.shards.push(shard);
            first += count;
        }
        Ok(me)
    }

    /// Sends one command (to the processes it concerns) and returns the answer, merged over
    /// processes; an `error` answer is an error.
    pub async fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        let mut words = command.split_whitespace();
        let verb = words.next().unwrap_or_default();
        if matches!(verb, "crash" | "hang" | "restore") {
            let mut per: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
            for id in words {
                let n = self
                    .shard_of
                    .get(id)
                    .ok_or_else(|| anyhow!("no simulated agent {id}"))?;
                per.entry(*n).or_default().push(id);
            }
            let mut changed = 0;
            for (n, ids) in per {
                let v = self.shards[n]
                    .ask(&format!("{verb} {}", ids.join(" ")))
                    .await?;
                changed += v["changed"].as_u64().unwrap_or(0);
            }
            return Ok(json!({ "changed": changed }));
        }
        let mut answers = Vec::new();
        for s in &mut self.shards {
            answers.push(s.ask(command).await?);
        }
        Ok(merge(answers))
    }

    /// The simulator processes' ids, while they run.
    pub fn pids(&self) -> Vec<u32> {
        self.shards.iter().filter_map(|s| s.child.id()).collect()
    }

    /// The `[[pools]]` tables driving these agents.
    pub fn pools_toml(&self, extra: &str) -> String {
        super::pools_toml(&self.agents, extra)
    }
}

/// Several processes' answers to one command as one: counts add up, first times take the
/// earliest, last times the latest, maps merge the same way.
fn merge(answers: Vec<Value>) -> Value {
    let mut out = serde_json::Map::new();
    for a in answers {
        let Value::Object(a) = a else { continue };
        for (k, v) in a {
            let merged = match (out.remove(&k), v) {
                (None, v) => v,
                (Some(Value::Object(mut m)), Value::Object(n)) => {
                    for (nk, nv) in n {
                        let e = m.remove(&nk);
                        m.insert(nk, combine(&k, e, nv));
                    }
                    Value::Object(m)
                }
                (Some(old), v) => combine(&k, Some(old), v),
            };
            out.insert(k, merged);
        }
    }
    Value::Object(out)
}

fn combine(key: &str, old: Option<Value>, new: Value) -> Value {
    let (Some(a), Some(b)) = (old.as_ref().and_then(Value::as_u64), new.as_u64()) else {
        return if new.is_null() {
            old.unwrap_or(new)
        } else {
            new
        };
    };
    match key {
        "first_us" | "pools" => json!(a.min(b)),
        "last_us" => json!(a.max(b)),
        _ => json!(a + b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_several_processes_merge_as_one() {
        let m = merge(vec![
            json!({"total": 2, "fenced": 2, "first_us": 5, "last_us": 9}),
            json!({"total": 3, "fenced": 1, "first_us": 4, "last_us": 7}),
        ]);
        assert_eq!(
            m,
            json!({"total": 5, "fenced": 3, "first_us": 4, "last_us": 9})
        );
        let none = merge(vec![
            json!({"first_us": null}),
            json!({"first_us": 3}),
            json!({"first_us": null}),
        ]);
        assert_eq!(none, json!({"first_us": 3}));
        let pools = merge(vec![
            json!({"pools": {"a": 5, "b": 2}}),
            json!({"pools": {"a": 3}}),
        ]);
        assert_eq!(pools, json!({"pools": {"a": 3, "b": 2}}));
        let versions = merge(vec![
            json!({"versions": {"1.0": 2}}),
            json!({"versions": {"1.0": 1, "2.0": 4}}),
        ]);
        assert_eq!(versions, json!({"versions": {"1.0": 3, "2.0": 4}}));
    }
}
