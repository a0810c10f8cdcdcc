//! The deterministic simulation of the coordinator (in the spirit of FoundationDB's simulator
//! and TigerBeetle's VOPR): the real `node`, `control`, `driver`, `engine`, `progress` and
//! `readiness` code of several coordinators, against a simulated store, simulated agents and
//! services and a simulated failover hook ([`world`]), on one thread with tokio's paused clock.
//! One seed drives every choice (the pool, the plan, the service behaviour, every fault and its
//! moment), so a seed replays exactly; [`check`] holds the invariants, checked at every step.
//!
//! A run: three coordinators elect a leader; an operator starts an upgrade (and sometimes
//! pauses, resumes, aborts or rolls it back); for the chaos phase faults strike: leader crashes
//! at await points (before or after a call takes effect), leaders frozen past their lease,
//! partitions from the store or from the agents, lost and late answers, agent crashes, steps
//! slower than any deadline, readiness flaps, bad versions, stuck drains, failing installs.
//! Then everything heals, the operator resumes a paused upgrade (or aborts it), and the run must
//! end with the invariants intact.
//!
//! A roll-out run ([`rollout_scenario`], [`run_rollout`]) does the same over several pools (two
//! of them paired) driven by one roll-out, with the roll-out's own invariants (R1–R4, see
//! [`check`]) checked beside each pool's.

pub mod check;
pub mod rng;
pub mod world;

use check::{Checker, PoolRules, RolloutRules, SINGLE_POOL};
use rng::Rng;
use rollgate_coordinator::config::{
    CoordinatorConfig, MinActive, PoolConfig, ServerConfig, StoreConfig,
};
use rollgate_coordinator::control::{
    Control, ControlError, RolloutRequest, StartRequest, UpgradeCommand,
};
use rollgate_coordinator::engine::{ExhaustedAction, FailureAction, RollbackArtifact, Status};
use rollgate_coordinator::env::Env;
use rollgate_coordinator::node::Node;
use rollgate_coordinator::progress::UpgradeRecord;
use rollgate_coordinator::rollout::RolloutStatus;
use rollgate_coordinator::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use world::{lock, Behaviour, CallFaults, Shared, SimAgents, SimClock, SimHooks, SimStore, World};

/// What a run is allowed to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long faults strike (virtual time).
    pub chaos: Duration,
    /// Mean time between scheduled faults.
    pub fault_every: Duration,
    /// Faults at await points.
    pub call_faults: CallFaults,
    /// After the chaos, how long the run may take to end before it counts as stuck.
    pub end_within: Duration,
    /// Keep every traced line in the report (replaying one seed).
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chaos: Duration::from_secs(120),
            fault_every: Duration::from_secs(10),
            call_faults: CallFaults {
                crash_before: 0.004,
                crash_after: 0.004,
                lost_answer: 0.01,
                fail: 0.01,
                late: 0.02,
            },
            end_within: Duration::from_secs(3600),
            verbose: false,
        }
    }
}

/// How one seed went.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    /// Invariant violations (empty: the run passed).
    pub violations: Vec<String>,
    /// The upgrade's final status.
    pub outcome: String,
    /// A hash of everything that happened, in order: two runs of one seed must agree.
    pub trace: u64,
    /// Steps taken (store commits, agent operations, faults).
    pub steps: u64,
    /// Virtual time the run took.
    pub virtual_time: Duration,
    /// The scheduled faults, in order.
    pub faults: Vec<String>,
    /// Store commits (and the bytes of keys and values they put), agent admissions, servers
    /// taken down.
    pub commits: u64,
    pub bytes: u64,
    pub admissions: u64,
    pub downs: u64,
    /// Every traced line (with `Options::verbose`).
    pub lines: Vec<String>,
    /// The last stored upgrade of the single pool (none in a roll-out run).
    pub last: Option<UpgradeRecord>,
    /// Per server at the end: (version, serving, successful forward installs of the plan).
    pub servers: std::collections::BTreeMap<String, (String, bool, u32)>,
    /// Start requests refused (and why) before one was accepted.
    pub refusals: Vec<String>,
    /// Every record of the event history, in order.
    pub events: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The pool and plan a seed draws.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Servers and their upgrade domain (1-based).
    pub servers: Vec<(String, usize)>,
    pub min_active: usize,
    /// What the operator asks for.
    pub request: StartRequest,
    pub behaviour: Behaviour,
    pub coordinators: usize,
    /// A roll-out over several pools instead of one pool's upgrade: `servers` then lists every
    /// pool's servers, and `min_active` is unused.
    pub rollout: Option<RolloutSetup>,
}

/// The pools of a roll-out run and the roll-out's options.
#[derive(Debug, Clone)]
pub struct RolloutSetup {
    pub pools: Vec<PoolRules>,
    pub max_in_flight: u32,
    pub canary: Option<String>,
}

