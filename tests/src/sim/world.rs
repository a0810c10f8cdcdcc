//! The simulated world: one store (etcd's contract: revisions, an election key bound to a
//! lease, fenced transactions), the agents (the agent's contract: epochs, a journal, adoption,
//! one operation at a time, preconditions) and their services, the failover hook, and the
//! faults. Coordinators reach it through per-coordinator connections that implement the
//! coordinator's own seams (`store::Backend`, `AgentLink`, `PoolHooks`, `Clock`), so the real
//! control, driver, node and engine code runs against it.
//!
//! Every call is an await point where a fault may strike: the calling coordinator crashes
//! before or after the call takes effect, the answer is lost or late, the peer is cut off.
//! Invariants are checked at every step that could break one (see [`super::check`]).

use super::check::Checker;
use super::rng::Rng;
use rollgate_common::Epoch;
use rollgate_coordinator::config::{PoolConfig, PoolSpec};
use rollgate_coordinator::env::{Clock, PoolHooks};
use rollgate_coordinator::link::{
    AgentCommand, AgentLimits, AgentLink, LinkError, OpReply, OpState,
};
use rollgate_coordinator::progress::{self, UpgradeRecord};
use rollgate_coordinator::readiness::{self, AgentState, Clocks, PoolReadiness, ServerHealth};
use rollgate_coordinator::store::{
    Backend, Candidate, KeyValue, LeaderInfo, Leadership, Read, StoreError, WriteOp,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Probabilities of the faults struck at await points while chaos is on.
#[derive(Debug, Clone, Copy)]
pub struct CallFaults {
    /// The calling coordinator crashes before its call takes effect.
    pub crash_before: f64,
    /// The calling coordinator crashes after its call took effect, before it sees the answer.
    pub crash_after: f64,
    /// The call took effect but its answer is lost (the caller sees "unavailable").
    pub lost_answer: f64,
    /// The call fails without taking effect.
    pub fail: f64,
    /// The answer is late (up to a second).
    pub late: f64,
}

/// What the services do, per seed.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// A server whose new version comes up unhealthy (verify fails), if any.
    pub bad_version_on: Option<String>,
    /// A server whose drain never finishes (connections stay open), if any.
    pub stuck_drain_on: Option<String>,
    /// A server whose install fails this many times first.
    pub failing_install: Option<(String, u32)>,
    /// A server whose running version was installed outside rollgate (no rollback artifact).
    pub outside_install_on: Option<String>,
    /// Chance that an operation takes far longer than the coordinator's deadline.
    pub slow_step: f64,
}

/// The agents' own limits, as they report them (small, so that deadlines pass in a run).
pub const LIMITS: AgentLimits = AgentLimits {
    hook: Duration::from_secs(5),
    install: Duration::from_secs(10),
    start: Duration::from_secs(5),
    fetch: Duration::from_secs(5),
};

/// The service on a server, as the agent would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Svc {
    Serving,
    Draining,
    Stopped,
    Installing,
    Starting,
    Failed,
}

#[derive(Debug, Clone)]
struct JEntry {
    kind: &'static str,
    state: OpState,
    message: String,
    epoch: u64,
}

/// One server: its agent (epoch, journal) and its service.
#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub max_epoch: u64,
    journal: BTreeMap<String, JEntry>,
    running: Option<(String, watch::Sender<Option<OpReply>>)>,
    /// Bumped when the agent process crashes: completions of older runs are dropped.
    life: u32,
    pub svc: Svc,
    pub version: String,
    pub previous_version: String,
    pub previous_artifact: bool,
    pub installed_by_rollgate: bool,
    pub crashed_until: Option<Instant>,
    pub unhealthy_until: Option<Instant>,
    pub busy_until: Option<Instant>,
    /// Successful install executions per (plan, direction).
    pub installs: BTreeMap<(String, String), u32>,
    /// When a fault (not the coordinator) last made the service look inactive.
    pub last_fault: Option<Instant>,
    /// Epochs accepted, in order.
    pub accepted: Vec<u64>,
}

impl Agent {
    fn new(id: &str, version: &str, outside: bool) -> Agent {
        Agent {
            id: id.to_string(),
            max_epoch: 0,
            journal: BTreeMap::new(),
            running: None,
            life: 0,
            svc: Svc::Serving,
            version: version.to_string(),
            previous_version: "0.9".into(),
            previous_artifact: !outside,
            installed_by_rollgate: !outside,
            crashed_until: None,
            unhealthy_until: None,
            busy_until: None,
            installs: BTreeMap::new(),
            last_fault: None,
            accepted: Vec::new(),
        }
    }

    pub fn healthy(&self, now: Instant, bad: Option<&str>) -> bool {
        self.unhealthy_until.is_none_or(|t| now >= t) && bad != Some(self.version.as_str())
    }

    pub fn busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }

    /// Serving and healthy: counts toward min_active.
    pub fn active(&self, now: Instant, bad: Option<&str>) -> bool {
        self.svc == Svc::Serving && self.healthy(now, bad)
    }

    fn up(&self, now: Instant) -> bool {
        self.crashed_until.is_none_or(|t| now >= t)
    }
}

#[derive(Debug)]
struct Election {
    key: String,
    id: String,
    address: String,
    epoch: i64,
    coord: usize,
    life: u32,
    unrenewed_since: Option<Instant>,
    /// The holder's token: once it is cancelled (resigned, refused, gave up) the holder stops
    /// renewing, as the real store's keepalive does.
    lost: CancellationToken,
}

