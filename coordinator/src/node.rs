//! A coordinator node: campaigns for leadership and, while it leads, takes over (fences the
//! agents, resumes every unfinished upgrade from the store) and runs one driver per pool.
//! Leadership is a value others watch ([`Node::role`]); losing it stops every driver at once.

use crate::config::{CoordinatorConfig, PoolConfig};
use crate::driver::{Command, DriveError, Driver};
use crate::engine::{Action, Upgrade};
use crate::env::Env;
use crate::link::LinkError;
use crate::membership::{self, Members};
use crate::progress::{self, ProgressError, UpgradeRecord};
use crate::store::{Candidate, Leadership, StoreError};
use rollgate_common::Epoch;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tries of one background fence (about 30 s with the pauses between them).
const FENCE_ATTEMPTS: u32 = 8;

/// How many fence calls a new leader has in flight at once.
const FENCE_CONCURRENCY: usize = 256;

/// Where this node stands.
#[derive(Debug, Clone)]
pub enum Role {
    /// Not the leader (or not yet).
    Follower,
    /// Won the election at `epoch`; fencing agents and resuming upgrades. Leader-only calls
    /// are answered "unavailable, retry shortly" until it is done.
    TakingOver { epoch: Epoch },
    /// Leading: drivers run, leader-only calls are served.
    Leader(Leadership),
}

/// A running driver, as the control layer sees it.
#[derive(Debug, Clone)]
pub struct DriverHandle {
    /// Sends operator commands.
    pub commands: mpsc::Sender<Command>,
    /// The engine state after every transition.
    pub status: watch::Receiver<Option<Upgrade>>,
    /// Cancelled when the driver's task has ended.
    pub ended: CancellationToken,
    /// Its history records not stored yet.
    pub pending: crate::driver::Pending,
    /// Why its writes are held (the store refuses them), while they are.
    pub held: crate::driver::Held,
}

/// The running roll-out, as the control layer sees it.
#[derive(Debug, Clone)]
pub struct RolloutHandle {
    /// Its id.
    pub id: String,
    /// Sends operator commands.
    pub commands: mpsc::Sender<crate::rollout_driver::RolloutCommand>,
    /// The roll-out after every transition.
    pub status: watch::Receiver<crate::rollout::Rollout>,
    /// Cancelled when its task has ended.
    pub ended: CancellationToken,
}

/// Where a driver's upgrade comes from.
#[derive(Debug)]
pub enum Origin {
    /// A plan just made: nothing of it is stored yet.
    New,
    /// Read from the store at take-over (what was read): each in-flight step reads the
    /// agent's journal first.
    Resumed(progress::Stored),
}

/// One coordinator.
#[derive(Debug)]
pub struct Node {
    /// Its configuration.
    pub cfg: Arc<CoordinatorConfig>,
    /// Store, agents, hooks, clocks.
    pub env: Env,
    /// Where this node stands; watch it to follow leadership.
    pub role: watch::Sender<Role>,
    drivers: Mutex<BTreeMap<String, DriverHandle>>,
    /// The roll-out driven under this leadership, if any.
    rollout: Mutex<Option<RolloutHandle>>,
    /// Serialises roll-out starts (one roll-out runs at a time).
    pub rollout_lock: tokio::sync::Mutex<()>,
    /// Pools whose stored upgrade could not be read at take-over, and why.
    unreadable: Mutex<BTreeMap<String, String>>,
    /// Serialises the starts of a pool and of the pools paired with it, so two concurrent
    /// requests cannot both pass the "nothing is running on this pool" check.
    pub start_locks: crate::pool_locks::PoolLocks,
    /// Every task this node spawned.
    pub tasks: TaskTracker,
    /// Servers that joined by themselves, as last read from the store.
    members: std::sync::RwLock<Members>,
    /// Server ids listed in the config (they stay where it puts them).
    configured: HashSet<String>,
}