/// A run: the pool and plan, and what happens beyond the seed's own choices.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub setup: Setup,
    /// Scheduled faults and faults at await points (off: only the scenario's own events).
    pub chaos: bool,
    /// An upgrade already in the store when the coordinators start (as an older version, or a
    /// crashed leader, left it).
    pub stored: Option<UpgradeRecord>,
    /// Whether the operator starts an upgrade.
    pub start: bool,
    /// The leader crashes right after an agent admits an operation whose id contains this
    /// (the command is out, the answer never comes back).
    pub crash_leader_on_admit: Option<String>,
    /// The coordinator's task for an operation whose id contains this panics, once.
    pub panic_on: Option<String>,
    /// Operations whose id contains this take far longer than any coordinator deadline.
    pub slow_on: Option<String>,
}

/// The random scenario of `seed`.
pub fn scenario(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed ^ 0x0005_eed0_fa11);
    let setup = setup(&mut rng);
    // Now and then a coordinator task panics (a bug of ours): it must surface, not hang.
    let panic_on = rng.chance(0.05).then(|| {
        let step = rng
            .pick(&["drain", "install", "restart", "verify"])
            .copied()
            .unwrap_or("install");
        let server = rng
            .pick(&setup.servers)
            .map(|(s, _)| s.clone())
            .unwrap_or_default();
        format!("/{server}/fwd/{step}/1")
    });
    Scenario {
        setup,
        chaos: true,
        stored: None,
        start: true,
        crash_leader_on_admit: None,
        panic_on,
        slow_on: None,
    }
}

fn setup(rng: &mut Rng) -> Setup {
    let n = 3 + rng.below(6) as usize;
    let domains = 2 + rng.below(3.min(n as u64 - 1)) as usize;
    let servers: Vec<(String, usize)> = (1..=n)
        .map(|i| (format!("fe-{i}"), (i - 1) % domains + 1))
        .collect();
    let biggest = n.div_ceil(domains);
    let min_active = (n - biggest).saturating_sub(rng.below(2) as usize).max(1);
    let pick = |rng: &mut Rng, p: f64, servers: &[(String, usize)]| {
        rng.chance(p)
            .then(|| rng.pick(servers).map(|(s, _)| s.clone()))
            .flatten()
    };
    let behaviour = Behaviour {
        bad_version_on: pick(rng, 0.15, &servers),
        stuck_drain_on: pick(rng, 0.1, &servers),
        failing_install: pick(rng, 0.15, &servers).map(|s| (s, 1 + rng.below(3) as u32)),
        outside_install_on: pick(rng, 0.15, &servers),
        slow_step: if rng.chance(0.3) { 0.05 } else { 0.0 },
    };
    let secs = |rng: &mut Rng, lo: u64, hi: u64| {
        Some(rng.between(Duration::from_secs(lo), Duration::from_secs(hi)))
    };
    let request = StartRequest {
        pool: "pool-a".into(),
        version: "2.0".into(),
        artifact: "https://repo.invalid/fe-2.0.tar.gz".into(),
        sha256: "ab".repeat(32),
        drain_timeout: secs(rng, 5, 20),
        parallelism: Some(1 + rng.below(2) as u32),
        verify_stable: secs(rng, 0, 3),
        verify_timeout: secs(rng, 10, 30),
        busy_retry_interval: secs(rng, 1, 10),
        busy_retries: Some(2 + rng.below(3) as u32),
        on_exhausted: Some(match rng.below(3) {
            0 => ExhaustedAction::Failover,
            1 => ExhaustedAction::Pause,
            _ => ExhaustedAction::Abort,
        }),
        server_retries: Some(rng.below(3) as u32),
        on_failure: Some(if rng.chance(0.4) {
            FailureAction::Rollback
        } else {
            FailureAction::Pause
        }),
        canary_soak: if rng.chance(0.2) {
            secs(rng, 5, 30)
        } else {
            None
        },
        ..StartRequest::default()
    };
    Setup {
        servers,
        min_active,
        request,
        behaviour,
        coordinators: 3,
        rollout: None,
    }
}