/// One coordinator process (its current life) as the world sees it.
#[derive(Debug, Default)]
pub struct Coord {
    pub life: u32,
    pub alive: bool,
    pub frozen_until: Option<Instant>,
    pub store_cut_until: Option<Instant>,
    pub agents_cut_until: Option<Instant>,
    /// Leaderships handed to this life: cancelled once it notices they are gone.
    held: Vec<(i64, CancellationToken)>,
    pub restart_at: Option<Instant>,
}

/// Everything the simulation knows.
pub struct World {
    pub rng: Rng,
    pub start: Instant,
    pub chaos: bool,
    pub faults: CallFaults,
    pub behaviour: Behaviour,
    pub ttl: Duration,
    pub target_version: String,
    // store
    rev: i64,
    kv: BTreeMap<String, (Vec<u8>, i64, i64)>,
    election: Option<Election>,
    pub coords: Vec<Coord>,
    pub agents: BTreeMap<String, Agent>,
    /// Highest epoch the failover hook has seen (a fencing-aware load balancer).
    hook_epoch: u64,
    pub check: Checker,
    /// Steps taken (store commits, agent operations, faults): the run's length.
    pub steps: u64,
    trace: u64,
    /// Every traced line, when asked for (replaying one seed).
    pub lines: Option<Vec<String>>,
    /// See `Scenario`.
    pub crash_leader_on_admit: Option<String>,
    pub panic_on: Option<String>,
    pub slow_on: Option<String>,
    /// Start requests the control layer refused.
    pub refusals: Vec<String>,
    /// Per coordinator and pool: when its upgrade gate last answered (a readiness evaluation
    /// without rows, which only the driver's gate asks for).
    last_gate: BTreeMap<(usize, String), Instant>,
    /// Per gated operation: the readiness check that let it through (the committing
    /// coordinator's last gate answer before the commit).
    gate_time: BTreeMap<String, Option<Instant>>,
    /// Per coordinator and pool: gate answers since its last commit that took servers down.
    gates_since: BTreeMap<(usize, String), u64>,
}

/// The world, shared by every task of one run.
pub type Shared = Arc<Mutex<World>>;

pub fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

enum Gate {
    Go,
    Hang,
    Wait(Instant),
    Cut,
}

/// Which peer a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Store,
    Agents,
}

impl World {
    pub fn new(
        seed: u64,
        servers: &[(String, usize)],
        min_active: usize,
        faults: CallFaults,
        behaviour: Behaviour,
        coordinators: usize,
        ttl: Duration,
    ) -> World {
        let outside = behaviour.outside_install_on.clone();
        let agents = servers
            .iter()
            .map(|(s, _)| {
                (
                    s.clone(),
                    Agent::new(s, "1.0", outside.as_deref() == Some(s.as_str())),
                )
            })
            .collect();
        World {
            rng: Rng::new(seed),
            start: Instant::now(),
            chaos: true,
            faults,
            behaviour,
            ttl,
            target_version: "2.0".into(),
            rev: 1,
            kv: BTreeMap::new(),
            election: None,
            coords: (0..coordinators)
                .map(|_| Coord {
                    alive: true,
                    ..Coord::default()
                })
                .collect(),
            agents,
            hook_epoch: 0,
            check: Checker::new(servers, min_active),
            steps: 0,
            trace: 0xcbf2_9ce4_8422_2325,
            lines: None,
            crash_leader_on_admit: None,
            panic_on: None,
            slow_on: None,
            refusals: Vec::new(),
            last_gate: BTreeMap::new(),
            gate_time: BTreeMap::new(),
            gates_since: BTreeMap::new(),
        }
    }

