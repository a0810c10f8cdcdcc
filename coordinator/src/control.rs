//! The leader-side use cases, in domain terms and with typed errors: start an upgrade (plan
//! defaults are resolved here, once), pause / resume / abort / rollback, status and watch,
//! readiness and inventory, failover and failback, the event history, who leads. The gRPC
//! adapter (`api`) only converts wire types to these and [`ControlError`] to a status.

use crate::config::{PoolConfig, PoolSpec};
use crate::driver::{self, Command, DriveError};
use crate::engine::{
    Action, Domain, DrainMode, Event, ExhaustedAction, FailureAction, Plan, RollbackArtifact,
    Upgrade, DEFAULT_BUSY_RETRIES, DEFAULT_BUSY_RETRY_INTERVAL,
};
use crate::membership::{self, MemberRecord};
use crate::node::{Node, Origin};
use crate::pool_locks::PoolGuard;
use crate::progress::{self, ProgressError, UpgradeRecord};
use crate::readiness::PoolReadiness;
use crate::store::{LeaderInfo, Leadership, StoreError};
use rollgate_common::Epoch;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Plan defaults: what an unset field of a start request becomes. The one place they live.
pub mod defaults {
    use std::time::Duration;

    /// How long a graceful drain waits for connections to close.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
    /// Servers of one domain down at once.
    pub const PARALLELISM: u32 = 1;
    /// How long a server must stay good after its restart.
    pub const VERIFY_STABLE: Duration = Duration::from_secs(5);
    /// How long verify may try.
    pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);
    /// Extra attempts for a failed step.
    pub const SERVER_RETRIES: u32 = 1;
}

/// How a server stops taking traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainKind {
    Graceful,
    /// A declared outage: stop at once.
    Immediate,
}

/// A start request in domain terms: `None` takes the default. Stored as a roll-out's
/// template, so it has a stored form.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StartRequest {
    pub pool: String,
    pub version: String,
    pub artifact: String,
    pub sha256: String,
    pub drain: Option<DrainKind>,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    pub parallelism: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub verify_stable: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub busy_retry_interval: Option<Duration>,
    pub busy_retries: Option<u32>,
    pub on_exhausted: Option<ExhaustedAction>,
    pub server_retries: Option<u32>,
    pub on_failure: Option<FailureAction>,
    pub domain_order: Vec<String>,
    /// Unset or zero: no canary.
    #[serde(with = "humantime_serde")]
    pub canary_soak: Option<Duration>,
    pub rollback_artifact: Option<RollbackArtifact>,
    pub dry_run: bool,
    /// The plan id to use (a roll-out fixes it in advance); `None`: `<pool>-<unix ms>`.
    #[serde(skip)]
    pub plan_id: Option<String>,
}

/// A roll-out request in domain terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutRequest {
    /// Pools by name, in the order to start them; or empty, with a selector.
    pub pools: Vec<String>,
    /// `key=value[,key=value]`: every configured pool carrying all of them, by name.
    pub selector: String,
    /// A pool of the roll-out to upgrade first, alone.
    pub canary: Option<String>,
    /// Pools upgrading at once [1].
    pub max_in_flight: Option<u32>,
    /// The plan every pool's upgrade is made from (its `pool` is left empty).
    pub template: StartRequest,
    /// Resolve every pool's plan and show the roll-out; start nothing.
    pub dry_run: bool,
}

/// A roll-out to follow: the leader's live one, or the stored state once.
#[derive(Debug)]
pub enum WatchedRollout {
    Live(watch::Receiver<crate::rollout::Rollout>),
    Once(Box<Option<crate::rollout::Rollout>>),
}

/// An operator's command to a running upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeCommand {
    Pause,
    Resume,
    Abort,
    Rollback,
}