/// The random roll-out scenario of `seed`: 2–4 pools of 2–4 servers (a and b paired, c and d
/// when there are four), one plan for all, up to two pools at once, sometimes a canary; a pool
/// may fail over into its paired pool when every pool has one.
pub fn rollout_scenario(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed ^ 0x0070_11ba_5eed);
    let mut sc = scenario(seed);
    let n_pools = 2 + rng.below(3) as usize;
    let mut pools = Vec::new();
    for i in 0..n_pools {
        let name = format!("pool-{}", (b'a' + i as u8) as char);
        let n = 2 + rng.below(3) as usize;
        let servers: Vec<(String, usize)> = (1..=n)
            .map(|k| (format!("{}-fe-{k}", &name[5..]), (k - 1) % 2 + 1))
            .collect();
        // a and b are paired, and c and d when there are four.
        let paired = match (i, n_pools) {
            (0, _) => Some("pool-b".to_string()),
            (1, _) => Some("pool-a".to_string()),
            (2, 4) => Some("pool-d".to_string()),
            (3, _) => Some("pool-c".to_string()),
            _ => None,
        };
        pools.push(PoolRules {
            name,
            servers,
            min_active: n - n.div_ceil(2),
            paired,
        });
    }
    let all: Vec<(String, usize)> = pools.iter().flat_map(|p| p.servers.clone()).collect();
    // The seed's faults and service behaviour, moved onto this fleet's servers.
    let rename = |s: &Option<String>, rng: &mut Rng| {
        s.as_ref()
            .and_then(|_| rng.pick(&all).map(|(s, _)| s.clone()))
    };
    let b = sc.setup.behaviour.clone();
    sc.setup.behaviour = Behaviour {
        bad_version_on: rename(&b.bad_version_on, &mut rng),
        stuck_drain_on: rename(&b.stuck_drain_on, &mut rng),
        failing_install: b
            .failing_install
            .as_ref()
            .and_then(|(_, k)| rng.pick(&all).map(|(s, _)| (s.clone(), *k))),
        outside_install_on: None,
        slow_step: b.slow_step,
    };
    sc.panic_on = None;
    sc.setup.servers = all;
    sc.setup.request.pool = String::new();
    // Failing over needs every pool of the roll-out paired (the plan is the same for all).
    // When they are, half the seeds fail over after one Busy answer too many, so that a pool
    // left with its traffic on its pair (which the pair's upgrade must wait for) is common.
    if pools.iter().any(|p| p.paired.is_none()) {
        if sc.setup.request.on_exhausted == Some(ExhaustedAction::Failover) {
            sc.setup.request.on_exhausted = Some(ExhaustedAction::Pause);
        }
    } else if rng.chance(0.5) {
        sc.setup.request.on_exhausted = Some(ExhaustedAction::Failover);
        sc.setup.request.busy_retries = Some(1);
    }
    let canary = rng.chance(0.3).then(|| pools[n_pools - 1].name.clone());
    sc.setup.rollout = Some(RolloutSetup {
        pools,
        max_in_flight: 1 + rng.below(2) as u32,
        canary,
    });
    sc
}

fn config(id: &str, setup: &Setup, ttl: Duration) -> CoordinatorConfig {
    CoordinatorConfig {
        id: id.into(),
        listen: ([127, 0, 0, 1], 0).into(),
        advertise: Some(format!("{id}.sim.invalid:7100")),
        store: StoreConfig::Etcd {
            endpoints: vec!["http://sim.invalid:2379".into()],
            prefix: "/sim/".into(),
            election_ttl: ttl,
            tls: None,
            auth: None,
            insecure: true,
        },
        tls: None,
        insecure: true,
        lost_after: Duration::from_secs(2),
        stabilization: Duration::ZERO,
        shutdown_grace: Duration::from_secs(1),
        log_format: Default::default(),
        log_level: "off".into(),
        http: None,
        pools: match &setup.rollout {
            Some(r) => r.pools.iter().map(pool_config).collect(),
            None => vec![pool_config(&PoolRules {
                name: "pool-a".into(),
                servers: setup.servers.clone(),
                min_active: setup.min_active,
                paired: Some("pool-b".into()),
            })],
        },
    }
}

fn pool_config(p: &PoolRules) -> PoolConfig {
    PoolConfig {
        name: p.name.clone(),
        min_active: MinActive::Count(p.min_active as u32),
        upgrade_domains: None,
        paired_pool: p.paired.clone(),
        labels: Default::default(),
        failover: vec!["true".into()],
        failback: vec!["true".into()],
        hook_timeout: Duration::from_secs(10),
        maintenance_windows: vec![],
        servers: p
            .servers
            .iter()
            .map(|(s, d)| ServerConfig {
                id: s.clone(),
                agent: format!("{s}.sim.invalid:7200"),
                upgrade_domain: Some(format!("ud-{d}")),
            })
            .collect(),
    }
}

/// Starts a new life of coordinator `c`: a fresh process with nothing but its config.
fn spawn_node(w: &Shared, c: usize, cfg: &Arc<CoordinatorConfig>) -> Arc<Node> {
    let node = make_node(w, c, cfg);
    // Dropped with the runtime at the end of the run, like a killed process.
    tokio::spawn(Arc::clone(&node).lead_loop(CancellationToken::new()));
    node
}

/// One coordinator on a fresh, quiet world of `seed`'s pool, not campaigning: for tests of
/// what a node answers in a given role.
pub fn lone_node(seed: u64) -> Arc<Node> {
    let sc = scenario(seed);
    let ttl = Duration::from_secs(2);
    let w: Shared = Arc::new(std::sync::Mutex::new(World::new(
        seed,
        &sc.setup.servers,
        sc.setup.min_active,
        Options::default().call_faults,
        sc.setup.behaviour.clone(),
        1,
        ttl,
    )));
    lock(&w).chaos = false;
    make_node(&w, 0, &Arc::new(config("c0", &sc.setup, ttl)))
}