    /// Virtual milliseconds since the run began.
    pub fn ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Folds a line into the run's trace hash (two runs of a seed must agree on it).
    pub fn trace(&mut self, what: &str) {
        self.steps += 1;
        let line = format!("{} {what}", self.ms());
        for b in line.bytes() {
            self.trace ^= u64::from(b);
            self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
        }
        if let Some(lines) = self.lines.as_mut() {
            lines.push(line);
        }
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    fn bad_for(&self, server: &str) -> Option<String> {
        match &self.behaviour.bad_version_on {
            Some(s) if s == server => Some(self.target_version.clone()),
            _ => None,
        }
    }

    /// Whether `server` counts toward min_active right now.
    pub fn active(&self, server: &str) -> bool {
        let now = Instant::now();
        self.agents
            .get(server)
            .is_some_and(|a| a.active(now, self.bad_for(server).as_deref()))
    }

    /// Crashes coordinator `c` (its current life): every call of it hangs from now on.
    pub fn crash(&mut self, c: usize, restart_after: Duration) {
        if let Some(co) = self.coords.get_mut(c) {
            if co.alive {
                co.alive = false;
                co.restart_at = Some(Instant::now() + restart_after);
            }
        }
        self.trace(&format!("crash c{c}"));
    }

    fn gate(&mut self, c: usize, life: u32, peer: Peer) -> Gate {
        let now = Instant::now();
        let Some(co) = self.coords.get(c) else {
            return Gate::Hang;
        };
        if co.life != life || !co.alive {
            return Gate::Hang;
        }
        if let Some(t) = co.frozen_until.filter(|t| now < *t) {
            return Gate::Wait(t);
        }
        let cut = match peer {
            Peer::Store => co.store_cut_until,
            Peer::Agents => co.agents_cut_until,
        };
        if cut.is_some_and(|t| now < t) {
            return Gate::Cut;
        }
        if self.chaos && self.rng.chance(self.faults.crash_before) {
            let after = self
                .rng
                .between(Duration::from_millis(500), Duration::from_secs(8));
            self.crash(c, after);
            return Gate::Hang;
        }
        Gate::Go
    }

    /// After a call took effect: the caller may crash, or its answer be lost or late.
    fn after(&mut self, c: usize) -> After {
        if !self.chaos {
            return After::Answer(None);
        }
        if self.rng.chance(self.faults.crash_after) {
            let after = self
                .rng
                .between(Duration::from_millis(500), Duration::from_secs(8));
            self.crash(c, after);
            return After::Hang;
        }
        if self.rng.chance(self.faults.lost_answer) {
            return After::Lost;
        }
        if self.rng.chance(self.faults.late) {
            let d = self.rng.between(Duration::ZERO, Duration::from_secs(1));
            return After::Answer(Some(d));
        }
        After::Answer(None)
    }

    /// Keeps leases: a holder that is dead, frozen or cut off from the store stops renewing;
    /// its lease expires after the TTL. A holder that runs again notices a lost lease.
    pub fn tick_leases(&mut self) {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut expired = false;
        if let Some(e) = self.election.as_mut() {
            let holder = &self.coords[e.coord];
            let renewing = holder.life == e.life
                && !e.lost.is_cancelled()
                && holder.alive
                && holder.frozen_until.is_none_or(|t| now >= t)
                && holder.store_cut_until.is_none_or(|t| now >= t);
            if renewing {
                e.unrenewed_since = None;
            } else {
                let since = *e.unrenewed_since.get_or_insert(now);
                if now.duration_since(since) >= ttl {
                    expired = true;
                }
            }
        }
        if expired {
            if let Some(e) = self.election.take() {
                self.trace(&format!("lease of epoch {} expired", e.epoch));
            }
        }
        let current = self.election.as_ref().map(|e| (e.coord, e.epoch));
        for (i, co) in self.coords.iter_mut().enumerate() {
            let running = co.alive && co.frozen_until.is_none_or(|t| now >= t);
            let cut = co.store_cut_until.is_some_and(|t| now < t);
            co.held.retain(|(epoch, lost)| {
                let mine = current == Some((i, *epoch));
                // A running holder's keepalive notices a lost lease (or, cut off from the
                // store, fails to renew in time and gives up at once).
                if running && (!mine || cut) {
                    lost.cancel();
                    return false;
                }
                !lost.is_cancelled()
            });
        }
    }

    fn commit(&mut self, ops: Vec<WriteOp>, epoch: u64, coord: usize) -> i64 {
        self.rev += 1;
        let rev = self.rev;
        let mut keys = Vec::new();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => {
                    let created = self.kv.get(&key).map_or(rev, |(_, c, _)| *c);
                    self.check.bytes += (key.len() + value.len()) as u64;
                    keys.push(key.clone());
                    self.kv.insert(key, (value, created, rev));
                }
                WriteOp::Delete { key } => {
                    self.kv.remove(&key);
                    keys.push(key);
                }
                WriteOp::DeleteRange { start, end } if start < end => {
                    let doomed: Vec<String> =
                        self.kv.range(start..end).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        self.kv.remove(&k);
                    }
                }
                WriteOp::DeleteRange { .. } => {}
            }
        }
        let state = self.upgrade_state(&keys);
        let pool = state
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .map(|r| r.upgrade.plan.pool.clone())
            .unwrap_or_default();
        let at = (coord, pool);
        let gate = self.last_gate.get(&at).copied();
        let gated = self.check.on_commit(&keys, state, epoch);
        // The procedure's per-server ReadyForUpgrade: every server that goes down has a
        // readiness check of its own, answered after the previous one went: as many gate
        // answers since this coordinator's last commit that took servers down as servers this
        // commit takes down (a leader may store several in one transaction, each let through
        // by an answer that counted the ones before it as down).
        let mut credit = self.gates_since.get(&at).copied().unwrap_or(0);
        let any = !gated.is_empty();
        for op in gated {
            self.gate_time.insert(op.clone(), gate);
            let failed_over = self
                .check
                .lasts
                .get(&at.1)
                .is_some_and(|r| r.upgrade.failed_over);
            if !failed_over {
                if credit == 0 {
                    self.check.violations.push(format!(
                        "I2: {op} takes a server down without a readiness check of its own"
                    ));
                }
                credit = credit.saturating_sub(1);
            }
            self.steps += 1;
        }
        if any {
            self.gates_since.remove(&at);
        }
        self.trace(&format!("commit rev {rev} epoch {epoch}"));
        if let Some(lines) = self.lines.as_mut() {
            // Only in a replay's lines, not in the trace hash.
            lines.push(format!("  keys {keys:?}"));
        }
        rev
    }

    /// The upgrade of the pool whose progress keys are among `keys`, as stored now.
    fn upgrade_state(&self, keys: &[String]) -> Option<Result<UpgradeRecord, String>> {
        let pool = keys.iter().find_map(|k| {
            ["upgrades/", "plans/", "runs/"]
                .iter()
                .find_map(|p| k.strip_prefix(p))
                .map(|rest| rest.split('/').next().unwrap_or_default().to_string())
        })?;
        let cursor = self.kv.get(&progress::upgrade_key(&pool))?;
        let plan = self
            .kv
            .get(&progress::plan_key(&pool))
            .map(|(v, _, _)| v.as_slice());
        let prefix = progress::runs_prefix(&pool);
        let runs: Vec<(String, Vec<u8>)> = self
            .kv
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, (v, _, _))| (k.clone(), v.clone()))
            .collect();
        Some(progress::assemble(&pool, &cursor.0, plan, &runs, None).map_err(|e| e.to_string()))
    }

    /// Pools whose stored failover record says their traffic is on their paired pool (what
    /// the coordinators go by; the hook may have run since without its record landing).
    pub fn stored_failed_over(&self) -> Vec<String> {
        self.kv
            .iter()
            .filter_map(|(k, (v, _, _))| {
                let pool = k.strip_prefix("pools/")?.strip_suffix("/failover")?;
                let record: progress::FailoverRecord = serde_json::from_slice(v).ok()?;
                record.failed_over.then(|| pool.to_string())
            })
            .collect()
    }

    /// The newest roll-out as stored now.
    pub fn stored_rollout(&self) -> Option<Result<rollgate_coordinator::rollout::Rollout, String>> {
        let prefix = progress::ROLLOUTS_PREFIX;
        let (key, (value, _, _)) = self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()?;
        Some(
            serde_json::from_slice(value)
                .map_err(|e| format!("roll-out {key} does not decode: {e}")),
        )
    }

    /// Stores `record` whole, as an older leader (or a person) would have.
    pub fn seed_record(&mut self, record: &UpgradeRecord) {
        self.rev += 1;
        let rev = self.rev;
        let mut keys = Vec::new();
        for op in progress::full_writes(record) {
            if let WriteOp::Put { key, value } = op {
                keys.push(key.clone());
                self.kv.insert(key, (value, rev, rev));
            }
        }
        let state = self.upgrade_state(&keys);
        let _ = self.check.on_commit(&keys, state, 1);
    }

    fn kv(&self, key: &str) -> Option<KeyValue> {
        self.kv.get(key).map(|(v, c, m)| KeyValue {
            key: key.to_string(),
            value: v.clone(),
            create_revision: *c,
            mod_revision: *m,
        })
    }

    /// Puts a value straight into the store, as an older version (or a person) would have.
    pub fn seed_value(&mut self, key: &str, value: Vec<u8>) {
        self.rev += 1;
        self.kv.insert(key.to_string(), (value, self.rev, self.rev));
    }

    /// The event history as stored, one line per record: "kind server: message".
    pub fn events(&self) -> Vec<String> {
        self.kv
            .iter()
            .filter(|(k, _)| k.starts_with("events/"))
            .flat_map(|(k, (v, _, _))| progress::decode_events(k, v).unwrap_or_default())
            .map(|e| format!("{} {}: {}", e.kind, e.server, e.message))
            .collect()
    }
}