impl Node {
    /// A node that does not lead yet.
    pub fn new(cfg: Arc<CoordinatorConfig>, env: Env) -> Arc<Node> {
        let (role, _) = watch::channel(Role::Follower);
        let configured = cfg
            .pools
            .iter()
            .flat_map(|p| p.servers.iter().map(|s| s.id.clone()))
            .collect();
        Arc::new(Node {
            members: std::sync::RwLock::new(Members::new()),
            configured,
            cfg,
            env,
            role,
            drivers: Mutex::new(BTreeMap::new()),
            rollout: Mutex::new(None),
            rollout_lock: tokio::sync::Mutex::new(()),
            unreadable: Mutex::new(BTreeMap::new()),
            start_locks: crate::pool_locks::PoolLocks::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// The pool `name` as configured, with the servers that joined it.
    pub fn pool(&self, name: &str) -> Option<PoolConfig> {
        let cfg = self.cfg.pool(name)?;
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        Some(membership::with_members(cfg, &members, &self.configured))
    }

    /// Every configured pool, with the servers that joined it.
    pub fn pools(&self) -> Vec<PoolConfig> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        self.cfg
            .pools
            .iter()
            .map(|p| membership::with_members(p, &members, &self.configured))
            .collect()
    }

    /// The servers that joined by themselves.
    pub fn members(&self) -> Members {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `server` is listed in the config.
    pub fn is_configured(&self, server: &str) -> bool {
        self.configured.contains(server)
    }

    /// Takes `members` as the membership: agents that joined get a connection (and a health
    /// stream), agents that left lose theirs.
    pub fn set_members(&self, members: Members) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = members;
        let agents: Vec<(String, String)> = self
            .pools()
            .iter()
            .flat_map(|p| p.servers.iter().map(|s| (s.id.clone(), s.agent.clone())))
            .collect();
        self.env.agents.set_agents(&agents);
    }

    /// Follows the stored membership until `stop`: one small read every
    /// [`membership::REFRESH`], the members only when they changed.
    pub async fn membership_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut seen = None;
        loop {
            match membership::version(&self.env.store).await {
                Ok(v) if Some(v) != seen => match membership::load(&self.env.store).await {
                    Ok(m) => {
                        seen = Some(v);
                        self.set_members(m);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the members; retrying"),
                },
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the membership version"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(membership::REFRESH) => {}
            }
        }
    }

    /// The leadership this node holds now, if it leads and has taken over.
    pub fn leadership(&self) -> Option<Leadership> {
        match &*self.role.borrow() {
            Role::Leader(l) if !l.lost.is_cancelled() => Some(l.clone()),
            _ => None,
        }
    }

    /// The epoch this node is taking over at, while it does.
    pub fn taking_over(&self) -> Option<Epoch> {
        match &*self.role.borrow() {
            Role::TakingOver { epoch } => Some(*epoch),
            _ => None,
        }
    }

    /// The driver of `pool`, if one runs (or ran) under this leadership.
    pub fn driver(&self, pool: &str) -> Option<DriverHandle> {
        self.drivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool)
            .cloned()
    }

    /// Why `pool`'s stored upgrade could not be read at take-over, if it could not.
    pub fn unreadable(&self, pool: &str) -> Option<String> {
        self.unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool)
            .cloned()
    }