/// Why a use case could not be carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed or out of bounds; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The pool is not configured.
    #[error("unknown pool {}", rollgate_common::quote::quoted(.0))]
    UnknownPool(String),
    /// This node does not lead; the leader (if any) is elsewhere.
    #[error("this coordinator is not the leader; {}", match .leader {
        Some(l) => format!("the leader is {} at {} (epoch {})", l.id, l.address, l.epoch),
        None => "no leader is elected right now; retry shortly".to_string(),
    })]
    NotLeader { leader: Option<LeaderInfo> },
    /// This node won the election and is taking over (fencing agents, resuming upgrades).
    #[error("this coordinator is taking over leadership (epoch {epoch}); retry shortly")]
    TakingOver { epoch: Epoch },
    /// An upgrade is already running on the pool.
    #[error("an upgrade ({plan}) is already running on pool {pool}; pause, abort or wait for it")]
    AlreadyRunning { plan: String, pool: String },
    /// There is no running upgrade to act on.
    #[error("no upgrade is running on pool {0}")]
    NoUpgrade(String),
    /// The pool's paired backup pool is being upgraded: never both at once.
    #[error("pool {pool} is paired with pool {paired}, whose upgrade ({plan}) is running; a pool and its paired pool are never upgraded together")]
    PairedBusy {
        pool: String,
        paired: String,
        plan: String,
    },
    /// The pool carries its paired pool's traffic (that pool was failed over into it): taking
    /// its servers down would cut capacity under both pools' clients.
    #[error("pool {pool} carries the traffic of its paired pool {paired}, which is failed over into it; fail {paired} back first (rollgate pool failback {paired})")]
    PairedFailedOver { pool: String, paired: String },
    /// The store refuses writes for space or size (etcd out of space, a request too large):
    /// nothing was started. An operator must free space or raise the limit.
    #[error("the store refuses the write: {0}; free space in etcd (compact, defragment, disarm the alarm) or raise its limits, then try again")]
    StoreRefused(String),
    /// A roll-out is running; one at a time.
    #[error("roll-out {0} is running; pause, abort or wait for it")]
    RolloutRunning(String),
    /// No such roll-out.
    #[error("{}", if .0.is_empty() { "no roll-out was ever started".to_owned() } else { format!("no roll-out {}", rollgate_common::quote::quoted(.0)) })]
    NoRollout(String),
    /// The store failed.
    #[error("store: {message}")]
    Store { message: String, retryable: bool },
    /// Leadership was lost while handling the call; the next leader will answer.
    #[error("leadership lost while handling the call: {0}")]
    LeadershipLost(String),
    /// A failover or failback hook failed.
    #[error("{0}")]
    Hook(String),
}

