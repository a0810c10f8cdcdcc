//! The invariants, checked at every step of a simulated run (DESIGN.md and
//! `shared/reference/reliability.md` §7):
//!
//! - **I1** at most one upgrade domain out of service at a time: when a server goes down, every
//!   other server the upgrade has down is in the same domain;
//! - **I2** never fewer than `min_active` active servers because of the upgrade: when a server
//!   goes down, the others still active number at least `min_active` (unless the pool is failed
//!   over, or a fault outside rollgate's control just made a server inactive);
//! - **I3** no server left out of service at the end unless the upgrade lists it with a reason;
//! - **I4** each server installed at most once per plan and direction (exactly once when the
//!   upgrade completed);
//! - **I5** a deposed leader's commands are refused: each agent accepts epochs in
//!   non-decreasing order, and elections only raise the epoch;
//! - **I6** progress survives: the run ends within its time bound after the faults stop;
//! - **I7** store writes are fenced: every commit carries the epoch of the lease holder;
//! - **store before acting**: an agent never admits an operation that no stored state put in
//!   flight, a failover hook never runs before the stored state says so, and every state the
//!   control layer acknowledges (start, pause, abort, rollback) is a stored one.
//!
//! With several pools (a roll-out run), I1–I4 hold per pool, and for the roll-out:
//! - **R1** never a pool together with its paired pool: when a server goes down behind the gate,
//!   the paired pool's upgrade has ended (nothing in flight), and its traffic is not on this
//!   pool (failed over into it);
//! - **R2** at most `max_in_flight` pools' upgrades unended when a server goes down;
//! - **R3** the canary's upgrade has ended before a server of another pool goes down;
//! - **R4** each pool gets one plan: a new leader resuming a start finds the plan, never makes
//!   a second one.

use rollgate_coordinator::engine::{Direction, DomainPhase, ServerPhase, Status, Step, Upgrade};
use rollgate_coordinator::progress::{self, UpgradeRecord};
use std::collections::{BTreeMap, BTreeSet};

/// The pool of a single-pool run.
pub const SINGLE_POOL: &str = "pool-a";

/// One pool as the checker knows it.
#[derive(Debug, Clone, Default)]
pub struct PoolRules {
    pub name: String,
    /// Servers and their upgrade domain (1-based).
    pub servers: Vec<(String, usize)>,
    pub min_active: usize,
    pub paired: Option<String>,
}

/// The roll-out's rules, in a roll-out run.
#[derive(Debug, Clone, Default)]
pub struct RolloutRules {
    pub max_in_flight: usize,
    pub canary: Option<String>,
}

/// Collects violations; a run passes when there are none.
#[derive(Debug, Default)]
pub struct Checker {
    domain_of: BTreeMap<String, String>,
    pool_of: BTreeMap<String, String>,
    pools: BTreeMap<String, PoolRules>,
    rollout: Option<RolloutRules>,
    /// Every plan id stored per pool.
    plans: BTreeMap<String, BTreeSet<String>>,
    /// When each plan was started, as first stored.
    plan_starts: BTreeMap<String, u64>,
    /// Pools whose traffic is on their paired pool (the failover hook ran last with `over`).
    failed_over_pools: BTreeSet<String>,
    /// The last stored upgrade of each pool.
    pub lasts: BTreeMap<String, UpgradeRecord>,
    pub violations: Vec<String>,
    /// Operation ids some stored state put in flight.
    committed_ops: BTreeSet<String>,
    /// The latest stored upgrade states, to recognise acknowledged ones.
    committed_states: Vec<Upgrade>,
    last_epoch_elected: i64,
    last_accepted: BTreeMap<String, u64>,
    fenced: BTreeMap<String, u64>,
    /// Counters for the report.
    pub commits: u64,
    /// Keys and values put by those commits, in bytes.
    pub bytes: u64,
    pub admissions: u64,
    pub downs: u64,
}

impl Checker {
    /// One pool, [`SINGLE_POOL`].
    pub fn new(servers: &[(String, usize)], min_active: usize) -> Checker {
        Checker::with_pools(
            &[PoolRules {
                name: SINGLE_POOL.into(),
                servers: servers.to_vec(),
                min_active,
                paired: Some("pool-b".into()),
            }],
            None,
        )
    }

    /// Several pools, and a roll-out's rules when a roll-out drives them.
    pub fn with_pools(pools: &[PoolRules], rollout: Option<RolloutRules>) -> Checker {
        let each = || {
            pools
                .iter()
                .flat_map(|p| p.servers.iter().map(move |s| (p, s)))
        };
        Checker {
            domain_of: each()
                .map(|(_, (s, d))| (s.clone(), format!("ud-{d}")))
                .collect(),
            pool_of: each()
                .map(|(p, (s, _))| (s.clone(), p.name.clone()))
                .collect(),
            pools: pools.iter().map(|p| (p.name.clone(), p.clone())).collect(),
            rollout,
            ..Checker::default()
        }
    }