    /// Forgets that `pool`'s stored upgrade was unreadable (a new plan replaced it).
    pub fn forget_unreadable(&self, pool: &str) {
        self.unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pool);
    }

    /// Campaigns, leads until leadership is lost, and campaigns again, until `shutdown`.
    /// On shutdown a leader resigns so that a follower takes over at once.
    pub async fn lead_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let me = Candidate {
            id: self.cfg.id.clone(),
            address: self.cfg.advertise(),
        };
        let ttl = match &self.cfg.store {
            crate::config::StoreConfig::Etcd { election_ttl, .. } => *election_ttl,
            crate::config::StoreConfig::Embedded { .. } => Duration::from_secs(5),
        };
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let lead = match self.env.store.campaign(&me, ttl, &shutdown).await {
                Ok(l) => l,
                Err(StoreError::Cancelled) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(epoch = lead.epoch.get(), id = %self.cfg.id, "won the election; taking over");
            tokio::select! {
                biased;
                _ = lead.lost.cancelled() => {}
                _ = shutdown.cancelled() => {}
                _ = Arc::clone(&self).take_over(lead.clone()) => {}
            }
            tokio::select! {
                biased;
                _ = lead.lost.cancelled() => {
                    tracing::warn!(epoch = lead.epoch.get(), "leadership lost: all leader work stopped");
                }
                _ = shutdown.cancelled() => {
                    tracing::info!(epoch = lead.epoch.get(), "resigning leadership");
                    if let Err(e) = self.env.store.resign(&lead).await {
                        tracing::warn!(error = %e, "resign failed; followers take over when the lease expires");
                    }
                    lead.lost.cancel();
                }
            }
            self.role.send_replace(Role::Follower);
            self.drivers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            *self.rollout.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Takes over: reads the unfinished upgrades, fences their agents, resumes them, then
    /// fences every other agent in the background. Leader-only calls are refused as "taking
    /// over" until the upgrades are resumed, so nothing can start a second driver for a pool
    /// being resumed.
    ///
    /// Only the agents of upgrades being resumed must be fenced before anything acts: an older
    /// leader can have work in flight only there (it stores every state before acting), and
    /// anything new it tries needs a fenced store write, which fails now. So a hung agent
    /// elsewhere in the fleet no longer delays the take-over.
    async fn take_over(self: Arc<Self>, lead: Leadership) {
        self.role
            .send_replace(Role::TakingOver { epoch: lead.epoch });
        // The plans being resumed may name servers that joined by themselves: their agents
        // need lines before anything is sent.
        let mut backoff = Duration::from_millis(100);
        loop {
            match membership::load(&self.env.store).await {
                Ok(m) => {
                    self.set_members(m);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the members; retrying");
                    tokio::select! {
                        biased;
                        _ = lead.lost.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let pools: Vec<PoolConfig> = self.pools();
        let mut resumed = Vec::new();
        for pool in pools {
            let record = match self.load(&lead, &pool.name).await {
                Some(Ok(r)) => r,
                Some(Err(why)) => {
                    tracing::error!(pool = %pool.name, %why, "stored upgrade is unreadable; not resuming it");
                    self.unreadable
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(pool.name.clone(), why);
                    continue;
                }
                None => continue,
            };
            if record.upgrade.is_terminal() {
                continue;
            }
            resumed.push((pool, record));
        }
        if lead.lost.is_cancelled() {
            return;
        }
        let urgent: std::collections::BTreeSet<String> = resumed
            .iter()
            .flat_map(|(_, r)| r.upgrade.plan.servers().cloned())
            .collect();
        self.fence_agents(&lead, urgent.iter().cloned().collect(), false)
            .await;
        if lead.lost.is_cancelled() {
            return;
        }
        for (pool, record) in resumed {
            let stored = progress::Stored::of(&record);
            let (upgrade, mut actions) = match record.upgrade.plan.validate() {
                Ok(()) => (record.upgrade.clone(), Vec::new()),
                // A stored plan that can no longer be executed pauses with the reason; the
                // steps already in flight are still answered.
                Err(e) => record.upgrade.clone().block(&e),
            };
            actions.extend(upgrade.resume());
            tracing::info!(pool = %pool.name, plan = %upgrade.plan.id, actions = actions.len(), "resuming upgrade");
            let record = UpgradeRecord {
                upgrade,
                next_event: record.next_event,
                started_by: record.started_by,
                started_ms: record.started_ms,
            };
            if let Err(e) =
                self.start_driver(&lead, pool, record, actions, Origin::Resumed(stored), None)
            {
                tracing::error!(error = %e, "cannot resume upgrade");
            }
        }
        if !lead.lost.is_cancelled() {
            self.role.send_replace(Role::Leader(lead.clone()));
            tracing::info!(
                epoch = lead.epoch.get(),
                fenced_first = urgent.len(),
                "took over: leading"
            );
            self.resume_rollout(&lead).await;
            let rest: Vec<String> = self
                .env
                .agents
                .servers()
                .into_iter()
                .filter(|s| !urgent.contains(s))
                .collect();
            if !rest.is_empty() {
                let me = Arc::clone(&self);
                self.tasks.spawn(async move {
                    tokio::select! {
                        biased;
                        _ = lead.lost.cancelled() => {}
                        _ = me.fence_agents(&lead, rest, true) => {}
                    }
                });
            }
        }
    }

    /// Resumes the newest roll-out if it has not ended (its pools' upgrades were resumed
    /// already, with the others).
    async fn resume_rollout(self: &Arc<Self>, lead: &Leadership) {
        let mut backoff = Duration::from_millis(100);
        let newest = loop {
            match progress::newest_rollout(&self.env.store).await {
                Ok(r) => break r,
                Err(ProgressError::Unreadable { key, message }) => {
                    tracing::error!(%key, %message, "the newest roll-out is unreadable; not resuming it");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the roll-outs; retrying");
                    tokio::select! {
                        biased;
                        _ = lead.lost.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        let Some(r) = newest.filter(|r| !r.is_ended()) else {
            return;
        };
        let actions = crate::rollout_driver::RolloutDriver::resumed_actions(&r);
        tracing::info!(rollout = %r.plan.id, status = %r.status.name(), starts = actions.len(), "resuming roll-out");
        if let Err(e) = self.start_rollout_driver(lead, r, actions, true, None) {
            tracing::error!(error = %e, "cannot resume the roll-out");
        }
    }

    /// The roll-out driven under this leadership, if any (running or ended).
    pub fn rollout(&self) -> Option<RolloutHandle> {
        self.rollout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a roll-out's driver on this node's tasks; refused while another one runs.
    /// `stored`: read from the store as it is. `started` is answered once it is stored.
    pub fn start_rollout_driver(
        self: &Arc<Self>,
        lead: &Leadership,
        rollout: crate::rollout::Rollout,
        actions: Vec<crate::rollout::RolloutAction>,
        stored: bool,
        started: Option<
            oneshot::Sender<Result<crate::rollout::Rollout, crate::control::ControlError>>,
        >,
    ) -> Result<(), String> {
        let mut slot = self.rollout.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = slot.as_ref().filter(|h| !h.ended.is_cancelled()) {
            return Err(h.id.clone());
        }
        let (status_tx, status_rx) = watch::channel(rollout.clone());
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let ended = CancellationToken::new();
        let id = rollout.plan.id.clone();
        let driver = crate::rollout_driver::RolloutDriver::new(
            crate::control::Control::new(Arc::clone(self)),
            lead.clone(),
            rollout,
            stored,
            status_tx,
        );
        *slot = Some(RolloutHandle {
            id: id.clone(),
            commands: cmd_tx,
            status: status_rx,
            ended: ended.clone(),
        });
        drop(slot);
        self.tasks.spawn(async move {
            if let Err(e) = driver.run(actions, cmd_rx, started).await {
                tracing::warn!(rollout = %id, error = %e, "roll-out driver stopped");
            }
            ended.cancel();
        });
        Ok(())
    }

    /// Reads `pool`'s upgrade record, retrying while the store is unavailable. `None`: none
    /// stored (or leadership lost); `Some(Err)`: stored but unreadable.
    async fn load(&self, lead: &Leadership, pool: &str) -> Option<Result<UpgradeRecord, String>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match progress::load_upgrade(&self.env.store, pool).await {
                Ok(r) => return r.map(Ok),
                Err(ProgressError::Unreadable { key, message }) => {
                    return Some(Err(format!("{key}: {message}")))
                }
                Err(e) => {
                    tracing::warn!(%pool, error = %e, "cannot read the stored upgrade; retrying");
                    tokio::select! {
                        biased;
                        _ = lead.lost.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Raises the epoch on `servers`' agents so that an older leader's calls are refused from
    /// now on, at most [`FENCE_CONCURRENCY`] at a time. Unreachable agents are fenced by the
    /// epoch on the first command they get.
    ///
    /// With `retry` (the background pass), a fence that failed for a reason worth retrying (a
    /// timeout, a connection not up yet) is tried again a few times with a growing pause, so
    /// an idle agent does not stay at an older epoch only because it was slow at take-over.
    async fn fence_agents(&self, lead: &Leadership, servers: Vec<String>, retry: bool) {
        let permits = Arc::new(tokio::sync::Semaphore::new(FENCE_CONCURRENCY));
        let calls = servers.into_iter().map(|server| {
            let agents = Arc::clone(&self.env.agents);
            let epoch = lead.epoch;
            let permits = Arc::clone(&permits);
            let lost = lead.lost.clone();
            async move {
                let mut pause = Duration::from_millis(200);
                let mut attempt = 1;
                loop {
                    let r = {
                        let _permit = permits.acquire().await;
                        agents.fence(&server, epoch).await
                    };
                    match r {
                        Err(e) if retry && e.is_retryable() && attempt < FENCE_ATTEMPTS => {
                            tokio::select! {
                                _ = lost.cancelled() => return (server, Err(e)),
                                _ = tokio::time::sleep(pause) => {}
                            }
                            pause = (pause * 2).min(Duration::from_secs(5));
                            attempt += 1;
                        }
                        r => return (server, r),
                    }
                }
            }
        });
        for (server, r) in futures_util::future::join_all(calls).await {
            crate::metrics::METRICS.fence(r.is_ok());
            match r {
                Ok(()) => {}
                Err(LinkError::StaleEpoch { current, .. }) => {
                    tracing::warn!(%server, current, "agent has seen a newer epoch: this leadership is stale");
                    lead.lost.cancel();
                }
                Err(e) => {
                    tracing::warn!(%server, error = %e, "could not fence agent (it will be fenced by its next command)")
                }
            }
        }
    }

    /// Starts a driver for `record` on this node's tasks. Refused when a driver for the pool
    /// is still running under this leadership: never two drivers for one pool. `started` is
    /// answered once the first state is stored.
    pub fn start_driver(
        self: &Arc<Self>,
        lead: &Leadership,
        pool: PoolConfig,
        record: UpgradeRecord,
        actions: Vec<Action>,
        origin: Origin,
        started: Option<oneshot::Sender<Result<Upgrade, DriveError>>>,
    ) -> Result<(), String> {
        let (stored, reconcile) = match origin {
            Origin::New => (progress::Stored::default(), false),
            Origin::Resumed(stored) => (stored, true),
        };
        let name = pool.name.clone();
        let mut drivers = self.drivers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = drivers.get(&name) {
            if !h.ended.is_cancelled() {
                return Err(format!("a driver for pool {name} is already running"));
            }
        }
        let (status_tx, status_rx) = watch::channel(None);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let ended = CancellationToken::new();
        let shared = crate::driver::Shared::default();
        let driver = Driver::new(
            self.env.clone(),
            lead.clone(),
            pool,
            record,
            stored,
            status_tx,
            shared.clone(),
        );
        drivers.insert(
            name.clone(),
            DriverHandle {
                commands: cmd_tx,
                status: status_rx,
                ended: ended.clone(),
                pending: shared.pending,
                held: shared.held,
            },
        );
        drop(drivers);
        self.tasks.spawn(async move {
            match driver.run(actions, reconcile, started, cmd_rx).await {
                Ok(u) => tracing::info!(pool = %name, status = %u.status, "driver done"),
                Err(e) => tracing::warn!(pool = %name, error = %e, "driver stopped"),
            }
            // Keep the handle: its status receiver still shows the final state to readers.
            ended.cancel();
        });
        Ok(())
    }
}