enum After {
    Answer(Option<Duration>),
    Lost,
    Hang,
}

/// Waits at the gate of a call; `Err` when the peer is cut off.
async fn pass(w: &Shared, c: usize, life: u32, peer: Peer) -> Result<(), ()> {
    loop {
        let g = lock(w).gate(c, life, peer);
        match g {
            Gate::Go => return Ok(()),
            Gate::Hang => std::future::pending::<()>().await,
            Gate::Wait(t) => tokio::time::sleep_until(t).await,
            Gate::Cut => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(());
            }
        }
    }
}

/// Delivers (or loses, or delays) the answer of a call that took effect.
async fn deliver<T>(w: &Shared, c: usize, answer: T, lost: T) -> T {
    let a = lock(w).after(c);
    match a {
        After::Hang => std::future::pending::<T>().await,
        After::Lost => lost,
        After::Answer(late) => {
            if let Some(d) = late {
                tokio::time::sleep(d).await;
            }
            answer
        }
    }
}

/// One coordinator's connection to the store.
#[derive(Debug, Clone)]
pub struct SimStore {
    pub w: Shared,
    pub coord: usize,
    pub life: u32,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rev", &self.rev)
            .finish_non_exhaustive()
    }
}

fn unavailable() -> StoreError {
    StoreError::Unavailable("simulated: store unreachable".into())
}