impl ControlError {
    /// True when the same call may succeed if tried again shortly (against the leader).
    pub fn is_retryable(&self) -> bool {
        match self {
            ControlError::TakingOver { .. } | ControlError::LeadershipLost(_) => true,
            ControlError::NotLeader { leader } => leader.is_none(),
            ControlError::Store { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

impl From<ProgressError> for ControlError {
    fn from(e: ProgressError) -> Self {
        ControlError::Store {
            retryable: e.is_retryable(),
            message: e.to_string(),
        }
    }
}

impl From<DriveError> for ControlError {
    fn from(e: DriveError) -> Self {
        match e {
            DriveError::LeadershipLost(m) => ControlError::LeadershipLost(m),
            DriveError::Refused(m) => ControlError::StoreRefused(m),
        }
    }
}

/// An upgrade to follow: a live one (the leader's driver), or the stored state once.
#[derive(Debug)]
pub enum Watched {
    Live(watch::Receiver<Option<Upgrade>>),
    Once(Box<Option<Upgrade>>),
}

/// Who leads, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    pub leader: Option<LeaderInfo>,
    pub this_id: String,
    pub this_is_leader: bool,
}

/// The use cases, over one node.
#[derive(Debug, Clone)]
pub struct Control {
    node: Arc<Node>,
}

impl Control {
    pub fn new(node: Arc<Node>) -> Control {
        Control { node }
    }

    /// The node this serves.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The pool `name` as configured, with the servers that joined it.
    fn pool(&self, name: &str) -> Result<PoolConfig, ControlError> {
        if name.is_empty() {
            return Err(ControlError::Invalid(
                "pool: a pool name is required".into(),
            ));
        }
        self.node
            .pool(name)
            .ok_or_else(|| ControlError::UnknownPool(name.into()))
    }

    /// The leadership to act under, or why this node cannot act now.
    async fn lead(&self) -> Result<Leadership, ControlError> {
        if let Some(l) = self.node.leadership() {
            return Ok(l);
        }
        if let Some(epoch) = self.node.taking_over() {
            return Err(ControlError::TakingOver { epoch });
        }
        match self.node.env.store.leader().await {
            // The store names this node, but it does not lead (yet, or any more): never point
            // a client at itself; tell it to retry.
            Ok(Some(l)) if l.id == self.node.cfg.id => {
                Err(ControlError::TakingOver { epoch: l.epoch })
            }
            Ok(leader) => Err(ControlError::NotLeader { leader }),
            Err(e) => Err(ControlError::Store {
                message: format!("cannot read who leads: {e}"),
                retryable: true,
            }),
        }
    }

    /// The state of `pool`'s upgrade: the leader's live driver, else the store.
    pub async fn upgrade(&self, pool: &str) -> Result<Option<Upgrade>, ControlError> {
        self.pool(pool)?;
        if self.node.leadership().is_some() {
            if let Some(h) = self.node.driver(pool) {
                if let Some(u) = h.status.borrow().clone() {
                    return Ok(Some(u));
                }
            }
        }
        Ok(progress::load_upgrade(&self.node.env.store, pool)
            .await?
            .map(|r| r.upgrade))
    }

    /// The upgrade to follow: live on the leader.
    pub async fn watch(&self, pool: &str) -> Result<Watched, ControlError> {
        self.pool(pool)?;
        self.lead().await?;
        match self.node.driver(pool) {
            Some(h) => Ok(Watched::Live(h.status)),
            None => Ok(Watched::Once(Box::new(self.upgrade(pool).await?))),
        }
    }

    /// Resolves a start request into a plan: defaults, the pool's domains as configured now
    /// (fixed for the plan's life), the requested order, `min_active`, bounds.
    pub fn resolve_plan(&self, r: &StartRequest) -> Result<Plan, ControlError> {
        let pool = self.pool(&r.pool)?;
        let spec = pool.spec();
        let invalid = ControlError::Invalid;
        if r.version.trim().is_empty() {
            return Err(invalid("version: the target version is required".into()));
        }
        if r.artifact.trim().is_empty() {
            return Err(invalid("artifact: a path or URL is required".into()));
        }
        let drain = match r.drain.unwrap_or(DrainKind::Graceful) {
            DrainKind::Graceful => DrainMode::Graceful {
                timeout: r.drain_timeout.unwrap_or(defaults::DRAIN_TIMEOUT),
            },
            DrainKind::Immediate => DrainMode::Immediate,
        };
        let on_exhausted = r
            .on_exhausted
            .clone()
            .unwrap_or(if pool.paired_pool.is_some() {
                ExhaustedAction::Failover
            } else {
                ExhaustedAction::Pause
            });
        let mut domains: Vec<Domain> = spec
            .domains
            .iter()
            .map(|(name, servers)| Domain {
                name: name.clone(),
                servers: servers.clone(),
            })
            .collect();
        if !r.domain_order.is_empty() {
            let mut ordered = Vec::new();
            for name in &r.domain_order {
                let i = domains
                    .iter()
                    .position(|d| &d.name == name)
                    .ok_or_else(|| {
                        invalid(format!(
                            "domain_order: pool {} has no upgrade domain {}",
                            r.pool,
                            rollgate_common::quote::quoted(name)
                        ))
                    })?;
                ordered.push(domains.remove(i));
            }
            if !domains.is_empty() {
                let left: Vec<_> = domains.iter().map(|d| d.name.clone()).collect();
                return Err(invalid(format!(
                    "domain_order: leaves out domain(s) {}",
                    left.join(", ")
                )));
            }
            domains = ordered;
        }
        let plan = Plan {
            id: r
                .plan_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", r.pool, self.node.env.clock.wall_ms())),
            pool: r.pool.clone(),
            version: r.version.clone(),
            artifact: r.artifact.clone(),
            sha256: r.sha256.trim().to_ascii_lowercase(),
            drain,
            parallelism: r.parallelism.unwrap_or(defaults::PARALLELISM),
            verify_stable: r.verify_stable.unwrap_or(defaults::VERIFY_STABLE),
            verify_timeout: r.verify_timeout.unwrap_or(defaults::VERIFY_TIMEOUT),
            busy_retry_interval: r.busy_retry_interval.unwrap_or(DEFAULT_BUSY_RETRY_INTERVAL),
            busy_retries: r.busy_retries.unwrap_or(DEFAULT_BUSY_RETRIES),
            on_exhausted,
            server_retries: r.server_retries.unwrap_or(defaults::SERVER_RETRIES),
            on_failure: r.on_failure.clone().unwrap_or_default(),
            domains,
            canary_soak: r.canary_soak.filter(|d| !d.is_zero()),
            paired_pool: pool.paired_pool.clone(),
            min_active: Some(u32::try_from(spec.min_active).unwrap_or(u32::MAX)),
            rollback_artifact: r.rollback_artifact.clone().map(|mut a| {
                a.sha256 = a.sha256.trim().to_ascii_lowercase();
                a
            }),
            windows: pool.windows().map_err(invalid)?,
        };
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(plan)
    }

    /// Servers that could not be rolled back after this plan: they run a version installed
    /// outside rollgate (the agent holds no artifact for it) and the plan brings none.
    fn unrollbackable(&self, plan: &Plan) -> Vec<String> {
        if plan.rollback_artifact.is_some() {
            return Vec::new();
        }
        let health = self
            .node
            .env
            .agents
            .health_of(&plan.servers().collect::<Vec<_>>());
        plan.servers()
            .filter(|s| {
                health
                    .get(*s)
                    .is_some_and(|h| !h.disconnected && h.installed_sha256.is_empty())
            })
            .cloned()
            .collect()
    }

    /// Starts an upgrade (or, with `dry_run`, only resolves its plan). Answers once the
    /// first state is stored.
    pub async fn start(&self, r: StartRequest, by: &str) -> Result<Upgrade, ControlError> {
        let plan = self.resolve_plan(&r)?;
        if plan.on_failure == FailureAction::Rollback {
            let stuck = self.unrollbackable(&plan);
            if !stuck.is_empty() {
                return Err(ControlError::Invalid(format!(
                    "on_failure = rollback, but {} run(s) a version installed outside rollgate \
                     and could not be rolled back; give --rollback-artifact and \
                     --rollback-sha256 for the version they run",
                    stuck.join(", ")
                )));
            }
        }
        if r.dry_run {
            let (u, _) = Upgrade::new(plan).map_err(|e| ControlError::Invalid(e.to_string()))?;
            return Ok(u);
        }
        let lead = self.lead().await?;
        let one_at_a_time = self.lock_start(&r.pool).await;
        let pool = self.pool(&r.pool)?.clone();
        let next_event = match progress::load_upgrade(&self.node.env.store, &r.pool).await {
            Ok(Some(stored)) => {
                let cur = match self.node.driver(&r.pool) {
                    Some(h) => h.status.borrow().clone().unwrap_or(stored.upgrade.clone()),
                    None => stored.upgrade.clone(),
                };
                if !cur.is_terminal() {
                    return Err(ControlError::AlreadyRunning {
                        plan: cur.plan.id,
                        pool: r.pool,
                    });
                }
                stored.next_event
            }
            Ok(None) => 0,
            // Nothing can be resumed from an unreadable record: a new plan replaces it, and
            // its history goes on after the last stored event.
            Err(ProgressError::Unreadable { .. }) => {
                progress::next_event_after_history(&self.node.env.store, &r.pool).await?
            }
            Err(e) => return Err(e.into()),
        };
        self.paired_idle(&pool).await?;
        let (u, mut actions) =
            Upgrade::new(plan).map_err(|e| ControlError::Invalid(e.to_string()))?;
        actions.insert(
            0,
            Action::Record {
                kind: "upgrade_requested".into(),
                server: None,
                domain: None,
                message: format!(
                    "{by} asked for version {} on pool {} (plan {})",
                    u.plan.version, u.plan.pool, u.plan.id
                ),
            },
        );
        let record = UpgradeRecord {
            upgrade: u,
            next_event,
            started_by: by.to_owned(),
            started_ms: self.node.env.clock.wall_ms(),
        };
        self.launch(&lead, pool, record, actions, one_at_a_time)
            .await
    }

    /// `pool` and the pools paired with it (its `paired_pool`, and every pool that names it as
    /// its own), from the config: joining servers never change pairing.
    fn with_partners(&self, pool: &str) -> BTreeSet<String> {
        let mut set: BTreeSet<String> = self
            .node
            .cfg
            .pools
            .iter()
            .filter(|p| p.paired_pool.as_deref() == Some(pool))
            .map(|p| p.name.clone())
            .chain(self.node.cfg.pool(pool).and_then(|p| p.paired_pool.clone()))
            .collect();
        set.insert(pool.to_owned());
        set
    }

    /// Takes the start locks of `pool` and of its paired pools (see [`crate::pool_locks`]).
    async fn lock_start(&self, pool: &str) -> PoolGuard {
        self.node.start_locks.lock(&self.with_partners(pool)).await
    }

    /// Refuses while a pool paired with `pool` (its `paired_pool`, or a pool that names it as
    /// its own) has an upgrade that has not ended, or has its traffic on `pool` (failed over
    /// into it): the backup must be whole while its primary is upgraded or served by it, and
    /// the other way round.
    async fn paired_idle(&self, pool: &PoolConfig) -> Result<(), ControlError> {
        let mut partners = self.with_partners(&pool.name);
        partners.remove(&pool.name);
        for paired in partners {
            if self.node.cfg.pool(&paired).is_none() {
                continue;
            }
            // A driver registered but not yet stored (its start is in flight) is busy too.
            if let Some(h) = self
                .node
                .driver(&paired)
                .filter(|h| !h.ended.is_cancelled())
            {
                let plan = h.status.borrow().as_ref().map(|u| u.plan.id.clone());
                if h.status.borrow().as_ref().is_none_or(|u| !u.is_terminal()) {
                    return Err(ControlError::PairedBusy {
                        pool: pool.name.clone(),
                        paired,
                        plan: plan.unwrap_or_else(|| "starting".into()),
                    });
                }
                continue;
            }
            if let Some(u) = self.upgrade(&paired).await? {
                if !u.is_terminal() {
                    return Err(ControlError::PairedBusy {
                        pool: pool.name.clone(),
                        paired,
                        plan: u.plan.id,
                    });
                }
            }
            // An ended upgrade (or an operator) may have left the partner's traffic here.
            let record = progress::load_failover(&self.node.env.store, &paired).await?;
            if record.is_some_and(|r| r.failed_over && r.paired_pool == pool.name) {
                return Err(ControlError::PairedFailedOver {
                    pool: pool.name.clone(),
                    paired,
                });
            }
        }
        Ok(())
    }

    /// Starts a driver for a new plan (`record`, with its first `actions`) and answers once
    /// its first state is stored. Refused while a driver for the pool still runs.
    ///
    /// `checked` (the pool's start locks, held since the checks) is released once the driver
    /// is registered, before its first write: from then on the registered driver itself
    /// refuses a second start of the pool, and counts as busy for its paired pool, so starts of
    /// its partners need not wait for this one's store round trip.
    async fn launch(
        &self,
        lead: &Leadership,
        pool: PoolConfig,
        record: UpgradeRecord,
        actions: Vec<Action>,
        checked: PoolGuard,
    ) -> Result<Upgrade, ControlError> {
        let name = pool.name.clone();
        let (tx, rx) = oneshot::channel();
        self.node
            .start_driver(lead, pool, record, actions, Origin::New, Some(tx))
            .map_err(|plan| ControlError::AlreadyRunning {
                plan,
                pool: name.clone(),
            })?;
        drop(checked);
        self.node.forget_unreadable(&name);
        Ok(rx
            .await
            .map_err(|_| ControlError::LeadershipLost("the driver stopped".into()))??)
    }

    /// Sends `cmd` to the pool's running upgrade; answers once the resulting state is stored,
    /// so an acknowledged command survives a leader change.
    pub async fn command(
        &self,
        pool: &str,
        cmd: UpgradeCommand,
        by: &str,
    ) -> Result<Upgrade, ControlError> {
        self.pool(pool)?;
        self.lead().await?;
        let live = self.node.driver(pool).filter(|h| !h.ended.is_cancelled());
        let h = match (live, cmd) {
            (Some(h), _) => h,
            // Nothing runs: a rollback of the last upgrade, if it completed, is a new plan.
            (None, UpgradeCommand::Rollback) => return self.revert(pool, by).await,
            (None, _) => return Err(ControlError::NoUpgrade(pool.into())),
        };
        let by = by.to_string();
        let event = match cmd {
            UpgradeCommand::Pause => Event::Pause { by },
            UpgradeCommand::Resume => Event::Resume { by },
            UpgradeCommand::Abort => Event::Abort { by },
            UpgradeCommand::Rollback => Event::Rollback { by },
        };
        let (tx, rx) = oneshot::channel();
        h.commands
            .send(Command { event, reply: tx })
            .await
            .map_err(|_| ControlError::NoUpgrade(pool.into()))?;
        match rx.await {
            Ok(answer) => Ok(answer?),
            Err(_) => {
                // The driver dropped the command unanswered: it is ending (its task marks it
                // ended a moment after it drops its queue).
                let _ = tokio::time::timeout(Duration::from_secs(1), h.ended.cancelled()).await;
                if h.ended.is_cancelled() && self.node.leadership().is_some() {
                    // Its upgrade ended with the command still queued, and this node still
                    // leads: there is no upgrade left to command. Found by the roll-out
                    // simulation: taken for a lost leadership, it stopped a roll-out's driver
                    // for good.
                    Err(ControlError::NoUpgrade(pool.into()))
                } else {
                    Err(ControlError::LeadershipLost("the driver stopped".into()))
                }
            }
        }
    }

    /// Rolls the pool's completed upgrade back: a new plan, walked backward domain by domain,
    /// every server back to its previous version, with the same readiness gate and safety as
    /// a forward upgrade. Answers once the new plan is stored.
    async fn revert(&self, pool: &str, by: &str) -> Result<Upgrade, ControlError> {
        let lead = self.lead().await?;
        let one_at_a_time = self.lock_start(pool).await;
        let cfg = self.pool(pool)?.clone();
        if self
            .node
            .driver(pool)
            .is_some_and(|h| !h.ended.is_cancelled())
        {
            return Err(ControlError::AlreadyRunning {
                plan: String::new(),
                pool: pool.into(),
            });
        }
        let stored = progress::load_upgrade(&self.node.env.store, pool)
            .await?
            .ok_or_else(|| ControlError::NoUpgrade(pool.into()))?;
        self.paired_idle(&cfg).await?;
        let id = format!("{pool}-{}", self.node.env.clock.wall_ms());
        let reverted = Upgrade::revert(&stored.upgrade, id, by)
            .map_err(|e| ControlError::Invalid(format!("rollback: {e}")))?;
        let Some((u, mut actions)) = reverted else {
            return Err(ControlError::Invalid(format!(
                "rollback: the last upgrade of pool {pool} (plan {}) is {}; only a running, paused or completed upgrade can be rolled back",
                stored.upgrade.plan.id,
                stored.upgrade.status.name()
            )));
        };
        actions.insert(
            0,
            Action::Record {
                kind: "upgrade_requested".into(),
                server: None,
                domain: None,
                message: format!(
                    "{by} asked to roll back completed plan {} on pool {pool} (plan {})",
                    stored.upgrade.plan.id, u.plan.id
                ),
            },
        );
        let record = UpgradeRecord {
            upgrade: u,
            next_event: stored.next_event,
            started_by: by.to_owned(),
            started_ms: self.node.env.clock.wall_ms(),
        };
        self.launch(&lead, cfg, record, actions, one_at_a_time)
            .await
    }

    /// The pool's readiness now, and whether its traffic is on its paired pool. While an
    /// upgrade runs, the plan's domains are shown and its servers in flight count as down.
    pub async fn readiness(&self, pool: &str) -> Result<(PoolReadiness, bool), ControlError> {
        let cfg = self.pool(pool)?.clone();
        let current = self.upgrade(pool).await?;
        let (spec, down, running) = match current.as_ref().filter(|u| !u.is_terminal()) {
            Some(u) => (
                PoolSpec::for_plan(&u.plan, Some(&cfg)),
                u.down_servers().into_iter().collect(),
                u.in_flight() > 0,
            ),
            None => (cfg.spec(), BTreeSet::new(), false),
        };
        let r = driver::evaluate(&self.node.env, &spec, &down, running);
        let failed_over = progress::load_failover(&self.node.env.store, pool)
            .await
            .ok()
            .flatten()
            .is_some_and(|f| f.failed_over);
        Ok((r, failed_over))
    }

    /// `server` (named by its agent's certificate) joins `pool` at `address`, in `domain` (or
    /// one assigned). `Ok(false)`: nothing changed (already so, or the config lists it, and
    /// its entry there is what counts). Leader only: the membership is a fenced write.
    pub async fn join(
        &self,
        server: &str,
        pool: &str,
        domain: Option<String>,
        address: &str,
    ) -> Result<bool, ControlError> {
        let invalid = ControlError::Invalid;
        rollgate_common::config::check_name("server", server).map_err(invalid)?;
        self.pool(pool)?;
        if let Some(d) = &domain {
            rollgate_common::config::check_name("upgrade_domain", d).map_err(invalid)?;
        }
        let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || address.len() > 256 {
            return Err(invalid(format!(
                "address: {} is not host:port",
                rollgate_common::quote::quoted(address)
            )));
        }
        if self.node.is_configured(server) {
            return Ok(false);
        }
        let lead = self.lead().await?;
        let mut members = self.node.members();
        let record = MemberRecord {
            address: address.to_owned(),
            upgrade_domain: domain,
            joined_ms: self.node.env.clock.wall_ms(),
        };
        let same = members
            .get(pool)
            .and_then(|m| m.get(server))
            .is_some_and(|c| {
                c.address == record.address && c.upgrade_domain == record.upgrade_domain
            });
        if same {
            return Ok(false);
        }
        let others: Vec<String> = members
            .iter()
            .filter(|(p, m)| p.as_str() != pool && m.contains_key(server))
            .map(|(p, _)| p.clone())
            .collect();
        self.membership_write(
            &lead,
            membership::join_writes(pool, server, &record, &others),
        )
        .await?;
        for p in &others {
            if let Some(m) = members.get_mut(p) {
                m.remove(server);
            }
        }
        tracing::info!(%server, %pool, address = %record.address, domain = ?record.upgrade_domain, "server joined");
        members
            .entry(pool.to_owned())
            .or_default()
            .insert(server.to_owned(), record);
        self.node.set_members(members);
        Ok(true)
    }

    /// `server` leaves every pool it joined. `Ok(false)`: it had joined none.
    pub async fn leave(&self, server: &str) -> Result<bool, ControlError> {
        let mut members = self.node.members();
        let pools: Vec<String> = members
            .iter()
            .filter(|(_, m)| m.contains_key(server))
            .map(|(p, _)| p.clone())
            .collect();
        if pools.is_empty() {
            return Ok(false);
        }
        let lead = self.lead().await?;
        let now = self.node.env.clock.wall_ms();
        let ops = pools
            .iter()
            .flat_map(|p| membership::leave_writes(p, server, now))
            .collect();
        self.membership_write(&lead, ops).await?;
        for p in &pools {
            if let Some(m) = members.get_mut(p) {
                m.remove(server);
            }
        }
        tracing::info!(%server, ?pools, "server left");
        self.node.set_members(members);
        Ok(true)
    }

    async fn membership_write(
        &self,
        lead: &Leadership,
        ops: Vec<crate::store::WriteOp>,
    ) -> Result<(), ControlError> {
        match self.node.env.store.fenced_write(lead, ops).await {
            Ok(_) => Ok(()),
            Err(StoreError::Fenced { epoch }) => Err(ControlError::LeadershipLost(format!(
                "store fenced epoch {epoch}"
            ))),
            Err(e) => Err(ControlError::Store {
                retryable: e.is_retryable(),
                message: e.to_string(),
            }),
        }
    }

    /// Every configured pool's readiness.
    pub async fn inventory(&self) -> Result<Vec<(PoolReadiness, bool)>, ControlError> {
        let mut out = Vec::new();
        for p in self.node.pools() {
            out.push(self.readiness(&p.name).await?);
        }
        Ok(out)
    }

    /// Fails the pool over to its paired pool (or back) at an operator's request.
    pub async fn failover(&self, pool: &str, over: bool, by: &str) -> Result<String, ControlError> {
        let cfg = self.pool(pool)?.clone();
        let lead = self.lead().await?;
        let paired = cfg.paired_pool.clone().ok_or_else(|| {
            ControlError::Invalid(format!("pool {pool} has no paired_pool to fail over to"))
        })?;
        driver::fail_over(&self.node.env, &lead, &cfg, &paired, over, by)
            .await
            .map_err(ControlError::Hook)
    }

    /// A page of a pool's history (see [`progress::EventRange`]; a limit of 0 means 100, and
    /// no page holds more than [`progress::MAX_EVENTS_PAGE`]).
    pub async fn events(
        &self,
        pool: &str,
        mut range: progress::EventRange,
    ) -> Result<progress::EventPage, ControlError> {
        self.pool(pool)?;
        if range.limit == 0 {
            range.limit = 100;
        }
        let page = progress::load_events(&self.node.env.store, pool, range).await?;
        // The leader's records not stored yet (a chain's steps are stored with the state that
        // ends it): shown at once, here.
        let pending: Vec<progress::EventRecord> = match self.node.driver(pool) {
            Some(h) if self.node.leadership().is_some() => {
                crate::driver::lock_pending(&h.pending).clone()
            }
            _ => Vec::new(),
        };
        Ok(progress::merge_pending(page, pending, range))
    }

    /// The newest `limit` past plans of a pool (20 when 0; at most 100), oldest first.
    pub async fn history(
        &self,
        pool: &str,
        limit: u32,
    ) -> Result<Vec<progress::HistoryRecord>, ControlError> {
        self.pool(pool)?;
        let limit = if limit == 0 { 20 } else { limit as usize };
        Ok(progress::load_history(&self.node.env.store, pool, limit).await?)
    }

    /// Starts a roll-out (or, with `dry_run`, resolves it): every pool's plan is resolved
    /// first, so a bad option fails here for all pools rather than later for one. Answers
    /// once the roll-out is stored.
    pub async fn start_rollout(
        &self,
        r: RolloutRequest,
        by: &str,
    ) -> Result<crate::rollout::Rollout, ControlError> {
        use crate::rollout::{Rollout, RolloutPlan, MAX_POOLS};
        let invalid = ControlError::Invalid;
        if !r.template.pool.is_empty() {
            return Err(invalid(
                "upgrade.pool: a roll-out names its pools in pools or selector, not here".into(),
            ));
        }
        let mut pools: Vec<String> = match (r.pools.is_empty(), r.selector.trim().is_empty()) {
            (false, true) => {
                let mut seen = BTreeSet::new();
                for p in &r.pools {
                    self.pool(p)?;
                    if !seen.insert(p.as_str()) {
                        return Err(invalid(format!("pools: pool {p} is named twice")));
                    }
                }
                r.pools.clone()
            }
            (true, false) => {
                let sel = crate::config::parse_selector(&r.selector).map_err(invalid)?;
                let matched: Vec<String> = self
                    .node
                    .pools()
                    .into_iter()
                    .filter(|p| p.matches(&sel))
                    .map(|p| p.name)
                    .collect();
                if matched.is_empty() {
                    return Err(invalid(format!(
                        "selector: no pool carries the labels {}",
                        rollgate_common::quote::quoted(&r.selector)
                    )));
                }
                matched
            }
            (true, true) => {
                return Err(invalid(
                    "pools: name the pools, or give a selector (key=value)".into(),
                ))
            }
            (false, false) => {
                return Err(invalid(
                    "pools: give pool names or a selector, not both".into(),
                ))
            }
        };
        if pools.len() > MAX_POOLS {
            return Err(invalid(format!(
                "pools: {} pools; a roll-out takes at most {MAX_POOLS}",
                pools.len()
            )));
        }
        if let Some(c) = &r.canary {
            let i = pools.iter().position(|p| p == c).ok_or_else(|| {
                invalid(format!(
                    "canary: pool {} is not one of the roll-out's pools",
                    rollgate_common::quote::quoted(c)
                ))
            })?;
            let c = pools.remove(i);
            pools.insert(0, c);
        }
        let max_in_flight = r.max_in_flight.unwrap_or(1);
        if max_in_flight == 0 {
            return Err(invalid("max_in_flight: must be at least 1".into()));
        }
        let mut paired = std::collections::BTreeMap::new();
        for name in &pools {
            let mut req = r.template.clone();
            req.pool = name.clone();
            req.dry_run = true;
            self.resolve_plan(&req).map_err(|e| match e {
                ControlError::Invalid(m) => invalid(format!("pool {name}: {m}")),
                e => e,
            })?;
            if let Some(p) = self.pool(name)?.paired_pool {
                paired.insert(name.clone(), p);
            }
        }
        let now = self.node.env.clock.wall_ms();
        let mut plan = RolloutPlan {
            id: format!("rollout-{now}"),
            max_in_flight: max_in_flight.min(u32::try_from(pools.len()).unwrap_or(u32::MAX)),
            pools,
            paired,
            canary: r.canary.clone(),
            template: StartRequest {
                dry_run: false,
                ..r.template.clone()
            },
            started_by: by.to_owned(),
            started_ms: now,
        };
        if r.dry_run {
            return Ok(Rollout::new(plan).0);
        }
        let lead = self.lead().await?;
        let _one_at_a_time = self.node.rollout_lock.lock().await;
        if let Some(h) = self.node.rollout().filter(|h| !h.ended.is_cancelled()) {
            return Err(ControlError::RolloutRunning(h.id));
        }
        let ids = progress::rollout_ids(&self.node.env.store, progress::KEEP_ROLLOUTS + 1).await?;
        if let Some(newest) = ids.last() {
            if let Some(stored) = progress::load_rollout(&self.node.env.store, newest).await? {
                if !stored.is_ended() {
                    return Err(ControlError::RolloutRunning(stored.plan.id));
                }
            }
            // Ids sort by time: a clock that stepped back must not reuse or precede one.
            let last_ms = newest
                .strip_prefix("rollout-")
                .and_then(|m| m.parse::<u64>().ok())
                .unwrap_or(0);
            if last_ms >= now {
                plan.id = format!("rollout-{}", last_ms + 1);
            }
        }
        for name in &plan.pools {
            if let Some(u) = self.upgrade(name).await? {
                if !u.is_terminal() {
                    return Err(ControlError::AlreadyRunning {
                        plan: u.plan.id,
                        pool: name.clone(),
                    });
                }
            }
        }
        // Keep the newest KEEP_ROLLOUTS, this one included.
        let drop = (ids.len() + 1).saturating_sub(progress::KEEP_ROLLOUTS);
        if drop > 0 {
            let ops = ids[..drop]
                .iter()
                .map(|id| crate::store::WriteOp::Delete {
                    key: progress::rollout_key(id),
                })
                .collect();
            self.membership_write(&lead, ops).await?;
        }
        let (rollout, actions) = Rollout::new(plan);
        tracing::info!(rollout = %rollout.plan.id, pools = rollout.plan.pools.len(), max_in_flight = rollout.plan.max_in_flight, %by, "roll-out requested");
        let (tx, rx) = oneshot::channel();
        self.node
            .start_rollout_driver(&lead, rollout, actions, false, Some(tx))
            .map_err(ControlError::RolloutRunning)?;
        rx.await
            .map_err(|_| ControlError::LeadershipLost("the roll-out driver stopped".into()))?
    }

    /// Roll-out `id` (the newest when `None`): the leader's live one, else the store.
    pub async fn rollout(
        &self,
        id: Option<&str>,
    ) -> Result<Option<crate::rollout::Rollout>, ControlError> {
        if self.node.leadership().is_some() {
            if let Some(h) = self.node.rollout() {
                if id.is_none_or(|i| i == h.id) {
                    return Ok(Some(h.status.borrow().clone()));
                }
            }
        }
        Ok(match id {
            Some(id) => progress::load_rollout(&self.node.env.store, id).await?,
            None => progress::newest_rollout(&self.node.env.store).await?,
        })
    }

    /// The roll-out to follow: live on the leader.
    pub async fn watch_rollout(&self, id: Option<&str>) -> Result<WatchedRollout, ControlError> {
        self.lead().await?;
        match self.node.rollout() {
            Some(h) if id.is_none_or(|i| i == h.id) => Ok(WatchedRollout::Live(h.status)),
            _ => Ok(WatchedRollout::Once(Box::new(self.rollout(id).await?))),
        }
    }

    /// Pauses, resumes or aborts the running roll-out (`id`, or whichever runs); answers
    /// once the resulting state is stored.
    pub async fn rollout_command(
        &self,
        id: Option<&str>,
        cmd: UpgradeCommand,
        by: &str,
    ) -> Result<crate::rollout::Rollout, ControlError> {
        use crate::rollout::RolloutEvent;
        self.lead().await?;
        let by = by.to_owned();
        let event = match cmd {
            UpgradeCommand::Pause => RolloutEvent::Pause { by },
            UpgradeCommand::Resume => RolloutEvent::Resume { by },
            UpgradeCommand::Abort => RolloutEvent::Abort { by },
            UpgradeCommand::Rollback => {
                return Err(ControlError::Invalid(
                    "rollback: roll back each pool with rollgate upgrade rollback".into(),
                ))
            }
        };
        let live = self
            .node
            .rollout()
            .filter(|h| !h.ended.is_cancelled() && id.is_none_or(|i| i == h.id));
        let Some(h) = live else {
            return match self.rollout(id).await? {
                Some(r) => Err(ControlError::Invalid(format!(
                    "roll-out {} is {}: nothing to {}",
                    r.plan.id,
                    r.status.name(),
                    match cmd {
                        UpgradeCommand::Pause => "pause",
                        UpgradeCommand::Resume => "resume",
                        _ => "abort",
                    }
                ))),
                None => Err(ControlError::NoRollout(id.unwrap_or("").to_owned())),
            };
        };
        let (tx, rx) = oneshot::channel();
        h.commands
            .send(crate::rollout_driver::RolloutCommand { event, reply: tx })
            .await
            .map_err(|_| ControlError::LeadershipLost("the roll-out driver stopped".into()))?;
        rx.await
            .map_err(|_| ControlError::LeadershipLost("the roll-out driver stopped".into()))?
    }

    /// Who leads.
    pub async fn leader(&self) -> Result<LeaderView, ControlError> {
        let leader = self
            .node
            .env
            .store
            .leader()
            .await
            .map_err(|e| ControlError::Store {
                retryable: e.is_retryable(),
                message: e.to_string(),
            })?;
        let mine = self.node.leadership();
        Ok(LeaderView {
            this_is_leader: matches!((&leader, mine), (Some(l), Some(m)) if m.epoch == l.epoch),
            leader,
            this_id: self.node.cfg.id.clone(),
        })
    }

    /// Why `pool`'s stored upgrade cannot be shown, if the leader found it unreadable.
    pub fn unreadable(&self, pool: &str) -> Option<String> {
        self.node.unreadable(pool)
    }
}