fn make_node(w: &Shared, c: usize, cfg: &Arc<CoordinatorConfig>) -> Arc<Node> {
    let life = {
        let mut w = lock(w);
        let co = &mut w.coords[c];
        co.life += 1;
        co.alive = true;
        co.restart_at = None;
        co.frozen_until = None;
        co.life
    };
    let env = Env {
        me: cfg.id.clone(),
        store: Store::Dyn(Arc::new(SimStore {
            w: Arc::clone(w),
            coord: c,
            life,
        })),
        agents: Arc::new(SimAgents {
            w: Arc::clone(w),
            coord: c,
            life,
        }),
        hooks: Arc::new(SimHooks { w: Arc::clone(w) }),
        clock: Arc::new(SimClock { w: Arc::clone(w) }),
        lost_after: cfg.lost_after,
        stabilization: cfg.stabilization,
    };
    Node::new(Arc::clone(cfg), env)
}

type Nodes = Arc<std::sync::Mutex<Vec<Arc<Node>>>>;

fn leader(nodes: &Nodes) -> Option<Control> {
    let nodes = nodes.lock().unwrap_or_else(|p| p.into_inner());
    nodes
        .iter()
        .find(|n| n.leadership().is_some())
        .map(|n| Control::new(Arc::clone(n)))
}

/// Keeps leases and restarts crashed coordinators; heals everything when the chaos ends.
async fn supervise(w: Shared, nodes: Nodes, cfgs: Vec<Arc<CoordinatorConfig>>, chaos_end: Instant) {
    let mut healed = false;
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ticks += 1;
        if ticks.is_multiple_of(100) && std::env::var_os("ROLLGATE_SIM_DEBUG").is_some() {
            let w = lock(&w);
            eprintln!("supervisor: {} ms virtual, {} steps", w.ms(), w.steps);
        }
        let now = Instant::now();
        let restart: Vec<usize> = {
            let mut w = lock(&w);
            if !healed && now >= chaos_end {
                healed = true;
                w.chaos = false;
                for co in &mut w.coords {
                    co.frozen_until = None;
                    co.store_cut_until = None;
                    co.agents_cut_until = None;
                    if !co.alive {
                        co.restart_at = Some(now);
                    }
                }
                for a in w.agents.values_mut() {
                    a.crashed_until = None;
                    a.unhealthy_until = None;
                    a.busy_until = None;
                }
                w.trace("healed");
            }
            w.tick_leases();
            w.coords
                .iter()
                .enumerate()
                .filter(|(_, co)| !co.alive && co.restart_at.is_some_and(|t| now >= t))
                .map(|(i, _)| i)
                .collect()
        };
        for c in restart {
            let node = spawn_node(&w, c, &cfgs[c]);
            lock(&w).trace(&format!("c{c} restarted"));
            nodes.lock().unwrap_or_else(|p| p.into_inner())[c] = node;
        }
    }
}

/// Strikes scheduled faults until the chaos ends.
async fn chaos(
    w: Shared,
    nodes: Nodes,
    chaos_end: Instant,
    every: Duration,
    log: Arc<std::sync::Mutex<Vec<String>>>,
) {
    loop {
        let wait = {
            let mut w = lock(&w);
            w.rng.between(every / 4, every * 7 / 4)
        };
        tokio::time::sleep(wait).await;
        let now = Instant::now();
        if now >= chaos_end {
            return;
        }
        let leader_idx = {
            let nodes = nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.iter().position(|n| n.leadership().is_some())
        };
        let mut w = lock(&w);
        let ttl = w.ttl;
        let n = w.coords.len();
        let target = leader_idx.unwrap_or_else(|| w.rng.below(n as u64) as usize);
        let servers: Vec<String> = w.agents.keys().cloned().collect();
        let what = match w.rng.below(8) {
            0 | 1 => {
                let after = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(10));
                w.crash(target, after);
                format!("crash c{target}")
            }
            2 => {
                let d = w.rng.between(ttl + ttl / 2, ttl * 3);
                w.coords[target].frozen_until = Some(now + d);
                format!("freeze c{target} for {}ms", d.as_millis())
            }
            3 => {
                let d = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(8));
                w.coords[target].store_cut_until = Some(now + d);
                format!("cut c{target} from the store for {}ms", d.as_millis())
            }
            4 => {
                let d = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(8));
                w.coords[target].agents_cut_until = Some(now + d);
                format!("cut c{target} from the agents for {}ms", d.as_millis())
            }
            5 => {
                let Some(s) = w.rng.pick(&servers).cloned() else {
                    continue;
                };
                let d = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(10));
                world::crash_agent(&mut w, &s, d);
                format!("crash agent {s} for {}ms", d.as_millis())
            }
            6 => {
                let Some(s) = w.rng.pick(&servers).cloned() else {
                    continue;
                };
                let d = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(10));
                let busy = w.rng.chance(0.5);
                if let Some(a) = w.agents.get_mut(&s) {
                    if busy {
                        a.busy_until = Some(now + d);
                    } else {
                        a.unhealthy_until = Some(now + d);
                        a.last_fault = Some(now);
                    }
                }
                format!(
                    "{s} {} for {}ms",
                    if busy { "busy" } else { "unhealthy" },
                    d.as_millis()
                )
            }
            _ => {
                let other = (target + 1 + w.rng.below(n as u64 - 1) as usize) % n;
                let after = w
                    .rng
                    .between(Duration::from_secs(1), Duration::from_secs(10));
                w.crash(other, after);
                format!("crash follower c{other}")
            }
        };
        let line = format!("{} ms: {what}", w.ms());
        w.trace(&line);
        log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}