#[tonic::async_trait]
impl Backend for SimStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let v = lock(&self.w).kv(key);
        Ok(v)
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let w = lock(&self.w);
        Ok(w.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| w.kv(k))
            .collect())
    }

    /// One round trip, all at one instant (etcd serves a read transaction at one revision).
    async fn read_all(&self, reads: &[Read]) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let w = lock(&self.w);
        let kvs = |keys: Vec<&String>| keys.into_iter().filter_map(|k| w.kv(k)).collect();
        Ok(reads
            .iter()
            .map(|r| match r {
                Read::Key(k) => w.kv(k).into_iter().collect(),
                Read::Prefix(p) => kvs(w
                    .kv
                    .range(p.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(p.as_str()))
                    .collect()),
                Read::Page(page) if page.start < page.end => {
                    let inside = w.kv.range(page.start.clone()..page.end.clone());
                    let mut keys: Vec<&String> = if page.from_end {
                        inside.rev().take(page.limit).map(|(k, _)| k).collect()
                    } else {
                        inside.take(page.limit).map(|(k, _)| k).collect()
                    };
                    keys.sort();
                    kvs(keys)
                }
                Read::Page(_) => Vec::new(),
            })
            .collect())
    }

    async fn campaign(
        &self,
        me: &Candidate,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Result<Leadership, StoreError> {
        loop {
            if cancel.is_cancelled() {
                return Err(StoreError::Cancelled);
            }
            if pass(&self.w, self.coord, self.life, Peer::Store)
                .await
                .is_ok()
            {
                let mut w = lock(&self.w);
                if w.election.is_none() {
                    w.rev += 1;
                    let epoch = w.rev;
                    let key = format!("election/{}-{epoch}", me.id);
                    let lost = CancellationToken::new();
                    w.election = Some(Election {
                        key: key.clone(),
                        id: me.id.clone(),
                        address: me.address.clone(),
                        epoch,
                        coord: self.coord,
                        life: self.life,
                        unrenewed_since: None,
                        lost: lost.clone(),
                    });
                    if let Some(co) = w.coords.get_mut(self.coord) {
                        co.held.push((epoch, lost.clone()));
                    }
                    w.trace(&format!("c{} elected at epoch {epoch}", self.coord));
                    w.check.on_elected(epoch);
                    return Ok(Leadership {
                        epoch: Epoch(u64::try_from(epoch).unwrap_or(0)),
                        key,
                        lost,
                        ttl,
                        lease_id: epoch,
                    });
                }
            }
            let wait = lock(&self.w)
                .rng
                .between(Duration::from_millis(100), Duration::from_millis(300));
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(StoreError::Cancelled),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let w = lock(&self.w);
        Ok(w.election.as_ref().map(|e| LeaderInfo {
            id: e.id.clone(),
            address: e.address.clone(),
            epoch: Epoch(u64::try_from(e.epoch).unwrap_or(0)),
        }))
    }

    async fn fenced_write(
        &self,
        leadership: &Leadership,
        ops: Vec<WriteOp>,
    ) -> Result<i64, StoreError> {
        let epoch = leadership.epoch;
        if leadership.lost.is_cancelled() {
            return Err(StoreError::Fenced { epoch });
        }
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let rev = {
            let mut w = lock(&self.w);
            let p = w.faults.fail;
            if w.chaos && w.rng.chance(p) {
                return Err(unavailable());
            }
            let holds = w.election.as_ref().is_some_and(|e| {
                e.key == leadership.key && u64::try_from(e.epoch).ok() == Some(epoch.get())
            });
            if !holds {
                w.trace(&format!("fenced write of epoch {epoch} refused"));
                drop(w);
                leadership.lost.cancel();
                return Err(StoreError::Fenced { epoch });
            }
            w.commit(ops, epoch.get(), self.coord)
        };
        deliver(
            &self.w,
            self.coord,
            Ok(rev),
            Err(StoreError::Unavailable(
                "simulated: the answer was lost".into(),
            )),
        )
        .await
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        leadership.lost.cancel();
        pass(&self.w, self.coord, self.life, Peer::Store)
            .await
            .map_err(|()| unavailable())?;
        let mut w = lock(&self.w);
        if w.election.as_ref().is_some_and(|e| e.key == leadership.key) {
            w.election = None;
            w.trace("resigned");
        }
        Ok(())
    }
}

/// One coordinator's line to the agents.
#[derive(Debug, Clone)]
pub struct SimAgents {
    pub w: Shared,
    pub coord: usize,
    pub life: u32,
}

fn unreachable_err() -> LinkError {
    LinkError::Unreachable("simulated: agent unreachable".into())
}

/// How long an operation takes on a healthy service.
fn duration_of(w: &mut World, op_id: &str, command: &AgentCommand) -> Duration {
    let ms = |a: u64, b: u64| (Duration::from_millis(a), Duration::from_millis(b));
    let (lo, hi) = match command {
        AgentCommand::PrepareInstall { .. } | AgentCommand::PrepareRollback { .. } => ms(10, 300),
        AgentCommand::Drain { .. } => ms(200, 3000),
        AgentCommand::Stop => ms(50, 500),
        AgentCommand::Install { .. } | AgentCommand::Rollback { .. } => ms(500, 5000),
        AgentCommand::Restart { .. } => ms(300, 3000),
        AgentCommand::Verify { stable, .. } => (*stable, *stable + Duration::from_millis(500)),
    };
    let mut d = w.rng.between(lo, hi);
    if w.slow_on.as_deref().is_some_and(|x| op_id.contains(x)) {
        d += Duration::from_secs(90);
    }
    if w.chaos && w.rng.chance(w.behaviour.slow_step) {
        // Far past the coordinator's deadline (derived from the agent's limits).
        d += w
            .rng
            .between(Duration::from_secs(60), Duration::from_secs(120));
    }
    d
}

fn kind_of(command: &AgentCommand) -> &'static str {
    match command {
        AgentCommand::PrepareInstall { .. } => "prepare_install",
        AgentCommand::PrepareRollback { .. } => "prepare_rollback",
        AgentCommand::Drain { .. } => "drain",
        AgentCommand::Stop => "stop",
        AgentCommand::Install { .. } => "install",
        AgentCommand::Rollback { .. } => "rollback",
        AgentCommand::Restart { .. } => "restart",
        AgentCommand::Verify { .. } => "verify",
    }
}

enum Admit {
    Done(OpReply),
    Wait(watch::Receiver<Option<OpReply>>),
}