    /// The last stored upgrade of `server`'s pool.
    pub fn last_of(&self, server: &str) -> Option<&UpgradeRecord> {
        self.pool_of.get(server).and_then(|p| self.lasts.get(p))
    }

    /// Whether the last stored upgrade of `server`'s pool is failed over.
    pub fn failed_over(&self, server: &str) -> bool {
        self.last_of(server).is_some_and(|r| r.upgrade.failed_over)
    }

    fn violate(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    /// A store commit by the holder of `epoch` (the store checked the fence) of `keys`;
    /// `state` is the pool's upgrade as the store holds it after the commit, if the commit
    /// touched it. Returns the operations this commit puts in flight for the first time that
    /// take a server down behind the readiness gate (drain or stop of a forward or backward
    /// chain).
    pub fn on_commit(
        &mut self,
        keys: &[String],
        state: Option<Result<UpgradeRecord, String>>,
        epoch: u64,
    ) -> Vec<String> {
        self.commits += 1;
        let mut gated = Vec::new();
        if epoch == 0 {
            self.violate(format!("I7: unfenced write of {keys:?}"));
        }
        let record = match state {
            None => return gated,
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                self.violate(format!("stored upgrade does not decode: {e}"));
                return gated;
            }
        };
        let up = &record.upgrade;
        for (server, p) in &up.servers {
            if let ServerPhase::InFlight { step, attempt } = p.phase {
                let op = Upgrade::op_id(&up.plan.id, server, p.direction, step, attempt);
                let new = self.committed_ops.insert(op.clone());
                if new
                    && attempt == 1
                    && matches!(step, Step::Drain | Step::Stop)
                    && p.direction != Direction::Restore
                {
                    gated.push(op);
                }
                // The stored step accounts for the rest of its chain: a new leader sends it
                // again and the steps after it follow with these ids (see `progress`).
                if step != Step::Prepare {
                    let mut next = step.next(p.direction);
                    while let Some(s) = next {
                        self.committed_ops.insert(Upgrade::op_id(
                            &up.plan.id,
                            server,
                            p.direction,
                            s,
                            attempt,
                        ));
                        next = s.next(p.direction);
                    }
                }
            }
        }
        self.committed_states.push(up.clone());
        if self.committed_states.len() > 16 {
            self.committed_states.remove(0);
        }
        // A write retried after its answer was lost puts the same plan again, unchanged; a
        // second start of the plan would put it with its own start time.
        let plan_written = keys.contains(&progress::plan_key(&up.plan.pool));
        let first_start = *self
            .plan_starts
            .entry(up.plan.id.clone())
            .or_insert(record.started_ms);
        if plan_written && first_start != record.started_ms && self.rollout.is_some() {
            self.violate(format!(
                "R4: plan {} of pool {} was started a second time (at {} ms, first at {first_start})",
                up.plan.id, up.plan.pool, record.started_ms
            ));
        }
        let plans = self.plans.entry(up.plan.pool.clone()).or_default();
        plans.insert(up.plan.id.clone());
        if self.rollout.is_some() && plans.len() > 1 {
            let ids: Vec<String> = plans.iter().cloned().collect();
            self.violate(format!(
                "R4: pool {} got more than one plan: {ids:?}",
                up.plan.pool
            ));
        }
        self.lasts.insert(up.plan.pool.clone(), record);
        gated
    }

    pub fn on_elected(&mut self, epoch: i64) {
        if epoch <= self.last_epoch_elected {
            self.violate(format!(
                "I5: epoch {epoch} elected after epoch {}",
                self.last_epoch_elected
            ));
        }
        self.last_epoch_elected = epoch;
    }

    pub fn on_fence(&mut self, server: &str, epoch: u64) {
        let e = self.fenced.entry(server.to_string()).or_default();
        *e = (*e).max(epoch);
    }

    /// An agent admits a new run of `op_id` at `epoch`.
    pub fn on_admit(&mut self, server: &str, op_id: &str, epoch: u64) {
        self.admissions += 1;
        if !self.committed_ops.contains(op_id) {
            self.violate(format!(
                "store before acting: {server} admitted {op_id} (epoch {epoch}) that no stored \
                 state put in flight"
            ));
        }
        let last = self.last_accepted.get(server).copied().unwrap_or_default();
        if epoch < last {
            self.violate(format!(
                "I5: {server} accepted epoch {epoch} after epoch {last}"
            ));
        }
        self.last_accepted
            .insert(server.to_string(), last.max(epoch));
        if self.fenced.get(server).is_some_and(|f| epoch < *f) {
            self.violate(format!(
                "I5: {server} accepted epoch {epoch} after being fenced at a newer one"
            ));
        }
    }