/// How long the operator waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The operator: starts the upgrade, sometimes intervenes during the chaos, and afterwards
/// resumes a paused upgrade a few times (or aborts it) until it ends.
async fn operate(
    w: Shared,
    nodes: Nodes,
    request: Option<StartRequest>,
    chaos_end: Instant,
    deadline: Instant,
) -> Result<(), String> {
    if let Some(request) = request {
        start(&w, &nodes, request, deadline).await?;
    }
    follow(&w, &nodes, chaos_end, deadline).await
}

/// The operator of a roll-out run: starts it, sometimes pauses, resumes or aborts it during
/// the chaos, and afterwards resumes it when paused (a few times, then aborts) until it ends.
async fn operate_rollout(
    w: Shared,
    nodes: Nodes,
    r: RolloutSetup,
    template: StartRequest,
    chaos_end: Instant,
    deadline: Instant,
) -> Result<(), String> {
    let request = RolloutRequest {
        pools: r.pools.iter().map(|p| p.name.clone()).collect(),
        selector: String::new(),
        canary: r.canary.clone(),
        max_in_flight: Some(r.max_in_flight),
        template,
        dry_run: false,
    };
    loop {
        if Instant::now() > deadline {
            return Err("I6: the roll-out never started".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if lock(&w).stored_rollout().is_some() {
            break;
        }
        let Some(control) = leader(&nodes) else {
            continue;
        };
        match tokio::time::timeout(
            CALL_TIMEOUT,
            control.start_rollout(request.clone(), "sim-operator"),
        )
        .await
        {
            Ok(Ok(_)) => break,
            Ok(Err(ControlError::Invalid(m))) => return Err(format!("roll-out refused: {m}")),
            _ => {}
        }
    }
    let mut resumes = 0;
    loop {
        let wait = lock(&w)
            .rng
            .between(Duration::from_secs(1), Duration::from_secs(20));
        tokio::time::sleep(wait).await;
        let now = Instant::now();
        let stored = lock(&w).stored_rollout();
        let rollout = match stored {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(e),
            None => continue,
        };
        if rollout.is_ended() {
            return Ok(());
        }
        if now > deadline {
            let stages: Vec<String> = rollout
                .pools
                .iter()
                .map(|(p, r)| format!("{p} {}", r.stage.name()))
                .collect();
            return Err(format!(
                "I6: the roll-out did not end {}s after the faults stopped; stuck at {} ({}); \
                 pools: {}",
                deadline.duration_since(chaos_end).as_secs(),
                rollout.status.name(),
                rollout.status.reason(),
                stages.join(", ")
            ));
        }
        let Some(control) = leader(&nodes) else {
            continue;
        };
        // A pool whose upgrade ended with its traffic on its paired pool is failed back, as an
        // operator would: until then its pair cannot be upgraded (the roll-out waits, saying
        // why).
        let back: Vec<String> = {
            let w = lock(&w);
            w.stored_failed_over()
                .into_iter()
                .filter(|p| {
                    w.check
                        .lasts
                        .get(p)
                        .is_some_and(|u| u.upgrade.is_terminal())
                })
                .collect()
        };
        for pool in back {
            let done =
                tokio::time::timeout(CALL_TIMEOUT, control.failover(&pool, false, "sim-operator"))
                    .await;
            if let Ok(Ok(m)) = done {
                lock(&w).trace(&format!("operator failback {pool}: {m}"));
            }
        }
        let paused = matches!(rollout.status, RolloutStatus::Paused { .. });
        let cmd = if now < chaos_end && lock(&w).chaos {
            match lock(&w).rng.below(100) {
                0..=7 => Some(UpgradeCommand::Pause),
                8..=20 => Some(UpgradeCommand::Resume),
                21 => Some(UpgradeCommand::Abort),
                _ => None,
            }
        } else if paused {
            resumes += 1;
            Some(if resumes > 8 {
                UpgradeCommand::Abort
            } else {
                UpgradeCommand::Resume
            })
        } else {
            None
        };
        let Some(cmd) = cmd else { continue };
        // A pool paused on its own (a failure) is resumed too, as an operator would after
        // looking at it: the roll-out's resume only resumes pools it paused itself.
        if cmd == UpgradeCommand::Resume {
            for (pool, run) in &rollout.pools {
                let stuck = run.stage == rollgate_coordinator::rollout::Stage::Running
                    && lock(&w)
                        .check
                        .lasts
                        .get(pool)
                        .is_some_and(|u| matches!(u.upgrade.status, Status::Paused { .. }));
                if stuck {
                    let _ = tokio::time::timeout(
                        CALL_TIMEOUT,
                        control.command(pool, UpgradeCommand::Resume, "sim-operator"),
                    )
                    .await;
                }
            }
        }
        if let Ok(Ok(r)) = tokio::time::timeout(
            CALL_TIMEOUT,
            control.rollout_command(None, cmd, "sim-operator"),
        )
        .await
        {
            lock(&w).trace(&format!("operator roll-out {cmd:?}: {}", r.status.name()));
        }
    }
}

/// Starts the upgrade on whichever coordinator leads.
async fn start(
    w: &Shared,
    nodes: &Nodes,
    mut request: StartRequest,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        if Instant::now() > deadline {
            return Err("I6: the upgrade never started".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(control) = leader(nodes) else {
            continue;
        };
        // An operator's call to a coordinator that dies meanwhile times out, like a gRPC call.
        let Ok(started) =
            tokio::time::timeout(CALL_TIMEOUT, control.start(request.clone(), "sim-operator"))
                .await
        else {
            continue;
        };
        match started {
            Ok(up) => {
                lock(w).check.on_ack("start", &up);
                break;
            }
            Err(ControlError::Invalid(m))
                if m.contains("rollback-artifact") && request.rollback_artifact.is_none() =>
            {
                // #5: servers on a version installed outside rollgate need the old artifact.
                lock(w).refusals.push(m);
                request.rollback_artifact = Some(RollbackArtifact {
                    artifact: "https://repo.invalid/fe-1.0.tar.gz".into(),
                    sha256: "cd".repeat(32),
                });
            }
            Err(ControlError::Invalid(m)) => return Err(format!("start refused: {m}")),
            Err(ControlError::AlreadyRunning { .. }) => break,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Follows the upgrade to its end, intervening as an operator would.
async fn follow(
    w: &Shared,
    nodes: &Nodes,
    chaos_end: Instant,
    deadline: Instant,
) -> Result<(), String> {
    let w = Arc::clone(w);
    let nodes = Arc::clone(nodes);
    let mut resumes = 0;
    loop {
        let wait = lock(&w)
            .rng
            .between(Duration::from_secs(1), Duration::from_secs(20));
        tokio::time::sleep(wait).await;
        let now = Instant::now();
        let last = lock(&w).check.lasts.get(SINGLE_POOL).cloned();
        let Some(record) = last else { continue };
        if record.upgrade.is_terminal() {
            return Ok(());
        }
        if now > deadline {
            return Err(format!(
                "I6: no end {}s after the faults stopped; stuck at {}",
                deadline.duration_since(chaos_end).as_secs(),
                record.upgrade.status
            ));
        }
        let Some(control) = leader(&nodes) else {
            continue;
        };
        let cmd = if now < chaos_end && lock(&w).chaos {
            let r = lock(&w).rng.below(100);
            match r {
                0..=7 => Some(UpgradeCommand::Pause),
                8..=20 => Some(UpgradeCommand::Resume),
                21..=22 => Some(UpgradeCommand::Abort),
                23..=25 => Some(UpgradeCommand::Rollback),
                _ => None,
            }
        } else if matches!(record.upgrade.status, Status::Paused { .. }) {
            resumes += 1;
            Some(if resumes > 6 {
                UpgradeCommand::Abort
            } else {
                UpgradeCommand::Resume
            })
        } else {
            None
        };
        let Some(cmd) = cmd else { continue };
        let name = match cmd {
            UpgradeCommand::Pause => "pause",
            UpgradeCommand::Resume => "resume",
            UpgradeCommand::Abort => "abort",
            UpgradeCommand::Rollback => "rollback",
        };
        if let Ok(Ok(up)) =
            tokio::time::timeout(CALL_TIMEOUT, control.command("pool-a", cmd, "sim-operator")).await
        {
            let mut w = lock(&w);
            w.trace(&format!("operator {name}"));
            w.check.on_ack(name, &up);
        }
    }
}

/// The end state: nothing out of service unless listed (I3), installs (I4), per pool; and in
/// a roll-out run, the roll-out ended, and completed only with every pool completed.
fn final_checks(w: &mut World, pools: &[(String, Vec<String>)], rollout: bool) -> String {
    let mut outcome = Vec::new();
    for (pool, servers) in pools {
        outcome.push(final_checks_pool(w, pool, servers, rollout));
    }
    for (s, a) in &w.agents {
        let mut last = 0;
        for e in &a.accepted {
            if *e < last {
                w.check
                    .violations
                    .push(format!("I5: {s} accepted epoch {e} after {last}"));
            }
            last = last.max(*e);
        }
    }
    if !rollout {
        return outcome.concat();
    }
    match w.stored_rollout() {
        None => {
            w.check
                .violations
                .push("the roll-out never stored a state".into());
            "none".into()
        }
        Some(Err(e)) => {
            w.check.violations.push(e);
            "unreadable".into()
        }
        Some(Ok(r)) => {
            if !r.is_ended() {
                w.check.violations.push(format!(
                    "I6: the roll-out did not end ({})",
                    r.status.name()
                ));
            }
            if r.status == RolloutStatus::Completed {
                for (pool, _) in pools {
                    let done = w
                        .check
                        .lasts
                        .get(pool)
                        .is_some_and(|u| u.upgrade.status == Status::Completed);
                    if !done {
                        w.check
                            .violations
                            .push(format!("the roll-out completed but pool {pool} did not"));
                    }
                }
            }
            format!("roll-out {}: {}", r.status.name(), outcome.join(", "))
        }
    }
}

fn final_checks_pool(w: &mut World, pool: &str, servers: &[String], rollout: bool) -> String {
    let Some(record) = w.check.lasts.get(pool).cloned() else {
        if !rollout {
            w.check
                .violations
                .push("the upgrade never stored a state".into());
            return "none".into();
        }
        // Never started (the roll-out was aborted first): untouched.
        for s in servers {
            let untouched = w
                .agents
                .get(s)
                .is_some_and(|a| a.svc == world::Svc::Serving && a.installs.is_empty());
            if !untouched {
                w.check.violations.push(format!(
                    "{s} of {pool} was touched though its pool never got a plan"
                ));
            }
        }
        return format!("{pool} not started");
    };
    let up = &record.upgrade;
    let listed: Vec<String> = up.out_of_service().into_iter().map(|(s, _)| s).collect();
    for s in servers {
        let serving = w
            .agents
            .get(s)
            .is_some_and(|a| a.svc == world::Svc::Serving);
        if !serving && listed.contains(s) && up.is_terminal() {
            // Listed is not enough when the agent can be reached: a restore must have been
            // tried (and failed), or the step's answer never came.
            let tried = up.servers.get(s).is_some_and(|p| {
                p.direction == rollgate_coordinator::engine::Direction::Restore
                    || matches!(
                        p.phase,
                        rollgate_coordinator::engine::ServerPhase::Unanswered { .. }
                    )
            });
            if !tried {
                w.check.violations.push(format!(
                    "I3: {s} is left out of service at the end ({}) without a restore",
                    up.status
                ));
            }
        }
        if !serving && !listed.contains(s) {
            let svc = w.agents.get(s).map(|a| a.svc);
            w.check.violations.push(format!(
                "I3: {s} is left {svc:?} at the end ({}) and the upgrade does not list it",
                up.status
            ));
        }
    }
    for s in servers {
        let Some(a) = w.agents.get(s) else { continue };
        for ((plan, dir), n) in &a.installs {
            if *n > 1 {
                w.check
                    .violations
                    .push(format!("I4: {s} installed {n} times by {plan} ({dir})"));
            }
        }
    }
    if up.status == Status::Completed {
        for s in servers {
            let Some(a) = w.agents.get(s) else { continue };
            let n = a
                .installs
                .get(&(up.plan.id.clone(), "fwd".into()))
                .copied()
                .unwrap_or(0);
            if n != 1 || a.version != "2.0" {
                w.check.violations.push(format!(
                    "I4: completed, but {s} runs {} after {n} install(s)",
                    a.version
                ));
            }
        }
    }
    if rollout {
        format!("{pool} {}", up.status.name())
    } else {
        up.status.to_string()
    }
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Report {
    run_scenario(seed, opts, scenario(seed))
}

/// Keeps the panics the simulation injects on purpose out of the output; any other panic is
/// reported as before.
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with("simulated panic"));
            if !injected {
                previous(info);
            }
        }));
    });
}