impl SimAgents {
    /// Admission, as the agent does it: stale epoch → refused; a known id → replayed, or
    /// adopted and attached while it runs; another operation running → busy; unsafe state →
    /// refused; else the epoch is stored and the operation runs.
    fn admit(
        &self,
        w: &mut World,
        server: &str,
        op_id: &str,
        epoch: Epoch,
        command: &AgentCommand,
    ) -> Result<Admit, LinkError> {
        let now = Instant::now();
        let kind = kind_of(command);
        let Some(a) = w.agents.get_mut(server) else {
            return Err(LinkError::UnknownServer(server.to_string()));
        };
        if !a.up(now) {
            return Err(unreachable_err());
        }
        if epoch.get() < a.max_epoch {
            return Err(LinkError::StaleEpoch {
                current: a.max_epoch,
                message: format!("stale epoch {epoch}"),
            });
        }
        // Preparation: nothing changes on the service and nothing is journaled.
        match command {
            AgentCommand::PrepareInstall { .. } => {
                return Ok(Admit::Done(OpReply {
                    state: OpState::Succeeded,
                    message: "artifact verified".into(),
                }))
            }
            AgentCommand::PrepareRollback { fallback, .. } => {
                if a.previous_artifact || fallback.is_some() {
                    if fallback.is_some() {
                        a.previous_artifact = true;
                    }
                    return Ok(Admit::Done(OpReply {
                        state: OpState::Succeeded,
                        message: "rollback possible".into(),
                    }));
                }
                return Err(LinkError::Refused(
                    "nothing to roll back to: the previous version was installed outside rollgate"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(e) = a.journal.get_mut(op_id) {
            if e.kind != kind {
                return Err(LinkError::Refused(format!("{op_id} is a {}", e.kind)));
            }
            match e.state {
                OpState::Succeeded | OpState::Failed => {
                    return Ok(Admit::Done(OpReply {
                        state: e.state,
                        message: format!("(replayed) {}", e.message),
                    }))
                }
                OpState::Running => {
                    if let Some((id, tx)) = &a.running {
                        if id == op_id {
                            // A newer epoch adopts the run instead of failing it.
                            if epoch.get() > e.epoch {
                                e.epoch = epoch.get();
                                a.max_epoch = a.max_epoch.max(epoch.get());
                                a.accepted.push(epoch.get());
                            }
                            return Ok(Admit::Wait(tx.subscribe()));
                        }
                    }
                }
                OpState::Interrupted => {}
            }
        }
        if let Some((running, _)) = &a.running {
            return Err(LinkError::Busy {
                running: running.clone(),
                message: "another operation runs".into(),
            });
        }
        let accepting = matches!(a.svc, Svc::Serving | Svc::Draining | Svc::Starting);
        match command {
            AgentCommand::Install { .. } | AgentCommand::Rollback { .. } if accepting => {
                return Err(LinkError::Refused(format!(
                    "the service is {:?}: drain or stop it before installing",
                    a.svc
                )));
            }
            AgentCommand::Rollback { from_version, .. }
                if a.version == *from_version && !a.previous_artifact =>
            {
                return Err(LinkError::Refused("nothing to roll back to".into()));
            }
            _ => {}
        }
        a.max_epoch = a.max_epoch.max(epoch.get());
        a.accepted.push(epoch.get());
        a.journal.insert(
            op_id.to_string(),
            JEntry {
                kind,
                state: OpState::Running,
                message: String::new(),
                epoch: epoch.get(),
            },
        );
        let (tx, rx) = watch::channel(None);
        a.running = Some((op_id.to_string(), tx));
        let life = a.life;
        let before = a.svc;
        // What the step does to the service right away.
        let takes_down = match command {
            AgentCommand::Drain { .. } => {
                a.svc = Svc::Draining;
                true
            }
            AgentCommand::Stop => {
                a.svc = Svc::Stopped;
                true
            }
            AgentCommand::Install { .. } | AgentCommand::Rollback { .. } => {
                a.svc = Svc::Installing;
                false
            }
            AgentCommand::Restart { .. } => {
                let was_up = before == Svc::Serving;
                a.svc = Svc::Starting;
                was_up
            }
            _ => false,
        };
        w.trace(&format!("{server} admits {op_id} at epoch {epoch}"));
        w.check.on_admit(server, op_id, epoch.get());
        if takes_down {
            let active: Vec<String> = w
                .agents
                .keys()
                .filter(|s| s.as_str() != server && w.active(s))
                .cloned()
                .collect();
            let down: Vec<String> = w
                .agents
                .iter()
                .filter(|(s, a)| {
                    s.as_str() != server
                        && matches!(
                            a.svc,
                            Svc::Draining | Svc::Stopped | Svc::Installing | Svc::Starting
                        )
                })
                .map(|(s, _)| s.clone())
                .collect();
            // Only a gated step is held to min_active; a server turning unhealthy after the
            // check that let this one go is not something any coordinator could have seen.
            let gated = matches!(command, AgentCommand::Drain { .. } | AgentCommand::Stop);
            let gate = w.gate_time.get(op_id).copied().flatten();
            let unseen_fault = w
                .agents
                .values()
                .filter_map(|a| a.last_fault)
                .any(|t| gate.is_none_or(|g| t >= g));
            let recent_fault = !gated || unseen_fault;
            w.check
                .on_down(server, op_id, &active, &down, recent_fault, w.ms());
        }
        // Run it.
        let duration = duration_of(w, op_id, command);
        if w.crash_leader_on_admit
            .as_deref()
            .is_some_and(|x| op_id.contains(x))
        {
            // The command is out; the leader dies before it hears back.
            w.crash_leader_on_admit = None;
            w.crash(self.coord, Duration::from_secs(3));
        }
        let shared = Arc::clone(&self.w);
        let (server, op_id, command) = (server.to_string(), op_id.to_string(), command.clone());
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            let mut w = lock(&shared);
            complete(&mut w, &server, &op_id, &command, life);
        });
        Ok(Admit::Wait(rx))
    }
}

/// Ends an operation: applies its effect on the service and journals the result.
fn complete(w: &mut World, server: &str, op_id: &str, command: &AgentCommand, life: u32) {
    let now = Instant::now();
    let bad = w.bad_for(server);
    let stuck = w.behaviour.stuck_drain_on.as_deref() == Some(server);
    let failing = match &mut w.behaviour.failing_install {
        Some((s, n))
            if s == server && *n > 0 && matches!(command, AgentCommand::Install { .. }) =>
        {
            *n -= 1;
            true
        }
        _ => false,
    };
    let plan = op_id.split('/').next().unwrap_or_default().to_string();
    let direction = op_id.split('/').nth(2).unwrap_or_default().to_string();
    let Some(a) = w.agents.get_mut(server) else {
        return;
    };
    if a.life != life {
        return; // the agent crashed meanwhile: the run was interrupted
    }
    let (ok, message) = match command {
        AgentCommand::Drain { .. } if stuck => (false, "drain timed out; left draining".into()),
        AgentCommand::Drain { .. } => {
            a.svc = Svc::Stopped;
            (true, "drained".to_string())
        }
        AgentCommand::Stop => (true, "stopped".into()),
        AgentCommand::Install { version, .. } => {
            if failing {
                a.svc = Svc::Failed;
                (false, "install command exited with 1".into())
            } else {
                if a.version != *version {
                    a.previous_version = std::mem::replace(&mut a.version, version.clone());
                    a.previous_artifact = a.installed_by_rollgate || a.previous_artifact;
                }
                a.installed_by_rollgate = true;
                *a.installs.entry((plan, direction)).or_default() += 1;
                a.svc = Svc::Stopped;
                (true, format!("installed {version}"))
            }
        }
        AgentCommand::Rollback { from_version, .. } => {
            if a.version == *from_version {
                let prev = a.previous_version.clone();
                a.version = prev;
                *a.installs.entry((plan, direction)).or_default() += 1;
            }
            a.svc = Svc::Stopped;
            (true, format!("version {} installed", a.version))
        }
        AgentCommand::Restart { .. } => {
            a.svc = Svc::Serving;
            (true, "accepting connections".into())
        }
        AgentCommand::Verify { .. } => {
            let good = a.svc == Svc::Serving && a.healthy(now, bad.as_deref()) && !a.busy(now);
            if good {
                (true, format!("verified {}", a.version))
            } else {
                (false, "verify failed: not healthy".into())
            }
        }
        AgentCommand::PrepareInstall { .. } | AgentCommand::PrepareRollback { .. } => {
            (true, String::new())
        }
    };
    let state = if ok {
        OpState::Succeeded
    } else {
        OpState::Failed
    };
    if let Some(e) = a.journal.get_mut(op_id) {
        e.state = state;
        e.message = message.clone();
    }
    let reply = OpReply { state, message };
    if let Some((id, tx)) = a.running.take() {
        if id == op_id {
            tx.send_replace(Some(reply));
        } else {
            a.running = Some((id, tx));
        }
    }
    w.trace(&format!("{server} completes {op_id} ok={ok}"));
}

/// Crashes the agent process on `server` for `down`: a running operation is interrupted; the
/// service itself keeps running as it was.
pub fn crash_agent(w: &mut World, server: &str, down: Duration) {
    let now = Instant::now();
    let Some(a) = w.agents.get_mut(server) else {
        return;
    };
    a.crashed_until = Some(now + down);
    a.life += 1;
    if let Some((id, tx)) = a.running.take() {
        if let Some(e) = a.journal.get_mut(&id) {
            e.state = OpState::Interrupted;
        }
        drop(tx);
        // The interrupted step left the service where it was going: an install that crashed
        // mid-way left it stopped, a restart left it stopped too.
        if matches!(a.svc, Svc::Installing | Svc::Starting) {
            a.svc = Svc::Stopped;
        }
    }
    w.trace(&format!("agent {server} crashed"));
}

#[tonic::async_trait]
impl AgentLink for SimAgents {
    fn servers(&self) -> Vec<String> {
        lock(&self.w).agents.keys().cloned().collect()
    }

    fn health(&self) -> HashMap<String, ServerHealth> {
        let w = lock(&self.w);
        let now = Instant::now();
        let ms = w.ms();
        let cut = w
            .coords
            .get(self.coord)
            .and_then(|c| c.agents_cut_until)
            .is_some_and(|t| now < t);
        w.agents
            .iter()
            .map(|(s, a)| {
                let h = if cut || !a.up(now) {
                    ServerHealth::unknown(ms.saturating_sub(10_000), "simulated: unreachable")
                } else {
                    let healthy = a.healthy(now, w.bad_for(s).as_deref());
                    ServerHealth {
                        state: match a.svc {
                            Svc::Serving if healthy => AgentState::Serving,
                            Svc::Serving => AgentState::Failed,
                            Svc::Draining => AgentState::Draining,
                            Svc::Stopped => AgentState::Stopped,
                            Svc::Installing => AgentState::Installing,
                            Svc::Starting => AgentState::Starting,
                            Svc::Failed => AgentState::Failed,
                        },
                        accepting: a.svc == Svc::Serving,
                        busy: a.busy(now),
                        healthy,
                        version: a.version.clone(),
                        active_connections: 0,
                        detail: String::new(),
                        seen_ms: ms,
                        serving_since_ms: Some(0),
                        disconnected: false,
                        limits: Some(LIMITS),
                        installed_sha256: if a.installed_by_rollgate {
                            "ab".repeat(32)
                        } else {
                            String::new()
                        },
                    }
                };
                (s.clone(), h)
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        lock(&self.w).ms()
    }

    fn readiness(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
        rows: bool,
    ) -> PoolReadiness {
        let health = self.health();
        if !rows {
            // The upgrade's gate answering: what lets a server go down (see `commit`).
            let mut w = lock(&self.w);
            let now = Instant::now();
            let at = (self.coord, spec.name.clone());
            w.last_gate.insert(at.clone(), now);
            *w.gates_since.entry(at).or_default() += 1;
            w.steps += 1;
        }
        readiness::evaluate(spec, &health, clocks, going_down, operation_running)
    }

    async fn refresh(&self, _servers: Vec<String>) {
        // Health is read from the world as it is: a refresh only costs a round trip.
        let _ = pass(&self.w, self.coord, self.life, Peer::Agents).await;
    }

    async fn run(
        &self,
        server: &str,
        op_id: &str,
        epoch: Epoch,
        command: &AgentCommand,
        timeout: Duration,
    ) -> Result<OpReply, LinkError> {
        pass(&self.w, self.coord, self.life, Peer::Agents)
            .await
            .map_err(|()| unreachable_err())?;
        let panic_now = {
            let mut w = lock(&self.w);
            let hit = w.panic_on.as_deref().is_some_and(|x| op_id.contains(x));
            if hit {
                w.panic_on = None;
                w.trace(&format!("the task for {op_id} panics"));
            }
            hit
        };
        if panic_now {
            panic!("simulated panic in the step task for {op_id}");
        }
        let admitted = {
            let mut w = lock(&self.w);
            let p = w.faults.fail;
            if w.chaos && w.rng.chance(p) {
                return Err(unreachable_err());
            }
            self.admit(&mut w, server, op_id, epoch, command)
        };
        let reply = match admitted? {
            Admit::Done(r) => r,
            Admit::Wait(mut rx) => {
                let waited = tokio::time::timeout(timeout, async {
                    loop {
                        if let Some(r) = rx.borrow_and_update().clone() {
                            return Ok(r);
                        }
                        if rx.changed().await.is_err() {
                            // The agent crashed: the call's connection broke.
                            return Err(unreachable_err());
                        }
                    }
                })
                .await;
                match waited {
                    Ok(r) => r?,
                    Err(_) => return Err(LinkError::TimedOut("simulated: deadline".into())),
                }
            }
        };
        deliver(&self.w, self.coord, Ok(reply), Err(unreachable_err())).await
    }

    async fn operation(&self, server: &str, op_id: &str) -> Result<OpReply, LinkError> {
        pass(&self.w, self.coord, self.life, Peer::Agents)
            .await
            .map_err(|()| unreachable_err())?;
        let w = lock(&self.w);
        let now = Instant::now();
        let a = w
            .agents
            .get(server)
            .ok_or_else(|| LinkError::UnknownServer(server.to_string()))?;
        if !a.up(now) {
            return Err(unreachable_err());
        }
        match a.journal.get(op_id) {
            Some(e) => Ok(OpReply {
                state: e.state,
                message: e.message.clone(),
            }),
            None => Err(LinkError::NotFound(op_id.to_string())),
        }
    }

    async fn fence(&self, server: &str, epoch: Epoch) -> Result<(), LinkError> {
        pass(&self.w, self.coord, self.life, Peer::Agents)
            .await
            .map_err(|()| unreachable_err())?;
        let mut w = lock(&self.w);
        let now = Instant::now();
        let a = w
            .agents
            .get_mut(server)
            .ok_or_else(|| LinkError::UnknownServer(server.to_string()))?;
        if !a.up(now) {
            return Err(unreachable_err());
        }
        if epoch.get() < a.max_epoch {
            return Err(LinkError::StaleEpoch {
                current: a.max_epoch,
                message: "stale".into(),
            });
        }
        a.max_epoch = epoch.get();
        w.check.on_fence(server, epoch.get());
        Ok(())
    }
}

/// The failover hook: a load balancer that takes a fencing token.
#[derive(Debug, Clone)]
pub struct SimHooks {
    pub w: Shared,
}

#[tonic::async_trait]
impl PoolHooks for SimHooks {
    async fn run(
        &self,
        pool: &PoolConfig,
        paired: &str,
        over: bool,
        epoch: Epoch,
    ) -> Result<String, String> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut w = lock(&self.w);
        if epoch.get() < w.hook_epoch {
            return Err(format!(
                "load balancer refused epoch {epoch}: it has seen {}",
                w.hook_epoch
            ));
        }
        w.hook_epoch = epoch.get();
        w.check.on_hook(&pool.name, over, epoch.get());
        w.trace(&format!("hook over={over} epoch {epoch}"));
        Ok(format!("pool {} failed over to {paired}", pool.name))
    }
}

/// Wall-clock time in the simulation: a fixed start plus virtual time.
#[derive(Debug, Clone)]
pub struct SimClock {
    pub w: Shared,
}

impl Clock for SimClock {
    fn wall_ms(&self) -> u64 {
        1_800_000_000_000 + lock(&self.w).ms()
    }
}