    /// `server` goes out of service by `op_id`; `active` are the other servers active now,
    /// `down` the other servers out of service.
    pub fn on_down(
        &mut self,
        server: &str,
        op_id: &str,
        active: &[String],
        down: &[String],
        recent_fault: bool,
        ms: u64,
    ) {
        self.downs += 1;
        let pool = self.pool_of.get(server).cloned().unwrap_or_default();
        let same_pool = |s: &&String| self.pool_of.get(*s) == Some(&pool);
        let active: Vec<String> = active.iter().filter(same_pool).cloned().collect();
        let down: Vec<String> = down.iter().filter(same_pool).cloned().collect();
        let min_active = self.pools.get(&pool).map_or(0, |p| p.min_active);
        let failed_over = self.failed_over(server);
        if !failed_over && !recent_fault && active.len() < min_active {
            self.violate(format!(
                "I2 at {ms} ms: {op_id} takes {server} down with only {} other server(s) \
                 active ({}), min_active {}",
                active.len(),
                active.join(", "),
                min_active
            ));
        }
        if let Some(rules) = self.rollout.clone() {
            self.rollout_rules(&rules, &pool, op_id, ms);
        }
        let mine = self.domain_of.get(server).cloned();
        let others: Vec<&String> = down
            .iter()
            .filter(|s| self.domain_of.get(*s) != mine.as_ref())
            .collect();
        if !others.is_empty() {
            self.violate(format!(
                "I1 at {ms} ms: {op_id} takes {server} ({}) down while {:?} of other domains \
                 are down",
                mine.unwrap_or_default(),
                others
            ));
        }
    }

    /// R1–R3 when `op_id` takes a server of `pool` down.
    fn rollout_rules(&mut self, rules: &RolloutRules, pool: &str, op_id: &str, ms: u64) {
        let unended = |r: &UpgradeRecord| !r.upgrade.is_terminal();
        let paired = self.pools.get(pool).and_then(|p| p.paired.clone());
        if let Some(paired) = paired {
            if let Some(r) = self.lasts.get(&paired).filter(|r| unended(r)) {
                self.violate(format!(
                    "R1 at {ms} ms: {op_id} takes a server of {pool} down while its paired pool \
                     {paired} is upgrading ({})",
                    r.upgrade.status
                ));
            }
            if self.failed_over_pools.contains(&paired) {
                self.violate(format!(
                    "R1 at {ms} ms: {op_id} takes a server of {pool} down while {pool} carries \
                     the traffic of its paired pool {paired} (failed over into it)"
                ));
            }
        }
        let flying: Vec<&String> = self
            .lasts
            .iter()
            .filter(|(_, r)| unended(r))
            .map(|(p, _)| p)
            .collect();
        if flying.len() > rules.max_in_flight {
            self.violate(format!(
                "R2 at {ms} ms: {op_id}: {} pools upgrading at once ({flying:?}), max {}",
                flying.len(),
                rules.max_in_flight
            ));
        }
        if let Some(canary) = rules.canary.as_deref().filter(|c| *c != pool) {
            let ended = self.lasts.get(canary).is_some_and(|r| !unended(r));
            if !ended {
                self.violate(format!(
                    "R3 at {ms} ms: {op_id} takes a server of {pool} down before the canary \
                     {canary} ended"
                ));
            }
        }
    }

    /// The failover hook ran for the leader at `epoch`.
    pub fn on_hook(&mut self, pool: &str, over: bool, epoch: u64) {
        if over {
            self.failed_over_pools.insert(pool.to_string());
        } else {
            self.failed_over_pools.remove(pool);
        }
        let failing_over = self
            .lasts
            .get(pool)
            .is_some_and(|r| r.upgrade.domain_phase == DomainPhase::FailingOver);
        if over && !failing_over {
            self.violate(format!(
                "store before acting: the failover hook ran (epoch {epoch}) before a stored \
                 state said to fail over"
            ));
        }
    }

    /// The control layer acknowledged `what` with `up`: it must be a stored state.
    pub fn on_ack(&mut self, what: &str, up: &Upgrade) {
        // The chain steps after a stored one are not stored again (see `progress`): an
        // acknowledged state is one a stored state accounts for.
        let stored = self
            .committed_states
            .iter()
            .any(|s| progress::state_accounts_for(s, up));
        if !stored {
            self.violate(format!(
                "store before acting: {what} was acknowledged with a state that was never stored \
                 ({})",
                up.status
            ));
        }
        let ok = match what {
            "pause" => matches!(up.status, Status::Paused { .. }) || up.status.is_terminal(),
            "abort" => up.status.is_terminal(),
            _ => true,
        };
        if !ok {
            self.violate(format!(
                "{what} acknowledged but the state is {}",
                up.status
            ));
        }
    }
}