/// Runs `sc` with the choices of `seed`.
pub fn run_scenario(seed: u64, opts: &Options, sc: Scenario) -> Report {
    quiet_injected_panics();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Report {
                seed,
                violations: vec![format!("cannot build a runtime: {e}")],
                outcome: String::new(),
                trace: 0,
                steps: 0,
                virtual_time: Duration::ZERO,
                faults: Vec::new(),
                commits: 0,
                bytes: 0,
                admissions: 0,
                downs: 0,
                lines: Vec::new(),
                last: None,
                servers: Default::default(),
                refusals: Vec::new(),
                events: Vec::new(),
            }
        }
    };
    rt.block_on(run_inner(seed, opts, sc))
}

async fn run_inner(seed: u64, opts: &Options, sc: Scenario) -> Report {
    let setup = sc.setup.clone();
    let ttl = Duration::from_secs(2);
    let w: Shared = Arc::new(std::sync::Mutex::new(World::new(
        seed,
        &setup.servers,
        setup.min_active,
        opts.call_faults,
        setup.behaviour.clone(),
        setup.coordinators,
        ttl,
    )));
    {
        let mut w = lock(&w);
        if let Some(r) = &setup.rollout {
            w.check = Checker::with_pools(
                &r.pools,
                Some(RolloutRules {
                    max_in_flight: r.max_in_flight as usize,
                    canary: r.canary.clone(),
                }),
            );
        }
        if opts.verbose {
            w.lines = Some(Vec::new());
        }
        w.chaos = sc.chaos;
        w.crash_leader_on_admit = sc.crash_leader_on_admit.clone();
        w.panic_on = sc.panic_on.clone();
        w.slow_on = sc.slow_on.clone();
        if let Some(record) = &sc.stored {
            w.seed_record(record);
        }
    }
    let start = Instant::now();
    let chaos_end = start + opts.chaos;
    let deadline = chaos_end + opts.end_within;
    let cfgs: Vec<Arc<CoordinatorConfig>> = (0..setup.coordinators)
        .map(|c| Arc::new(config(&format!("c{c}"), &setup, ttl)))
        .collect();
    let nodes: Nodes = Arc::new(std::sync::Mutex::new(
        (0..setup.coordinators)
            .map(|c| {
                lock(&w).coords[c].life = 0;
                spawn_node(&w, c, &cfgs[c])
            })
            .collect(),
    ));
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sup = tokio::spawn(supervise(
        Arc::clone(&w),
        Arc::clone(&nodes),
        cfgs.clone(),
        chaos_end,
    ));
    let cha = if sc.chaos {
        Some(tokio::spawn(chaos(
            Arc::clone(&w),
            Arc::clone(&nodes),
            chaos_end,
            opts.fault_every,
            Arc::clone(&log),
        )))
    } else {
        None
    };
    let request = sc.start.then(|| setup.request.clone());
    let result = match (&setup.rollout, request) {
        (Some(r), Some(template)) => {
            operate_rollout(
                Arc::clone(&w),
                Arc::clone(&nodes),
                r.clone(),
                template,
                chaos_end,
                deadline,
            )
            .await
        }
        (_, request) => {
            operate(
                Arc::clone(&w),
                Arc::clone(&nodes),
                request,
                chaos_end,
                deadline,
            )
            .await
        }
    };
    sup.abort();
    if let Some(c) = cha {
        c.abort();
    }
    let faults_seen = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut w = lock(&w);
    if let Err(e) = result {
        w.check.violations.push(e);
    }
    let pools: Vec<(String, Vec<String>)> = match &setup.rollout {
        Some(r) => r
            .pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.servers.iter().map(|(s, _)| s.clone()).collect(),
                )
            })
            .collect(),
        None => vec![(
            "pool-a".into(),
            setup.servers.iter().map(|(s, _)| s.clone()).collect(),
        )],
    };
    let outcome = final_checks(&mut w, &pools, setup.rollout.is_some());
    Report {
        seed,
        violations: w.check.violations.clone(),
        outcome,
        trace: w.trace_hash(),
        steps: w.steps,
        virtual_time: start.elapsed(),
        faults: faults_seen,
        commits: w.check.commits,
        bytes: w.check.bytes,
        admissions: w.check.admissions,
        downs: w.check.downs,
        lines: w.lines.take().unwrap_or_default(),
        servers: w
            .agents
            .iter()
            .map(|(s, a)| {
                let plan = w
                    .check
                    .last_of(s)
                    .map(|r| r.upgrade.plan.id.clone())
                    .unwrap_or_default();
                let n = a
                    .installs
                    .get(&(plan, "fwd".to_string()))
                    .copied()
                    .unwrap_or(0);
                (
                    s.clone(),
                    (a.version.clone(), a.svc == world::Svc::Serving, n),
                )
            })
            .collect(),
        last: w.check.lasts.get(SINGLE_POOL).cloned(),
        refusals: w.refusals.clone(),
        events: w.events(),
    }
}

/// Runs the roll-out scenario of one seed.
pub fn run_rollout(seed: u64, opts: &Options) -> Report {
    run_scenario(seed, opts, rollout_scenario(seed))
}

/// Runs `seeds` on `threads` threads; returns every report, in seed order.
pub fn run_many(seeds: std::ops::Range<u64>, threads: usize, opts: &Options) -> Vec<Report> {
    run_many_of(seeds, threads, opts, run)
}

/// Runs `seeds` through `one` ([`run`] or [`run_rollout`]) on `threads` threads; returns
/// every report, in seed order.
pub fn run_many_of(
    seeds: std::ops::Range<u64>,
    threads: usize,
    opts: &Options,
    one: fn(u64, &Options) -> Report,
) -> Vec<Report> {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let r = one(seed, opts);
                out.lock().unwrap_or_else(|p| p.into_inner()).push(r);
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
    v.sort_by_key(|r| r.seed);
    v
}
